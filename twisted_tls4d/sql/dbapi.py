"""
A DB-API 2.0 (PEP 249) driver for the tls4d SQL server, blocking, on the
standard library's sockets and TLS::

    from twisted_tls4d.sql import dbapi

    connection = dbapi.connect("localhost", 19812, identity="alice")
    cursor = connection.cursor()
    cursor.execute("INSERT INTO people (name) VALUES (?)", ("Ada",))
    connection.commit()
    cursor.execute("SELECT id, name FROM people")
    for row in cursor:
        print(row)
    connection.close()

Rows are read from the connection as the cursor is fetched from, so a large
result never sits in memory whole. As the PEP asks, a transaction opens
with the first statement and lasts until `Connection.commit` or
`Connection.rollback`, unless ``autocommit`` is set; closing a connection
without committing rolls its work back.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from twisted_tls4d.clienttls import CA_FILE, CERT_FILE, KEY_FILE
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.wire import Value

apilevel = "2.0"
threadsafety = 1
paramstyle = "qmark"

#: The longest line accepted from the server (one row), in bytes.
MAX_ANSWER_LINE = 64 * 1024 * 1024


class Warning(Exception):  # noqa: A001 (the PEP's name)
    """An important warning, such as data truncated."""


class Error(Exception):
    """The base class of the driver's errors."""


class InterfaceError(Error):
    """The driver was misused, or the connection broke the protocol."""


class DatabaseError(Error):
    """
    The server refused or failed a statement.

    Attributes:
        code: The protocol's error code (``sql``, ``access``, ``login``...).
        sqlite_name: SQLite's name of the error, when the server gave it.
        sqlstate: PostgreSQL's SQLSTATE, when the server gave it.
    """

    def __init__(
        self,
        message: str,
        code: str | None = None,
        sqlite_name: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.sqlite_name = sqlite_name
        self.sqlstate = sqlstate


class DataError(DatabaseError):
    """A value was out of range or of the wrong kind."""


class OperationalError(DatabaseError):
    """The database or the connection failed (lost connection, lock timeout)."""


class IntegrityError(DatabaseError):
    """A constraint refused the statement."""


class InternalError(DatabaseError):
    """The server failed internally."""


class ProgrammingError(DatabaseError):
    """The statement is wrong (syntax, missing table) or not allowed."""


class NotSupportedError(DatabaseError):
    """The database does not support what was asked."""


class _TypeObject:
    """
    A DB-API type object: equal to each column type it stands for.
    """

    def __init__(self, *types: str) -> None:
        self.types = frozenset(types)

    def __eq__(self, other: object) -> bool:
        return other in self.types

    def __hash__(self) -> int:
        return hash(self.types)


STRING = _TypeObject(wire.TYPE_TEXT)
BINARY = _TypeObject(wire.TYPE_BLOB)
NUMBER = _TypeObject(wire.TYPE_INTEGER, wire.TYPE_REAL)
DATETIME = _TypeObject(wire.TYPE_TEXT)
ROWID = _TypeObject(wire.TYPE_INTEGER)


def Date(year: int, month: int, day: int) -> str:  # noqa: N802 (the PEP's name)
    """Returns: a date as ISO 8601 text, which SQLite's date functions read."""
    return datetime.date(year, month, day).isoformat()


def Time(hour: int, minute: int, second: int) -> str:  # noqa: N802
    """Returns: a time of day as ISO 8601 text."""
    return datetime.time(hour, minute, second).isoformat()


def Timestamp(  # noqa: N802 (the PEP's name)
    year: int, month: int, day: int, hour: int, minute: int, second: int
) -> str:
    """Returns: a timestamp as ISO 8601 text."""
    return datetime.datetime(year, month, day, hour, minute, second).isoformat(" ")


def DateFromTicks(ticks: float) -> str:  # noqa: N802 (the PEP's name)
    """Returns: the local date of a POSIX time, as ISO 8601 text."""
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> str:  # noqa: N802 (the PEP's name)
    """Returns: the local time of day of a POSIX time, as ISO 8601 text."""
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> str:  # noqa: N802 (the PEP's name)
    """Returns: the local timestamp of a POSIX time, as ISO 8601 text."""
    return Timestamp(*time.localtime(ticks)[:6])


def Binary(data: bytes | bytearray | memoryview) -> bytes:  # noqa: N802
    """Returns: ``data`` as a BLOB parameter."""
    return bytes(data)


def _error_of(status: dict[str, Any]) -> DatabaseError:
    """
    Returns:
        The exception of the PEP's hierarchy for an error status.
    """
    error = status.get("error")
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message", "The server reported an error."))
    code = error.get("code")
    name = error.get("sqlite_name")
    sqlstate = error.get("sqlstate")
    kind: type[DatabaseError] = OperationalError
    if code in (wire.ERROR_ACCESS, wire.ERROR_LOGIN_REQUIRED, wire.ERROR_REQUEST):
        kind = ProgrammingError
    elif code == wire.ERROR_INTERNAL:
        kind = InternalError
    elif code == wire.ERROR_SQL:
        text = str(name or "")
        state = str(sqlstate or "")
        if text.startswith("SQLITE_CONSTRAINT") or state.startswith("23"):
            kind = IntegrityError
        elif text in ("SQLITE_MISMATCH", "SQLITE_TOOBIG", "SQLITE_RANGE") or (
            state.startswith("22")
        ):
            kind = DataError
        elif state.startswith("42") or (
            name == "SQLITE_ERROR"
            and ("syntax error" in message or message.startswith("no such"))
        ):
            kind = ProgrammingError
    return kind(message, code, name, sqlstate)


def _parameter(value: Any) -> Value:
    """
    Returns:
        ``value`` as a parameter of the protocol.

    Raises:
        ProgrammingError: It is of a type the protocol cannot carry.
    """
    if value is None or isinstance(value, int | float | str | bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat(" ")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    msg = f"The parameter {value!r} is not an int, float, str, bytes or None."
    raise ProgrammingError(msg)


class Connection:
    """
    A session with the SQL server. Make one with `connect`.

    Attributes:
        autocommit: When True, each statement commits on its own; when False
            (the default), the first statement opens a transaction that
            `commit` or `rollback` ends.
        greeting: What the server said of itself and of this client.
    """

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, sock: ssl.SSLSocket, where: str) -> None:
        self._socket: ssl.SSLSocket | None = sock
        self._reader = sock.makefile("rb")
        self._where = where
        self._in_transaction = False
        self._streaming: Cursor | None = None
        self.autocommit = False
        self.greeting: dict[str, Any] = {}

    def _read(self) -> dict[str, Any] | list[Any]:
        """
        Returns:
            The next message or row of the server.

        Raises:
            OperationalError: The connection was lost.
            InterfaceError: The server broke the protocol.
        """
        if self._socket is None:
            msg = "The connection is closed."
            raise InterfaceError(msg)
        try:
            line = self._reader.readline(MAX_ANSWER_LINE + 1)
        except OSError as e:
            self.close()
            msg = f"The connection to the SQL server at {self._where} failed: {e}."
            raise OperationalError(msg) from e
        if not line.endswith(b"\n"):
            self.close()
            msg = f"The SQL server at {self._where} closed the connection."
            raise OperationalError(msg)
        try:
            return wire.decode_line(line.rstrip(b"\r\n"))
        except wire.WireFormatError as e:
            self.close()
            raise InterfaceError(str(e)) from e

    def _send(self, data: bytes) -> None:
        """
        Send one request line, after reading what is left of an answer still
        streaming.

        Raises:
            InterfaceError: The connection is closed.
            OperationalError: Sending failed.
        """
        if self._socket is None:
            msg = "The connection is closed."
            raise InterfaceError(msg)
        if self._streaming is not None:
            self._streaming._drain()
        try:
            self._socket.sendall(data)
        except OSError as e:
            self.close()
            msg = f"Sending to the SQL server at {self._where} failed: {e}."
            raise OperationalError(msg) from e

    def _request(self, data: bytes) -> dict[str, Any]:
        """
        Send a request whose answer holds no rows.

        Returns:
            The answer's success status.

        Raises:
            DatabaseError: (a subclass) The server refused it.
        """
        self._send(data)
        while True:
            message = self._read()
            if isinstance(message, dict) and "ok" in message:
                self._note(message)
                if message["ok"] is not True:
                    raise _error_of(message)
                return message

    def _note(self, status: dict[str, Any]) -> None:
        """
        Keep the session's transaction state from a status.
        """
        in_transaction = status.get("in_transaction")
        if isinstance(in_transaction, bool):
            self._in_transaction = in_transaction

    def _begin_if_needed(self) -> None:
        """
        Open the implicit transaction of the PEP before a statement.
        """
        if not self.autocommit and not self._in_transaction:
            self._request(b"BEGIN\n")

    def cursor(self) -> Cursor:
        """
        Returns:
            A new cursor of this connection.
        """
        self._check_open()
        return Cursor(self)

    def commit(self) -> None:
        """
        Commit the open transaction, if any.

        Raises:
            DatabaseError: (a subclass) The commit failed.
        """
        self._check_open()
        if self._streaming is not None:
            self._streaming._drain()
        if self._in_transaction:
            self._request(b"COMMIT\n")

    def rollback(self) -> None:
        """
        Roll back the open transaction, if any.

        Raises:
            DatabaseError: (a subclass) The rollback failed.
        """
        self._check_open()
        if self._streaming is not None:
            self._streaming._drain()
        if self._in_transaction:
            self._request(b"ROLLBACK\n")

    def close(self) -> None:
        """
        Close the connection; the server rolls back uncommitted work.
        Closing twice does nothing.
        """
        sock, self._socket = self._socket, None
        if sock is None:
            return
        try:
            self._reader.close()
            sock.close()
        except OSError:
            pass

    def _check_open(self) -> None:
        if self._socket is None:
            msg = "The connection is closed."
            raise InterfaceError(msg)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        """
        Commit if the block succeeded, roll back if it raised; then close.
        """
        try:
            if self._socket is not None:
                if kind is None:
                    self.commit()
                else:
                    self.rollback()
        finally:
            self.close()


class Cursor:
    """
    Runs statements of its connection and fetches their rows.

    Attributes:
        description: For a statement returning rows, one 7-item sequence a
            column (name, type code, then five None); None otherwise.
        rowcount: The rows changed by the last INSERT, UPDATE or DELETE, or
            the rows of the last result once all were fetched; -1 when not
            known.
        arraysize: How many rows `fetchmany` returns by default.
        lastrowid: Always None: the protocol does not report it.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection: Connection | None = connection
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self.arraysize = 1
        self.lastrowid: int | None = None
        self._more = False
        self._fetched = 0

    def _live(self) -> Connection:
        """
        Raises:
            InterfaceError: The cursor or its connection is closed.
        """
        if self.connection is None or self.connection._socket is None:
            msg = "The cursor is closed."
            raise InterfaceError(msg)
        return self.connection

    def execute(self, operation: str, parameters: Sequence[Any] = ()) -> Cursor:
        """
        Run one statement, with the values of its ``?`` placeholders kept
        apart from it.

        Returns:
            The cursor.

        Raises:
            ProgrammingError: A parameter has an unsupported type, or the
                statement is wrong.
            DatabaseError: (another subclass) The database refused it.
        """
        connection = self._live()
        if isinstance(parameters, str | bytes) or not isinstance(parameters, Sequence):
            msg = "Give the parameters as a sequence (a tuple or a list)."
            raise ProgrammingError(msg)
        values = [_parameter(p) for p in parameters]
        if connection._streaming is not None:
            connection._streaming._drain()
        connection._begin_if_needed()
        self.description = None
        self.rowcount = -1
        self._fetched = 0
        connection._send(wire.statement_request(operation, values))
        message = connection._read()
        if isinstance(message, dict) and "columns" in message:
            names = message["columns"]
            types = message.get("types") or [None] * len(names)
            self.description = tuple(
                (str(name), kind, None, None, None, None, None)
                for name, kind in zip(names, types, strict=False)
            )
            self._more = True
            connection._streaming = self
            return self
        self._finish(message)
        return self

    def executemany(
        self, operation: str, seq_of_parameters: Sequence[Sequence[Any]]
    ) -> None:
        """
        Run one statement once for each sequence of parameters.

        Raises:
            DatabaseError: (a subclass) One run failed; those before it took
                effect in the transaction.
        """
        total = 0
        for parameters in seq_of_parameters:
            self.execute(operation, parameters)
            total += max(self.rowcount, 0)
        self.rowcount = total

    def _finish(self, message: dict[str, Any] | list[Any]) -> None:
        """
        Take the status ending an answer.

        Raises:
            DatabaseError: (a subclass) The status is a failure.
            InterfaceError: It is not a status.
        """
        connection = self._live()
        self._more = False
        if connection._streaming is self:
            connection._streaming = None
        if not isinstance(message, dict) or "ok" not in message:
            msg = f"The server sent {message!r} where a status belongs."
            raise InterfaceError(msg)
        connection._note(message)
        if message["ok"] is not True:
            raise _error_of(message)
        changes = message.get("changes")
        if isinstance(changes, int):
            self.rowcount = changes
        elif self.description is not None:
            self.rowcount = self._fetched

    def fetchone(self) -> tuple[Value, ...] | None:
        """
        Returns:
            The next row, or None when there are no more.

        Raises:
            ProgrammingError: The last statement returned no rows.
            DatabaseError: (a subclass) Reading the rows failed.
        """
        connection = self._live()
        if self.description is None:
            msg = "The last statement returned no result set to fetch from."
            raise ProgrammingError(msg)
        while self._more:
            message = connection._read()
            if isinstance(message, list):
                self._fetched += 1
                try:
                    return tuple(wire.decode_value(cell) for cell in message)
                except wire.WireFormatError as e:
                    raise InterfaceError(str(e)) from e
            if "ok" in message:
                self._finish(message)
        return None

    def fetchmany(self, size: int | None = None) -> list[tuple[Value, ...]]:
        """
        Returns:
            Up to ``size`` (default `arraysize`) next rows.
        """
        rows = []
        for _ in range(self.arraysize if size is None else size):
            row = self.fetchone()
            if row is None:
                break
            rows.append(row)
        return rows

    def fetchall(self) -> list[tuple[Value, ...]]:
        """
        Returns:
            All the remaining rows.
        """
        rows = []
        while (row := self.fetchone()) is not None:
            rows.append(row)
        return rows

    def _drain(self) -> None:
        """
        Read and drop the rest of a result, so the next request can go.
        """
        while self._more:
            self.fetchone()

    def __iter__(self) -> Iterator[tuple[Value, ...]]:
        return self

    def __next__(self) -> tuple[Value, ...]:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def setinputsizes(self, sizes: Any) -> None:
        """Does nothing, as the PEP allows."""

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        """Does nothing, as the PEP allows."""

    def close(self) -> None:
        """
        Close the cursor, reading the rest of its result if any.
        """
        if self.connection is not None and self.connection._socket is not None:
            self._drain()
        self.connection = None


def connect(
    host: str = "localhost",
    port: int = wire.DEFAULT_PORT,
    *,
    identity: str | Path | None = None,
    key: str | Path | None = None,
    cert: str | Path | None = None,
    ca: str | Path | None = None,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
) -> Connection:
    """
    Connect to a tls4d SQL server over TLS, verifying its certificate and
    host name, and authenticate with a client certificate, a user name and
    password, or both.

    Args:
        host: The server's host name or address; its certificate must cover
            it.
        port: The SQL server's port.
        identity: A folder written by ``tls4d client NAME --out DIR`` (its
            ``key.pem``, ``cert.pem`` and ``ca.pem``).
        key: The client's private key (overrides the identity's).
        cert: The client's certificate (overrides the identity's).
        ca: The CA certificates that signed the server's (overrides the
            identity's); required without an identity.
        user: Log in as this user.
        password: The user's password.
        timeout: Seconds to wait for the connection, and for each answer.

    Returns:
        The connection.

    Raises:
        OperationalError: The connection or the TLS handshake failed, or the
            login was refused.
        InterfaceError: The server is not a tls4d SQL server, or no CA is
            given.
    """
    base = Path(identity) if identity is not None else None
    key = key or (base / KEY_FILE if base else None)
    cert = cert or (base / CERT_FILE if base else None)
    ca = ca or (base / CA_FILE if base else None)
    if ca is None:
        msg = "Give the CA that signed the server's certificate (ca= or identity=)."
        raise InterfaceError(msg)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        raw = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as e:
        msg = f"Cannot connect to the SQL server at {where}: {e}."
        raise OperationalError(msg) from e
    try:
        sock = context.wrap_socket(raw, server_hostname=host)
    except (OSError, ssl.SSLError) as e:
        raw.close()
        msg = f"The TLS handshake with {where} failed: {e}."
        raise OperationalError(msg) from e
    connection = Connection(sock, where)
    try:
        greeting = connection._read()
    except OperationalError as e:
        msg = f"The SQL server at {where} refused the connection: {e}"
        raise OperationalError(msg) from e
    if not isinstance(greeting, dict) or not isinstance(greeting.get("hello"), dict):
        connection.close()
        msg = f"The server at {where} did not greet as a tls4d SQL server."
        raise InterfaceError(msg)
    connection.greeting = greeting["hello"]
    if user is not None:
        try:
            connection._request(wire.login_request(user, password or ""))
        except DatabaseError as e:
            connection.close()
            raise OperationalError(str(e), e.code) from e
    return connection
