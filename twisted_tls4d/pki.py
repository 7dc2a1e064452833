"""
Keys, certificates and the local certificate authority of a server root.

Everything here is built on cryptography's X.509 and key APIs; this module only
decides which keys and certificates tls4d makes and how it reads and writes
them safely.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twisted_tls4d.errors import KeyMismatchError, PEMError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""The kinds of private key tls4d serves with."""

#: Browsers and Mozilla's profiles refuse server certificates that live longer.
MAX_SERVER_CERTIFICATE_DAYS = 366

#: Lifespan of the certificates tls4d issues itself (server and client).
DEFAULT_CERTIFICATE_DAYS = 365

#: Lifespan of a root's local certificate authority.
CA_DAYS = 10 * 365

#: Issue certificates this far in the past, so that a peer whose clock runs a
#: little behind does not see them as not yet valid.
_BACKDATE = datetime.timedelta(minutes=10)

#: RFC 7919's ffdhe2048 group, as ``openssl genpkey -genparam -algorithm DH
#: -pkeyopt group:ffdhe2048`` writes it. A standard, public constant: written
#: at once on first start so that DH parameters never delay it.
FFDHE2048_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


#: The line that opens a PEM private key of any form (PKCS#8, encrypted
#: PKCS#8, PKCS#1, SEC1).
_PRIVATE_KEY_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


@attrs.frozen
class PEMText:
    """
    The bytes of a PEM file, with line endings made readable.

    Attributes:
        data: The file's content with LF line endings.
        note: A sentence for the operator when the file had to be normalised
            (CR-only line endings), else None.
    """

    data: bytes
    note: str | None


@attrs.frozen
class LocalCA:
    """
    A certificate authority that signs the certificates of one server root.

    Attributes:
        certificate: The CA's self-signed certificate.
        key: The CA's private key.
    """

    certificate: x509.Certificate
    key: PrivateKey


def utc_now() -> datetime.datetime:
    """
    Returns:
        The current time, timezone-aware in UTC.
    """
    return datetime.datetime.now(datetime.UTC)


def generate_private_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    """
    Make a new ECDSA private key.

    Args:
        curve: ``"P-256"`` or ``"P-384"``.

    Returns:
        The new key.

    Raises:
        ValueError: The curve is not one tls4d makes keys on.
    """
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
    }
    if curve not in curves:
        msg = f"Unsupported curve {curve!r}; choose P-256 or P-384."
        raise ValueError(msg)
    return ec.generate_private_key(curves[curve])


def _write_temporary(path: Path, data: bytes, mode: int) -> str:
    """
    Write ``data`` to a new temporary file beside ``path`` (its folder created
    if missing), with ``mode`` from its creation, flushed to disk.

    Returns:
        The temporary file's path, for the caller to move into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """
    Write ``data`` to ``path`` through a temporary file in the same folder, so
    that a reader sees either the old file or the whole new one, never a part.
    The temporary file has ``mode`` from its creation, so a private key is
    never readable by others, even for an instant.
    """
    temporary = _write_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_private_key(path: Path, key: PrivateKey) -> None:
    """
    Write a private key as unencrypted PKCS#8 PEM, readable by its owner only
    (mode 0600).

    Args:
        path: Where to write it.
        key: The key.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, pem, 0o600)


def write_certificates(path: Path, certificates: Iterable[x509.Certificate]) -> None:
    """
    Write certificates to one PEM file (mode 0644), in the order given.

    Args:
        path: Where to write them.
        certificates: The leaf first, then the chain that issued it.
    """
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    _write_atomically(path, pem, 0o644)


def write_public_file(path: Path, data: bytes) -> None:
    """
    Write a file that holds nothing secret (mode 0644), atomically.

    Args:
        path: Where to write it.
        data: Its content.
    """
    _write_atomically(path, data, 0o644)


def read_pem(path: Path) -> PEMText:
    """
    Read a PEM file, accepting LF and CRLF line endings and normalising the
    CR-only endings some old editors write.

    Args:
        path: The file.

    Returns:
        Its content with LF endings, and a note if it was normalised.

    Raises:
        PEMError: The file cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        msg = f"Cannot read {path}: {e.strerror}."
        raise PEMError(msg) from e
    if b"\r" in data and b"\n" not in data:
        note = (
            f"{path} has CR-only line endings (classic Mac OS); read it as if "
            "they were LF. Save it with LF or CRLF endings to silence this note."
        )
        return PEMText(data.replace(b"\r", b"\n"), note)
    return PEMText(data.replace(b"\r\n", b"\n"), None)


def load_certificates(
    path: Path, text: PEMText | None = None
) -> list[x509.Certificate]:
    """
    Load every certificate of a PEM file, in file order.

    Args:
        path: The file, named in errors.
        text: Its content if already read with `read_pem`.

    Returns:
        At least one certificate, each checked readable (`check_readable`).

    Raises:
        PEMError: The file cannot be read, holds no valid certificate, or
            holds one damaged in a part read only on use.
    """
    data = (text or read_pem(path)).data
    if b"-----BEGIN CERTIFICATE-----" not in data:
        msg = (
            f"{path} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' "
            "line); install a PEM certificate there."
        )
        raise PEMError(msg)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as e:
        msg = f"{path} holds a malformed certificate: {e}."
        raise PEMError(msg) from e
    for number, certificate in enumerate(certificates, 1):
        check_readable(path, certificate, number)
    return certificates


def check_readable(path: Path, certificate: x509.Certificate, number: int = 1) -> None:
    """
    Read the parts of a certificate that cryptography parses only when they
    are used (names, extensions, public key), so that damage there is found
    as the file is loaded rather than as a stray exception later.

    Args:
        path: The certificate's file, named in the error.
        certificate: A certificate loaded from it.
        number: Its place in the file, counting from 1.

    Raises:
        PEMError: A part cannot be read, or the public key is of a kind
            cryptography does not know.
    """
    part = "subject"
    try:
        certificate.subject.rfc4514_string()
        part = "issuer"
        certificate.issuer.rfc4514_string()
        part = "extensions"
        for extension in certificate.extensions:
            part = f"extension {extension.oid.dotted_string}"
            _ = extension.value
        part = "public key"
        certificate.public_key()
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as e:
        which = "" if number == 1 else f" (certificate {number} of the file)"
        msg = (
            f"{path} holds a certificate{which} whose {part} cannot be read "
            f"({e}); the file is damaged or not meant for TLS: install the "
            "certificate again from the file its issuer sent."
        )
        raise PEMError(msg) from e


def load_private_key(path: Path, text: PEMText | None = None) -> PrivateKey:
    """
    Load an unencrypted PEM private key (PKCS#8, or the older PKCS#1 and SEC1
    forms).

    Args:
        path: The file, named in errors.
        text: Its content if already read with `read_pem`.

    Returns:
        The key.

    Raises:
        PEMError: The file cannot be read, holds no key, an encrypted key, or
            a kind of key TLS servers cannot use.
    """
    data = (text or read_pem(path)).data
    check_one_private_key(path, data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        msg = (
            f"{path} holds an encrypted private key; tls4d starts unattended, "
            "so store the key unencrypted with mode 0600."
        )
        raise PEMError(msg) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        msg = f"{path} holds no usable PEM private key: {e}."
        raise PEMError(msg) from e
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) or not (
        isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    ):
        msg = f"{path} holds a {type(key).__name__}; use an ECDSA or RSA key."
        raise PEMError(msg)
    return key


def check_one_private_key(path: Path, data: bytes) -> None:
    """
    Refuse PEM text that holds more than one private key: which of them the
    file means is a guess (a parser takes the first), and a wrong guess
    shows up later as a certificate that does not match.

    Args:
        path: The file, named in the error.
        data: Its PEM text.

    Raises:
        PEMError: It holds two or more ``PRIVATE KEY`` blocks.
    """
    count = len(_PRIVATE_KEY_BEGIN.findall(data))
    if count > 1:
        msg = (
            f"{path} holds {count} private keys; keep only the key the "
            "certificate was issued for in it."
        )
        raise PEMError(msg)


def _public_bytes(key: object) -> bytes:
    public_bytes = key.public_bytes
    result: bytes = public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return result


def check_key_matches(
    certificate: x509.Certificate, key: PrivateKey, cert_path: Path, key_path: Path
) -> None:
    """
    Check that a certificate was issued for a private key.

    Args:
        certificate: The leaf certificate.
        key: The private key served with it.
        cert_path: The certificate's file, named in the error.
        key_path: The key's file, named in the error.

    Raises:
        KeyMismatchError: Their public keys differ.
        PEMError: The certificate's public key cannot be read (a damaged file).
    """
    try:
        certificate_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        msg = (
            f"{cert_path} holds a certificate whose public key cannot be read "
            f"({e}); the file is damaged: install the certificate again."
        )
        raise PEMError(msg) from e
    if _public_bytes(certificate_key) != _public_bytes(key.public_key()):
        msg = (
            f"{cert_path} does not match {key_path} (public keys differ); "
            "install the certificate issued for this key, or the key it was "
            "issued for."
        )
        raise KeyMismatchError(msg)


def general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """
    Turn host names and IP addresses into subject alternative names.

    Args:
        names: DNS names (``localhost``, ``db.example.com``) or IPv4/IPv6
            addresses (``127.0.0.1``, ``::1``).

    Returns:
        One ``IPAddress`` or ``DNSName`` each, in order.
    """
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, issuer: bool, rsa_key: bool) -> x509.KeyUsage:
    """
    What a key may do: sign (always), sign certificates and CRLs (a CA), and
    encipher keys (an RSA end-entity key, for TLS 1.2's RSA key transport).
    """
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key and not issuer,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=issuer,
        crl_sign=issuer,
        encipher_only=False,
        decipher_only=False,
    )


def create_local_ca(label: str, now: datetime.datetime | None = None) -> LocalCA:
    """
    Make a new certificate authority for one server root, with a fresh ECDSA
    P-256 key. It may sign end-entity certificates only (path length 0).

    Args:
        label: Words that tell this CA from others (a host name and a path),
            put in its common name with a random tag.
        now: The time of issue; the current time if None.

    Returns:
        The CA's certificate and key.
    """
    now = now or utc_now()
    key = generate_private_key()
    tag = secrets.token_hex(4)
    name = _name(f"tls4d local CA {tag} ({label})"[:64])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now - _BACKDATE + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(issuer=True, rsa_key=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .sign(key, hashes.SHA256())
    )
    return LocalCA(certificate, key)


def issue_certificate(
    ca: LocalCA,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    days: int = DEFAULT_CERTIFICATE_DAYS,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """
    Sign an end-entity certificate with a local CA.

    Args:
        ca: The issuing authority.
        public_key: The public key the certificate is for.
        common_name: The subject's common name.
        server_names: Host names and addresses the certificate covers as a
            server (serverAuth); none for a client-only certificate.
        client: Whether it may authenticate a client (clientAuth).
        days: Its lifespan; at most 366 days for a server certificate.
        now: The time of issue; the current time if None.

    Returns:
        The certificate.

    Raises:
        ValueError: It would be neither server nor client certificate, live
            less than a day, or (a server certificate) longer than browsers
            accept.
    """
    if days < 1:
        msg = f"A certificate must be valid for at least 1 day, not {days}."
        raise ValueError(msg)
    if not server_names and not client:
        msg = "A certificate needs server names, the client purpose, or both."
        raise ValueError(msg)
    if server_names and days > MAX_SERVER_CERTIFICATE_DAYS:
        msg = (
            f"A server certificate valid for {days} days is refused by browsers "
            f"and Mozilla's profiles; choose at most {MAX_SERVER_CERTIFICATE_DAYS}."
        )
        raise ValueError(msg)
    now = now or utc_now()
    purposes = []
    if server_names:
        purposes.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        purposes.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_public = ca.key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now - _BACKDATE + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(issuer=False, rsa_key=isinstance(public_key, rsa.RSAPublicKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(general_names(server_names)), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """
    Returns:
        The certificate's SHA-256 fingerprint as colon-separated upper-case
        hex pairs, as ``openssl x509 -fingerprint -sha256`` shows it.
    """
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(certificate: x509.Certificate) -> str:
    """
    Returns:
        One line for a log: subject, issuer and expiry of the certificate.
    """
    expiry = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"subject {certificate.subject.rfc4514_string()!r}, issuer "
        f"{certificate.issuer.rfc4514_string()!r}, expires {expiry}"
    )


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """
    Serialise a private key as PKCS#8 PEM, encrypted when a passphrase is
    given.

    Args:
        key: The key.
        passphrase: Encrypt the key with this passphrase (the best scheme
            cryptography offers: AES-256 with a PBKDF2 key); unencrypted if
            None.

    Returns:
        The PEM bytes.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def create_new_file(path: Path, data: bytes, mode: int) -> None:
    """
    Write a file that must not exist yet, atomically and with ``mode`` from
    its creation (as `write_private_key` does), without ever replacing a
    file already at ``path``.

    Args:
        path: Where to write; its folder is created if missing.
        data: The file's content.
        mode: Its permission bits (0600 for a private key).

    Raises:
        FileExistsError: ``path`` exists; it is left as it was.
        OSError: The file cannot be written.
    """
    temporary = _write_temporary(path, data, mode)
    try:
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
