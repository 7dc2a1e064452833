"""
A Twisted client of the SQL server: connect with a client identity, send
statements, get their results, and format results as text tables.

    client = await connect(reactor, "localhost", 19812, identity)
    result = await client.execute("SELECT id, name FROM people")
    print(format_table(result))
    await client.close()
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d import pki
from twisted_tls4d.app.client import (
    describe_connection_failure,
    describe_tls_failure,
    failure_detail,
    server_certificate_of,
)
from twisted_tls4d.clienttls import ClientIdentity, client_options
from twisted_tls4d.errors import ClientConnectionError, ConfigurationError, Tls4dError
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.wire import Value

#: Seconds to wait for the TCP connection, then again for the server's greeting.
DEFAULT_CONNECT_TIMEOUT = 30.0

#: The longest line accepted from the server (one row), in bytes.
MAX_ANSWER_LINE = 64 * 1024 * 1024

#: How many of the first bytes from a server an error message shows when
#: they are not the SQL protocol.
_SHOWN_BYTES = 24


class SQLError(Tls4dError):
    """
    The server refused or failed a statement; the session goes on.

    Attributes:
        message: The server's message (SQLite's, for an SQL error).
        code: The protocol's error code: ``sql``, ``encoding``,
            ``line_too_long``, ``internal`` or ``shutdown``.
        sqlite_code: SQLite's extended result code, if the server sent it.
        sqlite_name: SQLite's name for it, e.g. ``SQLITE_CONSTRAINT_UNIQUE``.
        in_transaction: Whether the session still has a transaction open,
            if the server said.
    """

    def __init__(
        self,
        message: str,
        code: str = wire.ERROR_SQL,
        sqlite_code: int | None = None,
        sqlite_name: str | None = None,
        in_transaction: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.sqlite_code = sqlite_code
        self.sqlite_name = sqlite_name
        self.in_transaction = in_transaction


class SQLConnectionError(ClientConnectionError):
    """
    The connection to the SQL server could not be made, was refused during
    the TLS handshake, broke the protocol, or was lost.
    """


@attrs.frozen
class Result:
    """
    The answer to one successful statement.

    Attributes:
        columns: The result's column names; empty for a statement that
            returns no result set (``INSERT``, ``CREATE TABLE``...).
        rows: The rows, each a tuple of ``int``, ``float``, ``str``, ``bytes``
            or None.
        row_count: How many rows the server sent.
        changes: How many rows an ``INSERT``, ``UPDATE`` or ``DELETE``
            changed; None for other statements.
        in_transaction: Whether the session has a transaction open (after a
            ``BEGIN`` not yet committed or rolled back).
        types: The columns' types as the server declared them (``integer``,
            ``real``, ``text``, ``blob``, ``null``, ``any``); empty if it
            did not.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Value, ...], ...]
    row_count: int
    changes: int | None = None
    in_transaction: bool = False
    types: tuple[str | None, ...] = ()


class _Pending:
    """
    A statement sent whose answer is still arriving.
    """

    def __init__(self) -> None:
        self.deferred: defer.Deferred[Result] = defer.Deferred()
        self.columns: tuple[str, ...] = ()
        self.types: tuple[str | None, ...] = ()
        self.rows: list[tuple[Value, ...]] = []
        self.status: dict[str, Any] = {}


@implementer(IHandshakeListener)
class _SQLClientProtocol(LineReceiver):
    """
    The client side of the line protocol: matches each answer to the
    statement it answers, in order.

    Attributes:
        where: ``host:port`` of the server, for messages.
        host: The host name or address dialled, for messages.
        identity: The client's identity, to name its files in messages.
        handshake_done: Whether the TLS handshake completed.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_ANSWER_LINE
    #: The TLS transport; typed loosely, as zope interfaces confuse mypy.
    transport: Any

    def __init__(
        self,
        where: str,
        host: str | None = None,
        identity: ClientIdentity | None = None,
    ) -> None:
        self.where = where
        self.host = host
        self.identity = identity
        self.handshake_done = False
        self.greeted: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.pending: collections.deque[_Pending] = collections.deque()
        self.lost: Failure | None = None
        self._broken = False
        self._checked_first_byte = False

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Note that the TLS handshake completed; the greeting comes next.
        """
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Refuse at once a server whose first byte cannot start the greeting (a
        JSON object), rather than wait for a line end that may never come.
        """
        if not self._checked_first_byte and data.strip():
            self._checked_first_byte = True
            if not data.lstrip().startswith(b"{"):
                sent = data.lstrip()[:_SHOWN_BYTES]
                self._violation(
                    f"{self.where} does not speak the tls4d SQL protocol: it sent "
                    f"{sent.decode('ascii', 'backslashreplace')!r} where the "
                    "greeting belongs; is that the SQL server's port "
                    f"({wire.DEFAULT_PORT} by default)?"
                )
                return
        super().dataReceived(data)

    def send(self, data: bytes) -> defer.Deferred[Result]:
        """
        Send one encoded statement line.

        Returns:
            A Deferred for its answer.
        """
        pending = _Pending()
        self.pending.append(pending)
        self.transport.write(data)
        return pending.deferred

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Parse one line of the server, unless it already broke the protocol.
        """
        if self._broken:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            self._message_received(wire.decode_line(line))
        except wire.WireFormatError as e:
            self._violation(str(e))

    def _message_received(self, message: dict[str, Any] | list[Any]) -> None:
        """
        Take the greeting, then add each row, header or status to the answer
        of the oldest statement waiting.

        Raises:
            WireFormatError: A cell is not a value of this protocol version.
        """
        if not self.greeted.called:
            if not isinstance(message, dict) or not isinstance(
                message.get("hello"), dict
            ):
                self._violation(
                    f"The server at {self.where} did not greet as a tls4d SQL "
                    "server; is that the SQL server's port "
                    f"({wire.DEFAULT_PORT} by default)?"
                )
                return
            version = message["hello"].get("protocol")
            if version != wire.PROTOCOL_VERSION:
                self._violation(
                    f"The server at {self.where} speaks SQL protocol {version!r}; "
                    f"this client speaks {wire.PROTOCOL_VERSION}."
                )
                return
            self.greeted.callback(message["hello"])
            return
        if not self.pending:
            if isinstance(message, dict) and message.get("ok") is False:
                # An error nobody asked for, sent before the server closes.
                self.lost = Failure(SQLConnectionError(_error_text(message)))
            return
        current = self.pending[0]
        if isinstance(message, list):
            current.rows.append(tuple(wire.decode_value(cell) for cell in message))
        elif "ok" in message:
            self.pending.popleft()
            _finish(current, message)
        elif isinstance(message.get("columns"), list):
            current.columns = tuple(str(name) for name in message["columns"])
            types = message.get("types")
            if isinstance(types, list) and len(types) == len(current.columns):
                current.types = tuple(t if isinstance(t, str) else None for t in types)
        # Other messages are for later versions of the protocol: skip them.

    def _violation(self, why: str) -> None:
        """
        Close a connection whose server broke the protocol; whatever waits
        fails with ``why``.
        """
        self._broken = True
        self.lost = Failure(SQLConnectionError(why))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Treat a line over `MAX_ANSWER_LINE` as a broken protocol.
        """
        self._violation(
            f"The server at {self.where} sent a line longer than this client's "
            f"limit of {self.MAX_LENGTH} bytes."
        )

    def _describe_loss(self, reason: Failure) -> str:
        """
        Returns:
            Why the connection ended, as a sentence for the user.
        """
        tls = describe_tls_failure(
            reason.value,
            host=self.host,
            identity=self.identity,
            server_certificate=server_certificate_of(self.transport),
        )
        if tls is not None:
            # With TLS 1.3 a server refuses a client certificate only after
            # the client saw the handshake complete: still a handshake failure.
            return f"The TLS handshake with {self.where} failed: {tls}."
        if not self.handshake_done:
            why = describe_connection_failure(
                reason, server="SQL server", in_handshake=True
            )
            return f"The TLS handshake with {self.where} failed: {why}."
        if reason.check(ConnectionDone):
            return f"The SQL server at {self.where} closed the connection."
        why = describe_connection_failure(reason, server="SQL server")
        return f"The connection to the SQL server at {self.where} was lost: {why}."

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Fail the greeting and every statement still waiting.
        """
        if self.lost is None:
            self.lost = Failure(
                SQLConnectionError(
                    self._describe_loss(reason), failure_detail(reason.value)
                )
            )
        if not self.greeted.called:
            self.greeted.errback(self.lost)
        pending, self.pending = self.pending, collections.deque()
        for each in pending:
            each.deferred.errback(self.lost)
        self.closed.callback(None)


def _error_text(message: dict[str, Any]) -> str:
    """
    Returns:
        The message of an error status.
    """
    error = message.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return f"The server reported an error without a message: {message!r}"


def _finish(pending: _Pending, status: dict[str, Any]) -> None:
    """
    Fire a statement's Deferred with its result or its `SQLError`.
    """
    in_transaction = status.get("in_transaction")
    if status["ok"] is True:
        rows = tuple(pending.rows)
        changes = status.get("changes")
        pending.deferred.callback(
            Result(
                columns=pending.columns,
                rows=rows,
                row_count=len(rows),
                changes=changes if isinstance(changes, int) else None,
                in_transaction=bool(in_transaction),
                types=pending.types,
            )
        )
        return
    error = status.get("error")
    error = error if isinstance(error, dict) else {}
    pending.deferred.errback(
        SQLError(
            _error_text(status),
            code=str(error.get("code", wire.ERROR_SQL)),
            sqlite_code=error.get("sqlite_code"),
            sqlite_name=error.get("sqlite_name"),
            in_transaction=in_transaction if isinstance(in_transaction, bool) else None,
        )
    )


class SQLClient:
    """
    A session with the SQL server. Statements may be sent without waiting:
    the server runs them in order and their results come back in order.

    Attributes:
        greeting: What the server said of itself (``server``, ``protocol``,
            and ``client``: the name the server knows this client by).
    """

    def __init__(self, protocol: _SQLClientProtocol, greeting: dict[str, Any]) -> None:
        self._protocol = protocol
        self.greeting = greeting

    def execute(
        self, statement: str, parameters: Sequence[Value] | None = None
    ) -> defer.Deferred[Result]:
        """
        Run one SQL statement in this session.

        Args:
            statement: One statement. Without parameters it is sent as a line
                of its own and must not span lines; with them (even an empty
                list) it is sent in a request that keeps them apart, and may.
            parameters: The values of the statement's ``?`` placeholders, in
                order: ``int``, ``float``, ``str``, ``bytes`` or None.

        Returns:
            A Deferred firing with the `Result`, or failing with `SQLError`
            if the server refused or failed the statement, with
            `SQLConnectionError` if the connection is lost before the answer,
            or with ``ValueError`` if the statement is empty, or spans lines
            without parameters, or a parameter is not a value of the protocol.
        """
        if not statement.strip():
            msg = "The statement is empty; the server ignores empty lines."
            return defer.fail(ValueError(msg))
        if parameters is not None:
            for value in parameters:
                if value is not None and not isinstance(
                    value, int | float | str | bytes
                ):
                    msg = (
                        f"The parameter {value!r} is not an int, float, str, "
                        "bytes or None."
                    )
                    return defer.fail(ValueError(msg))
            try:
                data = wire.statement_request(statement, list(parameters))
            except UnicodeEncodeError as e:
                msg = f"The request holds text UTF-8 cannot encode ({e.reason})."
                return defer.fail(ValueError(msg))
            return self._send(data)
        if "\n" in statement or "\r" in statement:
            msg = (
                f"The statement {statement[:40]!r}... spans several lines; send "
                "it with parameters (even none: []), or join its lines first."
            )
            return defer.fail(ValueError(msg))
        try:
            data = statement.encode("utf-8") + wire.LINE_END
        except UnicodeEncodeError as e:
            msg = (
                f"The statement {statement[:40]!r} holds a lone surrogate at "
                f"offset {e.start}, which UTF-8 cannot encode."
            )
            return defer.fail(ValueError(msg))
        return self._send(data)

    def login(self, user: str, password: str) -> defer.Deferred[Result]:
        """
        Log in as ``user``: the session's next statements run with that
        user's access level.

        Returns:
            A Deferred firing when the server accepted the login (with an
            empty `Result`), or failing with `SQLError` (code ``login``).
        """
        d = self._send(wire.login_request(user, password))

        def accepted(result: Result) -> Result:
            self.greeting = {**self.greeting, "user": user}
            return result

        return d.addCallback(accepted)

    def _send(self, data: bytes) -> defer.Deferred[Result]:
        """
        Send one request line unless the connection is gone.
        """
        if self._protocol.lost is not None:
            return defer.fail(self._protocol.lost)
        return self._protocol.send(data)

    def close(self) -> defer.Deferred[None]:
        """
        End the session; the server rolls back a transaction left open.

        Returns:
            A Deferred firing once the connection is closed.
        """
        if self._protocol.lost is None:
            self._protocol.lost = Failure(
                SQLConnectionError("The SQL client was closed.")
            )
            self._protocol.transport.loseConnection()
        closed: defer.Deferred[None] = defer.Deferred()
        self._protocol.closed.addCallback(closed.callback)
        return closed


def connect(
    reactor: Any,
    host: str,
    port: int,
    identity: ClientIdentity | None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    *,
    ca: Path | None = None,
    user: str | None = None,
    password: str | None = None,
) -> defer.Deferred[SQLClient]:
    """
    Connect to a tls4d SQL server, present the client certificate, verify
    the server's certificate against the identity's CA and host name, and
    wait for the server's greeting.

    Args:
        reactor: The reactor (TCP, time and core).
        host: The server's host name or IP address, which its certificate
            must cover.
        port: The server's port.
        identity: The client's key, certificate and trusted CA; None to
            present no certificate (the server must take passwords).
        timeout: Seconds to wait for the connection and for the greeting.
        ca: Without an identity, the CA certificates that signed the server's
            certificate.
        user: If given, log in as this user once greeted.
        password: The user's password.

    Returns:
        A Deferred firing with the `SQLClient`, or failing with
        `SQLConnectionError` (no connection, TLS refused either way, not a
        tls4d SQL server), `SQLError` (the login failed) or
        `twisted_tls4d.errors.PEMError` (the identity's files are unusable).
    """
    return defer.ensureDeferred(
        _connect(reactor, host, port, identity, timeout, ca, user, password)
    )


def _trust_only_options(host: str, ca: Path | None) -> Any:
    """
    Returns:
        TLS options that verify the server against ``ca`` and present no
        client certificate.

    Raises:
        ConfigurationError: No CA is given.
    """
    if ca is None:
        msg = "Give the CA that signed the server's certificate (--ca FILE)."
        raise ConfigurationError(msg)
    trust = ssl.trustRootFromCertificates(
        [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in pki.load_certificates(ca)
        ]
    )
    return ssl.optionsForClientTLS(host, trustRoot=trust)


async def _connect(
    reactor: Any,
    host: str,
    port: int,
    identity: ClientIdentity | None,
    timeout: float,
    ca: Path | None,
    user: str | None,
    password: str | None,
) -> SQLClient:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if identity is not None:
        options = client_options(host, identity)
    else:
        options = _trust_only_options(host, ca)
    tcp: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    endpoint: Any = wrapClientTLS(options, tcp)
    try:
        protocol = await endpoint.connect(
            Factory.forProtocol(lambda: _SQLClientProtocol(where, host, identity))
        )
    except (ConnectError, OSError) as e:
        why = describe_connection_failure(Failure(e), server="SQL server")
        msg = f"Cannot connect to the SQL server at {where}: {why}."
        raise SQLConnectionError(msg, failure_detail(e)) from e
    try:
        greeting = await protocol.greeted.addTimeout(timeout, reactor)
    except defer.TimeoutError as e:
        protocol.transport.abortConnection()
        if protocol.handshake_done:
            what = "SQL server greeting from"
        else:
            what = "TLS handshake with"
        msg = (
            f"No {what} {where} within {timeout:g} s; is that the SQL server's "
            f"port ({wire.DEFAULT_PORT} by default)?"
        )
        raise SQLConnectionError(msg, failure_detail(e)) from e
    client = SQLClient(protocol, greeting)
    if user is not None:
        try:
            await client.login(user, password or "")
        except SQLError:
            await client.close()
            raise
    return client


def _cell_text(value: Value) -> str:
    """
    Returns:
        How a cell shows in a table: NULL, X'hex' for a BLOB, control
        characters escaped.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"X'{value.hex().upper()}'"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return (
        text.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )


def format_table(result: Result) -> str:
    """
    Args:
        result: A statement's result.

    Returns:
        For a result set, a text table: the column names, a rule, one line a
        row (numbers aligned right), and the row count; for other
        statements, ``OK`` and the number of rows changed, if any. No
        trailing newline.
    """
    if not result.columns:
        if result.changes is None:
            return "OK"
        plural = "" if result.changes == 1 else "s"
        return f"OK, {result.changes} row{plural} changed"
    cells = [[_cell_text(v) for v in row] for row in result.rows]
    widths = [len(name) for name in result.columns]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in result.rows)
        and any(row[i] is not None for row in result.rows)
        for i in range(len(result.columns))
    ]
    lines = [
        " | ".join(
            name.ljust(w) for name, w in zip(result.columns, widths, strict=True)
        ).rstrip()
    ]
    lines.append("-+-".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            " | ".join(
                text.rjust(w) if numeric[i] else text.ljust(w)
                for i, (text, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    plural = "" if result.row_count == 1 else "s"
    lines.append(f"({result.row_count} row{plural})")
    return "\n".join(lines)
