"""
The application server: length-prefixed JSON requests over mutual TLS,
answered by built-in operations and an application's own handlers
(`twisted_tls4d.app.ops.Registry`). docs/app-protocol.md is its
specification.

The TLS layer in front of it (`twisted_tls4d.tls`) requires a client
certificate chained to ``Resources/ca.pem``; this protocol answers nothing
before the handshake has delivered that certificate, and may refuse a
certificate whose name is not among those it admits (``--app-allow``).

Requests are served as they arrive and answered as they complete, so a slow
operation does not hold back the answers to later requests. A connection
with ``max_outstanding`` requests unanswered is not read until answers
drain, nor is one whose answers pile up unread in its transport. Each frame
leaves in one ``transport.write``.
"""

from __future__ import annotations

import inspect
import socket
import struct
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d._peer import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    AuthenticatedPeerMixin,
    common_name,
    peer_label,
)
from twisted_tls4d.app.database import SQLConnection, SQLDatabase
from twisted_tls4d.app.ops import (
    BUILTIN_OPS,
    LEGACY_OPS,
    SIMPLE_OPS,
    Connection,
    Identity,
    Registry,
    Request,
)
from twisted_tls4d.app.wire import (
    CLOSING_EVENT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_OUTSTANDING,
    FRAME_TOO_LARGE,
    HELLO_REQUIRED,
    INTERNAL_ERROR,
    INVALID_ARGS,
    INVALID_REQUEST,
    MAX_HEADER_LENGTH,
    MAX_SUBSCRIPTIONS,
    MAX_TOPIC_LENGTH,
    NOT_ALLOWED,
    NOTIFICATION_EVENT,
    PROTOCOL_VERSION,
    RESULT_TOO_LARGE,
    SERVER_SOFTWARE,
    SUPPORTED_VERSIONS,
    UNAVAILABLE,
    UNKNOWN_OP,
    UNSUPPORTED_VERSION,
    AppError,
    FrameDecodeError,
    RequestId,
    decode_payload,
    encode_payload,
    is_request_id,
    json_kind,
)
from twisted_tls4d.errors import ConfigurationError

#: How much of a client-chosen name (an op) a log line or message quotes.
_QUOTE_LIMIT = 40

#: A frame with more than this many bytes still to come is gathered piece by
#: piece (see `AppServerProtocol._gather_large_frame`).
GATHER_FROM = 64 * 1024

#: Seconds a connection the server closes may take to read its last frame
#: before it is cut.
CLOSE_GRACE = 5.0

#: The longest ``agent`` of a hello that the log shows, in characters.
_AGENT_LIMIT = 100


class _RefusedRequestError(Exception):
    """
    A frame that cannot be served, with the error answer it gets.

    Attributes:
        request_id: The request's id if it had a usable one, else None.
        error: The error answer's code and message.
        description: A short phrase for the log that quotes no payload.
    """

    def __init__(
        self, request_id: RequestId | None, error: AppError, description: str
    ) -> None:
        super().__init__(description)
        self.request_id = request_id
        self.error = error
        self.description = description


def _quote(name: str) -> str:
    """
    Returns:
        ``repr(name)``, cut short for a log line or an error message.
    """
    if len(name) > _QUOTE_LIMIT:
        return repr(name[:_QUOTE_LIMIT]) + "..."
    return repr(name)


def _request_has(what: str) -> str:
    """
    Returns:
        The start of a sentence about a request's member, from a phrase such
        as ``no "id"`` or ``"op" is a number``.
    """
    if what.startswith("no "):
        return f"The request has {what}"
    return f"The request's {what}"


def _topic_of(args: Mapping[str, Any]) -> str:
    """
    Returns:
        The ``topic`` argument of a subscribe, unsubscribe or notify.

    Raises:
        AppError: It is missing or not a string of 1 to `MAX_TOPIC_LENGTH`
            characters (``invalid_args``).
    """
    topic = args.get("topic")
    if not isinstance(topic, str) or not 1 <= len(topic) <= MAX_TOPIC_LENGTH:
        what = json_kind(topic) if "topic" in args else "missing"
        msg = (
            f'"topic" is {what}; name the topic with a string of 1 to '
            f"{MAX_TOPIC_LENGTH} characters."
        )
        raise AppError(INVALID_ARGS, msg)
    return topic


def _refuse_extra(op: str, args: Mapping[str, Any], allowed: Collection[str]) -> None:
    """
    Raises:
        AppError: ``args`` holds a name not in ``allowed`` (``invalid_args``).
    """
    extra = sorted(set(args) - set(allowed))
    if extra:
        names = ", ".join(repr(name) for name in extra)[:200]
        takes = ", ".join(sorted(allowed))
        msg = f"The {op!r} operation takes {takes}; it does not take {names}."
        raise AppError(INVALID_ARGS, msg)


class _RequestConnection(Connection):
    """
    What a handler may do with its request's connection: notify the other
    connections, and use the connection's database session.
    """

    def __init__(self, protocol: AppServerProtocol) -> None:
        self._protocol = protocol

    def notify(self, topic: str, data: Any) -> int:
        return self._protocol.notify(_topic_of({"topic": topic}), data)

    def sql(self, statement: str, parameters: Any = ()) -> Deferred[dict[str, Any]]:
        return self._protocol.run_sql(statement, list(parameters))


@implementer(IPushProducer)
class AppServerProtocol(AuthenticatedPeerMixin, Int32StringReceiver):
    """
    One client connection of the application server.

    Each frame is one request; each request gets exactly one answer, written
    with a single ``transport.write`` so that it leaves as one TLS record.

    Attributes:
        identity: The client's verified identity, once the handshake is done.
        version: The protocol version ``hello`` agreed on; None before.
        requests_answered: How many frames got an answer on this connection.
    """

    server_name = "application server"
    factory: AppServerFactory
    #: The TLS transport; typed loosely, as zope interfaces confuse mypy.
    transport: Any

    def __init__(self, factory: AppServerFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.MAX_LENGTH = factory.max_frame_size
        self.handshake_timeout = factory.handshake_timeout
        self.idle_timeout = factory.idle_timeout
        self.request_timeout = factory.request_timeout
        self.identity: Identity | None = None
        self.version: int | None = None
        self.requests_answered = 0
        self._pending: dict[RequestId, Deferred[Any]] = {}
        self._subscriptions: set[str] = set()
        self._missed = 0
        self._write_paused = False
        self._receiving = False
        self._gathering: list[bytes] | None = None
        self._peer_label: str | None = None
        self._connection_view = _RequestConnection(self)
        self._gathered = 0
        self._gather_until = 0
        self._closing = False
        self._lost = False
        self._refused = False
        self._cut: Any = None
        self._sql: SQLConnection | None = None

    # Connection life

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Give the client ``handshake_timeout`` seconds to complete TLS, and
        stop reading requests whenever answers pile up unread.

        The protocol registers itself as the transport's streaming producer:
        when the client does not read its answers and the transport's buffer
        fills, the transport pauses it, which stops reading the socket until
        the buffer drains.
        """
        self.start_handshake_timer()
        self.transport.registerProducer(self, True)

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Refuse a certificate whose name the server does not admit; take the
        others (see `AuthenticatedPeerMixin.handshakeCompleted`).
        """
        allowed = self.factory.allowed_names
        if allowed is not None:
            handle = self.transport.getHandle()
            certificate = handle.get_peer_certificate(as_cryptography=True)
            if certificate is not None and common_name(certificate) not in allowed:
                self._refuse_name(common_name(certificate))
                return
        super().handshakeCompleted()

    def peer_authenticated(self) -> None:
        """
        Note who the client is, and serve it.
        """
        assert self.peer_certificate is not None
        self.identity = Identity.from_certificate(self.peer_certificate)
        if self.factory.stopped:
            self.close_with_event(
                "shutdown", "The server is shutting down; connect again later."
            )
            return
        self.factory.connections.add(self)

    def _refuse_name(self, name: str) -> None:
        """
        Refuse a verified certificate whose name is not admitted: log it as
        a refused handshake, tell the client why, and close.
        """
        self._refused = True
        self.setTimeout(None)
        self.log.warn(
            "{server}: refused TLS handshake from {peer}: its certificate name "
            "{name!r} is not among those --app-allow admits",
            server=self.server_name,
            peer=peer_label(self.transport),
            name=name,
        )
        message = (
            f"This server admits only the clients its operator named, and the "
            f"certificate name {name!r} is not among them; ask the operator to "
            "admit it (--app-allow)."
        )
        self._close_after(
            encode_payload(
                {"id": None, "error": AppError(NOT_ALLOWED, message).to_json()}
            )
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Stop the timers and pending work, leave the topics, end the database
        session, and log a refused handshake or the end of a session.
        """
        self._lost = True
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        self.stop_request_deadline()
        if self._refused:
            self.setTimeout(None)
        else:
            self.log_refusal_if_any(reason)
        self.factory.connections.discard(self)
        for topic in self._subscriptions:
            self.factory.unsubscribe(self, topic)
        self._subscriptions.clear()
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.cancel()
        if self._sql is not None and self.factory.database is not None:
            self.factory.database.forget(self._sql)
        if self.identity is not None:
            self.log.info(
                "{server}: {peer} ({name}) disconnected; requests answered: {count}",
                server=self.server_name,
                peer=peer_label(self.transport),
                name=self.identity.common_name,
                count=self.requests_answered,
            )

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin)
        """
        Close a connection that went idle, telling the client why; one that
        took too long to handshake is cut (see the mixin).
        """
        if self.identity is None:
            super().timeoutConnection()
            return
        self._timed_out_in = "idle"
        self.log.info(
            "{server}: closing {peer}: idle timeout",
            server=self.server_name,
            peer=peer_label(self.transport),
        )
        self.close_with_event(
            "idle_timeout",
            f"The connection sent nothing for {self.idle_timeout:g} s, this "
            "server's limit; connect again, or send ping now and then to stay.",
        )

    def request_timed_out(self) -> None:
        """
        Close a connection whose request did not arrive within
        ``request_timeout``, telling the client why.
        """
        self.close_with_event(
            "request_timeout",
            f"A request began to arrive {self.request_timeout:g} s ago and is "
            "still incomplete, over this server's limit; send each frame whole.",
        )

    def close_with_event(self, reason: str, message: str) -> None:
        """
        Send a ``closing`` event and close the connection.

        Args:
            reason: ``"idle_timeout"``, ``"request_timeout"`` or
                ``"shutdown"``.
            message: Why, for people.
        """
        if self._closing or self._lost:
            return
        event = {"event": CLOSING_EVENT, "reason": reason, "message": message}
        self._close_after(encode_payload(event))

    def _close_after(self, payload: bytes) -> None:
        """
        Stop reading, send ``payload`` as the last frame, and close; cut the
        connection if the client does not read it within `CLOSE_GRACE`.
        """
        self._closing = True
        self.setTimeout(None)
        self.stop_request_deadline()
        if self.paused:
            # The TLS layer must read the client's close_notify to close.
            self.transport.resumeProducing()
        self.paused = True
        self.sendString(payload)
        # A TLS transport closes only once its producer is gone.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        clock: Any = self.clock
        self._cut = clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # Flow control

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The transport's buffer is full: read no more until it drains.
        """
        self._write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The transport's buffer drained: read again, if nothing else stops it.
        """
        self._write_paused = False
        self._update_reading()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The connection is going: read nothing more.
        """
        self._write_paused = True
        self.paused = True

    def _update_reading(self) -> None:
        """
        Read frames unless the transport's buffer is full, ``max_outstanding``
        requests await their answers, or the connection is closing.
        """
        stop = (
            self._closing
            or self._write_paused
            or len(self._pending) >= self.factory.max_outstanding
        )
        if stop and not self.paused:
            self.paused = True
            self.stop_request_deadline()
            self.transport.pauseProducing()
        elif not stop and self.paused and not self._lost:
            self.paused = False
            self.transport.resumeProducing()
            if not self._receiving:
                # Serve the frames that arrived while paused. Inside
                # dataReceived, its own loop goes on with them instead.
                self.dataReceived(b"")

    def _update_idle_timer(self) -> None:
        """
        Time the connection out only while no request is in progress.
        """
        if self.identity is None or self._closing:
            return
        self.setTimeout(None if self._pending else self.idle_timeout)

    # Frames in

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Split the bytes into frames, once the client is authenticated.
        """
        if self._closing or (not data and self.identity is None):
            return
        if self.identity is None:
            # TLS delivers no application data before the handshake, and
            # handshakeCompleted refuses a peer without a certificate; this
            # guards the rule that nothing is served to an unknown peer.
            self.log.error(
                "{server}: closing {peer}: data arrived before its certificate "
                "was verified",
                server=self.server_name,
                peer=peer_label(self.transport),
            )
            self._closing = True
            self.transport.abortConnection()
            return
        if data:
            self.note_received(len(data))
            self.resetTimeout()
            if self._gathering is not None:
                # The rest of a large frame: keep the pieces until it is
                # whole, instead of joining the growing start to each one.
                self._gathering.append(data)
                self._gathered += len(data)
                if self._gathered < self._gather_until:
                    self.update_request_deadline(not self.paused)
                    return
                data = b"".join(self._gathering)
                self._gathering = None
        self._receiving = True
        try:
            super().dataReceived(data)
        finally:
            self._receiving = False
        self._gather_large_frame()
        self.update_request_deadline(not self.paused and not self._closing)

    def _gather_large_frame(self) -> None:
        """
        When what is left unread is the start of a frame with more than
        `GATHER_FROM` bytes still to come, take it out of Twisted's buffer,
        which copies itself whole on each arrival, and gather the rest.
        """
        pending = self._unprocessed
        if len(pending) < self.prefixLength or self.paused or self._closing:
            return
        (length,) = struct.unpack(self.structFormat, pending[: self.prefixLength])
        whole = self.prefixLength + length
        if length > self.MAX_LENGTH or whole - len(pending) < GATHER_FROM:
            return
        self._gathering = [pending]
        self._gathered = len(pending)
        self._gather_until = whole
        self._unprocessed = b""

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802 (Twisted's name)
        """
        Answer a frame over the size limit with ``frame_too_large`` and close
        the connection.
        """
        if self._closing:
            return
        description = f"a frame of {length} bytes, over the limit of {self.MAX_LENGTH}"
        self._log_bad_frame(FRAME_TOO_LARGE, description)
        message = (
            f"A frame of {length} bytes is over this server's limit of "
            f"{self.MAX_LENGTH} bytes; the connection is closed. Send smaller "
            "requests."
        )
        self.requests_answered += 1
        self._close_after(
            encode_payload(
                {"id": None, "error": AppError(FRAME_TOO_LARGE, message).to_json()}
            )
        )

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Serve one frame.
        """
        self.note_request(self.prefixLength + len(string))
        if self._closing:
            return
        try:
            request = self._parse_request(string)
        except _RefusedRequestError as refused:
            self._log_bad_frame(refused.error.code, refused.description)
            self._send_answer(refused.request_id, error=refused.error)
            return
        self._serve(request)

    def _known_ops(self) -> list[str]:
        """
        Returns:
            Every op name this connection may call, sorted.
        """
        return self.factory.offered_ops()

    def _parse_request(self, payload: bytes) -> Request:
        """
        Check a frame's payload for the shape of a request.

        Raises:
            _RefusedRequestError: It is not JSON, not an object, lacks a
                usable id or op, reuses the id of a request still in
                progress, has args that are not an object, names an unknown
                op, or names one that needs ``hello`` first.
        """
        try:
            message = decode_payload(payload)
        except FrameDecodeError as e:
            error = AppError(e.code, f"The frame's payload is {e.description}.")
            raise _RefusedRequestError(None, error, e.description) from e

        request_id = message.get("id")
        if not is_request_id(request_id):
            what = f'"id" is {json_kind(request_id)}' if "id" in message else 'no "id"'
            text = (
                f"{_request_has(what)}; give each request a string or integer "
                "id, which the answer carries back."
            )
            raise _RefusedRequestError(None, AppError(INVALID_REQUEST, text), what)
        assert isinstance(request_id, (int, str))
        if request_id in self._pending:
            text = (
                f"The id {_quote(str(request_id))} is that of a request still in "
                "progress; give each request an id of its own, or its answers "
                "cannot be told apart."
            )
            description = "an id already in progress"
            raise _RefusedRequestError(
                None, AppError(INVALID_REQUEST, text), description
            )

        op = message.get("op")
        if not isinstance(op, str):
            what = f'"op" is {json_kind(op)}' if "op" in message else 'no "op"'
            text = (
                f"{_request_has(what)}; name the operation as a string, one of "
                f"{', '.join(self._known_ops())}."
            )
            raise _RefusedRequestError(
                request_id, AppError(INVALID_REQUEST, text), what
            )

        if op not in self.factory.op_names():
            known = ", ".join(self._known_ops())
            text = f"Unknown op {_quote(op)}; this server knows {known}."
            description = f"unknown op {_quote(op)}"
            raise _RefusedRequestError(
                request_id, AppError(UNKNOWN_OP, text), description
            )

        if self.version is None and op not in LEGACY_OPS and op != "hello":
            text = (
                f"The {op!r} operation needs the hello exchange first; send "
                f'{{"op": "hello", "args": {{"version": {PROTOCOL_VERSION}}}}} as '
                "the connection's first request."
            )
            raise _RefusedRequestError(
                request_id, AppError(HELLO_REQUIRED, text), f"{op} before hello"
            )

        args = message.get("args", {})
        if not isinstance(args, dict):
            what = f'"args" is {json_kind(args)}'
            text = f'The request\'s {what}; send an object, or leave "args" out.'
            raise _RefusedRequestError(request_id, AppError(INVALID_ARGS, text), what)

        assert self.identity is not None
        return Request(
            id=request_id,
            op=op,
            args=args,
            identity=self.identity,
            peer=self._peer_text(),
            connection=self._connection_view,
        )

    def _peer_text(self) -> str:
        """
        Returns:
            The peer's ``host:port``, worked out once per connection.
        """
        if self._peer_label is None:
            self._peer_label = peer_label(self.transport)
        return self._peer_label

    # Serving

    def _serve(self, request: Request) -> None:
        """
        Run the request's operation, and send its answer now or once its
        Deferred fires.
        """
        try:
            result = self._run_op(request)
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
        except AppError as error:
            self._send_answer(request.id, error=error)
            return
        except Exception:
            self._send_answer(request.id, error=self._internal_error(request))
            return
        if not isinstance(result, Deferred):
            sent = self._send_answer(request.id, result=result, op=request.op)
            if not sent and request.op == "hello":
                # The client got an error, not the hello answer: not greeted.
                self.version = None
            return

        def answer(value: Any) -> None:
            if self._pending.pop(request.id, None) is None:
                return
            self._send_answer(request.id, result=value, op=request.op)
            self._after_answer()

        def failed(failure: Failure) -> None:
            if self._pending.pop(request.id, None) is None:
                return
            if failure.check(AppError):
                assert isinstance(failure.value, AppError)
                error = failure.value
            else:
                error = self._internal_error(request, failure)
            self._send_answer(request.id, error=error)
            self._after_answer()

        self._pending[request.id] = result
        result.addCallbacks(answer, failed)
        # A handler's Deferred that fired already was answered at once.
        if request.id in self._pending:
            self._update_reading()
            self._update_idle_timer()

    def _after_answer(self) -> None:
        """
        A request in progress was answered: read again if that was all that
        held reading back.
        """
        if self._lost:
            return
        self._update_idle_timer()
        self._update_reading()

    def _run_op(self, request: Request) -> Any:
        """
        Returns:
            What the request's operation returned: a value, a Deferred or a
            coroutine.

        Raises:
            AppError: The operation refused the request.
            Exception: The operation failed.
        """
        builtin = {
            "hello": self._op_hello,
            "subscribe": self._op_subscribe,
            "unsubscribe": self._op_unsubscribe,
            "notify": self._op_notify,
            "sql": self._op_sql,
        }.get(request.op)
        if builtin is not None:
            return builtin(request)
        return self.factory.registry.call(request)

    def _internal_error(
        self, request: Request, failure: Failure | None = None
    ) -> AppError:
        """
        Log why an operation failed, and return the error answer that says
        only that it did.
        """
        if failure is None or not failure.check(defer.CancelledError):
            self.log.failure(
                "{server}: op {op} from {peer} failed",
                failure,
                server=self.server_name,
                op=request.op,
                peer=request.peer,
            )
        message = (
            f"The {request.op!r} operation failed inside the server; its log says why."
        )
        return AppError(INTERNAL_ERROR, message)

    def _send_answer(
        self,
        request_id: RequestId | None,
        *,
        result: Any = None,
        error: AppError | None = None,
        op: str | None = None,
    ) -> bool:
        """
        Write one answer as one frame with one ``transport.write``; an
        answer that cannot be encoded, or is over the frame size limit,
        becomes an error answer.

        Returns:
            Whether the answer was sent as given.
        """
        if self._lost or self._closing:
            return False
        sent = True
        answer: dict[str, Any] = {"id": request_id}
        if error is None:
            answer["result"] = result
        else:
            answer["error"] = error.to_json()
        try:
            payload = encode_payload(answer)
        except (TypeError, ValueError) as e:
            self.log.error(
                "{server}: the result of op {op} for {peer} cannot be sent: {why}",
                server=self.server_name,
                op=op,
                peer=peer_label(self.transport),
                why=str(e),
            )
            message = (
                f"The result of the {op!r} operation cannot be encoded as JSON: {e}"
            )
            replacement = AppError(INTERNAL_ERROR, message)
            payload = encode_payload({"id": request_id, "error": replacement.to_json()})
            sent = False
        if len(payload) > self.factory.max_frame_size:
            message = (
                f"The answer would be {len(payload)} bytes, over this server's "
                f"frame size limit of {self.factory.max_frame_size} bytes; ask "
                "for less."
            )
            too_large = AppError(RESULT_TOO_LARGE, message)
            payload = encode_payload({"id": request_id, "error": too_large.to_json()})
            sent = False
        self.sendString(payload)
        self.requests_answered += 1
        return sent

    def _log_bad_frame(self, code: str, description: str) -> None:
        """
        Log a frame that got an error answer, naming the peer and the problem
        but nothing of the payload.
        """
        assert self.identity is not None
        self.log.warn(
            "{server}: refused a frame from {peer} ({name}): {problem}; "
            "answered {code}",
            server=self.server_name,
            peer=peer_label(self.transport),
            name=self.identity.common_name,
            problem=description,
            code=code,
        )

    # Built-in operations that need the connection

    def _op_hello(self, request: Request) -> dict[str, Any]:
        """
        Agree on the protocol version, and tell the client the server's name,
        limits and operations.
        """
        if self.version is not None:
            msg = (
                f"hello was already exchanged on this connection (version "
                f"{self.version}); send it once, as the first request."
            )
            raise AppError(INVALID_REQUEST, msg)
        version = request.args.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            what = json_kind(version) if "version" in request.args else "missing"
            msg = (
                f'"version" is {what}; give the protocol version the client '
                f"speaks as an integer ({PROTOCOL_VERSION})."
            )
            raise AppError(INVALID_ARGS, msg)
        if version not in SUPPORTED_VERSIONS:
            spoken = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            msg = (
                f"This server speaks protocol version {spoken}, not {version}; "
                "use a client for that version."
            )
            raise AppError(
                UNSUPPORTED_VERSION, msg, {"versions": list(SUPPORTED_VERSIONS)}
            )
        agent = request.args.get("agent")
        self.version = version
        assert self.identity is not None
        self.log.info(
            "{server}: {peer} ({name}) speaks protocol {version}{agent}",
            server=self.server_name,
            peer=request.peer,
            name=self.identity.common_name,
            version=version,
            agent=f" ({agent[:_AGENT_LIMIT]})" if isinstance(agent, str) else "",
        )
        return {
            "version": version,
            "server": SERVER_SOFTWARE,
            "name": self.factory.name,
            "client": self.identity.common_name,
            "ops": self._known_ops(),
            "limits": {
                "max_frame_size": self.factory.max_frame_size,
                "max_outstanding": self.factory.max_outstanding,
                "idle_timeout": self.factory.idle_timeout,
                "handshake_timeout": self.factory.handshake_timeout,
            },
        }

    def _op_subscribe(self, request: Request) -> dict[str, Any]:
        """
        Receive the notifications of a topic from now on.
        """
        _refuse_extra(request.op, request.args, ("topic",))
        topic = _topic_of(request.args)
        if topic not in self._subscriptions:
            if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                msg = (
                    f"This connection subscribes to {MAX_SUBSCRIPTIONS} topics, "
                    "the most one may; unsubscribe from one first."
                )
                raise AppError(INVALID_ARGS, msg)
            self._subscriptions.add(topic)
            self.factory.subscribe(self, topic)
        return {"topics": sorted(self._subscriptions)}

    def _op_unsubscribe(self, request: Request) -> dict[str, Any]:
        """
        Receive no more notifications of a topic.
        """
        _refuse_extra(request.op, request.args, ("topic",))
        topic = _topic_of(request.args)
        if topic in self._subscriptions:
            self._subscriptions.discard(topic)
            self.factory.unsubscribe(self, topic)
        return {"topics": sorted(self._subscriptions)}

    def _op_notify(self, request: Request) -> dict[str, int] | Deferred[dict[str, int]]:
        """
        Send a notification to the other connections subscribed to a topic,
        in every server process, and answer how many it reached.
        """
        _refuse_extra(request.op, request.args, ("topic", "data"))
        topic = _topic_of(request.args)
        here, elsewhere = self.publish(topic, request.args.get("data"))
        if elsewhere is None:
            return {"delivered": here}
        return elsewhere.addCallback(lambda there: {"delivered": here + there})

    def _op_sql(self, request: Request) -> Deferred[dict[str, Any]]:
        """
        Run one statement in this connection's database session.
        """
        if not self.factory.sql_op:
            msg = (
                "This server does not let clients run SQL (--app-no-sql); use "
                "the application's own operations."
            )
            raise AppError(UNAVAILABLE, msg)
        _refuse_extra(request.op, request.args, ("statement", "params"))
        statement = request.args.get("statement")
        if not isinstance(statement, str) or not statement.strip():
            what = json_kind(statement) if "statement" in request.args else "missing"
            msg = f'"statement" is {what}; send one SQL statement as a string.'
            raise AppError(INVALID_ARGS, msg)
        return self.run_sql(statement, request.args.get("params", []))

    # What handlers reach through their request

    def notify(self, topic: str, data: Any) -> int:
        """
        Send a notification event to every other connection subscribed to
        ``topic``, in this process and, through the factory's relay, in the
        other server processes. A connection whose answers pile up unread
        does not get it; the next one it gets counts those it missed.

        Returns:
            How many connections of this process it was sent to.

        Raises:
            AppError: The event would be over the frame size limit
                (``invalid_args``), or ``data`` cannot be encoded as JSON.
        """
        here, elsewhere = self.publish(topic, data)
        if elsewhere is not None:
            elsewhere.addErrback(lambda _: 0)
        return here

    def publish(self, topic: str, data: Any) -> tuple[int, Deferred[int] | None]:
        """
        Send a notification event as `notify` does.

        Returns:
            How many connections of this process it was sent to, and, with a
            relay to other server processes, a Deferred of how many of theirs.

        Raises:
            AppError: The event would be over the frame size limit
                (``invalid_args``), or ``data`` cannot be encoded as JSON.
        """
        assert self.identity is not None
        event = {
            "event": NOTIFICATION_EVENT,
            "topic": topic,
            "data": data,
            "sender": self.identity.common_name,
        }
        try:
            payload = encode_payload(event)
        except (TypeError, ValueError) as e:
            msg = f"The notification's data cannot be encoded as JSON: {e}."
            raise AppError(INVALID_ARGS, msg) from e
        if len(payload) > self.factory.max_frame_size:
            msg = (
                f"The notification would be {len(payload)} bytes, over this "
                f"server's frame size limit of {self.factory.max_frame_size} "
                "bytes; send less data."
            )
            raise AppError(INVALID_ARGS, msg)
        here = self.factory.deliver(topic, event, payload, sender=self)
        relay = self.factory.relay
        if relay is None:
            return here, None
        return here, relay.publish(topic, payload)

    def send_event(self, event: Mapping[str, Any], payload: bytes) -> bool:
        """
        Send an event frame, unless the connection's answers pile up unread.

        Args:
            event: The event.
            payload: The event encoded, to send as it is when nothing was
                missed.

        Returns:
            Whether it was sent.
        """
        if self._closing or self._lost:
            return False
        if self._write_paused:
            self._missed += 1
            return False
        if self._missed:
            payload = encode_payload({**event, "missed": self._missed})
            self._missed = 0
        self.sendString(payload)
        return True

    def run_sql(self, statement: str, parameters: Any) -> Deferred[dict[str, Any]]:
        """
        Run one statement in this connection's database session.

        Returns:
            A Deferred of the ``sql`` op's result, or failing with `AppError`.
        """
        database = self.factory.database
        if database is None:
            msg = "This server has no database for the application server."
            return defer.fail(AppError(UNAVAILABLE, msg))
        if self._sql is None:
            assert self.identity is not None
            self._sql = database.open(self.identity.common_name)
        return self._sql.execute(statement, parameters, self.factory.max_frame_size)


class NotificationRelay(Protocol):
    """
    Carries notifications to the application server's other processes
    (``--workers``), whose factories `AppServerFactory.deliver` them.
    """

    def publish(self, topic: str, payload: bytes) -> Deferred[int]:
        """
        Deliver an encoded notification event to the subscribers of
        ``topic`` in the other processes.

        Returns:
            A Deferred firing with how many connections it reached there;
            never failing.
        """


class AppServerFactory(Factory):
    """
    Makes the application server's protocol for each accepted connection,
    and holds what they share: limits, operations, topics, the database.

    Wrap it in `twisted.protocols.tls.TLSMemoryBIOFactory` with a server
    connection creator that requires client certificates.

    Attributes:
        registry: The operations served by handlers: ping, echo, whoami and
            the application's.
        connections: The authenticated connections.
        stopped: Whether the factory stopped (its port stopped listening).
        relay: Where notifications go to reach the subscribers of the other
            server processes; None when this process serves alone.
    """

    protocol = AppServerProtocol  # type: ignore[assignment]
    #: The service logs where the server listens; Factory's own start and
    #: stop lines would only repeat it.
    noisy = False

    def __init__(
        self,
        *,
        clock: Any,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        registry: Registry | None = None,
        database: SQLDatabase | None = None,
        sql_op: bool = True,
        allowed_names: Collection[str] | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            clock: Schedules the handshake and idle timeouts (the reactor,
                or a `twisted.internet.task.Clock` in tests).
            max_frame_size: The largest payload accepted or sent, in bytes.
            handshake_timeout: Seconds a client has to complete TLS.
            idle_timeout: Seconds an authenticated connection with no request
                in progress may stay silent.
            request_timeout: Seconds a client has to send the rest of a frame
                once its first byte arrived.
            max_outstanding: The most requests of one connection in progress
                at once; past it the server reads no more from it until one
                is answered.
            registry: An application's operations, served beside the
                built-in ones.
            database: The database of the ``sql`` op and of handlers'
                `Request.sql`; without one, both answer ``unavailable``.
            sql_op: Whether clients may call ``sql`` (handlers may use the
                database either way).
            allowed_names: If given, only clients whose certificate's common
                name is among these are served.
            name: The server's name in ``hello``; the machine's host name if
                None.

        Raises:
            ValueError: A size, count or timeout is impossible.
            ConfigurationError: ``registry`` defines a built-in op.
        """
        if not 1 <= max_frame_size <= MAX_HEADER_LENGTH:
            msg = (
                f"A maximum frame size of {max_frame_size} bytes is impossible; "
                f"choose 1 to {MAX_HEADER_LENGTH} bytes."
            )
            raise ValueError(msg)
        if max_outstanding < 1:
            msg = (
                f"A maximum of {max_outstanding} outstanding requests is "
                "impossible; choose 1 or more."
            )
            raise ValueError(msg)
        for what, value in (
            ("handshake timeout", handshake_timeout),
            ("idle timeout", idle_timeout),
            ("request timeout", request_timeout),
        ):
            if value <= 0:
                msg = (
                    f"A {what} of {value} seconds is impossible; choose a positive one."
                )
                raise ValueError(msg)
        self.clock = clock
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_outstanding = max_outstanding
        self.registry = SIMPLE_OPS.merged(registry) if registry else SIMPLE_OPS
        clash = sorted((BUILTIN_OPS - set(SIMPLE_OPS)) & set(registry or ()))
        if clash:
            msg = (
                f"The application's handlers define op {clash[0]!r}, which the "
                "server has built in; rename the application's op."
            )
            raise ConfigurationError(msg)
        self.database = database
        self.sql_op = sql_op
        self.allowed_names = (
            frozenset(allowed_names) if allowed_names is not None else None
        )
        self.name = name or socket.gethostname()
        self.connections: set[AppServerProtocol] = set()
        self._topics: dict[str, set[AppServerProtocol]] = {}
        self.stopped = False
        self.relay: NotificationRelay | None = None

    def app_ops(self) -> list[str]:
        """
        Returns:
            The names of the application's own ops, sorted.
        """
        return sorted(set(self.registry) - set(SIMPLE_OPS))

    def op_names(self) -> set[str]:
        """
        Returns:
            Every op the server knows, ``sql`` included.
        """
        return set(self.registry) | BUILTIN_OPS

    def offered_ops(self) -> list[str]:
        """
        Returns:
            The ops clients may call, sorted: all but ``sql`` when the server
            has no database or refuses the op to clients.
        """
        names = self.op_names()
        if not self.sql_op or self.database is None:
            names.discard("sql")
        return sorted(names)

    def buildProtocol(  # type: ignore[override]  # noqa: N802 (Twisted's name)
        self, addr: IAddress | None
    ) -> AppServerProtocol:
        """
        Returns:
            The protocol of one new connection.
        """
        return AppServerProtocol(self)

    def startFactory(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Start the database threads as the first port starts listening.
        """
        self.stopped = False
        if self.database is not None:
            self.database.start()

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        """
        As the last port stops listening: tell every client the server is
        shutting down and close its connection, and stop the database.
        """
        self.stopped = True
        for connection in list(self.connections):
            connection.close_with_event(
                "shutdown", "The server is shutting down; connect again later."
            )
        if self.database is not None:
            self.database.stop()

    def subscribe(self, protocol: AppServerProtocol, topic: str) -> None:
        """
        Send ``protocol`` the notifications of ``topic``.
        """
        self._topics.setdefault(topic, set()).add(protocol)

    def unsubscribe(self, protocol: AppServerProtocol, topic: str) -> None:
        """
        Stop sending ``protocol`` the notifications of ``topic``.
        """
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.discard(protocol)
            if not subscribers:
                del self._topics[topic]

    def subscribers(self, topic: str) -> list[AppServerProtocol]:
        """
        Returns:
            The connections subscribed to ``topic``.
        """
        return list(self._topics.get(topic, ()))

    def deliver(
        self,
        topic: str,
        event: Mapping[str, Any] | None,
        payload: bytes,
        sender: AppServerProtocol | None = None,
    ) -> int:
        """
        Send a notification event to this process's connections subscribed
        to ``topic``, but not to its sender.

        Args:
            topic: The topic.
            event: The event; decoded from ``payload`` if None (an event
                relayed from another process).
            payload: The event encoded.
            sender: The connection that sent it, if it is one of this
                process's.

        Returns:
            How many connections it was sent to.
        """
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        if event is None:
            event = decode_payload(payload)
        delivered = 0
        for subscriber in list(subscribers):
            if subscriber is not sender and subscriber.send_event(event, payload):
                delivered += 1
        return delivered
