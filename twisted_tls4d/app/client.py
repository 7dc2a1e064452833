"""
A client of the application server, for Twisted programs (`connect`,
`AppClient`) and for scripts that make one call and exit (`blocking_call`).

The client presents its certificate, verifies the server's certificate and
host name against the CA it trusts (`twisted_tls4d.clienttls`), numbers its
requests itself and matches each answer to its request by id.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, cast

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d import clienttls
from twisted_tls4d.app.wire import (
    DEFAULT_PORT,
    HEADER,
    AppError,
    FrameDecodeError,
    decode_payload,
    encode_payload,
)
from twisted_tls4d.errors import Tls4dError

__all__ = [
    "DEFAULT_CLIENT_MAX_FRAME_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "AppClient",
    "AppClientProtocol",
    "AppConnectionError",
    "AppError",
    "blocking_call",
    "connect",
    "describe_connection_failure",
    "describe_tls_failure",
    "failure_detail",
    "server_certificate_of",
]

#: The largest answer the client reads, in bytes. Larger than the server's
#: default request limit, since an answer may be longer than its request
#: (an echo with escapes, for instance).
DEFAULT_CLIENT_MAX_FRAME_SIZE = 64 * 1024 * 1024

#: Seconds to wait for the TCP connection when none is given.
DEFAULT_CONNECT_TIMEOUT = 30.0

#: How many of the first bytes from a server an error message shows when
#: they are not the application protocol.
_SHOWN_BYTES = 24

#: What the TLS alerts a server sends to a refused client mean for its user;
#: ``{cert}`` stands for the client's certificate file.
_REFUSAL_ALERTS = {
    "certificate required": "the server requires a client certificate and got "
    "none it accepts",
    "unknown ca": "the server refused this client's certificate: the server does "
    "not trust the CA that issued it; use an identity from 'tls4d client' for "
    "that server's root",
    "bad certificate": "the server refused this client's certificate ({cert})",
    "certificate unknown": "the server refused this client's certificate ({cert})",
    "certificate revoked": "the server refused this client's certificate "
    "({cert}): it is revoked",
    "certificate expired": "this client's certificate ({cert}) has expired; "
    "issue a new one with 'tls4d client'",
    "unsupported certificate": "the server refused this client's certificate "
    "({cert}): it is not meant for client authentication",
    "decrypt error": "the server could not verify this client's signature; "
    "check that the key belongs to the certificate ({cert})",
    "protocol version": "the server accepts none of the TLS versions this "
    "client offers",
    "handshake failure": "the server and this client have no cipher suite or "
    "key exchange group in common",
    "insufficient security": "the server and this client have no cipher suite "
    "or key exchange group in common",
}

#: OpenSSL reasons that mean the peer answered the handshake with something
#: other than TLS.
_NOT_TLS_REASONS = ("wrong version number", "packet length too long", "record layer")


class AppConnectionError(Tls4dError):
    """
    The client could not connect to the application server, the TLS
    handshake failed, or the connection ended before an answer arrived.

    Attributes:
        detail: What Twisted or OpenSSL said of the failure, for debugging;
            None when the message says it all.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def _tls_error_text(value: SSL.Error) -> str:
    """
    Returns:
        OpenSSL's reason strings of a pyOpenSSL error, joined.
    """
    reasons = []
    for entry in (
        value.args[0] if value.args and isinstance(value.args[0], list) else []
    ):
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return "; ".join(reasons) or str(value)


def failure_detail(value: object) -> str:
    """
    Returns:
        The exception as Python shows it, for an error's ``detail``.
    """
    return repr(value)


def server_certificate_of(transport: object) -> x509.Certificate | None:
    """
    Find the certificate a server presented, even one that failed
    verification, for telling why it failed.

    Args:
        transport: The TLS transport of a client connection (what the
            protocol's ``transport`` is).

    Returns:
        The server's leaf certificate, or None if the handshake did not get
        that far or the transport is not TLS.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        connection = get_handle()
        chain = connection.get_verified_chain()
        certificate = chain[0] if chain else connection.get_peer_certificate()
    except (AttributeError, SSL.Error):
        return None
    if certificate is None:
        return None
    return cast(x509.Certificate, certificate.to_cryptography())


def describe_tls_failure(
    value: object,
    *,
    host: str | None = None,
    identity: clienttls.ClientIdentity | None = None,
    server_certificate: x509.Certificate | None = None,
) -> str | None:
    """
    Put a failed TLS handshake into words a user can act on. The application
    and SQL clients both word TLS failures with this function.

    Args:
        value: Why the connection failed.
        host: The host name or address dialled.
        identity: The client's identity, to name its files.
        server_certificate: The certificate the server presented, if known
            (see `server_certificate_of`), to tell an expired one.

    Returns:
        A phrase without a final period, such as "the server's certificate is
        not signed by the CA in alice/ca.pem", or None if ``value`` is not a
        TLS failure.
    """
    if isinstance(value, VerificationError):
        dialled = f" ({host})" if host else ""
        return (
            "the server's certificate does not cover the host name or address "
            f"dialled{dialled}; use --host with a name it covers"
        )
    if not isinstance(value, SSL.Error):
        return None

    lowered = _tls_error_text(value).lower()
    if "certificate verify failed" in lowered:
        if server_certificate is not None:
            now = datetime.datetime.now(datetime.UTC)
            expiry = server_certificate.not_valid_after_utc
            start = server_certificate.not_valid_before_utc
            if expiry < now:
                return f"the server's certificate expired on {expiry:%Y-%m-%d} (UTC)"
            if start > now:
                return (
                    "the server's certificate is not valid before "
                    f"{start:%Y-%m-%d %H:%M} (UTC); check the clocks of both machines"
                )
        ca = identity.ca if identity is not None else "the --ca file"
        return f"the server's certificate is not signed by the CA in {ca}"
    cert = identity.cert if identity is not None else "--cert"
    for alert, meaning in _REFUSAL_ALERTS.items():
        if f"alert {alert}" in lowered:
            return meaning.format(cert=cert)
    if any(reason in lowered for reason in _NOT_TLS_REASONS):
        return "the server does not speak TLS on this port"
    return f"TLS failed ({_tls_error_text(value)})"


def describe_connection_failure(
    reason: Failure,
    *,
    host: str | None = None,
    identity: clienttls.ClientIdentity | None = None,
    server_certificate: x509.Certificate | None = None,
    server: str = "application server",
    in_handshake: bool = False,
) -> str:
    """
    Put why a connection attempt or a connection failed into words.

    Args:
        reason: The failure a connection attempt or ``connectionLost`` got.
        host: The host name or address dialled.
        identity: The client's identity, to name its files.
        server_certificate: The certificate the server presented, if known.
        server: What the client meant to reach, such as "SQL server".
        in_handshake: Whether the TLS handshake was still under way.

    Returns:
        A phrase without a final period, such as "the connection was
        refused; check that the application server runs there and listens
        on this port".
    """
    value = reason.value
    tls = describe_tls_failure(
        value, host=host, identity=identity, server_certificate=server_certificate
    )
    if tls is not None:
        return tls
    if isinstance(value, error.ConnectionRefusedError):
        return (
            f"the connection was refused; check that the {server} runs there "
            "and listens on this port"
        )
    if isinstance(value, error.DNSLookupError):
        return "the host name does not resolve"
    if isinstance(value, error.TimeoutError):
        return "the server did not accept the connection in time"
    if isinstance(value, error.ConnectionDone | error.ConnectionLost) and in_handshake:
        return (
            f"the server closed the connection; check that this is the {server}'s port"
        )
    if isinstance(value, error.ConnectionDone):
        return "the server closed the connection"
    if isinstance(value, error.ConnectionLost):
        return "the connection was lost"
    return str(value).rstrip(".") or type(value).__name__


def _error_from_answer(error_object: object) -> AppError:
    """
    Returns:
        The `AppError` an answer's ``error`` member describes, however
        malformed it is.
    """
    if not isinstance(error_object, dict):
        return AppError("unknown", "The server answered with a malformed error.")
    code = error_object.get("code")
    message = error_object.get("message")
    return AppError(
        code if isinstance(code, str) else "unknown",
        message if isinstance(message, str) else "The server gave no message.",
    )


@implementer(IHandshakeListener)
class AppClientProtocol(Int32StringReceiver):
    """
    The client side of one connection to the application server.

    Attributes:
        peer: ``host:port`` of the server, for messages.
        host: The host name or address dialled, for messages; None if
            unknown.
        identity: The client's identity, to name its files in messages;
            None if unknown.
    """

    log = Logger()

    def __init__(
        self,
        *,
        peer: str = "the application server",
        max_frame_size: int = DEFAULT_CLIENT_MAX_FRAME_SIZE,
        host: str | None = None,
        identity: clienttls.ClientIdentity | None = None,
    ) -> None:
        self.peer = peer
        self.host = host
        self.identity = identity
        self.MAX_LENGTH = max_frame_size
        self._first_bytes = b""
        self._frames_received = 0
        self._foreign: str | None = None
        self._next_id = 1
        self._pending: dict[int, tuple[str, Deferred[Any]]] = {}
        self._handshake_done = False
        self._handshake_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._closing = False
        self._lost: AppConnectionError | None = None
        self._problem: str | None = None

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Release whoever waits for the TLS handshake.
        """
        self._handshake_done = True
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def wait_for_handshake(self) -> Deferred[None]:
        """
        Returns:
            A Deferred that fires once the TLS handshake completed, or fails
            with `AppConnectionError` if the connection ends before.
        """
        if self._handshake_done:
            return defer.succeed(None)
        if self._lost is not None:
            return defer.fail(self._lost)
        waiter: Deferred[None] = Deferred()
        self._handshake_waiters.append(waiter)
        return waiter

    def wait_for_close(self) -> Deferred[None]:
        """
        Returns:
            A Deferred that fires once the connection is closed.
        """
        if self._lost is not None:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def call(self, op: str, args: Mapping[str, Any]) -> Deferred[Any]:
        """
        Send one request.

        Args:
            op: The operation's name.
            args: Its arguments.

        Returns:
            A Deferred that fires with the answer's result, or fails with
            `AppError` for an error answer, `AppConnectionError` if the
            connection is or gets lost first, or `ValueError` if the
            arguments cannot be encoded as JSON. Cancelling it forgets the
            request (its answer is then ignored).
        """
        if self._lost is not None:
            return defer.fail(self._lost)
        if self._closing or self.transport is None:
            msg = f"The connection to {self.peer} is closed; {op!r} was not sent."
            return defer.fail(AppConnectionError(msg))

        request_id = self._next_id
        self._next_id += 1
        try:
            payload = encode_payload({"id": request_id, "op": op, "args": dict(args)})
        except (TypeError, ValueError) as e:
            msg = f"The arguments of {op!r} cannot be sent as JSON: {e}."
            return defer.fail(ValueError(msg))

        def forget(_: Deferred[Any]) -> None:
            self._pending.pop(request_id, None)

        answer: Deferred[Any] = Deferred(canceller=forget)
        self._pending[request_id] = (op, answer)
        self.sendString(payload)
        return answer

    def close(self) -> Deferred[None]:
        """
        Close the connection; calls still waiting fail with
        `AppConnectionError`.

        Returns:
            A Deferred that fires once the connection is closed.
        """
        closed = self.wait_for_close()
        if self._lost is None and not self._closing:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[misc, union-attr]
        return closed

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Keep the first bytes the server sends, to show them if they turn out
        not to be the application protocol, and read frames.
        """
        if not self._frames_received and len(self._first_bytes) < _SHOWN_BYTES:
            self._first_bytes += data[: _SHOWN_BYTES - len(self._first_bytes)]
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Match an answer to its request.
        """
        self._frames_received += 1
        try:
            message = decode_payload(string)
        except FrameDecodeError as e:
            self._give_up(f"the server sent a frame that is {e.description}")
            return

        request_id = message.get("id")
        if request_id is None and "error" in message:
            # The server could not tell which request this answers (a frame
            # too large, say); every request in flight may be the culprit.
            answer_error = _error_from_answer(message["error"])
            self.log.debug(
                "The application server {peer} reported: {error}",
                peer=self.peer,
                error=str(answer_error),
            )
            pending, self._pending = self._pending, {}
            for _, waiter in pending.values():
                waiter.errback(answer_error)
            return

        entry = None
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            entry = self._pending.pop(request_id, None)
        if entry is None:
            self.log.debug(
                "Ignored an answer from {peer} to no pending request", peer=self.peer
            )
            return
        op, waiter = entry
        if "error" in message:
            waiter.errback(_error_from_answer(message["error"]))
        elif "result" in message:
            waiter.callback(message["result"])
        else:
            msg = (
                f"The server at {self.peer} answered {op!r} with neither a "
                "result nor an error."
            )
            waiter.errback(AppConnectionError(msg))

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802 (Twisted's name)
        """
        Give up on a server that announces an answer over the client's limit,
        or whose first bytes are text rather than a length: another protocol.
        """
        header = HEADER.pack(length)
        if not self._frames_received and all(32 <= b < 127 for b in header):
            self._not_this_protocol()
            return
        self._give_up(
            f"the server announced an answer of {length} bytes, over this "
            f"client's limit of {self.MAX_LENGTH}"
        )

    def _not_this_protocol(self) -> None:
        """
        Drop a connection whose server does not speak the application
        protocol; whatever waits fails saying so, with what the server sent.
        """
        sent = self._first_bytes.decode("ascii", "backslashreplace")
        if sent.startswith('{"hello"'):
            what = "it greets like the tls4d SQL server"
        else:
            what = f"it sent {sent!r} where an answer belongs"
        self._foreign = (
            f"{self.peer} does not speak the application protocol: {what}; is "
            f"that the application server's port ({DEFAULT_PORT} by default)?"
        )
        self._give_up("the server does not speak the application protocol")

    def _give_up(self, problem: str) -> None:
        """
        Drop a connection whose server broke the protocol; pending calls fail
        with ``problem``.
        """
        if self._problem is None:
            self._problem = problem
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Fail what still waits: the handshake, and every pending call.
        """
        detail = None if self._problem else failure_detail(reason.value)
        tls = describe_tls_failure(
            reason.value,
            host=self.host,
            identity=self.identity,
            server_certificate=server_certificate_of(self.transport),
        )
        why = (
            self._problem
            or tls
            or describe_connection_failure(
                reason,
                server="application server",
                in_handshake=not self._handshake_done,
            )
        )
        closed = self._closing and self._problem is None and tls is None
        if self._foreign is not None:
            lost = AppConnectionError(self._foreign, detail)
        elif not self._handshake_done or tls is not None:
            # With TLS 1.3 a server refuses a client certificate only after
            # the client saw the handshake complete: still a handshake failure.
            lost = AppConnectionError(
                f"The TLS handshake with {self.peer} failed: {why}.", detail
            )
        elif closed:
            lost = AppConnectionError(f"The connection to {self.peer} was closed.")
        else:
            lost = AppConnectionError(
                f"The connection to {self.peer} ended: {why}.", detail
            )
        self._lost = lost

        pending, self._pending = self._pending, {}
        for op, waiter in pending.values():
            if self._foreign is not None or tls is not None:
                waiter.errback(lost)
                continue
            if closed:
                msg = (
                    f"The connection to {self.peer} was closed before the answer "
                    f"to {op!r} arrived."
                )
            else:
                msg = (
                    f"The connection to {self.peer} ended before the answer to "
                    f"{op!r} arrived: {why}."
                )
            waiter.errback(AppConnectionError(msg, detail))

        handshake_waiters, self._handshake_waiters = self._handshake_waiters, []
        for handshake_waiter in handshake_waiters:
            handshake_waiter.errback(lost)
        close_waiters, self._close_waiters = self._close_waiters, []
        for close_waiter in close_waiters:
            close_waiter.callback(None)


class AppClient:
    """
    A connection to the application server, ready for calls.

    Make one with `connect`, or around a connected `AppClientProtocol`.
    """

    def __init__(self, protocol: AppClientProtocol) -> None:
        self.protocol = protocol

    @property
    def peer(self) -> str:
        """``host:port`` of the server."""
        return self.protocol.peer

    def call(self, op: str, /, **args: Any) -> Deferred[Any]:
        """
        Call an operation of the server.

        Args:
            op: The operation's name: ``"ping"``, ``"echo"``, ``"whoami"``.
            **args: Its arguments, sent as the request's ``args`` object.

        Returns:
            A Deferred that fires with the answer's ``result``, or fails with
            `AppError` (with ``code`` and ``message``) for an error answer,
            with `AppConnectionError` if the connection is or gets lost before
            the answer, or with `ValueError` if ``args`` cannot be encoded
            as JSON.
        """
        return self.protocol.call(op, args)

    def close(self) -> Deferred[None]:
        """
        Close the connection. Calls still waiting fail with
        `AppConnectionError`.

        Returns:
            A Deferred that fires once the connection is closed.
        """
        return self.protocol.close()


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(
    reactor: Any,
    host: str,
    port: int,
    identity: clienttls.ClientIdentity,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_CLIENT_MAX_FRAME_SIZE,
) -> Deferred[AppClient]:
    """
    Connect to an application server and complete the TLS handshake.

    With TLS 1.3 a server that refuses the client's certificate lets the
    handshake complete and says so by an alert right after it: the first
    call then fails with `AppConnectionError` naming the refusal.

    Args:
        reactor: The reactor (`IReactorTCP` and `IReactorTime`).
        host: The server's host name or address; its certificate must cover
            it.
        port: The server's port.
        identity: The client's key and certificate, and the CA it trusts to
            have signed the server's certificate.
        timeout: Seconds to wait for the TCP connection.
        max_frame_size: The largest answer accepted, in bytes.

    Returns:
        A Deferred firing with the client once the handshake completed, or
        failing with `AppConnectionError` (connection or handshake failed) or
        `twisted_tls4d.errors.PEMError` (an identity file is unusable).
    """
    peer = _label(host, port)
    try:
        options = clienttls.client_options(host, identity)
    except Tls4dError as e:
        return defer.fail(e)
    endpoint = wrapClientTLS(
        options,
        cast(
            IStreamClientEndpoint,
            HostnameEndpoint(reactor, host, port, timeout=timeout),
        ),
    )
    protocol = AppClientProtocol(
        peer=peer, max_frame_size=max_frame_size, host=host, identity=identity
    )

    async def connect_and_handshake() -> AppClient:
        try:
            await connectProtocol(endpoint, protocol)
        except defer.CancelledError:
            raise
        except Exception as e:
            why = describe_connection_failure(Failure(e), host=host, identity=identity)
            msg = f"Cannot connect to {peer}: {why}."
            raise AppConnectionError(msg, failure_detail(e)) from e
        await protocol.wait_for_handshake()
        return AppClient(protocol)

    return Deferred.fromCoroutine(connect_and_handshake())


async def _call_and_close(
    reactor: Any,
    host: str,
    port: int,
    identity: clienttls.ClientIdentity,
    op: str,
    args: Mapping[str, Any],
    timeout: float,
    connected: list[AppClient],
) -> Any:
    client = await connect(reactor, host, port, identity, timeout=timeout)
    connected.append(client)
    try:
        result = await client.call(op, **args)
    except BaseException:
        client.close()
        raise
    await client.close()
    return result


def blocking_call(
    host: str,
    port: int,
    identity: clienttls.ClientIdentity,
    op: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Any:
    """
    Connect, make one call, close, and return its result, running the global
    reactor meanwhile. For scripts: a reactor runs only once a process, so
    this can be called only once, and not from a Twisted program.

    Args:
        host: The server's host name or address.
        port: The server's port.
        identity: The client's key, certificate and trusted CA.
        op: The operation's name.
        args: Its arguments.
        timeout: Seconds the whole exchange may take.

    Returns:
        The answer's result.

    Raises:
        AppError: The server answered with an error.
        AppConnectionError: The connection, the handshake or the exchange
            failed, or took longer than ``timeout``.
        PEMError: An identity file is unusable.
    """
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    assert IReactorCore.providedBy(reactor) and IReactorTime.providedBy(reactor)
    outcome: list[Any] = []
    connected: list[AppClient] = []
    interrupted: list[bool] = []
    peer = _label(host, port)

    def note_interruption() -> None:
        # The reactor stops before the exchange ended only when told to by
        # a signal (Ctrl-C); the exchange then fails as its connection closes.
        if not outcome:
            interrupted.append(True)

    def start() -> None:
        exchange = Deferred.fromCoroutine(
            _call_and_close(
                reactor, host, port, identity, op, args or {}, timeout, connected
            )
        )
        exchange.addTimeout(timeout, reactor)
        exchange.addBoth(outcome.append)
        exchange.addBoth(lambda _: reactor.stop() if reactor.running else None)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", note_interruption)
    reactor.run()

    if interrupted or not outcome:
        msg = f"The exchange with {peer} was interrupted before it finished."
        raise AppConnectionError(msg)
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(defer.TimeoutError, defer.CancelledError):
            what = "answer from" if connected else "TLS handshake with"
            msg = (
                f"No {what} {peer} within {timeout:g} s; is that the application "
                f"server's port ({DEFAULT_PORT} by default)?"
            )
            raise AppConnectionError(msg, failure_detail(result.value))
        result.raiseException()
    return result
