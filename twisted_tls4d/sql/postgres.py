"""
One client's session with a PostgreSQL database, for an SQL server started
with ``--sql-database postgresql://...``: the same interface as the SQLite
`twisted_tls4d.sql.session.Session`, through psycopg 3.

Access levels are PostgreSQL's own privileges, never a filter of statements:
each level connects as its own login role, which the operator provisions
(``docs/sql-protocol.md``, "PostgreSQL"), and a session of a level below
``full`` checks on connecting that its role cannot do more than the level
allows (no superuser, no CREATE on the database or a schema, no TEMP, no
table it owns, no role it could switch to; for ``read-only`` no write
privilege on any table or sequence and no large-object creation). A
statement cannot lift these limits, whatever it sets, since the role it runs
as is fixed by the connection.

Every method but `PostgresSession.abandon` blocks and belongs in a database
thread; a lock makes the calls of one session run one at a time.
"""

from __future__ import annotations

import itertools
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.session import BATCH_BYTES, BATCH_ROWS, Answer, whole_answer

#: Seconds allowed to connect to PostgreSQL.
CONNECT_TIMEOUT = 10

#: Seconds allowed to ask PostgreSQL to cancel a statement.
CANCEL_TIMEOUT = 5.0

#: The URL schemes of PostgreSQL databases.
URL_SCHEMES = ("postgresql", "postgres")

#: SQLSTATEs that mean a statement was refused for its access.
_ACCESS_STATES = frozenset({"42501", "25006"})

#: PostgreSQL types loaded as Python values rather than as their text, by
#: name: everything else (numeric, dates, JSON, arrays...) reaches the client
#: as the text PostgreSQL prints for it.
_NATIVE_TYPES = frozenset(
    {"int2", "int4", "int8", "oid", "float4", "float8", "bytea", "bool", "text"}
)

#: The protocol's column type of each natively loaded PostgreSQL type OID.
_COLUMN_TYPES = {
    16: wire.TYPE_INTEGER,  # bool, sent as 1 or 0
    20: wire.TYPE_INTEGER,  # int8
    21: wire.TYPE_INTEGER,  # int2
    23: wire.TYPE_INTEGER,  # int4
    26: wire.TYPE_INTEGER,  # oid
    700: wire.TYPE_REAL,  # float4
    701: wire.TYPE_REAL,  # float8
    17: wire.TYPE_BLOB,  # bytea
}

#: What each access level allows, in words, for error messages.
_ALLOWS = {
    wire.READ_ONLY: "reading only",
    wire.READ_WRITE: "reading and changing rows but not the schema",
    wire.FULL: "everything its PostgreSQL role may do",
}

#: Checks of a role that must find nothing for a session below ``full``: each
#: a query returning the names of what the role could do too much with.
_ROLE_CHECKS = {
    "is a superuser or may create roles, databases or bypass row security": (
        "SELECT rolname FROM pg_roles WHERE rolname = current_user AND "
        "(rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls)"
    ),
    "may create schemas or temporary tables in the database": (
        "SELECT current_database() WHERE "
        "has_database_privilege(current_database(), 'CREATE') OR "
        "has_database_privilege(current_database(), 'TEMP')"
    ),
    "may create objects in a schema": (
        "SELECT nspname FROM pg_namespace WHERE "
        "has_schema_privilege(oid, 'CREATE') AND nspname NOT LIKE 'pg\\_%temp\\_%'"
    ),
    "owns tables or other relations (through its membership)": (
        "SELECT relname FROM pg_class WHERE pg_has_role(relowner, 'USAGE') "
        "AND relnamespace NOT IN (SELECT oid FROM pg_namespace "
        "WHERE nspname LIKE 'pg\\_%temp\\_%')"
    ),
    "could SET ROLE to a role whose privileges it does not inherit": (
        "SELECT rolname FROM pg_roles WHERE rolname <> current_user AND "
        "pg_has_role(oid, 'MEMBER') AND NOT pg_has_role(oid, 'USAGE')"
    ),
}

#: Checks that must find nothing for a ``read-only`` session.
_READ_ONLY_CHECKS = {
    "may write to tables": (
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
        "c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'f') AND n.nspname "
        "NOT IN ('pg_catalog', 'information_schema') AND "
        "(has_table_privilege(c.oid, 'INSERT') OR has_table_privilege(c.oid, "
        "'UPDATE') OR has_table_privilege(c.oid, 'DELETE') OR "
        "has_table_privilege(c.oid, 'TRUNCATE'))"
    ),
    "may advance sequences": (
        "SELECT relname FROM pg_class WHERE relkind = 'S' AND "
        "(has_sequence_privilege(oid, 'USAGE') OR "
        "has_sequence_privilege(oid, 'UPDATE'))"
    ),
    "may create large objects": (
        "SELECT p FROM unnest(ARRAY['lo_create(oid)', 'lo_creat(integer)', "
        "'lo_from_bytea(oid, bytea)', 'lo_import(text)', "
        "'lo_import(text, oid)']) AS p WHERE has_function_privilege(p, 'EXECUTE')"
    ),
}


class PlaceholderError(ValueError):
    """
    A statement's ``?`` placeholders and its parameters do not match.
    """


def redact_url(url: str) -> str:
    """
    Args:
        url: A ``postgresql://`` URL, which may carry a password.

    Returns:
        The URL with its password, and any ``password`` query parameter,
        replaced by ``***``: the form to log or print.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(an unreadable PostgreSQL URL)"
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        if ":" in credentials:
            credentials = credentials.split(":", 1)[0] + ":***"
        netloc = f"{credentials}@{host}"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else f"{k}={v}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, query, parts.fragment)
    )


def check_url(url: str, option: str) -> None:
    """
    Args:
        url: What the operator gave for a PostgreSQL database.
        option: The option it came from, for the message.

    Raises:
        ValueError: ``url`` is not a ``postgresql://`` URL.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in URL_SCHEMES:
        msg = (
            f"{option} {redact_url(url)!r} is not a PostgreSQL URL; give one "
            "like postgresql://tls4d@localhost/tls4d."
        )
        raise ValueError(msg)


@attrs.frozen
class PostgresBackend:
    """
    The PostgreSQL database an SQL server serves, with the connection URL of
    each access level's login role.

    Attributes:
        full: The URL ``full`` sessions connect with.
        read_write: The URL ``read-write`` sessions connect with, or None
            (their statements are then refused).
        read_only: The URL ``read-only`` sessions connect with, or None.
    """

    full: str
    read_write: str | None = None
    read_only: str | None = None

    def url_for(self, access: str) -> str | None:
        """
        Returns:
            The URL of ``access``'s role, or None if the operator gave none.
        """
        return {
            wire.FULL: self.full,
            wire.READ_WRITE: self.read_write,
            wire.READ_ONLY: self.read_only,
        }[access]

    def describe(self) -> str:
        """
        Returns:
            The URLs without their passwords, for the log.
        """
        parts = [f"full: {redact_url(self.full)}"]
        for level, url in ((wire.READ_WRITE, self.read_write),) + (
            (wire.READ_ONLY, self.read_only),
        ):
            parts.append(f"{level}: {redact_url(url) if url else 'refused'}")
        return "; ".join(parts)


def translate_placeholders(statement: str) -> tuple[str, str, int]:
    """
    Find the ``?`` placeholders of a statement outside string literals,
    quoted identifiers, dollar-quoted strings and comments.

    Args:
        statement: One statement with SQLite-style ``?`` placeholders.

    Returns:
        The statement with ``$1``, ``$2``... in their place (PostgreSQL's
        form), the same with ``%s`` and every ``%`` doubled (psycopg's
        form), and how many there are.
    """
    native: list[str] = []
    psycopg_form: list[str] = []
    count = 0
    i, n = 0, len(statement)
    while i < n:
        c = statement[i]
        end = i + 1
        if c == "'":
            escapes = (
                i > 0 and statement[i - 1] in "eE" and not _in_word(statement, i - 1)
            )
            end = _end_of_quoted(statement, i, "'", escapes)
        elif c == '"':
            end = _end_of_quoted(statement, i, '"', False)
        elif c == "-" and statement.startswith("--", i):
            newline = statement.find("\n", i)
            end = n if newline < 0 else newline + 1
        elif c == "/" and statement.startswith("/*", i):
            end = _end_of_comment(statement, i)
        elif c == "$" and not _in_word(statement, i):
            end = _end_of_dollar_quote(statement, i)
        elif c == "?":
            count += 1
            native.append(f"${count}")
            psycopg_form.append("%s")
            i += 1
            continue
        piece = statement[i:end]
        native.append(piece)
        psycopg_form.append(piece.replace("%", "%%"))
        i = end
    return "".join(native), "".join(psycopg_form), count


def _in_word(text: str, i: int) -> bool:
    """
    Returns:
        Whether ``text[i]`` continues an identifier or a number.
    """
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")


def _end_of_quoted(text: str, i: int, quote: str, escapes: bool) -> int:
    """
    Returns:
        The index after the quoted text opening at ``i``, or the end.
    """
    j = i + 1
    while j < len(text):
        if escapes and text[j] == "\\":
            j += 2
            continue
        if text[j] == quote:
            if text.startswith(quote, j + 1):
                j += 2
                continue
            return j + 1
        j += 1
    return len(text)


def _end_of_comment(text: str, i: int) -> int:
    """
    Returns:
        The index after the (possibly nested) block comment opening at ``i``.
    """
    depth, j = 0, i
    while j < len(text):
        if text.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif text.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    return len(text)


def _end_of_dollar_quote(text: str, i: int) -> int:
    """
    Returns:
        The index after the dollar-quoted string opening at ``i``, or
        ``i + 1`` if no dollar quote opens there.
    """
    j = i + 1
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    if j >= len(text) or text[j] != "$" or text[i + 1 : i + 2].isdigit():
        return i + 1
    tag = text[i : j + 1]
    close = text.find(tag, j + 1)
    return len(text) if close < 0 else close + len(tag)


def _parameter_type(value: wire.Value) -> int:
    """
    Returns:
        The PostgreSQL type OID a parameter is described with, close to what
        psycopg sends it as: int8 (numeric beyond 64 bits), float8, bytea, or
        0 (unknown, inferred by PostgreSQL) for text and NULL.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return 0
    if isinstance(value, int):
        return 20 if -(2**63) <= value < 2**63 else 1700
    if isinstance(value, float):
        return 701
    return 17


def _cell(value: Any) -> wire.Value:
    """
    Returns:
        A value psycopg loaded, as a protocol value: a bool as 1 or 0, a
        memoryview as bytes, anything unexpected as its text.
    """
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, int | float | str | bytes):
        return value
    if isinstance(value, memoryview):
        return bytes(value)
    return str(value)


class PostgresSession:
    """
    A client's PostgreSQL connection, opened on its first statement as the
    role of the session's access level, and used by one database thread at
    a time.

    The connection is in autocommit mode: each statement commits on its own
    unless the client opened a transaction with ``BEGIN``, which lasts until
    its ``COMMIT`` or ``ROLLBACK`` or until `close` rolls it back.
    """

    def __init__(
        self,
        backend: PostgresBackend | str,
        access: str = wire.FULL,
        user: str | None = None,
    ) -> None:
        """
        Args:
            backend: The database and its roles' URLs; a URL alone serves
                ``full`` sessions only.
            access: What the session may do: ``read-only``, ``read-write`` or
                ``full``.
            user: Whom the session runs for, for error messages.

        Raises:
            ValueError: ``access`` is not an access level.
        """
        _check_access(access)
        if isinstance(backend, str):
            backend = PostgresBackend(backend)
        self._backend = backend
        self._access = access
        self._user = user
        self._lock = threading.Lock()
        self._connection: Any = None
        self._cursor: Any = None
        self._stream: Iterator[Any] | None = None
        self._rows = 0
        self._closed = False
        self._abandoned = False
        self._running = False

    @property
    def access(self) -> str:
        """The session's access level."""
        return self._access

    def set_user(self, user: str | None, access: str) -> None:
        """
        Run the session's next statements as ``user`` with ``access``, on a
        new connection. Blocks: call it in a database thread.

        Raises:
            ValueError: ``access`` is not an access level, or a transaction
                is open.
        """
        _check_access(access)
        with self._lock:
            if self._in_transaction():
                msg = "Finish the open transaction (COMMIT or ROLLBACK) first."
                raise ValueError(msg)
            self._close_connection()
            self._user, self._access = user, access

    def _connect(self) -> Any:
        """
        Open the session's connection as its level's role, and check that
        role.

        Returns:
            The connection.

        Raises:
            _Refused: The operator gave no role for the level, or its role may
                do more than the level allows.
            psycopg.Error: PostgreSQL cannot be reached.
        """
        import psycopg
        from psycopg.types.string import TextLoader

        url = self._backend.url_for(self._access)
        if url is None:
            msg = (
                f"The server has no PostgreSQL role for {self._access} sessions; "
                f"its operator must give --sql-database-{self._access}."
            )
            raise _Refused(msg)
        options = {}
        if self._access == wire.READ_ONLY:
            options["options"] = "-c default_transaction_read_only=on"
        connection = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="tls4d SQL server",
            **options,
        )
        try:
            for info in psycopg.postgres.types:
                if info.name not in _NATIVE_TYPES:
                    connection.adapters.register_loader(info.oid, TextLoader)
                if info.array_oid:
                    connection.adapters.register_loader(info.array_oid, TextLoader)
            if self._access != wire.FULL:
                self._check_role(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_role(self, connection: Any) -> None:
        """
        Raises:
            _Refused: The connection's role may do more than the session's
                level allows; names what.
        """
        checks = dict(_ROLE_CHECKS)
        if self._access == wire.READ_ONLY:
            checks.update(_READ_ONLY_CHECKS)
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            (role,) = cursor.fetchone()
            for what, query in checks.items():
                cursor.execute(query)
                found = [str(r[0]) for r in cursor.fetchmany(3)]
                if found:
                    msg = (
                        f"The PostgreSQL role {role!r} of {self._access} sessions "
                        f"{what} ({', '.join(found)}); the server refuses to use "
                        "it until its operator takes that away."
                    )
                    raise _Refused(msg, operator=True)

    def execute(self, statement: str, parameters: Sequence[wire.Value] = ()) -> Answer:
        """
        Run one statement and encode its whole answer. Blocks: call it in a
        database thread.

        Returns:
            The answer, as `twisted_tls4d.sql.session.Session.execute` gives.
        """
        return whole_answer(self.start(statement, parameters), self.fetch)

    def start(self, statement: str, parameters: Sequence[wire.Value] = ()) -> Answer:
        """
        Run one statement and encode the first batch of its answer. Blocks:
        call it in a database thread.

        Args:
            statement: One SQL statement.
            parameters: The values of its ``?`` placeholders.

        Returns:
            The header and first rows, with the status too if they are all;
            else `fetch` gives the rest. Or an error status carrying
            PostgreSQL's message and SQLSTATE.
        """
        import psycopg

        with self._lock:
            if self._closed or self._abandoned:
                return _failed(
                    wire.ERROR_SHUTDOWN, "The session is closed; reconnect to go on."
                )
            self._finish_stream()
            try:
                if self._connection is None:
                    self._connection = self._connect()
                self._running = True
                self._rows = 0
                return self._run(statement, parameters)
            except _Refused as e:
                self._finish_stream()
                notice = e.message if e.operator else None
                answer = _failed(wire.ERROR_ACCESS, e.message, self._in_transaction())
                return attrs.evolve(answer, notice=notice)
            except (psycopg.Error, PlaceholderError) as e:
                self._finish_stream()
                return self._error(e)
            finally:
                self._running = self._stream is not None

    def _run(self, statement: str, parameters: Sequence[wire.Value]) -> Answer:
        """
        Check the statement is one statement and learn its columns, by
        preparing it unnamed; then run it, streaming its rows if it has any.

        Raises:
            PlaceholderError: The placeholders and parameters differ in number.
            psycopg.Error: PostgreSQL refused or failed the statement.
        """
        from psycopg import pq

        native, psycopg_form, count = translate_placeholders(statement)
        if count != len(parameters):
            msg = (
                f"The statement has {count} ? placeholders but {len(parameters)} "
                "parameters (bindings) were given."
            )
            raise PlaceholderError(msg)
        connection = self._connection
        pgconn = connection.pgconn
        with connection.lock:
            nonblocking, pgconn.nonblocking = pgconn.nonblocking, 0
            try:
                prepared = pgconn.prepare(
                    b"",
                    native.encode("utf-8"),
                    [_parameter_type(p) for p in parameters],
                )
                if prepared.status != pq.ExecStatus.COMMAND_OK:
                    raise _result_error(prepared)
                described = pgconn.describe_prepared(b"")
                if described.status != pq.ExecStatus.COMMAND_OK:
                    raise _result_error(described)
            finally:
                pgconn.nonblocking = nonblocking
            names = [
                (described.fname(i) or b"?column?").decode("utf-8", "replace")
                for i in range(described.nfields)
            ]
            types = [
                _COLUMN_TYPES.get(described.ftype(i), wire.TYPE_TEXT)
                for i in range(described.nfields)
            ]
        query = psycopg_form if count else statement
        params = tuple(parameters) if count else None
        self._cursor = connection.cursor()
        if not names:
            self._cursor.execute(query, params)
            status = self._cursor.statusmessage or ""
            self._finish_stream()
            return Answer(
                wire.encode_line(
                    wire.success(0, _changes(status), self._in_transaction())
                ),
                ok=True,
            )
        self._stream = self._cursor.stream(query, params)
        header = wire.encode_line(wire.columns(names, types))
        answer = self._batch()
        return attrs.evolve(answer, data=header + answer.data)

    def fetch(self) -> Answer:
        """
        Encode the next batch of the answer `start` began. Blocks: call it in
        a database thread.

        Returns:
            The next rows, with the status if they are the last; or an error
            status if reading failed (the client discards the rows it got).
        """
        import psycopg

        with self._lock:
            if self._stream is None:
                return _failed(wire.ERROR_INTERNAL, "No statement is running.")
            if self._closed or self._abandoned:
                self._finish_stream()
                return _failed(
                    wire.ERROR_SHUTDOWN, "The session is closed; reconnect to go on."
                )
            try:
                return self._batch()
            except psycopg.Error as e:
                self._finish_stream()
                return self._error(e)
            finally:
                self._running = self._stream is not None

    def _batch(self) -> Answer:
        """
        Read and encode the next rows of the running statement; on the last
        ones, add the status and let the stream go.

        Raises:
            psycopg.Error: Reading a row failed.
        """
        assert self._stream is not None
        lines = []
        size = 0
        done = True
        for row in itertools.islice(self._stream, BATCH_ROWS):
            line = wire.encode_line([wire.encode_value(_cell(v)) for v in row])
            size += len(line)
            lines.append(line)
            if len(lines) == BATCH_ROWS or size >= BATCH_BYTES:
                done = False
                break
        rows = len(lines)
        self._rows += rows
        if done:
            self._finish_stream()
            lines.append(
                wire.encode_line(wire.success(self._rows, None, self._in_transaction()))
            )
        return Answer(b"".join(lines), ok=True, rows=rows, done=done)

    def _in_transaction(self) -> bool:
        """
        Returns:
            Whether the connection has a transaction open (or failed).
        """
        if self._connection is None or self._connection.closed:
            return False
        from psycopg import pq

        status = self._connection.info.transaction_status
        return status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

    def _error(self, error: Exception) -> Answer:
        """
        Returns:
            The error status for an exception of psycopg, naming the access
            level when PostgreSQL refused for lack of privilege.
        """
        sqlstate = getattr(error, "sqlstate", None)
        diag = getattr(error, "diag", None)
        message = (diag.message_primary if diag is not None else None) or str(error)
        code = wire.ERROR_SQL
        if sqlstate in _ACCESS_STATES:
            code = wire.ERROR_ACCESS
            who = f"User {self._user!r}" if self._user else "This session"
            message = (
                f"{who} has {self._access} access, which allows "
                f"{_ALLOWS[self._access]}; the statement was refused. "
                f"PostgreSQL said: {message}."
            )
        status = wire.failure(code, message, self._in_transaction(), sqlstate=sqlstate)
        return Answer(wire.encode_line(status), ok=False, error=message, code=code)

    def _finish_stream(self) -> None:
        """
        Let go of the running statement's rows and cursor, if any.
        """
        stream, self._stream = self._stream, None
        cursor, self._cursor = self._cursor, None
        if stream is not None:
            close = getattr(stream, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
        if cursor is not None:
            try:
                cursor.close()
            except Exception:
                pass

    def _close_connection(self) -> bool:
        """
        Roll back and close the connection, if open.

        Returns:
            Whether uncommitted work was rolled back.
        """
        self._finish_stream()
        connection, self._connection = self._connection, None
        if connection is None:
            return False
        rolled_back = False
        try:
            if not connection.closed and self._in_transaction_of(connection):
                rolled_back = True
                connection.execute("ROLLBACK")
        except Exception:
            pass
        finally:
            connection.close()
        return rolled_back

    @staticmethod
    def _in_transaction_of(connection: Any) -> bool:
        """
        Returns:
            Whether ``connection`` has a transaction open (or failed).
        """
        from psycopg import pq

        status = connection.info.transaction_status
        return status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

    def abandon(self) -> None:
        """
        Stop the session's work because its client is gone: the statement now
        running, if any, is cancelled (from a thread of its own, as asking
        PostgreSQL takes a connection), and statements not yet started are
        not run. Safe to call from any thread; `close` still has to be called.
        """
        self._abandoned = True
        connection = self._connection
        if connection is None or not self._running:
            return

        def cancel() -> None:
            cancel_safe = getattr(connection, "cancel_safe", None)
            try:
                if cancel_safe is not None:
                    cancel_safe(timeout=CANCEL_TIMEOUT)
                else:
                    connection.cancel()
            except Exception:
                pass

        threading.Thread(target=cancel, name="tls4d-sql-cancel", daemon=True).start()

    def close(self) -> bool:
        """
        Roll back any transaction left open and close the connection; later
        statements get a ``shutdown`` error. Blocks: call it in a database
        thread. Closing twice does nothing.

        Returns:
            Whether uncommitted work was rolled back.
        """
        with self._lock:
            self._closed = True
            return self._close_connection()


class _Refused(Exception):
    """
    A session may not run statements: the operator gave no role for its
    level, or one that may do too much.
    """

    def __init__(self, message: str, operator: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.operator = operator


def _result_error(result: Any) -> Exception:
    """
    Returns:
        A psycopg error for a failed result of PostgreSQL's.
    """
    import psycopg.errors

    return psycopg.errors.error_from_result(result)


def _changes(status: str) -> int | None:
    """
    Returns:
        How many rows a command changed, from its status (``INSERT 0 2``,
        ``UPDATE 3``...), or None for other commands.
    """
    words = status.split()
    if words and words[0] in ("INSERT", "UPDATE", "DELETE", "MERGE"):
        try:
            return int(words[-1])
        except ValueError:
            return None
    return None


def _check_access(access: str) -> None:
    """
    Raises:
        ValueError: ``access`` is not one of `wire.ACCESS_LEVELS`.
    """
    if access not in wire.ACCESS_LEVELS:
        levels = ", ".join(wire.ACCESS_LEVELS)
        msg = f"Access level {access!r} is unknown; use one of {levels}."
        raise ValueError(msg)


def _failed(code: str, message: str, in_transaction: bool | None = None) -> Answer:
    """
    Returns:
        An answer made of one error status.
    """
    status = wire.failure(code, message, in_transaction)
    return Answer(wire.encode_line(status), ok=False, error=message, code=code)


def postgres_backend(
    full: str | None, read_write: str | None = None, read_only: str | None = None
) -> PostgresBackend | None:
    """
    The PostgreSQL database the SQL server serves, if it serves one.

    Args:
        full: ``--sql-database``, or None for SQLite.
        read_write: ``--sql-database-read-write``.
        read_only: ``--sql-database-read-only``.

    Returns:
        The backend, or None without ``full``.

    Raises:
        ConfigurationError: psycopg 3 is not installed.
    """
    if full is None:
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        msg = (
            "sql-database needs psycopg 3, which is not installed; install it "
            "with pip install 'twisted-tls4d[postgresql]'."
        )
        raise ConfigurationError(msg) from e
    return PostgresBackend(full, read_write=read_write, read_only=read_only)
