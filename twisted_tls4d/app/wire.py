"""
The application protocol's wire format, shared by the server and its client:
frames of a 4-byte big-endian length and that many bytes of UTF-8 JSON, the
shape of requests and answers, and the error codes an answer can carry.

docs/app-protocol.md describes the same format for implementers in other
languages.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

from twisted_tls4d.errors import Tls4dError

#: The application server's TCP port when ``--app-port`` is not given.
DEFAULT_PORT = 19813

#: The largest frame payload the server accepts when ``--max-frame-size`` is
#: not given, in bytes (the 4-byte length header not counted).
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024

#: The 4-byte big-endian unsigned length in front of every payload.
HEADER = struct.Struct("!I")

#: The largest length the header can express.
MAX_HEADER_LENGTH = 2**32 - 1

#: The protocol version this module speaks, which ``hello`` negotiates.
PROTOCOL_VERSION = 1

#: Every version a server of this release accepts in ``hello``.
SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)

#: What a server calls itself in its ``hello`` answer.
SERVER_SOFTWARE = "tls4d"

#: The most requests a server reads from one connection before answering
#: some, when ``--app-max-outstanding`` is not given.
DEFAULT_MAX_OUTSTANDING = 32

#: The most topics one connection may subscribe to.
MAX_SUBSCRIPTIONS = 100

#: The longest topic name, in characters.
MAX_TOPIC_LENGTH = 200

# The error codes of an answer's ``error`` object. A code is a stable,
# machine-readable string; the message beside it is a sentence for people
# and may change between versions.

#: The frame's length header announces more bytes than the server accepts.
#: The answer's id is null, and the server closes the connection after it,
#: since it will not read the payload to find where the next frame starts.
FRAME_TOO_LARGE = "frame_too_large"

#: The payload is not UTF-8 JSON (or nests too deeply, or holds a number
#: out of range). The answer's id is null; the connection stays open.
INVALID_JSON = "invalid_json"

#: The payload is JSON but not an object (an array, a string, a number...).
#: The answer's id is null; the connection stays open.
NOT_AN_OBJECT = "not_an_object"

#: The object lacks a usable ``id`` (a string or an integer) or ``op`` (a
#: string), reuses the id of a request still unanswered, or repeats
#: ``hello``. The connection stays open.
INVALID_REQUEST = "invalid_request"

#: ``hello`` asked for a protocol version this server does not speak; the
#: error's ``details`` list the versions it does. The connection stays open.
UNSUPPORTED_VERSION = "unsupported_version"

#: The op needs the ``hello`` exchange first. The connection stays open.
HELLO_REQUIRED = "hello_required"

#: The ``op`` names no operation of this server. The connection stays open.
UNKNOWN_OP = "unknown_op"

#: The ``args`` are not an object, or do not suit the operation. The
#: connection stays open.
INVALID_ARGS = "invalid_args"

#: The answer would be larger than the frame limit. The connection stays
#: open.
RESULT_TOO_LARGE = "result_too_large"

#: An ``sql`` statement failed in the database (a syntax error, a broken
#: constraint, a lock that did not come free). The connection stays open.
SQL_ERROR = "sql_error"

#: The operation exists but cannot run now or here (the database is shut
#: down, or this server offers no ``sql``). The connection stays open.
UNAVAILABLE = "unavailable"

#: The client's certificate is valid but its name is not among those the
#: server admits (``--app-allow``). Sent with a null id right after the TLS
#: handshake; the server then closes the connection.
NOT_ALLOWED = "not_allowed"

#: The operation failed inside the server; the server logs the details. The
#: connection stays open.
INTERNAL_ERROR = "internal_error"

#: Every error code, with what it means, for documentation and tests.
ERROR_CODES: Mapping[str, str] = {
    FRAME_TOO_LARGE: "the frame is over the size limit; the connection closes",
    INVALID_JSON: "the payload is not UTF-8 JSON",
    NOT_AN_OBJECT: "the payload is JSON but not an object",
    INVALID_REQUEST: "the request lacks a usable id or op, or repeats one",
    UNSUPPORTED_VERSION: "hello asked for a protocol version the server lacks",
    HELLO_REQUIRED: "the op needs the hello exchange first",
    UNKNOWN_OP: "the op is not one this server knows",
    INVALID_ARGS: "the args are not an object or do not suit the op",
    RESULT_TOO_LARGE: "the answer would be over the frame size limit",
    SQL_ERROR: "the database refused or failed the statement",
    UNAVAILABLE: "the op cannot run on this server now",
    NOT_ALLOWED: "the server does not admit this client; the connection closes",
    INTERNAL_ERROR: "the operation failed inside the server",
}

#: The ``event`` of a frame the server sends when a client it serves calls
#: ``notify`` on a topic this connection subscribed to.
NOTIFICATION_EVENT = "notification"

#: The ``event`` of the frame a server sends before it closes a connection
#: of its own accord (idle timeout, shutdown).
CLOSING_EVENT = "closing"

#: A request id: what the client chose to match the answer to its request.
RequestId = int | str


class AppError(Tls4dError):
    """
    An error answer of the application server, or an error an operation's
    handler raises to make one.

    Attributes:
        code: One of the error codes of this module (`ERROR_CODES`), or one
            an application's handlers define; a client may also meet codes
            of a newer server.
        message: A sentence saying what was wrong, for people.
        details: Members a program can use, particular to the code (for
            `UNSUPPORTED_VERSION`, the ``versions`` the server speaks), or
            None.
    """

    def __init__(
        self, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = dict(details) if details else None

    def __str__(self) -> str:
        return f"{self.message} (error {self.code})"

    def to_json(self) -> dict[str, Any]:
        """
        Returns:
            The ``error`` object of an answer.
        """
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error


class FrameDecodeError(ValueError):
    """
    A payload that is not a JSON object.

    Attributes:
        code: `INVALID_JSON` or `NOT_AN_OBJECT`.
        description: A short phrase for logs and error messages that quotes
            nothing of the payload.
    """

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def _refuse_constant(name: str) -> float:
    msg = f"{name} is not a JSON number"
    raise ValueError(msg)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = "a number is out of the range of a double"
        raise ValueError(msg)
    return value


#: Compact UTF-8 JSON; made once rather than by each ``json.dumps`` call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_payload(message: Mapping[str, Any]) -> bytes:
    """
    Encode one message as compact UTF-8 JSON.

    Args:
        message: A request or an answer.

    Returns:
        The payload, without the length header.

    Raises:
        TypeError: The message holds a value JSON cannot express.
        ValueError: The message holds NaN or an infinity, or nests too deeply
            (RecursionError is a subclass of neither; it is re-raised as
            ValueError).
    """
    try:
        text = _ENCODER.encode(message)
    except RecursionError as e:
        msg = "The message nests too deeply to be encoded as JSON."
        raise ValueError(msg) from e
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a "\ud800" escape in a request) has no UTF-8
        # form; escaping everything outside ASCII keeps it as JSON wrote it.
        return json.dumps(
            message, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """
    Encode one message as a whole frame, ready for one ``transport.write``.

    Args:
        message: A request or an answer.

    Returns:
        The length header followed by the payload.

    Raises:
        TypeError: As `encode_payload`.
        ValueError: As `encode_payload`, or the payload is longer than a
            header can announce.
    """
    payload = encode_payload(message)
    if len(payload) > MAX_HEADER_LENGTH:
        msg = f"A payload of {len(payload)} bytes is too long for a frame."
        raise ValueError(msg)
    return HEADER.pack(len(payload)) + payload


#: Refuses NaN, infinities and floats too large; made once.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """
    Decode one frame's payload.

    Args:
        payload: The bytes after the length header.

    Returns:
        The JSON object it holds.

    Raises:
        FrameDecodeError: The payload is not UTF-8, not JSON, nests too
            deeply, holds NaN, an infinity or an integer too long to read,
            or is JSON but not an object.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        description = f"not valid UTF-8 (at byte {e.start})"
        raise FrameDecodeError(INVALID_JSON, description) from e
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        description = f"not valid JSON ({e.msg} at character {e.pos})"
        raise FrameDecodeError(INVALID_JSON, description) from e
    except RecursionError as e:
        description = "JSON nested too deeply"
        raise FrameDecodeError(INVALID_JSON, description) from e
    except ValueError as e:
        # NaN, infinities, and integers over Python's digit limit.
        description = f"not usable JSON ({e})"
        raise FrameDecodeError(INVALID_JSON, description) from e
    if not isinstance(value, dict):
        description = f"{json_kind(value)}, not a JSON object"
        raise FrameDecodeError(NOT_AN_OBJECT, description)
    return value


def is_request_id(value: object) -> bool:
    """
    Returns:
        Whether ``value`` may serve as a request id: a string or an integer
        (JSON true and false are not integers here).
    """
    return isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def json_kind(value: object) -> str:
    """
    Returns:
        What kind of JSON value a decoded value is, with its article ("an
        object", "an array", "a string", "a number", "a boolean" or "null"),
        for messages that must not quote the value itself.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
