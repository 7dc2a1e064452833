"""
What the application and SQL servers share about their peers: the client
certificate learnt at the end of the TLS handshake, the log line when a
handshake is refused, and the handshake, idle and request timeouts.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d import pki

#: Seconds a client has to complete its TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Seconds an authenticated connection may stay silent before it is closed.
DEFAULT_IDLE_TIMEOUT = 600.0

#: Seconds a client has to send the rest of a request (a frame, a line) once
#: its first byte arrived.
DEFAULT_REQUEST_TIMEOUT = 30.0


def common_name(certificate: x509.Certificate) -> str:
    """
    Returns:
        The certificate subject's first common name, or its whole subject in
        RFC 4514 form when it has none.
    """
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        value = names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return certificate.subject.rfc4514_string()


def peer_label(transport: Any) -> str:
    """
    Returns:
        ``host:port`` of the transport's peer, for logs.
    """
    address = transport.getPeer()
    host = getattr(address, "host", str(address))
    port = getattr(address, "port", None)
    if port is None:
        return str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHandshakeListener)
class AuthenticatedPeerMixin(TimeoutMixin):
    """
    Mixin for a protocol served through TLS with a required client
    certificate.

    The TLS layer starts the wrapped protocol before the handshake, so the
    protocol learns its peer in `handshakeCompleted`; until then it neither
    answers nor trusts anything. A connection lost before that is a refused
    handshake, logged once with the reason.

    A request (a frame, a line) whose first byte arrived must be complete
    within ``request_timeout`` seconds, or `request_timed_out` closes the
    connection: the idle timer alone would let a client that sends a byte
    now and then hold its connection for ever. The protocol counts the bytes
    it receives (`note_received`) and those of each complete request
    (`note_request`), and says after each batch whether it waits for more
    (`update_request_deadline`).

    The class using it sets ``server_name`` (for logs), ``clock`` (an
    `IReactorTime`), and the timeouts, and may override `peer_authenticated`.
    """

    log = Logger()
    server_name = "server"
    clock: IReactorTime
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    peer_certificate: x509.Certificate | None = None
    _verify_error: str | None = None
    _timed_out_in: str | None = None
    _incomplete = 0
    _request_deadline: Any = None

    def callLater(self, period: float, func: Any) -> Any:  # noqa: N802 (TimeoutMixin)
        """
        Schedule the timeouts on the protocol's clock, so tests drive them.
        """
        return self.clock.callLater(period, func)

    def start_handshake_timer(self) -> None:
        """
        Call from ``connectionMade``: give the client ``handshake_timeout``
        seconds to complete the TLS handshake.
        """
        self.setTimeout(self.handshake_timeout)

    def note_verify_error(self, reason: str) -> None:
        """
        Keep why OpenSSL refused the client's certificate (the first reason
        only), for the log line when the connection closes.
        """
        if self._verify_error is None:
            self._verify_error = reason

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Learn the peer's verified certificate and start the idle timer.
        """
        handle = self.transport.getHandle()  # type: ignore[attr-defined]
        certificate = handle.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            # OpenSSL refuses such handshakes (VERIFY_FAIL_IF_NO_PEER_CERT);
            # this guards against a context built without it.
            self.log.error(
                "{server}: refused {peer}: no client certificate",
                server=self.server_name,
                peer=peer_label(self.transport),
            )
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.peer_certificate = certificate
        self.log.info(
            "{server}: {peer} authenticated as {name!r} (certificate {fingerprint})",
            server=self.server_name,
            peer=peer_label(self.transport),
            name=common_name(certificate),
            fingerprint=pki.fingerprint_sha256(certificate),
        )
        self.setTimeout(self.idle_timeout)
        self.peer_authenticated()

    def peer_authenticated(self) -> None:
        """
        Called once the client's certificate was verified; override to greet.
        """

    def note_received(self, count: int) -> None:
        """
        Count ``count`` bytes received from the client, before they are split
        into requests.
        """
        self._incomplete += count

    def note_request(self, size: int) -> None:
        """
        Count a complete request of ``size`` bytes (its framing included) out
        of the bytes received, and stop its deadline.
        """
        self._incomplete -= size
        self.stop_request_deadline()

    def update_request_deadline(self, waiting: bool) -> None:
        """
        Call after handling received bytes: start the request deadline if
        part of a request is waiting for the rest, unless it runs already.

        Args:
            waiting: Whether the protocol is reading the client's bytes (not
                paused or closing), so that what is missing is the client's
                to send.
        """
        if not waiting or self._incomplete <= 0:
            self.stop_request_deadline()
        elif self._request_deadline is None:
            self._request_deadline = self.clock.callLater(
                self.request_timeout, self._request_overdue
            )

    def stop_request_deadline(self) -> None:
        """
        Stop the request deadline, if it runs.
        """
        deadline, self._request_deadline = self._request_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _request_overdue(self) -> None:
        self._request_deadline = None
        self._timed_out_in = "request"
        self.setTimeout(None)
        self.log.info(
            "{server}: closing {peer}: a request it began {timeout:g} s ago is "
            "still incomplete ({count} bytes so far; --request-timeout)",
            server=self.server_name,
            peer=peer_label(self.transport),
            timeout=self.request_timeout,
            count=self._incomplete,
        )
        self.request_timed_out()

    def request_timed_out(self) -> None:
        """
        Close a connection whose request did not arrive in time; override to
        tell the client first.
        """
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin)
        """
        Close a connection that took too long to handshake or went idle.
        """
        phase = "TLS handshake" if self.peer_certificate is None else "idle"
        self._timed_out_in = phase
        self.log.info(
            "{server}: closing {peer}: {phase} timeout",
            server=self.server_name,
            peer=peer_label(self.transport),
            phase=phase,
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def log_refusal_if_any(self, reason: Failure) -> None:
        """
        Call from ``connectionLost``: stop the timer and, if the handshake
        never completed, log once why: the server refused the client, or the
        client gave up (distrusting the server's certificate, say).
        """
        self.setTimeout(None)
        self.stop_request_deadline()
        if self.peer_certificate is not None or self._timed_out_in:
            return
        if self._verify_error is not None:
            refused, why = True, self._verify_error
        else:
            refused, why = describe_tls_failure(reason)
        self.log.warn(
            "{server}: refused TLS handshake from {peer}: {why}"
            if refused
            else "{server}: TLS handshake with {peer} failed: {why}",
            server=self.server_name,
            peer=peer_label(self.transport),
            why=why,
        )


#: Phrases of OpenSSL's errors, what they mean, and whether they mean that
#: this server refused the client (True) or the client gave up (False).
_TLS_FAILURES = [
    ("peer did not return a certificate", "the client presented no certificate", True),
    (
        "alert unknown ca",
        "the client does not trust the CA of this server's certificate",
        False,
    ),
    ("alert bad certificate", "the client rejected this server's certificate", False),
    (
        "alert certificate unknown",
        "the client rejected this server's certificate",
        False,
    ),
    ("no shared cipher", "no cipher suite in common", True),
    ("no suitable", "no cipher suite or key-exchange group in common", True),
    ("wrong version number", "it did not speak TLS", True),
    ("http request", "it sent plain HTTP, not TLS", True),
    ("unsupported protocol", "it offered only TLS versions this server refuses", True),
    ("protocol version", "it offered only TLS versions this server refuses", True),
]


def describe_tls_failure(reason: Failure) -> tuple[bool, str]:
    """
    Turn the failure that ended a TLS handshake into words for the log.

    Args:
        reason: What ``connectionLost`` received.

    Returns:
        Whether the server refused the client, and why, in words.
    """
    text = str(reason.value)
    for phrase, meaning, refused in _TLS_FAILURES:
        if phrase in text:
            return refused, meaning
    if "closed cleanly" in text or "non-clean fashion" in text:
        return False, "the client closed the connection during the handshake"
    return False, text
