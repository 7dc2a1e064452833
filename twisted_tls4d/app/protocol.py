"""
The application server: length-prefixed JSON requests over mutual TLS,
answered by the operations of `twisted_tls4d.app.ops`.

The TLS layer in front of it (`twisted_tls4d.tls`) requires a client
certificate chained to ``Resources/ca.pem``; this protocol answers nothing
before the handshake has delivered that certificate. A frame it cannot use
gets an error answer and is logged with the peer; only a frame over the size
limit also closes the connection, since the server will not read its payload
to find where the next frame starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d._peer import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    AuthenticatedPeerMixin,
    common_name,
    peer_label,
)
from twisted_tls4d.app.ops import DEFAULT_OPS, Handler, Request
from twisted_tls4d.app.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_ARGS,
    INVALID_REQUEST,
    MAX_HEADER_LENGTH,
    UNKNOWN_OP,
    AppError,
    FrameDecodeError,
    RequestId,
    decode_payload,
    encode_payload,
    is_request_id,
    json_kind,
)

#: How much of a client-chosen name (an op) a log line or message quotes.
_QUOTE_LIMIT = 40


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


@implementer(IPushProducer)
class AppServerProtocol(AuthenticatedPeerMixin, Int32StringReceiver):
    """
    One client connection of the application server.

    Each frame is one request; each request gets exactly one answer, written
    with a single ``transport.write`` so that it leaves as one TLS record.

    Attributes:
        ops: The operations served, by name.
        requests_answered: How many frames got an answer on this connection.
    """

    server_name = "application server"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        ops: Mapping[str, Handler],
        max_frame_size: int,
        handshake_timeout: float | None,
        idle_timeout: float | None,
    ) -> None:
        self.clock = clock
        self.ops = ops
        self.MAX_LENGTH = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.requests_answered = 0
        self._closing = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Give the client ``handshake_timeout`` seconds to complete TLS, and
        stop reading requests whenever answers pile up unread.

        The protocol registers itself as the transport's streaming producer:
        when the client does not read its answers and the transport's buffer
        fills, the transport pauses it, which stops reading the socket
        (`Int32StringReceiver` serves no further frame while paused) until
        the buffer drains.
        """
        self.start_handshake_timer()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Stop the timers, and log a refused handshake or the end of a session.
        """
        self.log_refusal_if_any(reason)
        if self.peer_certificate is not None:
            self.log.info(
                "{server}: {peer} ({name}) disconnected; requests answered: {count}",
                server=self.server_name,
                peer=peer_label(self.transport),
                name=common_name(self.peer_certificate),
                count=self.requests_answered,
            )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Split the bytes into frames, once the client is authenticated.
        """
        if self._closing or (not data and self.peer_certificate is None):
            return
        if self.peer_certificate is None:
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
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.resetTimeout()
        super().dataReceived(data)

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802 (Twisted's name)
        """
        Answer a frame over the size limit with ``frame_too_large`` and close
        the connection.
        """
        if self._closing:
            return
        self._closing = True
        description = f"a frame of {length} bytes, over the limit of {self.MAX_LENGTH}"
        self._log_bad_frame(FRAME_TOO_LARGE, description)
        message = (
            f"A frame of {length} bytes is over this server's limit of "
            f"{self.MAX_LENGTH} bytes; the connection is closed. Send smaller "
            "requests."
        )
        self._send_answer(None, error=AppError(FRAME_TOO_LARGE, message))
        # A transport closes only once its producer is gone.
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[misc, union-attr]

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Answer one frame.
        """
        if self._closing:
            return
        try:
            request = self._parse_request(string)
        except _RefusedRequestError as refused:
            self._log_bad_frame(refused.error.code, refused.description)
            self._send_answer(refused.request_id, error=refused.error)
            return
        self._serve(request)

    def _parse_request(self, payload: bytes) -> Request:
        """
        Check a frame's payload for the shape of a request.

        Raises:
            _RefusedRequestError: It is not JSON, not an object, lacks a usable
                id or op, has args that are not an object, or names an
                unknown op.
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

        op = message.get("op")
        if not isinstance(op, str):
            what = f'"op" is {json_kind(op)}' if "op" in message else 'no "op"'
            text = (
                f"{_request_has(what)}; name the operation as a string, one of "
                f"{', '.join(sorted(self.ops))}."
            )
            raise _RefusedRequestError(
                request_id, AppError(INVALID_REQUEST, text), what
            )

        if op not in self.ops:
            known = ", ".join(sorted(self.ops))
            text = f"Unknown op {_quote(op)}; this server knows {known}."
            description = f"unknown op {_quote(op)}"
            raise _RefusedRequestError(
                request_id, AppError(UNKNOWN_OP, text), description
            )

        args = message.get("args", {})
        if not isinstance(args, dict):
            what = f'"args" is {json_kind(args)}'
            text = f'The request\'s {what}; send an object, or leave "args" out.'
            raise _RefusedRequestError(request_id, AppError(INVALID_ARGS, text), what)

        assert self.peer_certificate is not None
        return Request(
            id=request_id,
            op=op,
            args=args,
            peer_certificate=self.peer_certificate,
            peer=peer_label(self.transport),
        )

    def _serve(self, request: Request) -> None:
        """
        Run the request's handler and send its result or error.
        """
        try:
            result = self.ops[request.op](request)
        except AppError as error:
            self._send_answer(request.id, error=error)
            return
        except Exception:
            self.log.failure(
                "{server}: op {op} from {peer} failed",
                server=self.server_name,
                op=request.op,
                peer=request.peer,
            )
            message = (
                f"The {request.op!r} operation failed inside the server; its log "
                "says why."
            )
            self._send_answer(request.id, error=AppError(INTERNAL_ERROR, message))
            return
        self._send_answer(request.id, result=result, op=request.op)

    def _send_answer(
        self,
        request_id: RequestId | None,
        *,
        result: Any = None,
        error: AppError | None = None,
        op: str | None = None,
    ) -> None:
        """
        Write one answer as one frame with one ``transport.write``.
        """
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
            payload = encode_payload(
                {"id": request_id, "error": AppError(INTERNAL_ERROR, message).to_json()}
            )
        self.sendString(payload)
        self.requests_answered += 1

    def _log_bad_frame(self, code: str, description: str) -> None:
        """
        Log a frame that got an error answer, naming the peer and the problem
        but nothing of the payload.
        """
        assert self.peer_certificate is not None
        self.log.warn(
            "{server}: refused a frame from {peer} ({name}): {problem}; "
            "answered {code}",
            server=self.server_name,
            peer=peer_label(self.transport),
            name=common_name(self.peer_certificate),
            problem=description,
            code=code,
        )


class AppServerFactory(Factory):
    """
    Makes the application server's protocol for each accepted connection.

    Wrap it in `twisted.protocols.tls.TLSMemoryBIOFactory` with a server
    connection creator that requires client certificates.

    Attributes:
        ops: The operations served, by name; `twisted_tls4d.app.ops.DEFAULT_OPS`
            unless changed before the first connection.
    """

    protocol = AppServerProtocol

    def __init__(
        self,
        *,
        clock: IReactorTime,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """
        Args:
            clock: Schedules the handshake and idle timeouts (the reactor,
                or a `twisted.internet.task.Clock` in tests).
            max_frame_size: The largest payload accepted, in bytes.
            handshake_timeout: Seconds a client has to complete TLS.
            idle_timeout: Seconds an authenticated connection may stay silent.

        Raises:
            ValueError: ``max_frame_size`` is not between 1 and 2**32 - 1, or
                a timeout is not positive.
        """
        if not 1 <= max_frame_size <= MAX_HEADER_LENGTH:
            msg = (
                f"A maximum frame size of {max_frame_size} bytes is impossible; "
                f"choose 1 to {MAX_HEADER_LENGTH} bytes."
            )
            raise ValueError(msg)
        for name, value in (
            ("handshake timeout", handshake_timeout),
            ("idle timeout", idle_timeout),
        ):
            if value <= 0:
                msg = (
                    f"A {name} of {value} seconds is impossible; choose a positive one."
                )
                raise ValueError(msg)
        self.clock = clock
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ops: dict[str, Handler] = dict(DEFAULT_OPS)

    def buildProtocol(self, addr: IAddress | None) -> AppServerProtocol:  # noqa: N802
        """
        Returns:
            The protocol of one new connection.
        """
        protocol = AppServerProtocol(
            clock=self.clock,
            ops=self.ops,
            max_frame_size=self.max_frame_size,
            handshake_timeout=self.handshake_timeout,
            idle_timeout=self.idle_timeout,
        )
        protocol.factory = self
        return protocol
