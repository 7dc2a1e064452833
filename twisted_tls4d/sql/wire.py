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
    return text.encode("utf-8") + LINE_END


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
    """
    if cell is None or isinstance(cell, int | float | str):
        return cell
    if isinstance(cell, Mapping) and len(cell) == 1:
        if "blob" in cell and isinstance(cell["blob"], str):
            try:
                return base64.b64decode(cell["blob"], validate=True)
            except binascii.Error as e:
                msg = f"The blob cell {cell!r} does not hold valid base64 ({e})."
                raise WireFormatError(msg) from e
        if "real" in cell and cell["real"] in _NON_FINITE:
            return _NON_FINITE[cell["real"]]
    msg = f"The cell {cell!r} is not a value of this protocol version."
    raise WireFormatError(msg)


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
    if not isinstance(value, dict | list):
        msg = f"The server sent {value!r}, which is neither a message nor a row."
        raise WireFormatError(msg)
    return value


def hello(client: str) -> dict[str, Any]:
    """
    Args:
        client: The common name of the client's certificate.

    Returns:
        The greeting message the server sends once the client is authenticated.
    """
    return {
        "hello": {
            "server": "tls4d SQL server",
            "protocol": PROTOCOL_VERSION,
            "client": client,
        }
    }


def columns(names: Sequence[str]) -> dict[str, Any]:
    """
    Returns:
        The header message naming the columns of a result.
    """
    return {"columns": list(names)}


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
) -> dict[str, Any]:
    """
    Args:
        code: One of the ``ERROR_*`` codes.
        message: What went wrong, for people (SQLite's message for ``sql``).
        in_transaction: Whether the session has a transaction open
            afterwards, when known.
        sqlite_code: SQLite's extended result code, when known.
        sqlite_name: SQLite's name of that code, e.g. ``SQLITE_ERROR``.

    Returns:
        The status message ending a failed answer.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if sqlite_code is not None:
        error["sqlite_code"] = sqlite_code
    if sqlite_name is not None:
        error["sqlite_name"] = sqlite_name
    status: dict[str, Any] = {"ok": False, "error": error}
    if in_transaction is not None:
        status["in_transaction"] = in_transaction
    return status
