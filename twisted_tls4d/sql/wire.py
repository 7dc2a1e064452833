"""
The line format of the SQL server, shared by the server and its clients.

The client sends one SQL statement a line. The server answers each line it
takes with lines that each hold one JSON value: a JSON array is a row, a JSON
object is a message, and the first object with an ``ok`` member ends the
answer. ``docs/sql-protocol.md`` describes the format for people writing
clients.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

#: The version of the line format this module speaks, sent in the greeting.
PROTOCOL_VERSION = 1

#: The TCP port the SQL server listens on unless told otherwise.
DEFAULT_PORT = 19812

#: What ends each line the server sends; the server accepts LF or CRLF.
LINE_END = b"\n"

#: Error codes of ``{"ok": false, "error": {"code": ...}}``.
ERROR_SQL = "sql"
ERROR_ENCODING = "encoding"
ERROR_LINE_TOO_LONG = "line_too_long"
ERROR_INTERNAL = "internal"
ERROR_SHUTDOWN = "shutdown"
ERROR_REQUEST = "request"
ERROR_LOGIN = "login"
ERROR_LOGIN_REQUIRED = "login_required"
ERROR_ACCESS = "access"

#: The access levels of users, from least to most.
READ_ONLY = "read-only"
READ_WRITE = "read-write"
FULL = "full"
ACCESS_LEVELS = (READ_ONLY, READ_WRITE, FULL)

#: Column types of a header's ``types``: a value's type, ``null`` when the
#: first rows held only NULL there, ``any`` when they mixed types.
TYPE_INTEGER = "integer"
TYPE_REAL = "real"
TYPE_TEXT = "text"
TYPE_BLOB = "blob"
TYPE_NULL = "null"
TYPE_ANY = "any"

#: What this version of the protocol offers beyond plain statement lines,
#: announced in the greeting.
FEATURES = ("parameters", "types", "streaming", "login")

#: Python values of the non-finite REAL values, by their name on the wire.
_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}

#: A value a cell of a row can hold once decoded.
Value = int | float | str | bytes | None


class WireFormatError(ValueError):
    """
    A line received does not follow the SQL server's line format.
    """


def encode_line(message: Any) -> bytes:
    """
    Args:
        message: A JSON-serialisable value: a message object or a row.

    Returns:
        The value as one line of compact UTF-8 JSON, with its line end.
    """
    text = json.dumps(
        message, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    try:
        return text.encode("utf-8") + LINE_END
    except UnicodeEncodeError:
        # A lone surrogate (from a "\ud800" escape a client sent, quoted back
        # in a message) has no UTF-8 form; escaping everything outside ASCII
        # keeps it as JSON wrote it.
        text = json.dumps(
            message, ensure_ascii=True, separators=(",", ":"), allow_nan=False
        )
        return text.encode("ascii") + LINE_END


def encode_value(value: Value) -> Any:
    """
    Args:
        value: One cell as SQLite returned it.

    Returns:
        The cell as JSON: INTEGER, finite REAL, TEXT and NULL as themselves,
        a BLOB as ``{"blob": BASE64}`` and a non-finite REAL as
        ``{"real": "Infinity" | "-Infinity" | "NaN"}``.
    """
    if isinstance(value, bytes):
        return {"blob": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        name = (
            "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        )
        return {"real": name}
    return value


def decode_value(cell: Any) -> Value:
    """
    Args:
        cell: One cell of a row line, parsed from JSON.

    Returns:
        The Python value it stands for.

    Raises:
        WireFormatError: The cell is a list, or an object of an unknown kind.
            Its message does not quote the cell, which may hold a value a
            log must not show.
    """
    if cell is None or isinstance(cell, int | float | str):
        return cell
    if isinstance(cell, Mapping) and len(cell) == 1:
        if "blob" in cell and isinstance(cell["blob"], str):
            try:
                return base64.b64decode(cell["blob"], validate=True)
            except binascii.Error as e:
                msg = f"A blob cell does not hold valid base64 ({e})."
                raise WireFormatError(msg) from e
        if "real" in cell and cell["real"] in _NON_FINITE:
            return _NON_FINITE[cell["real"]]
    msg = (
        f"A cell that is {_json_kind(cell)} is not a value of this protocol "
        'version: a value is null, a number, a string, {"blob": BASE64} or '
        '{"real": "NaN" | "Infinity" | "-Infinity"}.'
    )
    raise WireFormatError(msg)


def _json_kind(value: object) -> str:
    """
    Returns:
        What kind of JSON value a decoded value is, with its article, for
        messages that must not quote the value itself.
    """
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object of no kind this version knows"
    return "a value of another kind"


def decode_line(line: bytes) -> dict[str, Any] | list[Any]:
    """
    Args:
        line: One line from the server, without its line end.

    Returns:
        The message object or the row array it holds.

    Raises:
        WireFormatError: The line is not UTF-8 JSON, or holds neither an
            object nor an array.
    """
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        msg = f"The server sent a line that is not UTF-8 JSON ({e}): {line[:80]!r}"
        raise WireFormatError(msg) from e
    except RecursionError as e:
        msg = f"The server sent a line of JSON nested too deeply: {line[:80]!r}"
        raise WireFormatError(msg) from e
    if not isinstance(value, dict | list):
        msg = f"The server sent {value!r}, which is neither a message nor a row."
        raise WireFormatError(msg)
    return value


@attrs.frozen
class Request:
    """
    One line of a client, parsed.

    Attributes:
        statement: The SQL statement to run, or None for a login.
        parameters: The values of the statement's ``?`` placeholders.
        user: The user name of a login request.
        password: The password of a login request.
    """

    statement: str | None = None
    parameters: tuple[Value, ...] = ()
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


def parse_request(text: str) -> Request:
    """
    Args:
        text: One line of a client, decoded, without its line end and not
            blank.

    Returns:
        The request: the line itself as a statement unless it starts with
        ``{``, else the JSON request object it holds.

    Raises:
        WireFormatError: A JSON request is not valid JSON (or nests too
            deeply), or not one of ``{"sql": TEXT, "params": [VALUE, ...]}``
            and ``{"login": {"user": NAME, "password": TEXT}}``, or holds an
            escaped lone surrogate, which no UTF-8 text can carry. Its
            message quotes nothing of the request.
    """
    if not text.lstrip().startswith("{"):
        return Request(statement=text)
    try:
        request = json.loads(text)
    except ValueError as e:
        msg = f"The request is not valid JSON ({e}); see docs/sql-protocol.md."
        raise WireFormatError(msg) from e
    except RecursionError as e:
        msg = "The request nests JSON too deeply; see docs/sql-protocol.md."
        raise WireFormatError(msg) from e
    if isinstance(request, dict) and isinstance(request.get("sql"), str):
        parameters = request.get("params", [])
        if not isinstance(parameters, list):
            msg = "The request's params must be a JSON array of values."
            raise WireFormatError(msg)
        _check_text("sql", request["sql"])
        values = []
        for number, parameter in enumerate(parameters, 1):
            try:
                value = decode_value(parameter)
            except WireFormatError as e:
                msg = f"Parameter {number}: {e}"
                raise WireFormatError(msg) from e
            if isinstance(value, str):
                _check_text(f"parameter {number}", value)
            values.append(value)
        return Request(statement=request["sql"], parameters=tuple(values))
    login = request.get("login") if isinstance(request, dict) else None
    if (
        isinstance(login, dict)
        and isinstance(login.get("user"), str)
        and isinstance(login.get("password"), str)
    ):
        _check_text("login's user", login["user"])
        _check_text("login's password", login["password"])
        return Request(user=login["user"], password=login["password"])
    msg = (
        'The request is neither {"sql": ..., "params": [...]} nor '
        '{"login": {"user": ..., "password": ...}}; see '
        "docs/sql-protocol.md."
    )
    raise WireFormatError(msg)


def _check_text(what: str, text: str) -> None:
    """
    Raises:
        WireFormatError: ``text`` holds a lone surrogate (JSON's ``\\ud800``
            escape without its pair), which UTF-8 cannot encode; the message
            names ``what`` and the position, not the text.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        msg = (
            f"The request's {what} holds an escaped lone surrogate at character "
            f"{e.start}, which is not a character; escape characters outside "
            "the Basic Multilingual Plane as a surrogate pair, or send them as "
            "UTF-8."
        )
        raise WireFormatError(msg) from None


def statement_request(statement: str, parameters: Sequence[Value] = ()) -> bytes:
    """
    Args:
        statement: One SQL statement, which may span lines.
        parameters: The values of its ``?`` placeholders, in order.

    Returns:
        The request line carrying them.
    """
    request = {"sql": statement, "params": [encode_value(p) for p in parameters]}
    return encode_line(request)


def login_request(user: str, password: str) -> bytes:
    """
    Returns:
        The request line logging in as ``user``.
    """
    return encode_line({"login": {"user": user, "password": password}})


def hello(
    client: str | None,
    user: str | None = None,
    access: str | None = None,
) -> dict[str, Any]:
    """
    Args:
        client: The common name of the client's certificate, or None for a
            client without one.
        user: The user the session runs as, or None until a login.
        access: The user's access level, or None until a login.

    Returns:
        The greeting message the server sends once the TLS handshake is done.
    """
    return {
        "hello": {
            "server": "tls4d SQL server",
            "protocol": PROTOCOL_VERSION,
            "client": client,
            "user": user,
            "access": access,
            "login_required": user is None,
            "features": list(FEATURES),
        }
    }


def logged_in(user: str, access: str) -> dict[str, Any]:
    """
    Returns:
        The status answering a successful login.
    """
    return {"ok": True, "user": user, "access": access, "in_transaction": False}


def value_type(value: Value) -> str:
    """
    Returns:
        The column type of one value: ``integer``, ``real``, ``text``,
        ``blob`` or ``null``.
    """
    if value is None:
        return TYPE_NULL
    if isinstance(value, bytes):
        return TYPE_BLOB
    if isinstance(value, str):
        return TYPE_TEXT
    if isinstance(value, float):
        return TYPE_REAL
    return TYPE_INTEGER


def column_types(rows: Sequence[Sequence[Value]], width: int) -> list[str]:
    """
    Args:
        rows: The first rows of a result.
        width: How many columns it has.

    Returns:
        Each column's type as these rows show it: the type of its values
        other than NULL, ``null`` if there are none, ``any`` if they differ.
    """
    types = []
    for i in range(width):
        seen = {value_type(row[i]) for row in rows} - {TYPE_NULL}
        types.append(
            seen.pop() if len(seen) == 1 else (TYPE_ANY if seen else TYPE_NULL)
        )
    return types


def columns(names: Sequence[str], types: Sequence[str] | None = None) -> dict[str, Any]:
    """
    Args:
        names: The result's column names.
        types: Their types, if known.

    Returns:
        The header message naming the columns of a result and their types.
    """
    header: dict[str, Any] = {"columns": list(names)}
    if types is not None:
        header["types"] = list(types)
    return header


def success(rows: int, changes: int | None, in_transaction: bool) -> dict[str, Any]:
    """
    Args:
        rows: How many row lines the answer held.
        changes: How many rows an INSERT, UPDATE or DELETE changed, or None for
            other statements.
        in_transaction: Whether the session has a transaction open afterwards.

    Returns:
        The status message ending a successful answer.
    """
    status: dict[str, Any] = {"ok": True, "rows": rows}
    if changes is not None:
        status["changes"] = changes
    status["in_transaction"] = in_transaction
    return status


def failure(
    code: str,
    message: str,
    in_transaction: bool | None = None,
    sqlite_code: int | None = None,
    sqlite_name: str | None = None,
    sqlstate: str | None = None,
) -> dict[str, Any]:
    """
    Args:
        code: One of the ``ERROR_*`` codes.
        message: What went wrong, for people (SQLite's message for ``sql``).
        in_transaction: Whether the session has a transaction open
            afterwards, when known.
        sqlite_code: SQLite's extended result code, when known.
        sqlite_name: SQLite's name of that code, e.g. ``SQLITE_ERROR``.
        sqlstate: PostgreSQL's SQLSTATE, e.g. ``23505``, when known.

    Returns:
        The status message ending a failed answer.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if sqlite_code is not None:
        error["sqlite_code"] = sqlite_code
    if sqlite_name is not None:
        error["sqlite_name"] = sqlite_name
    if sqlstate is not None:
        error["sqlstate"] = sqlstate
    status: dict[str, Any] = {"ok": False, "error": error}
    if in_transaction is not None:
        status["in_transaction"] = in_transaction
    return status
