"""
The operations of the application server, and the registry that maps each
``op`` name to the function that answers it.

A handler takes the `Request` and returns the answer's ``result`` (any value
JSON can express), or raises `AppError` for an error answer. Any other
exception becomes an ``internal_error`` answer and is logged by the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography import x509

from twisted_tls4d import pki
from twisted_tls4d._peer import common_name
from twisted_tls4d.app.wire import INVALID_ARGS, AppError, RequestId


@attrs.frozen
class Request:
    """
    One request, checked for shape, with what the server knows of its sender.

    Attributes:
        id: The id the client chose; the answer carries it back.
        op: The operation's name.
        args: The operation's arguments (``{}`` when the request had none).
        peer_certificate: The client's certificate, verified during the TLS
            handshake.
        peer: The client's address, ``host:port``, for logs.
    """

    id: RequestId
    op: str
    args: dict[str, Any]
    peer_certificate: x509.Certificate
    peer: str


#: What answers one operation: the request in, the result out.
Handler = Callable[[Request], Any]


def _refuse_args(request: Request) -> None:
    """
    Raise `AppError` if an operation that takes no arguments got some.
    """
    if request.args:
        names = ", ".join(repr(name) for name in sorted(request.args))[:200]
        msg = f"The {request.op!r} operation takes no arguments; got {names}."
        raise AppError(INVALID_ARGS, msg)


def ping(request: Request) -> str:
    """
    Answer that the server is there.

    Returns:
        ``"pong"``.

    Raises:
        AppError: Arguments were given (``invalid_args``).
    """
    _refuse_args(request)
    return "pong"


def echo(request: Request) -> dict[str, Any]:
    """
    Send the arguments back.

    Returns:
        The request's ``args`` object, unchanged.
    """
    return request.args


def whoami(request: Request) -> dict[str, str]:
    """
    Tell the client how the server sees it.

    Returns:
        The client certificate's ``subject`` (RFC 4514), its ``common_name``,
        its ``issuer`` (RFC 4514) and its ``fingerprint_sha256`` (colon-separated
        upper-case hex, as ``openssl x509 -fingerprint -sha256`` shows it).

    Raises:
        AppError: Arguments were given (``invalid_args``).
    """
    _refuse_args(request)
    certificate = request.peer_certificate
    return {
        "subject": certificate.subject.rfc4514_string(),
        "common_name": common_name(certificate),
        "issuer": certificate.issuer.rfc4514_string(),
        "fingerprint_sha256": pki.fingerprint_sha256(certificate),
    }


#: The operations every application server answers, by ``op`` name.
DEFAULT_OPS: Mapping[str, Handler] = {
    "ping": ping,
    "echo": echo,
    "whoami": whoami,
}
