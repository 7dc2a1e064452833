"""
A client of the application server for Twisted programs: `connect` gives an
`AppClient` whose ``call(op, **args)`` returns a Deferred, and which can
reconnect by itself. `twisted_tls4d.app.blocking` wraps it for scripts, and
the ``tls4d app`` command uses that.

The client presents its certificate, verifies the server's certificate and
host name against the CA it trusts (`twisted_tls4d.clienttls`), says hello,
numbers its requests itself and matches each answer to its request by id,
in whatever order the answers come.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d import clienttls
from twisted_tls4d.app.wire import (
    CLOSING_EVENT,
    DEFAULT_PORT,
    FRAME_TOO_LARGE,
    HEADER,
    NOT_ALLOWED,
    NOTIFICATION_EVENT,
    PROTOCOL_VERSION,
    UNKNOWN_OP,
    UNSUPPORTED_VERSION,
    AppError,
    FrameDecodeError,
    decode_payload,
    encode_payload,
)
from twisted_tls4d.errors import ClientConnectionError, Tls4dError

__all__ = [
    "DEFAULT_CLIENT_MAX_FRAME_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "AppClient",
    "AppClientProtocol",
    "AppConnectionError",
    "AppError",
    "Limits",
    "Notification",
    "ServerInfo",
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


class AppConnectionError(ClientConnectionError):
    """
    The client could not connect to the application server, the TLS
    handshake failed, or the connection ended before an answer arrived.
    """


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
    details = error_object.get("details")
    return AppError(
        code if isinstance(code, str) else "unknown",
        message if isinstance(message, str) else "The server gave no message.",
        details if isinstance(details, dict) else None,
    )


@attrs.frozen
class Limits:
    """
    The limits a server announced in its ``hello`` answer.

    Attributes:
        max_frame_size: The largest frame payload it reads or sends, in bytes.
        max_outstanding: How many requests of one connection it works on at
            once; it reads no more until one is answered.
        idle_timeout: Seconds a connection with no request in progress may
            stay silent.
        handshake_timeout: Seconds a client has for its TLS handshake.
    """

    max_frame_size: int
    max_outstanding: int
    idle_timeout: float
    handshake_timeout: float


@attrs.frozen
class ServerInfo:
    """
    What a server said of itself in its ``hello`` answer.

    Attributes:
        version: The protocol version agreed on; 0 for a server of the first,
            unversioned release, which knows no ``hello`` and answers only
            ping, echo and whoami.
        server: The server's software (``"tls4d"``), or None.
        name: The server's name, or None.
        client: The client's name as the server read it from its
            certificate, or None.
        ops: The operations the server offers.
        limits: Its limits, or None for a version 0 server.
    """

    version: int
    server: str | None = None
    name: str | None = None
    client: str | None = None
    ops: tuple[str, ...] = ("echo", "ping", "whoami")
    limits: Limits | None = None

    @classmethod
    def from_hello(cls, result: object) -> ServerInfo:
        """
        Args:
            result: The result of a ``hello`` request.

        Returns:
            What it says.

        Raises:
            ValueError: It is not a hello answer of a known version.
        """
        if not isinstance(result, dict):
            msg = f"the hello answer is {type(result).__name__}, not an object"
            raise ValueError(msg)
        version = result.get("version")
        limits = result.get("limits")
        if version != PROTOCOL_VERSION or not isinstance(limits, dict):
            msg = f"the hello answer names version {version!r} or has no limits"
            raise ValueError(msg)
        try:
            known = Limits(
                max_frame_size=int(limits["max_frame_size"]),
                max_outstanding=int(limits["max_outstanding"]),
                idle_timeout=float(limits["idle_timeout"]),
                handshake_timeout=float(limits["handshake_timeout"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            msg = f"the hello answer's limits lack {e}"
            raise ValueError(msg) from e

        def text(key: str) -> str | None:
            value = result.get(key)
            return value if isinstance(value, str) else None

        ops = result.get("ops")
        return cls(
            version=version,
            server=text("server"),
            name=text("name"),
            client=text("client"),
            ops=tuple(o for o in ops if isinstance(o, str))
            if isinstance(ops, list)
            else (),
            limits=known,
        )


@attrs.frozen
class Notification:
    """
    A notification the server sent because a client called ``notify`` on a
    topic this client subscribed to.

    Attributes:
        topic: The topic.
        data: What the notifying client sent with it.
        sender: The common name of the notifying client's certificate.
        missed: How many notifications this connection missed just before
            this one, because it read too slowly.
    """

    topic: str
    data: Any
    sender: str | None
    missed: int = 0


#: What receives the notifications of a topic.
NotificationCallback = Callable[[Notification], object]


@implementer(IHandshakeListener)
class AppClientProtocol(Int32StringReceiver):
    """
    The client side of one connection to the application server: it says
    hello as soon as it is connected, numbers its requests, matches each
    answer to its request by id, and hands events to ``on_event``.

    Attributes:
        peer: ``host:port`` of the server, for messages.
        host: The host name or address dialled, for messages; None if
            unknown.
        identity: The client's identity, to name its files in messages;
            None if unknown.
        agent: What the client tells the server it is, in ``hello``.
        server: What the server said in its ``hello`` answer, once it came.
        on_event: Called with each event frame the server sends (a dict with
            ``event``), except ``closing``, which the protocol reads itself.
    """

    log = Logger()

    def __init__(
        self,
        *,
        peer: str = "the application server",
        max_frame_size: int = DEFAULT_CLIENT_MAX_FRAME_SIZE,
        host: str | None = None,
        identity: clienttls.ClientIdentity | None = None,
        agent: str | None = None,
        greet: bool = True,
    ) -> None:
        """
        Args:
            peer: ``host:port`` of the server, for messages.
            max_frame_size: The largest frame accepted from the server before
                its ``hello`` announces its own limit, in bytes.
            host: The host name or address dialled, for messages.
            identity: The client's identity, to name its files in messages.
            agent: What the client tells the server it is.
            greet: Whether to say hello once connected (tests of the raw
                protocol turn it off).
        """
        self.peer = peer
        self.host = host
        self.identity = identity
        self.agent = agent
        self.greet = greet
        self.MAX_LENGTH = max_frame_size
        self.server: ServerInfo | None = None
        self.on_event: Callable[[dict[str, Any]], object] | None = None
        self._first_bytes = b""
        self._frames_received = 0
        self._foreign: str | None = None
        self._next_id = 1
        self._pending: dict[int, tuple[str, Deferred[Any]]] = {}
        self._handshake_done = False
        self._handshake_waiters: list[Deferred[None]] = []
        self._ready_waiters: list[Deferred[ServerInfo]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._closing = False
        self._lost: AppConnectionError | None = None
        self._problem: str | None = None
        self._refusal: str | None = None
        self._server_closing: str | None = None

    @property
    def handshake_done(self) -> bool:
        """Whether the TLS handshake completed."""
        return self._handshake_done

    @property
    def lost(self) -> AppConnectionError | None:
        """Why the connection ended, once it has."""
        return self._lost

    @property
    def ready(self) -> bool:
        """Whether the hello exchange is done and the connection is up."""
        return self.server is not None and self._lost is None and not self._closing

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Say hello; TLS sends it as soon as the handshake is done.
        """
        if self.greet:
            args: dict[str, Any] = {"version": PROTOCOL_VERSION}
            if self.agent:
                args["agent"] = self.agent
            self._send("hello", args).addCallbacks(self._greeted, self._not_greeted)

    def _greeted(self, result: Any) -> None:
        """
        Take the server's hello answer, and release whoever waits for it.
        """
        try:
            server = ServerInfo.from_hello(result)
        except ValueError as e:
            self._give_up(f"the server's hello answer is not usable ({e})")
            return
        self.MAX_LENGTH = max(self.MAX_LENGTH, server.limits.max_frame_size)  # type: ignore[union-attr]
        self._set_ready(server)

    def _not_greeted(self, failure: Failure) -> None:
        """
        Take a refused hello: a server of the first release (no hello), or
        one that speaks another version.
        """
        if failure.check(AppConnectionError):
            return
        value = failure.value
        if isinstance(value, AppError) and value.code == UNKNOWN_OP:
            self._set_ready(ServerInfo(version=0))
            return
        if isinstance(value, AppError) and value.code == UNSUPPORTED_VERSION:
            self._give_up(
                f"the server does not speak protocol version {PROTOCOL_VERSION} "
                f"({value.message})"
            )
            return
        self._give_up(f"the server refused hello: {value}")

    def _set_ready(self, server: ServerInfo) -> None:
        self.server = server
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(server)

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

    def wait_until_ready(self) -> Deferred[ServerInfo]:
        """
        Returns:
            A Deferred that fires with what the server said in ``hello``, or
            fails with `AppConnectionError` if the connection, the handshake
            or the hello exchange fails. Cancelling it aborts the connection.
        """
        if self.server is not None:
            return defer.succeed(self.server)
        if self._lost is not None:
            return defer.fail(self._lost)

        def abort(waiter: Deferred[ServerInfo]) -> None:
            if waiter in self._ready_waiters:
                self._ready_waiters.remove(waiter)
            if self.transport is not None and self._lost is None:
                self.transport.abortConnection()

        waiter: Deferred[ServerInfo] = Deferred(canceller=abort)
        self._ready_waiters.append(waiter)
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
            `AppError` for an error answer (or, unsent, ``frame_too_large``
            for a request over the server's limit), `AppConnectionError` if
            the connection is or gets lost first, or `ValueError` if the
            arguments cannot be encoded as JSON. Cancelling it forgets the
            request (its answer is then ignored).
        """
        return self._send(op, dict(args))

    def _send(self, op: str, args: dict[str, Any]) -> Deferred[Any]:
        if self._lost is not None:
            return defer.fail(self._lost)
        if self._closing or self.transport is None:
            msg = f"The connection to {self.peer} is closed; {op!r} was not sent."
            return defer.fail(AppConnectionError(msg))

        request_id = self._next_id
        self._next_id += 1
        try:
            payload = encode_payload({"id": request_id, "op": op, "args": args})
        except (TypeError, ValueError) as e:
            msg = f"The arguments of {op!r} cannot be sent as JSON: {e}."
            return defer.fail(ValueError(msg))
        limits = self.server.limits if self.server is not None else None
        if limits is not None and len(payload) > limits.max_frame_size:
            msg = (
                f"The request for {op!r} is {len(payload)} bytes, over the "
                f"server's limit of {limits.max_frame_size} bytes; it was not "
                "sent. Send less."
            )
            return defer.fail(AppError(FRAME_TOO_LARGE, msg))

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
        Match an answer to its request, or take an event.
        """
        self._frames_received += 1
        try:
            message = decode_payload(string)
        except FrameDecodeError as e:
            self._give_up(f"the server sent a frame that is {e.description}")
            return

        if "id" not in message:
            self._event_received(message)
            return
        request_id = message.get("id")
        if request_id is None and "error" in message:
            self._unattributed_error(_error_from_answer(message["error"]))
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

    def _unattributed_error(self, answer_error: AppError) -> None:
        """
        Take an error the server could not tie to a request: a refusal of
        this client, or a frame it could not read (one too large, say), for
        which every request in flight may be the culprit.
        """
        if answer_error.code == NOT_ALLOWED:
            self._refusal = answer_error.message
            return
        self.log.debug(
            "The application server {peer} reported: {error}",
            peer=self.peer,
            error=str(answer_error),
        )
        pending, self._pending = self._pending, {}
        for _, waiter in pending.values():
            waiter.errback(answer_error)

    def _event_received(self, message: dict[str, Any]) -> None:
        """
        Take an event: note why the server closes, or pass it on.
        """
        if message.get("event") == CLOSING_EVENT:
            reason = message.get("message")
            self._server_closing = (
                reason.rstrip(".") if isinstance(reason, str) else "it gave no reason"
            )
            return
        if self.on_event is None:
            self.log.debug(
                "Ignored an event from {peer}: {event!r}",
                peer=self.peer,
                event=message.get("event"),
            )
            return
        try:
            self.on_event(message)
        except Exception:
            self.log.failure("Handling an event from {peer} failed", peer=self.peer)

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
        Fail what still waits: the handshake, the hello, and every pending
        call.
        """
        detail = None if self._problem else failure_detail(reason.value)
        tls = describe_tls_failure(
            reason.value,
            host=self.host,
            identity=self.identity,
            server_certificate=server_certificate_of(self.transport),
        )
        if self._refusal is not None:
            tls = None
        why = (
            self._problem
            or (
                f"the server refused this client: {self._refusal.rstrip('.')}"
                if self._refusal
                else None
            )
            or (
                f"the server closed it: {self._server_closing}"
                if self._server_closing
                else None
            )
            or tls
            or describe_connection_failure(
                reason,
                server="application server",
                in_handshake=not self._handshake_done,
            )
        )
        closed = (
            self._closing
            and self._problem is None
            and tls is None
            and self._refusal is None
        )
        if self._foreign is not None:
            lost = AppConnectionError(self._foreign, detail)
        elif self._refusal is not None:
            lost = AppConnectionError(
                f"The application server at {self.peer} refused this client: "
                f"{self._refusal}",
                detail,
            )
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
            if self._foreign is not None or tls is not None or self._refusal:
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

        waiting: list[Deferred[Any]] = [
            *self._handshake_waiters,
            *self._ready_waiters,
        ]
        self._handshake_waiters, self._ready_waiters = [], []
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(lost)
        close_waiters, self._close_waiters = self._close_waiters, []
        for close_waiter in close_waiters:
            close_waiter.callback(None)


class _ClientFactory(Factory):
    """
    Builds the protocol of each connection a reconnecting `AppClient` makes.
    """

    noisy = False

    def __init__(self, client: AppClient, make: Callable[[], AppClientProtocol]):
        self._client = client
        self._make = make

    def buildProtocol(self, addr: Any) -> AppClientProtocol:  # noqa: N802
        protocol = self._make()
        self._client.adopt(protocol)
        return protocol


class AppClient:
    """
    A connection to the application server, ready for calls; make one with
    `connect`.

    With ``reconnect``, a lost connection is made again, with growing
    delays between attempts, and says hello again and subscribes again to
    the client's topics; calls in flight when it was lost fail with
    `AppConnectionError`, calls made while it is down wait for the next
    attempt and fail if that fails.

    Attributes:
        peer: ``host:port`` of the server.
        failures: How many attempts to connect failed in a row.
    """

    log = Logger()

    def __init__(
        self,
        protocol: AppClientProtocol | None = None,
        *,
        peer: str | None = None,
        clock: Any = None,
        keepalive: float | None = None,
    ) -> None:
        """
        Args:
            protocol: A connected protocol, for a client that does not
                reconnect; None for one `connect` wires to a
                `twisted.application.internet.ClientService`.
            peer: ``host:port`` of the server, for messages.
            clock: Schedules keepalive pings; the global reactor if None.
            keepalive: Seconds between pings that keep an otherwise silent
                connection from the server's idle timeout; None for none.
        """
        self.peer = peer or (protocol.peer if protocol else "the application server")
        self._fixed = protocol
        self._current: AppClientProtocol | None = None
        self._ever_ready = False
        self._service: ClientService | None = None
        self._topics: dict[str, list[NotificationCallback]] = {}
        self._waiters: list[Deferred[AppClientProtocol]] = []
        self._watching = False
        self.failures = 0
        self._closed = False
        self._clock = clock
        self._keepalive: LoopingCall | None = None
        if protocol is not None:
            self.adopt(protocol)
            if protocol.ready:
                self._current = protocol
        if keepalive is not None:
            self.keep_alive(keepalive)

    def keep_alive(self, interval: float) -> None:
        """
        Ping the server every ``interval`` seconds, so that it does not close
        a connection that has nothing else to say (one waiting for
        notifications, say) as idle.

        Args:
            interval: Seconds between pings; best a third of the server's
                ``limits.idle_timeout`` or less.
        """
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = LoopingCall(self._ping)
        if self._clock is not None:
            self._keepalive.clock = self._clock
        self._keepalive.start(interval, now=False)

    def use_service(self, service: ClientService) -> None:
        """
        Reconnect through ``service``, whose factory hands each new protocol
        to `adopt`; `connect` calls this.
        """
        self._service = service

    @property
    def protocol(self) -> AppClientProtocol | None:
        """The protocol of the connection in use, if one is up (always the
        one given, for a client that does not reconnect)."""
        return self._fixed or self._current

    @property
    def server(self) -> ServerInfo | None:
        """What the server said in its last ``hello`` answer."""
        protocol = self._fixed or self._current
        return protocol.server if protocol is not None else None

    def adopt(self, protocol: AppClientProtocol) -> None:
        """
        Take a new connection's protocol: route its events here, and use it
        once it has said hello.
        """
        protocol.on_event = self._event
        protocol.wait_until_ready().addCallbacks(
            lambda _: self._ready(protocol), lambda f: self._not_ready(protocol, f)
        )
        protocol.wait_for_close().addCallback(lambda _: self._lost(protocol))

    def _ready(self, protocol: AppClientProtocol) -> None:
        if self._closed:
            protocol.close()
            return
        reconnected = self._ever_ready
        self._ever_ready = True
        self._current = protocol
        self.failures = 0
        if self._service is not None and reconnected:
            self.log.info("Reconnected to {peer}", peer=self.peer)
        for topic in self._topics:
            protocol.call("subscribe", {"topic": topic}).addErrback(
                self._not_subscribed, topic
            )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _not_subscribed(self, failure: Failure, topic: str) -> None:
        self.log.warn(
            "Could not subscribe again to {topic} at {peer}: {why}",
            topic=topic,
            peer=self.peer,
            why=str(failure.value),
        )

    def _not_ready(self, protocol: AppClientProtocol, failure: Failure) -> None:
        self.failures += 1
        if self._service is not None and self._ever_ready and not self._closed:
            self.log.warn(
                "Connecting to {peer} failed, retrying: {why}",
                peer=self.peer,
                why=str(failure.value),
            )
        self._fail_waiters(failure.value)

    def _lost(self, protocol: AppClientProtocol) -> None:
        if self._service is None and self._keepalive is not None:
            if self._keepalive.running:
                self._keepalive.stop()
        if self._current is not protocol:
            return
        self._current = None
        if self._service is not None and not self._closed:
            self.log.warn(
                "{why} Reconnecting.", why=str(protocol.lost or "Connection lost.")
            )

    def _fail_waiters(self, why: object) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            msg = f"Cannot reconnect to {self.peer}: {str(why).rstrip('.')}."
            waiter.errback(AppConnectionError(msg))

    def _connection(self) -> Deferred[AppClientProtocol]:
        """
        Returns:
            The connection in use, or the next one once it said hello;
            failing with `AppConnectionError` if that attempt fails or the
            client is closed.
        """
        if self._closed:
            msg = f"The client of {self.peer} is closed."
            return defer.fail(AppConnectionError(msg))
        if self._fixed is not None:
            return defer.succeed(self._fixed)
        if self._current is not None and self._current.ready:
            return defer.succeed(self._current)
        if self._service is None:
            msg = f"The client of {self.peer} has no connection."
            return defer.fail(AppConnectionError(msg))
        waiter: Deferred[AppClientProtocol] = Deferred()
        self._waiters.append(waiter)
        if not self._watching:
            # ClientService says when the next attempt fails before the TLS
            # connection is up; a failed hello is seen by _not_ready.
            self._watching = True

            def done(result: object) -> None:
                self._watching = False
                if isinstance(result, Failure) and not result.check(
                    defer.CancelledError
                ):
                    self._fail_waiters(
                        describe_connection_failure(result, server="application server")
                    )

            self._service.whenConnected(failAfterFailures=1).addBoth(done)
        return waiter

    def call(self, op: str, /, **args: Any) -> Deferred[Any]:
        """
        Call an operation of the server.

        Args:
            op: The operation's name.
            **args: Its arguments, sent as the request's ``args`` object.

        Returns:
            A Deferred that fires with the answer's ``result``, or fails with
            `AppError` (with ``code``, ``message`` and ``details``) for an
            error answer, with `AppConnectionError` if the connection is or
            gets lost before the answer, or with `ValueError` if ``args``
            cannot be encoded as JSON.
        """
        return self._connection().addCallback(lambda p: p.call(op, args))

    def sql(self, statement: str, *parameters: Any) -> Deferred[dict[str, Any]]:
        """
        Run one SQL statement against the server's database.

        Args:
            statement: The statement, with a ``?`` for each parameter.
            *parameters: The values of the placeholders, in order (bytes are
                sent as ``{"blob": BASE64}``).

        Returns:
            A Deferred firing with ``{"columns", "rows", "changes",
            "in_transaction"}``, or failing as `call` does.
        """
        params = [
            {"blob": base64.b64encode(p).decode("ascii")} if isinstance(p, bytes) else p
            for p in parameters
        ]
        return self.call("sql", statement=statement, params=params)

    def notify(self, topic: str, data: Any = None) -> Deferred[int]:
        """
        Send a notification to the other clients subscribed to ``topic``.

        Returns:
            A Deferred firing with how many connections it reached.
        """
        return self.call("notify", topic=topic, data=data).addCallback(
            lambda result: int(result["delivered"])
        )

    def subscribe(self, topic: str, callback: NotificationCallback) -> Deferred[None]:
        """
        Have ``callback`` called with each `Notification` of ``topic``; a
        reconnecting client subscribes again after each reconnection.

        Returns:
            A Deferred firing once the server confirmed the subscription.
        """
        first = topic not in self._topics
        self._topics.setdefault(topic, []).append(callback)
        if not first:
            return defer.succeed(None)

        def undo(failure: Failure) -> Failure:
            callbacks = self._topics.get(topic, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._topics.pop(topic, None)
            return failure

        subscribed = self.call("subscribe", topic=topic)
        return subscribed.addCallbacks(lambda _: None, undo)

    def unsubscribe(self, topic: str) -> Deferred[None]:
        """
        Stop receiving the notifications of ``topic``.

        Returns:
            A Deferred firing once the server confirmed it.
        """
        if self._topics.pop(topic, None) is None:
            return defer.succeed(None)
        return self.call("unsubscribe", topic=topic).addCallback(lambda _: None)

    def _event(self, message: dict[str, Any]) -> None:
        """
        Hand a notification to the callbacks of its topic.
        """
        if message.get("event") != NOTIFICATION_EVENT:
            self.log.debug(
                "Ignored an event {event!r} from {peer}",
                event=message.get("event"),
                peer=self.peer,
            )
            return
        topic = message.get("topic")
        if not isinstance(topic, str):
            return
        sender = message.get("sender")
        missed = message.get("missed")
        notification = Notification(
            topic=topic,
            data=message.get("data"),
            sender=sender if isinstance(sender, str) else None,
            missed=missed if isinstance(missed, int) else 0,
        )
        for callback in list(self._topics.get(topic, ())):
            try:
                callback(notification)
            except Exception:
                self.log.failure("A callback of topic {topic} failed", topic=topic)

    def _ping(self) -> None:
        """
        Ping the server, to keep a silent connection from its idle timeout.
        """
        protocol = self._current
        if protocol is not None and protocol.ready:
            protocol.call("ping", {}).addErrback(lambda _: None)

    def close(self) -> Deferred[None]:
        """
        Close the connection and stop reconnecting. Calls still waiting fail
        with `AppConnectionError`.

        Returns:
            A Deferred that fires once the connection is closed.
        """
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        first = not self._closed
        self._closed = True
        if first:
            self._fail_waiters("the client was closed")
        if self._service is not None:
            service, self._service = self._service, None
            # Stopping from inside one of the service's own callbacks (a
            # failed attempt's) would re-enter its state machine: wait a turn.
            later: Deferred[None] = task.deferLater(
                self._clock or _global_reactor(), 0, lambda: None
            )
            return later.addCallback(lambda _: service.stopService())
        protocol = self._fixed or self._current
        if protocol is not None:
            return protocol.close()
        return defer.succeed(None)


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timed_out(peer: str, protocol: AppClientProtocol | None, timeout: float) -> str:
    """
    Returns:
        What it means that ``connect`` got nowhere within ``timeout``.
    """
    if protocol is None or not protocol.handshake_done:
        what = "TLS handshake with"
    else:
        what = "answer from"
    return (
        f"No {what} {peer} within {timeout:g} s; is that the application "
        f"server's port ({DEFAULT_PORT} by default)?"
    )


def connect(
    reactor: Any,
    host: str,
    port: int,
    identity: clienttls.ClientIdentity,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_CLIENT_MAX_FRAME_SIZE,
    reconnect: bool = False,
    retry_policy: Callable[[int], float] | None = None,
    keepalive: float | None = None,
    agent: str | None = None,
) -> Deferred[AppClient]:
    """
    Connect to an application server, complete the TLS handshake, and say
    hello.

    Args:
        reactor: The reactor (`IReactorTCP` and `IReactorTime`).
        host: The server's host name or address; its certificate must cover
            it.
        port: The server's port.
        identity: The client's key and certificate, and the CA it trusts to
            have signed the server's certificate.
        timeout: Seconds the connection, the handshake and the hello may
            take together.
        max_frame_size: The largest frame accepted before the server's
            hello announces its limit, in bytes.
        reconnect: Whether to connect again, after a growing delay, whenever
            the connection is lost (`twisted.application.internet.ClientService`).
            The first connection must succeed.
        retry_policy: With ``reconnect``, the seconds to wait before attempt
            number N+1 after N failed; Twisted's ``backoffPolicy()`` (1 s
            growing by half each time to a minute, with jitter) if None.
        keepalive: Seconds between pings that keep an otherwise silent
            connection open past the server's idle timeout; None for none.
        agent: What the client tells the server it is (``"myapp/1.2"``), for
            its logs.

    Returns:
        A Deferred firing with the client once the server said hello, or
        failing with `AppConnectionError` (the connection, the handshake or
        the hello failed, or took longer than ``timeout``) or
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

    protocols: list[AppClientProtocol] = []

    def make_protocol() -> AppClientProtocol:
        protocol = AppClientProtocol(
            peer=peer,
            max_frame_size=max_frame_size,
            host=host,
            identity=identity,
            agent=agent,
        )
        protocols.append(protocol)
        return protocol

    client: AppClient | None = None
    if reconnect:
        client = reconnecting = AppClient(peer=peer, clock=reactor, keepalive=keepalive)
        policy = retry_policy or backoffPolicy()
        service = ClientService(
            endpoint,
            cast(IProtocolFactory, _ClientFactory(reconnecting, make_protocol)),
            retryPolicy=lambda attempt: policy(attempt + reconnecting.failures),
            clock=reactor,
        )
        reconnecting.use_service(service)

        async def first_connection() -> AppClient:
            service.startService()
            try:
                connected = await service.whenConnected(failAfterFailures=1)
            except defer.CancelledError:
                raise
            except Exception as e:
                await reconnecting.close()
                why = describe_connection_failure(
                    Failure(e), host=host, identity=identity
                )
                msg = f"Cannot connect to {peer}: {why}."
                raise AppConnectionError(msg, failure_detail(e)) from e
            try:
                await cast(AppClientProtocol, connected).wait_until_ready()
            except BaseException:
                await reconnecting.close()
                raise
            return reconnecting

        attempt = Deferred.fromCoroutine(first_connection())
    else:
        protocol = make_protocol()

        async def connect_and_greet() -> AppClient:
            try:
                await connectProtocol(endpoint, protocol)
            except defer.CancelledError:
                raise
            except Exception as e:
                why = describe_connection_failure(
                    Failure(e), host=host, identity=identity
                )
                msg = f"Cannot connect to {peer}: {why}."
                raise AppConnectionError(msg, failure_detail(e)) from e
            await protocol.wait_until_ready()
            return AppClient(protocol, clock=reactor, keepalive=keepalive)

        attempt = Deferred.fromCoroutine(connect_and_greet())

    def timed_out(result: AppClient | Failure, seconds: float) -> AppClient:
        if client is not None:
            client.close()
        raise AppConnectionError(
            _timed_out(peer, protocols[-1] if protocols else None, seconds)
        )

    return attempt.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
