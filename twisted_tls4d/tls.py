"""
The one TLS policy of tls4d: protocol versions, cipher suites, key-exchange
groups, Diffie-Hellman parameters and client-certificate verification, built
into pyOpenSSL contexts that every listener shares.

A pyOpenSSL context cannot change once a connection was made from it, so each
listener serves through a `ServerConnectionCreator` whose context a reload
replaces whole with a freshly built one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from twisted_tls4d import pki
from twisted_tls4d.errors import ConfigurationError, PEMError

_log = Logger()

#: Mozilla's "intermediate" profile (version 5.7): forward-secret AEAD suites
#: only, for TLS 1.2. TLS 1.3 suites are all forward-secret AEAD.
DEFAULT_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

TLS13_CIPHERSUITES = (
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
)

#: The ECDHE groups offered: X25519, P-256 and P-384 (no X448, no P-521).
ECDHE_GROUPS = "X25519:P-256:P-384"

#: RFC 7919's finite-field groups. OpenSSL 3 negotiates the TLS 1.2 DHE suites
#: only when the server's group list holds at least one of them; the DHE key
#: exchange itself uses dhparams.pem.
FFDHE_GROUPS = "ffdhe2048:ffdhe3072:ffdhe4096"

GROUPS = f"{ECDHE_GROUPS}:{FFDHE_GROUPS}"

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: How long a client may resume a TLS session, in seconds: the lifetime of
#: its session ticket, or of its entry in the server's session cache.
SESSION_LIFETIME = 2 * 60 * 60

#: What OpenSSL's certificate-verification error numbers mean for an operator.
_VERIFY_ERRORS = {
    7: "its certificate's signature is invalid",
    9: "its certificate is not yet valid",
    10: "its certificate has expired",
    18: "its certificate is self-signed",
    19: "its certificate chain ends in a CA that Resources/ca.pem does not hold",
    20: "its certificate was issued by a CA that Resources/ca.pem does not hold",
    21: "its certificate was issued by a CA that Resources/ca.pem does not hold",
    23: "its certificate has been revoked",
    24: "its chain holds a CA certificate that may not issue certificates",
    26: "its certificate is not meant for client authentication (no clientAuth)",
}


@attrs.frozen
class TLSPolicy:
    """
    What every tls4d listener allows.

    Attributes:
        min_version: The lowest TLS version accepted, ``"1.2"`` or ``"1.3"``.
        ciphers: An OpenSSL cipher string for TLS 1.2.
        dh_parameters: A PEM file of DH parameters for DHE suites, or None.
    """

    min_version: str = "1.2"
    ciphers: str = DEFAULT_CIPHERS
    dh_parameters: Path | None = None


@attrs.frozen
class ServerIdentity:
    """
    The key and certificate chain one listener presents.

    Attributes:
        key: The private key.
        chain: The leaf certificate first, then the certificates that issued
            it.
        cert_path: Where the chain was read from.
        key_path: Where the key was read from.
    """

    key: pki.PrivateKey
    chain: Sequence[x509.Certificate]
    cert_path: Path
    key_path: Path

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate."""
        return self.chain[0]


def min_version_number(min_version: str) -> int:
    """
    Args:
        min_version: ``"1.2"`` or ``"1.3"``.

    Returns:
        OpenSSL's number for that version.

    Raises:
        ConfigurationError: The version is older than TLS 1.2 or unknown.
    """
    if min_version in _MIN_VERSIONS:
        return _MIN_VERSIONS[min_version]
    if min_version in ("1.0", "1.1", "1", "ssl3"):
        msg = (
            f"A minimum TLS version of {min_version} is refused: TLS before 1.2 "
            "is deprecated by RFC 8996 and fails every current audit; use 1.2 "
            "or 1.3."
        )
    else:
        msg = f"Unknown minimum TLS version {min_version!r}; use 1.2 or 1.3."
    raise ConfigurationError(msg)


def tls12_suites(cipher_string: str) -> list[str]:
    """
    The TLS 1.2 cipher suites an OpenSSL cipher string selects, as this
    machine's OpenSSL understands it.

    Args:
        cipher_string: E.g. ``"ECDHE+AESGCM"``.

    Returns:
        OpenSSL suite names, in preference order.

    Raises:
        ConfigurationError: The string selects no TLS 1.2 suite.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(cipher_string.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        names: list[str] = []
    else:
        names = [
            name
            for name in SSL.Connection(context, None).get_cipher_list()
            if not name.startswith("TLS_")
        ]
    if not names:
        msg = (
            f"The cipher string {cipher_string!r} selects no TLS 1.2 cipher "
            "suite; see `openssl ciphers -v` for valid names, or leave "
            "--ciphers unset for Mozilla's intermediate list."
        )
        raise ConfigurationError(msg)
    return names


def is_forward_secret(suite: str) -> bool:
    """
    Args:
        suite: An OpenSSL TLS 1.2 suite name, or a TLS 1.3 one.

    Returns:
        Whether the suite's key exchange is ephemeral Diffie-Hellman with an
        authenticated server (ECDHE or DHE; every TLS 1.3 suite).
    """
    return suite.startswith(("ECDHE-", "DHE-", "TLS_"))


def check_ciphers(cipher_string: str) -> list[str]:
    """
    Check a cipher string for use, logging a warning naming every suite it
    allows that lacks forward secrecy.

    Args:
        cipher_string: An OpenSSL cipher string.

    Returns:
        The suites it selects that lack forward secrecy (possibly none).

    Raises:
        ConfigurationError: The string selects nothing.
    """
    weak = [s for s in tls12_suites(cipher_string) if not is_forward_secret(s)]
    if weak:
        _log.warn(
            "The cipher list allows {count} suites without forward secrecy "
            "(no ECDHE/DHE key exchange): {suites}",
            count=len(weak),
            suites=", ".join(weak),
        )
    return weak


def suites_for_key(suites: Sequence[str], key: pki.PrivateKey) -> list[str]:
    """
    Args:
        suites: OpenSSL TLS 1.2 suite names.
        key: The server's private key.

    Returns:
        Those of ``suites`` a server with ``key`` can negotiate: the ECDSA
        suites for an ECDSA key, the others for an RSA key.
    """
    ecdsa = isinstance(key, ec.EllipticCurvePrivateKey)
    return [suite for suite in suites if ("-ECDSA-" in suite) == ecdsa]


def key_exposure(path: Path) -> str | None:
    """
    Say whether a private key file is open to anyone but its owner.

    Args:
        path: The key file.

    Returns:
        A sentence naming the file, its mode, who has access to it and the
        fix (``chmod 600 FILE``); None if only its owner has, or if the file
        cannot be examined (a missing file is another error's business).
    """
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    who = "every user of this machine" if mode & 0o007 else "its group"
    return (
        f"{path} holds a private key and has mode {mode:04o}: {who} has access "
        f"to it; run chmod 600 {path}"
    )


def warn_if_exposed(path: Path) -> None:
    """
    Log a warning if a private key file can be read or changed by anyone but
    its owner, naming the file and the ``chmod`` that fixes it.

    Args:
        path: The key file.
    """
    exposure = key_exposure(path)
    if exposure is not None:
        _log.warn(
            "{exposure} (or start with --strict to refuse such keys)",
            exposure=exposure,
            path=str(path),
        )


def refuse_exposed(paths: Sequence[Path]) -> None:
    """
    Refuse private key files open to anyone but their owner, as ``--strict``
    asks.

    Args:
        paths: The key files; those that do not exist are skipped.

    Raises:
        ConfigurationError: One or more of them is open to its group or to
            every user; the message names each with its ``chmod``.
    """
    exposures = [e for e in map(key_exposure, dict.fromkeys(paths)) if e]
    if exposures:
        msg = (
            "--strict refuses private key files that others have access to: "
            f"{'; '.join(exposures)}."
        )
        raise ConfigurationError(msg)


def load_identity(cert_path: Path, key_path: Path) -> ServerIdentity:
    """
    Load a listener's certificate chain and key and check that they match;
    warn if the key file is open to other users.

    Args:
        cert_path: PEM file with the leaf certificate first.
        key_path: PEM file with its private key.

    Returns:
        The identity.

    Raises:
        PEMError: A file cannot be read or parsed.
        KeyMismatchError: The certificate was not issued for the key.
    """
    cert_text = pki.read_pem(cert_path)
    key_text = pki.read_pem(key_path)
    for text in (cert_text, key_text):
        if text.note:
            _log.warn("{note}", note=text.note)
    chain = pki.load_certificates(cert_path, cert_text)
    key = pki.load_private_key(key_path, key_text)
    pki.check_key_matches(chain[0], key, cert_path, key_path)
    warn_if_exposed(key_path)
    return ServerIdentity(key, chain, cert_path, key_path)


def load_client_cas(path: Path) -> list[x509.Certificate]:
    """
    Load the certificates trusted to sign client certificates.

    Args:
        path: A PEM file of one or more CA certificates.

    Returns:
        The certificates.

    Raises:
        PEMError: The file cannot be read or holds no certificate.
    """
    text = pki.read_pem(path)
    if text.note:
        _log.warn("{note}", note=text.note)
    return pki.load_certificates(path, text)


def load_crl(
    path: Path, issuers: Sequence[x509.Certificate]
) -> x509.CertificateRevocationList | None:
    """
    Load the certificate revocation list of the root's local CA, as
    ``tls4d revoke`` writes it, and check who signed it.

    Args:
        path: The PEM file (``Resources/crl.pem``).
        issuers: The certificates trusted to sign client certificates
            (``Resources/ca.pem``); one of them must have signed the list.

    Returns:
        The list, or None if the file does not exist (nothing was revoked).

    Raises:
        PEMError: The file cannot be read, holds no CRL, or was not signed by
            a CA of ``issuers``.
    """
    if not path.exists():
        return None
    text = pki.read_pem(path)
    if text.note:
        _log.warn("{note}", note=text.note)
    if b"-----BEGIN X509 CRL-----" not in text.data:
        msg = (
            f"{path} holds no PEM certificate revocation list (no '-----BEGIN "
            "X509 CRL-----' line); restore it from a backup, or remove it and "
            "revoke its certificates again with 'tls4d revoke'."
        )
        raise PEMError(msg)
    try:
        crl = x509.load_pem_x509_crl(text.data)
        # cryptography reads the issuer's name only when it is asked for.
        crl.issuer.rfc4514_string()
    except (ValueError, x509.InvalidVersion) as e:
        msg = (
            f"{path} holds a malformed revocation list ({e}); restore it from a "
            "backup, or remove it and revoke its certificates again with 'tls4d "
            "revoke'."
        )
        raise PEMError(msg) from e
    for issuer in issuers:
        if issuer.subject != crl.issuer:
            continue
        try:
            if crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                return crl
        except (TypeError, ValueError):
            continue
    msg = (
        f"{path} is not signed by a CA of Resources/ca.pem (it names "
        f"{crl.issuer.rfc4514_string()!r} as issuer, or its signature is "
        "invalid); restore the list the root's local CA signed, or, if the root "
        "has a new local CA, remove it (the old CA's certificates are not "
        "trusted any more)."
    )
    raise PEMError(msg)


def _set_groups(context: SSL.Context, groups: str) -> bool:
    """
    Limit the ECDHE groups of ``context``. pyOpenSSL has no public call for
    this (only ``set_tmp_ecdh`` for a single curve), so it goes through the
    OpenSSL binding pyOpenSSL itself uses; where that is missing, OpenSSL's
    default groups stay and the caller is told.
    """
    try:
        from OpenSSL._util import lib
    except ImportError:
        return False
    set_list = getattr(lib, "SSL_CTX_set1_curves_list", None)
    if set_list is None:
        return False
    return bool(set_list(context._context, groups.encode("ascii")) == 1)


def _record_verify_error(
    connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int
) -> bool:
    """
    OpenSSL's certificate-verification callback: keep OpenSSL's verdict and
    hand the reason of a refusal to the protocol, which logs it.
    """
    if not ok:
        tls_protocol = connection.get_app_data()
        protocol = getattr(tls_protocol, "wrappedProtocol", None)
        note = getattr(protocol, "note_verify_error", None)
        if note is not None:
            reason = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
            note(f"{reason} (depth {depth})")
    return bool(ok)


#: Verification errors that a revocation list may cause and that do not refuse
#: a client: no list for the client's CA (3: only the local CA's own list is
#: loaded, so clients of other CAs in Resources/ca.pem go unchecked), and a list
#: before its last update (11) or past its next update (12), since the root's
#: own list is still the best word on what its CA revoked.
_TOLERATED_CRL_ERRORS = frozenset({3, 11, 12})


def _verify_with_crl(
    connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int
) -> bool:
    """
    The certificate-verification callback of a context with a revocation list:
    `_record_verify_error`, except for the tolerated revocation-list errors.
    """
    if not ok and errno in _TOLERATED_CRL_ERRORS:
        return True
    return _record_verify_error(connection, certificate, errno, depth, ok)


#: TLS alert descriptions (RFC 8446, 6.2) in words, for the log.
_ALERTS = {
    10: "unexpected message",
    20: "bad record MAC",
    40: "handshake failure: no cipher suite or key-exchange group in common",
    42: "bad certificate",
    43: "unsupported certificate",
    44: "certificate revoked",
    45: "certificate expired",
    46: "certificate unknown: the client rejected this server's certificate",
    47: "illegal parameter",
    48: "unknown CA: the client does not trust this server's certificate",
    49: "access denied",
    50: "decode error: it did not speak TLS as expected",
    51: "decrypt error",
    70: "protocol version: it offered only TLS versions this server refuses",
    71: "insufficient security",
    80: "internal error",
    86: "inappropriate fallback",
    109: "missing extension",
    110: "unsupported extension",
    112: "unrecognized name",
    116: "certificate required",
    120: "no application protocol in common",
}


def _alert_logger(label: str) -> Any:
    """
    An OpenSSL info callback that logs each fatal alert a handshake sends or
    receives, with the peer: why a client could not connect.
    """

    def log_alert(connection: SSL.Connection, where: int, ret: int) -> None:
        if not where & SSL.SSL_CB_ALERT or ret >> 8 != 2:
            return
        if connection.get_peer_finished() is not None:
            # The handshake completed: whatever ends the connection now is
            # the application protocol's business, not a failed handshake.
            return
        transport = connection.get_app_data()
        peer = transport.getPeer() if transport is not None else None
        host = getattr(peer, "host", "?")
        address = f"[{host}]" if ":" in host else host
        description = _ALERTS.get(ret & 0xFF, f"alert {ret & 0xFF}")
        _log.warn(
            "{label}: TLS handshake with {peer} failed, {direction} alert {alert}",
            label=label,
            peer=f"{address}:{getattr(peer, 'port', '?')}",
            direction="sent" if where & SSL.SSL_CB_WRITE else "received",
            alert=description,
        )

    return log_alert


def _alpn_selector(protocols: Sequence[bytes]) -> Any:
    """
    An ALPN selection callback that picks the first of ``protocols`` the
    client offers, or none.
    """
    preferred = list(protocols)

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _openssl_reasons(error: SSL.Error) -> str:
    """
    Returns:
        The reasons OpenSSL gave for ``error``, in words, without its
        library and function names.
    """
    reasons = [
        entry[2]
        for entry in (error.args[0] if error.args else [])
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
    ]
    return "; ".join(reasons) or str(error)


def _load_dh_parameters(context: SSL.Context, path: Path) -> None:
    """
    Give ``context`` the DH parameters of ``path``.

    Raises:
        PEMError: The file cannot be read or holds no usable parameters.
    """
    fix = (
        "write the RFC 7919 ffdhe2048 group there with 'tls4d dhparams --group "
        f"ffdhe2048 --root {path.parent}' (a start writes it where it is missing)"
    )
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        msg = f"Cannot read {path}: {e.strerror}; restore it, or {fix}."
        raise PEMError(msg) from e
    try:
        context.load_tmp_dh(str(path).encode())
    except SSL.Error as e:
        msg = f"{path} holds no usable DH parameters ({_openssl_reasons(e)}); {fix}."
        raise PEMError(msg) from e


def build_context(
    policy: TLSPolicy,
    identity: ServerIdentity,
    client_cas: Sequence[x509.Certificate] = (),
    log_alerts_as: str | None = None,
    crl: x509.CertificateRevocationList | None = None,
    alpn: Sequence[bytes] = (),
    require_client_certificate: bool = True,
    session_id: bytes = b"",
) -> SSL.Context:
    """
    Build a fully configured server context.

    Returning clients may resume their session for `SESSION_LIFETIME`
    seconds without a full handshake: with a session ticket (TLS 1.3, and
    TLS 1.2 clients that support them) encrypted under keys the context
    draws at random, or else from the context's session cache (OpenSSL's
    default size, 20,480 sessions at most). Both belong to this context
    alone: a session resumes only on a connection made from the context that
    established it, so a new context (a reload) makes every client handshake
    in full again, its certificate checked anew. A resumed session keeps
    the client certificate verified when it was established.

    Args:
        policy: Versions, ciphers and DH parameters.
        identity: The key and chain to present.
        client_cas: If any, a client certificate chained to one of them is
            required (mutual TLS); if none, clients are not asked for one.
        log_alerts_as: If given, each fatal TLS alert is logged under this
            label with the peer (for a server whose protocol does not log
            failed handshakes itself).
        crl: If given with ``client_cas``, a client certificate it lists is
            refused ("its certificate has been revoked"). Only the client's
            own certificate is checked, against the list of the CA that issued
            it; clients of a CA without a list (another CA of ``client_cas``)
            are not checked, and a list past its next update still counts.
        require_client_certificate: With ``client_cas``, whether a client
            must present a certificate (True) or may come without one, to log
            in otherwise (False); a certificate presented is verified either
            way.
        alpn: The application protocols offered by ALPN, in the server's order
            of preference (``b"h2"``, ``b"http/1.1"``); the first one the
            client also offers is chosen. A client offering none of them goes
            on without ALPN. Empty: no ALPN.
        session_id: Names the listener in its sessions' id context (after
            ``tls4d-``, 26 bytes at most), which OpenSSL requires to resume
            a session with a verified client certificate.

    Returns:
        A context not yet used by any connection.

    Raises:
        ConfigurationError: The policy's version or ciphers are unusable, or a
            revocation list is given without client CAs.
        PEMError: The DH parameters file is unusable.
    """
    if crl is not None and not client_cas:
        msg = (
            "A certificate revocation list only applies to client certificates; "
            "give the client CAs with it."
        )
        raise ConfigurationError(msg)
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(min_version_number(policy.min_version))
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_DH_USE
        | SSL.OP_SINGLE_ECDH_USE
    )
    if not _set_groups(context, GROUPS):
        _log.warn(
            "This pyOpenSSL cannot limit the key-exchange groups; OpenSSL's "
            "defaults stay in force instead of {groups}.",
            groups=GROUPS,
        )
    if policy.dh_parameters is not None:
        _load_dh_parameters(context, policy.dh_parameters)

    context.use_certificate(identity.certificate)
    for certificate in identity.chain[1:]:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(identity.key)
    context.check_privatekey()

    if client_cas:
        from OpenSSL.crypto import X509

        store = context.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(X509.from_cryptography(ca))
        verify = _record_verify_error
        if crl is not None:
            from OpenSSL.crypto import X509StoreFlags

            store.add_crl(crl)
            # The leaf only: CRL_CHECK_ALL would want a list from every CA of
            # the chain, and the local CA's list covers what it issued.
            store.set_flags(X509StoreFlags.CRL_CHECK)
            verify = _verify_with_crl
        mode = SSL.VERIFY_PEER
        if require_client_certificate:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, verify)

    # A session id context is what lets a session with a verified client
    # certificate be resumed at all; tickets stay on (no OP_NO_TICKET).
    context.set_session_id(b"tls4d-" + session_id if session_id else b"tls4d")
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_timeout(SESSION_LIFETIME)
    # An idle connection gives its read and write buffers (about 34 KiB)
    # back to the allocator; most of a server's connections are idle.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)

    if log_alerts_as is not None:
        context.set_info_callback(_alert_logger(log_alerts_as))

    if alpn:
        context.set_alpn_select_callback(_alpn_selector(alpn))

    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode("ascii"))
    tls12_suites(policy.ciphers)
    context.set_cipher_list(policy.ciphers.encode("ascii"))
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """
    Makes the TLS side of each new server connection from one context, which
    `replace` swaps for a freshly built one; connections already made keep the
    context they were made from.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    @property
    def context(self) -> SSL.Context:
        """The context new connections are made from."""
        return self._context

    def replace(self, context: SSL.Context) -> None:
        """
        Serve new connections from ``context``.

        Args:
            context: A fully configured context.
        """
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        Returns:
            A server-side connection for one accepted transport.
        """
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection
