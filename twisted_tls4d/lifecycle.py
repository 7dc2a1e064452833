"""
The life cycle of a server's key and certificate, in the steps 4D documents:
generate a private key, issue a certificate request, send it to a
certification authority, and install the certificate it sends back.

Each step checks its own work: a key pair is read back before it is reported,
a request verifies with its own key, and a certificate is installed only when
it matches its key, is valid now, may serve TLS, comes with a chain in order
and is signed with a hash that is not broken. Everything cryptographic is
cryptography's; this module decides what tls4d asks of it.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import idna
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twisted_tls4d import pki, root
from twisted_tls4d.errors import ConfigurationError, KeyMismatchError, PEMError

PassphraseSource = Callable[[str], bytes]
"""
Asked for the passphrase of an encrypted file, named in its one argument (the
file's path); returns the passphrase. It may raise a tls4d error when no
passphrase can be had (no terminal to ask on, say).
"""

#: The curves `generate_keypair` makes ECDSA keys on.
CURVES = ("P-256", "P-384")

#: The sizes `generate_keypair` makes RSA keys of.
RSA_SIZES = (2048, 3072, 4096)

#: The smallest RSA key tls4d makes or installs.
MIN_RSA_BITS = 2048

#: A certificate that expires sooner than this is installed with a warning.
EXPIRY_WARNING = datetime.timedelta(days=30)

#: What ``--for`` may name, and the servers each choice serves.
TARGETS = {
    "web": "web and SQL servers",
    "sql": "web and SQL servers",
    "app": "application server",
}

_BROKEN_HASHES = (hashes.SHA1, hashes.MD5)

_PURPOSES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

#: Upper bounds of subject fields (RFC 5280, appendix A.1), in characters.
_MAX_LENGTHS = {
    NameOID.COMMON_NAME: 64,
    NameOID.STATE_OR_PROVINCE_NAME: 128,
    NameOID.LOCALITY_NAME: 128,
    NameOID.ORGANIZATION_NAME: 64,
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    NameOID.EMAIL_ADDRESS: 255,
}


class CertificateRefusedError(PEMError):
    """
    A certificate cannot be installed; every reason found is listed.

    Attributes:
        source: The certificate's file.
        problems: One full sentence per reason, naming the fix.
    """

    def __init__(self, source: Path, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            reasons = " ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            message = f"{source} is refused for {len(self.problems)} reasons: {reasons}"
        super().__init__(message)


@attrs.frozen
class Installable:
    """
    A certificate an authority sent back, with what belongs to it, as
    `load_for_install` read it.

    Attributes:
        certificate: The server's own (leaf) certificate.
        certificate_source: The file it came from, named in messages.
        source_format: ``"PEM"``, ``"DER"`` or ``"PKCS#12"``.
        chain: The certificates that issued it, in the order given: each
            should be issued by the next.
        key: Its private key, when one was given or came with it; None to
            use the key already in the server root.
        key_source: The file the key came from, named in messages.
        notes: Sentences for the operator about how the files were read
            (line endings normalised, duplicates dropped).
    """

    certificate: x509.Certificate
    certificate_source: Path
    source_format: str
    chain: tuple[x509.Certificate, ...] = ()
    key: pki.PrivateKey | None = None
    key_source: Path | None = None
    notes: tuple[str, ...] = ()


@attrs.frozen
class InstallResult:
    """
    What `install_identity` did.

    Attributes:
        servers: The servers that use the files (``"web and SQL servers"``).
        key: The key file of those servers.
        cert: Their certificate file (leaf, then chain).
        key_written: Whether a new key was written (False when the
            certificate was issued for the key already there).
        backups: The previous files, kept under new names.
        certificate: The installed leaf certificate.
        chain: The installed chain.
        warnings: Sentences about what was installed but deserves a look
            (expiry soon, no chain), and the notes from reading the files.
    """

    servers: str
    key: Path
    cert: Path
    key_written: bool
    backups: tuple[Path, ...]
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    warnings: tuple[str, ...]


def generate_keypair(
    key_type: str = "ec", *, curve: str | None = None, bits: int | None = None
) -> pki.PrivateKey:
    """
    Make a new private key for a server: ECDSA on P-256 unless asked
    otherwise.

    Args:
        key_type: ``"ec"`` (ECDSA) or ``"rsa"``.
        curve: The ECDSA curve, one of `CURVES`; P-256 if None.
        bits: The RSA key size, one of `RSA_SIZES`; 2048 if None.

    Returns:
        The new key.

    Raises:
        ConfigurationError: An unknown key type or curve, a curve for an RSA
            key or a size for an ECDSA key, or an RSA size tls4d refuses
            (under 2048 bits, which can be broken).
    """
    if key_type == "ec":
        if bits is not None:
            msg = (
                f"A key size ({bits} bits) applies to RSA keys only; leave out "
                "--bits, or choose --type rsa."
            )
            raise ConfigurationError(msg)
        curve = curve or "P-256"
        if curve not in CURVES:
            msg = f"Unsupported curve {curve!r}; choose {' or '.join(CURVES)}."
            raise ConfigurationError(msg)
        return pki.generate_private_key(curve)
    if key_type == "rsa":
        if curve is not None:
            msg = (
                f"A curve ({curve}) applies to ECDSA keys only; leave out "
                "--curve, or choose --type ec."
            )
            raise ConfigurationError(msg)
        bits = 2048 if bits is None else bits
        if bits < MIN_RSA_BITS:
            msg = (
                f"An RSA key of {bits} bits is refused: RSA keys under "
                f"{MIN_RSA_BITS} bits can be broken (a 512-bit key, the size "
                "4D's GENERATE ENCRYPTION KEYPAIR makes by default, is factored "
                "in hours), and browsers refuse them; choose --bits 2048 or more."
            )
            raise ConfigurationError(msg)
        if bits not in RSA_SIZES:
            sizes = ", ".join(str(s) for s in RSA_SIZES)
            msg = f"Unsupported RSA key size {bits}; choose one of {sizes}."
            raise ConfigurationError(msg)
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    msg = f"Unknown key type {key_type!r}; choose ec (ECDSA) or rsa."
    raise ConfigurationError(msg)


def describe_key(key: pki.PrivateKey) -> str:
    """
    Returns:
        The kind and size of a key in words: ``"ECDSA P-256"``,
        ``"RSA 2048-bit"``.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(key.curve.name, key.curve.name)}"
    return f"RSA {key.key_size}-bit"


def write_keypair(
    key: pki.PrivateKey,
    out: Path,
    *,
    public_out: Path | None = None,
    passphrase: bytes | None = None,
) -> None:
    """
    Write a private key as PKCS#8 PEM (mode 0600), optionally encrypted, and
    its public key as SubjectPublicKeyInfo PEM; then read both back to check
    them. Neither file may exist: a key is never overwritten.

    Args:
        key: The private key.
        out: Its file.
        public_out: The public key's file; none written if None.
        passphrase: Encrypt the private key with this passphrase; stored
            unencrypted if None.

    Raises:
        ConfigurationError: A file exists already, both are the same file,
            the passphrase is empty, or a file cannot be written.
        PEMError: A written file does not read back as the key (a failing
            disk).
    """
    if passphrase is not None and not passphrase:
        msg = "An empty passphrase protects nothing; give a passphrase, or none."
        raise ConfigurationError(msg)
    if public_out is not None and public_out.resolve() == out.resolve():
        msg = f"The private and public keys cannot both go to {out}; name two files."
        raise ConfigurationError(msg)
    files = [out] if public_out is None else [out, public_out]
    for path in files:
        if path.exists() or path.is_symlink():
            raise ConfigurationError(_exists_message(path))

    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create(out, pki.private_key_pem(key, passphrase), 0o600)
    if public_out is not None:
        try:
            _create(public_out, public_pem, 0o644)
        except ConfigurationError:
            # Without its public key the pair is incomplete; removing the new
            # private key lets the same command run again once fixed.
            out.unlink()
            raise

    try:
        reread = serialization.load_pem_private_key(out.read_bytes(), passphrase)
        same = _spki(reread.public_key()) == _spki(key.public_key())
        if public_out is not None:
            public = serialization.load_pem_public_key(public_out.read_bytes())
            same = same and _spki(public) == _spki(key.public_key())
    except (OSError, ValueError, TypeError) as e:
        msg = f"{out} does not read back as the key just written ({e}); check the disk."
        raise PEMError(msg) from e
    if not same:
        msg = f"{out} does not read back as the key just written; check the disk."
        raise PEMError(msg)


def load_key(path: Path, passphrase: PassphraseSource | None = None) -> pki.PrivateKey:
    """
    Load a private key in PEM (PKCS#8, PKCS#1 or SEC1) or DER, asking for its
    passphrase if it is encrypted.

    Args:
        path: The key's file.
        passphrase: Asked for the passphrase of an encrypted key.

    Returns:
        The key.

    Raises:
        PEMError: The file cannot be read, holds no ECDSA or RSA private key,
            or the passphrase is wrong.
        ConfigurationError: The key is encrypted and no passphrase was had.
    """
    data, _note = _read_normalised(path)
    return _decode_key(data, path, passphrase)


def subject_alternative_name(text: str) -> x509.GeneralName:
    """
    Read one subject alternative name as the command line gives it.

    Args:
        text: ``DNS:name`` or ``IP:address``; a bare address is an IP name,
            anything else bare a DNS name. A non-ASCII DNS name is encoded
            with IDNA (``bücher.example`` becomes ``xn--bcher-kva.example``);
            ``*.`` may start a DNS name (a wildcard).

    Returns:
        The name.

    Raises:
        ConfigurationError: A kind other than DNS or IP, or a value that is
            not a valid DNS name or IP address.
    """
    kind, sep, value = text.partition(":")
    if sep and kind.upper() == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value.strip()))
        except ValueError as e:
            msg = f"{text!r} is not an IP address; write it as IP:192.0.2.1 or IP:::1."
            raise ConfigurationError(msg) from e
    if sep and kind.upper() == "DNS":
        return _dns_name(value.strip(), text)
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip()))
    except ValueError:
        pass
    if sep and kind.isalpha():
        msg = (
            f"{text!r} is a {kind} name; a server certificate request takes "
            "DNS:name and IP:address names only."
        )
        raise ConfigurationError(msg)
    return _dns_name(text.strip(), text)


def build_request(
    key: pki.PrivateKey,
    common_name: str,
    *,
    country: str | None = None,
    state: str | None = None,
    locality: str | None = None,
    organization: str | None = None,
    unit: str | None = None,
    email: str | None = None,
    names: Sequence[str] = (),
) -> x509.CertificateSigningRequest:
    """
    Make a PKCS#10 certificate request for a server, signed with SHA-256 by
    its key.

    Browsers ignore the common name and match the subject alternative names
    only, so the request always carries some: ``names``, with the common
    name first when it is a host name or address they lack; just the common
    name when ``names`` is empty. Subject fields may be any Unicode text
    (UTF-8 in the request); non-ASCII DNS names are IDNA-encoded.

    Args:
        key: The server's private key.
        common_name: The subject's common name, usually the server's main
            host name.
        country: A two-letter ISO 3166 country code.
        state: State or province.
        locality: City.
        organization: Organization.
        unit: Organizational unit.
        email: A contact address.
        names: Subject alternative names, as `subject_alternative_name`
            reads them.

    Returns:
        The request; its signature is checked before it is returned.

    Raises:
        ConfigurationError: A field is empty or too long, the country is not
            two letters, the e-mail address cannot be encoded, a name is not
            valid, or there is no name at all (a common name that is not a
            host name, and no ``names``).
    """
    attributes: list[x509.NameAttribute[str]] = []
    if country is not None:
        code = country.strip()
        if len(code) != 2 or not (code.isascii() and code.isalpha()):
            msg = (
                f"The country {country!r} is not a two-letter ISO 3166 code; "
                "give it as, say, FR, DE or US."
            )
            raise ConfigurationError(msg)
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, code.upper()))
    fields = [
        (NameOID.STATE_OR_PROVINCE_NAME, "state", state),
        (NameOID.LOCALITY_NAME, "locality", locality),
        (NameOID.ORGANIZATION_NAME, "organization", organization),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "organizational unit", unit),
        (NameOID.COMMON_NAME, "common name", common_name),
    ]
    for oid, label, value in fields:
        if value is not None:
            attributes.append(_name_attribute(oid, label, value))
    if email is not None:
        attributes.append(
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, _email_address(email))
        )

    alternative: list[x509.GeneralName] = [subject_alternative_name(n) for n in names]
    try:
        from_common_name: x509.GeneralName | None = subject_alternative_name(
            common_name
        )
    except ConfigurationError:
        from_common_name = None
    if not alternative and from_common_name is None:
        msg = (
            f"The common name {common_name!r} is not a host name or IP address, "
            "and browsers ignore the common name anyway; give the server's "
            "names with --san DNS:name or --san IP:address."
        )
        raise ConfigurationError(msg)
    if from_common_name is not None and from_common_name not in alternative:
        alternative.insert(0, from_common_name)
    unique = list(dict.fromkeys(alternative))

    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .add_extension(x509.SubjectAlternativeName(unique), critical=False)
        .sign(key, hashes.SHA256())
    )
    if not request.is_signature_valid:
        msg = "The new certificate request does not verify with its own key."
        raise PEMError(msg)
    return request


def write_request(path: Path, request: x509.CertificateSigningRequest) -> None:
    """
    Write a certificate request as PEM (mode 0644), then read it back and
    verify its signature.

    Args:
        path: Its file; replaced if it exists (a request holds nothing that
            cannot be made again).
        request: The request.

    Raises:
        ConfigurationError: The file cannot be written.
        PEMError: It does not read back as a valid request.
    """
    try:
        pki.write_public_file(path, request.public_bytes(serialization.Encoding.PEM))
        reread = x509.load_pem_x509_csr(path.read_bytes())
    except OSError as e:
        msg = f"Cannot write {path}: {e.strerror}; choose a folder you may write to."
        raise ConfigurationError(msg) from e
    except ValueError as e:
        msg = f"{path} does not read back as the request just written ({e})."
        raise PEMError(msg) from e
    if reread != request or not reread.is_signature_valid:
        msg = f"{path} does not read back as the request just written."
        raise PEMError(msg)


def names_of(
    item: x509.Certificate | x509.CertificateSigningRequest,
) -> list[str]:
    """
    Returns:
        The subject alternative names of a certificate or request as
        ``DNS:name`` and ``IP:address`` strings, in order; empty if it has
        none.
    """
    try:
        extension = item.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    result = []
    for name in extension.value:
        if isinstance(name, x509.DNSName):
            result.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            result.append(f"IP:{name.value}")
        else:
            result.append(f"{type(name).__name__}:{name.value}")
    return result


def load_for_install(
    certificate: Path,
    *,
    key: Path | None = None,
    chain: Path | None = None,
    passphrase: PassphraseSource | None = None,
) -> Installable:
    """
    Read what a certification authority sent back, whatever its form.

    The certificate file may be PEM (LF, CRLF or CR-only line endings; more
    certificates after the first are its chain, and a private key may come
    with them), DER (one certificate), or PKCS#12 (``.pfx``/``.p12``: key,
    certificate and chain, usually behind a passphrase). The chain file is
    PEM or DER. Nothing is checked here beyond reading: see
    `check_installable`.

    Args:
        certificate: The certificate's file.
        key: The private key's file (PEM or DER, encrypted or not); leave out
            when the certificate file holds the key, or the key is the one
            already in the server root.
        chain: A file of intermediate certificates, appended to any chain the
            certificate file holds.
        passphrase: Asked for the passphrase of a PKCS#12 file or encrypted
            key.

    Returns:
        What was read. The chain keeps the order given, except from PKCS#12,
        whose certificates have no order and are put in issuing order;
        repeated certificates are dropped with a note.

    Raises:
        PEMError: A file cannot be read or holds nothing usable, or a
            passphrase is wrong.
        ConfigurationError: A key was given twice (in the certificate file
            and with ``key``), or a passphrase was needed and not had.
    """
    data = _read(certificate)
    notes: list[str] = []
    found_key: pki.PrivateKey | None = None
    if b"-----BEGIN" in data:
        text, note = _read_normalised(certificate)
        notes += [note] if note else []
        certificates = _pem_certificates(certificate, text)
        if b"PRIVATE KEY-----" in text:
            found_key = _decode_key(text, certificate, passphrase)
        source_format = "PEM"
    elif certificate.suffix.lower() in (".pfx", ".p12") or _looks_like_pkcs12(data):
        found_key, certificates = _load_pkcs12(certificate, data, passphrase)
        source_format = "PKCS#12"
    else:
        certificates = [_der_certificate(certificate, data)]
        source_format = "DER"

    key_source: Path | None = certificate if found_key is not None else None
    if key is not None:
        if found_key is not None:
            msg = (
                f"{certificate} holds a private key already, and --key names "
                f"{key} as well; leave out --key, or give a certificate file "
                "without a key."
            )
            raise ConfigurationError(msg)
        key_data, note = _read_normalised(key)
        notes += [note] if note else []
        found_key = _decode_key(key_data, key, passphrase)
        key_source = key

    given_chain = certificates[1:]
    if chain is not None:
        chain_data = _read(chain)
        if b"-----BEGIN" in chain_data:
            text, note = _read_normalised(chain)
            notes += [note] if note else []
            given_chain += _pem_certificates(chain, text)
        else:
            given_chain.append(_der_certificate(chain, chain_data))

    leaf = certificates[0]
    unique: list[x509.Certificate] = []
    for item in given_chain:
        if item == leaf or item in unique:
            notes.append(
                f"The certificate {item.subject.rfc4514_string()!r} was given "
                "twice; the copy was ignored."
            )
        else:
            unique.append(item)
    return Installable(
        certificate=leaf,
        certificate_source=certificate,
        source_format=source_format,
        chain=tuple(unique),
        key=found_key,
        key_source=key_source,
        notes=tuple(notes),
    )


def check_installable(
    installable: Installable, *, now: datetime.datetime | None = None
) -> list[str]:
    """
    Check that a certificate can serve TLS with its key and chain.

    Refused: a certificate that does not match the key; a certificate (leaf
    or chain) that is expired or not yet valid; a leaf whose extended key
    usage leaves out serverAuth; a chain in the wrong order or with a gap
    (each certificate must be issued by the next, by name and signature); an
    RSA key under 2048 bits (the server's or a chain certificate's); a
    signature with SHA-1 or MD5.

    Args:
        installable: What `load_for_install` read, with a key (the root's
            when none was given).
        now: The time to check validity at; the current time if None.

    Returns:
        Warnings about things that work but deserve a look (no subject
        alternative names, expiry within 30 days, no chain, a self-signed
        leaf, a root certificate at the end of the chain).

    Raises:
        CertificateRefusedError: Every refusal found, each a sentence that
            names the fix.
        ConfigurationError: There is no key to check against.
    """
    now = now or pki.utc_now()
    leaf = installable.certificate
    source = installable.certificate_source
    key = installable.key
    key_source = installable.key_source or Path("the key")
    if key is None:
        msg = f"{source} comes without its private key; give the key with --key."
        raise ConfigurationError(msg)
    problems: list[str] = []
    warnings: list[str] = []

    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        problems.append(
            f"{key_source} is an RSA key of {key.key_size} bits; keys under "
            f"{MIN_RSA_BITS} bits can be broken and browsers refuse them: make "
            "a new key (tls4d keypair), a new request, and have the "
            "certificate issued again."
        )
    try:
        pki.check_key_matches(leaf, key, source, key_source)
    except KeyMismatchError:
        problems.append(
            f"{source} does not match {key_source} (public keys differ); "
            "install the certificate issued for this key, or give the key it "
            "was issued for with --key."
        )
    except PEMError as e:
        problems.append(str(e))

    labelled = [(f"{source}", leaf)] + [
        (f"chain certificate {i} ({c.subject.rfc4514_string()!r})", c)
        for i, c in enumerate(installable.chain, 1)
    ]
    for label, item in labelled:
        problems += _validity_problems(label, item, now)
        problems += _signature_problems(label, item, in_chain=item is not leaf)
        try:
            public = item.public_key()
        except (ValueError, UnsupportedAlgorithm):
            continue
        if item is not leaf and isinstance(public, rsa.RSAPublicKey):
            if public.key_size < MIN_RSA_BITS:
                problems.append(
                    f"{label} has an RSA key of {public.key_size} bits, which "
                    "can be broken; get the CA's current chain."
                )

    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if ExtendedKeyUsageOID.SERVER_AUTH not in usage:
            purposes = ", ".join(_PURPOSES.get(p, p.dotted_string) for p in usage)
            problems.append(
                f"{source} may not serve TLS: its extended key usage allows "
                f"{purposes} but not serverAuth (TLS web server "
                "authentication); ask the CA for a TLS server certificate."
            )

    problems += _chain_problems(leaf, installable.chain)

    if problems:
        raise CertificateRefusedError(source, problems)

    if not names_of(leaf):
        warnings.append(
            f"{source} has no subject alternative names: browsers ignore the "
            "common name and will refuse it; ask the CA to include the "
            "server's names."
        )
    left = leaf.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        warnings.append(
            f"{source} expires in {left.days} days "
            f"({_date(leaf.not_valid_after_utc)}); renew it soon."
        )
    if _self_signed(leaf):
        warnings.append(
            f"{source} is self-signed: no client trusts it until given this "
            "very certificate."
        )
    elif not installable.chain:
        warnings.append(
            f"{source} comes without a chain: clients must trust its issuer "
            f"{leaf.issuer.rfc4514_string()!r} directly (as with a root's local "
            "CA); if the CA sent intermediate certificates, give them with "
            "--chain."
        )
    elif _self_signed(installable.chain[-1]):
        warnings.append(
            "The chain ends with the root certificate "
            f"{installable.chain[-1].subject.rfc4514_string()!r}; clients have "
            "it already, so it may be left out."
        )
    return warnings + list(installable.notes)


def install_identity(
    layout: root.RootLayout,
    target: str,
    installable: Installable,
    *,
    now: datetime.datetime | None = None,
) -> InstallResult:
    """
    Check a certificate with `check_installable`, then write it and its key
    where the chosen servers read them, keeping the previous files.

    ``web`` and ``sql`` mean the root's ``key.pem`` and ``cert.pem`` (the
    two servers share one identity); ``app`` means ``Resources/key.pem`` and
    ``Resources/cert.pem``. The certificate file receives the leaf then its
    chain. The key is stored unencrypted with mode 0600, since the servers
    start unattended; without a key in ``installable``, the one already
    there must match. Previous files are kept as ``NAME.bak-YYYYmmddTHHMMSSZ``
    (UTC; the key's with mode 0600). Each file is replaced atomically, then
    the pair is read back as the server will read it.

    Args:
        layout: The server root.
        target: ``"web"``, ``"sql"`` or ``"app"``.
        installable: What `load_for_install` read.
        now: The time to check validity at and to name backups by; the
            current time if None.

    Returns:
        What was written and kept, and the warnings of the check.

    Raises:
        ConfigurationError: An unknown target, a root folder that does not
            exist, no key to use, or a file that cannot be written.
        CertificateRefusedError: The certificate fails a check.
        PEMError: The root's key cannot be read, or the written files do not
            read back as a matching pair.
    """
    if target not in TARGETS:
        msg = f"Unknown server {target!r}; choose web, sql or app."
        raise ConfigurationError(msg)
    layout.require_existing()
    now = now or pki.utc_now()
    key_path, cert_path = (
        (layout.app_key, layout.app_cert)
        if target == "app"
        else (layout.key, layout.cert)
    )
    key = installable.key
    if key is None:
        if not key_path.exists():
            msg = (
                f"{installable.certificate_source} comes without its private key "
                f"and {key_path} does not exist; give the key with --key."
            )
            raise ConfigurationError(msg)
        key = pki.load_private_key(key_path)
        installable = attrs.evolve(installable, key=key, key_source=key_path)
    warnings = check_installable(installable, now=now)

    key_written = not (key_path.exists() and _same_key(key_path, key))
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    backups = []
    if cert_path.exists():
        backups.append(_back_up(cert_path, stamp, 0o644))
    if key_written and key_path.exists():
        backups.append(_back_up(key_path, stamp, 0o600))

    certificates = [installable.certificate, *installable.chain]
    try:
        if key_written:
            pki.write_private_key(key_path, key)
        pki.write_certificates(cert_path, certificates)
    except OSError as e:
        msg = (
            f"Cannot write {e.filename or cert_path}: {e.strerror}; run the "
            f"command as the owner of {layout.path}. Backups: "
            f"{', '.join(str(b) for b in backups) or 'none'}."
        )
        raise ConfigurationError(msg) from e

    written = pki.load_certificates(cert_path)
    pki.check_key_matches(
        written[0], pki.load_private_key(key_path), cert_path, key_path
    )
    if written != certificates:
        msg = f"{cert_path} does not read back as the certificates just written."
        raise PEMError(msg)
    return InstallResult(
        servers=TARGETS[target],
        key=key_path,
        cert=cert_path,
        key_written=key_written,
        backups=tuple(backups),
        certificate=installable.certificate,
        chain=installable.chain,
        warnings=tuple(warnings),
    )


def _exists_message(path: Path) -> str:
    return (
        f"{path} already exists; tls4d never overwrites a key file. Choose "
        "another file name, or move the old file away first if you really "
        "mean to replace it."
    )


def _create(path: Path, data: bytes, mode: int) -> None:
    try:
        pki.create_new_file(path, data, mode)
    except FileExistsError as e:
        if path.exists() or path.is_symlink():
            raise ConfigurationError(_exists_message(path)) from e
        msg = f"Cannot write {path}: {path.parent} is not a folder; choose a folder."
        raise ConfigurationError(msg) from e
    except OSError as e:
        msg = f"Cannot write {path}: {e.strerror}; choose a folder you may write to."
        raise ConfigurationError(msg) from e


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _same_key(path: Path, key: pki.PrivateKey) -> bool:
    try:
        existing = pki.load_private_key(path)
    except PEMError:
        return False
    return pki.private_key_pem(existing) == pki.private_key_pem(key)


def _back_up(path: Path, stamp: str, mode: int) -> Path:
    """
    Copy ``path`` to ``path.bak-STAMP`` (``-2``, ``-3``... if that exists),
    with ``mode``.
    """
    data = _read(path)
    for n in range(1, 1000):
        suffix = f".bak-{stamp}" if n == 1 else f".bak-{stamp}-{n}"
        backup = path.with_name(path.name + suffix)
        try:
            pki.create_new_file(backup, data, mode)
        except FileExistsError:
            continue
        except OSError as e:
            msg = (
                f"Cannot keep the previous {path} as {backup}: {e.strerror}; "
                "nothing was installed."
            )
            raise ConfigurationError(msg) from e
        return backup
    msg = f"Too many backups of {path} named for {stamp}; nothing was installed."
    raise ConfigurationError(msg)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        msg = f"Cannot read {path}: {e.strerror}."
        raise PEMError(msg) from e


def _read_normalised(path: Path) -> tuple[bytes, str | None]:
    """
    Read a file, with CRLF and CR-only line endings of PEM text made LF.

    Returns:
        The content, and a note naming the file when it had CR-only endings.
    """
    data = _read(path)
    if b"-----BEGIN" not in data:
        return data, None
    text = pki.read_pem(path)
    return text.data, text.note


def _pem_certificates(path: Path, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data and b"-----BEGIN PKCS7-----" in data:
        msg = (
            f"{path} holds no PEM certificate; it is a PKCS#7 bundle: convert "
            f"it with 'openssl pkcs7 -in {path} -print_certs -out cert.pem' and "
            "give the leaf first."
        )
        raise PEMError(msg)
    return pki.load_certificates(path, pki.PEMText(data, None))


def _der_certificate(path: Path, data: bytes) -> x509.Certificate:
    try:
        certificate = x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as e:
        msg = (
            f"{path} is neither a PEM nor a DER certificate, nor a PKCS#12 file "
            "(.pfx, .p12); give the certificate file the CA sent."
        )
        raise PEMError(msg) from e
    pki.check_readable(path, certificate)
    return certificate


def _looks_like_pkcs12(data: bytes) -> bool:
    """
    Whether DER bytes start like a PKCS#12 PFX: a SEQUENCE whose first item
    is the version INTEGER 3, where a certificate has another SEQUENCE.
    """
    if len(data) < 8 or data[0] != 0x30:
        return False
    length_octets = data[1] - 0x80 if data[1] & 0x80 else 0
    start = 2 + length_octets
    return data[start : start + 3] == b"\x02\x01\x03"


def _load_pkcs12(
    path: Path, data: bytes, passphrase: PassphraseSource | None
) -> tuple[pki.PrivateKey | None, list[x509.Certificate]]:
    """
    Returns:
        The key of a PKCS#12 file, if it holds one, and its certificates:
        the leaf first, then the others in issuing order.
    """
    bundle = None
    for attempt in (None, b""):
        try:
            bundle = pkcs12.load_pkcs12(data, attempt)
            break
        except ValueError:
            continue
    if bundle is None:
        if passphrase is None:
            msg = f"{path} is protected by a passphrase, and none was given."
            raise ConfigurationError(msg)
        try:
            bundle = pkcs12.load_pkcs12(data, passphrase(str(path)))
        except ValueError as e:
            msg = (
                f"The passphrase for {path} is wrong, or the file is not a "
                "valid PKCS#12 file; try again with the passphrase it was "
                "exported with."
            )
            raise PEMError(msg) from e
    key = bundle.key
    if key is not None and not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)
    ):
        msg = f"{path} holds a {type(key).__name__}; use an ECDSA or RSA key."
        raise PEMError(msg)
    others = [c.certificate for c in bundle.additional_certs]
    held = [bundle.cert.certificate] if bundle.cert is not None else []
    for number, certificate in enumerate(held + others, 1):
        pki.check_readable(path, certificate, number)
    if bundle.cert is not None:
        leaf = bundle.cert.certificate
    else:
        matching = [
            c
            for c in others
            if key is not None and _spki(c.public_key()) == _spki(key.public_key())
        ]
        if not matching:
            msg = f"{path} holds no certificate for a server; export it again."
            raise PEMError(msg)
        leaf = matching[0]
        others.remove(leaf)
    return key, [leaf, *_issuing_order(leaf, others)]


def _issuing_order(
    leaf: x509.Certificate, certificates: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """
    Returns:
        ``certificates`` in order from the one that issued ``leaf`` upwards;
        those outside that path follow, so that the chain check names them.
    """
    remaining = list(certificates)
    ordered: list[x509.Certificate] = []
    current = leaf
    while True:
        issuer = next((c for c in remaining if _issue_fault(current, c) is None), None)
        if issuer is None:
            return ordered + remaining
        ordered.append(issuer)
        remaining.remove(issuer)
        current = issuer


def _decode_key(
    data: bytes, path: Path, passphrase: PassphraseSource | None
) -> pki.PrivateKey:
    pem = b"-----BEGIN" in data
    if pem:
        pki.check_one_private_key(path, data)
    loader = (
        serialization.load_pem_private_key
        if pem
        else serialization.load_der_private_key
    )
    try:
        key = loader(data, None)
    except TypeError:
        if passphrase is None:
            msg = f"{path} holds an encrypted private key, and no passphrase was given."
            raise ConfigurationError(msg) from None
        try:
            key = loader(data, passphrase(str(path)))
        except (ValueError, TypeError) as e:
            msg = (
                f"The passphrase for {path} is wrong, or the key is damaged; "
                "try again with the passphrase the key was encrypted with."
            )
            raise PEMError(msg) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        kind = "PEM" if pem else "DER"
        msg = f"{path} holds no usable {kind} private key: {e}."
        raise PEMError(msg) from e
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        msg = f"{path} holds a {type(key).__name__}; use an ECDSA or RSA key."
        raise PEMError(msg)
    return key


def _dns_name(value: str, given: str) -> x509.DNSName:
    name = value.rstrip(".")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    try:
        encoded = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        msg = (
            f"{given!r} is not a valid DNS name ({e}); host names hold letters, "
            "digits and hyphens between dots."
        )
        raise ConfigurationError(msg) from e
    return x509.DNSName(f"*.{encoded}" if wildcard else encoded)


def _name_attribute(
    oid: x509.ObjectIdentifier, label: str, value: str
) -> x509.NameAttribute[str]:
    if not value.strip():
        msg = f"The {label} cannot be empty; give a value or leave the option out."
        raise ConfigurationError(msg)
    limit = _MAX_LENGTHS[oid]
    if len(value) > limit:
        msg = (
            f"The {label} {value!r} is {len(value)} characters long; certificates "
            f"allow at most {limit}."
        )
        if oid == NameOID.COMMON_NAME:
            msg += " Give a shorter common name and the long name with --san."
        raise ConfigurationError(msg)
    return x509.NameAttribute(oid, value)


def _email_address(value: str) -> str:
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        msg = f"{value!r} is not an e-mail address; give it as name@example.com."
        raise ConfigurationError(msg)
    if not local.isascii():
        msg = (
            f"The e-mail address {value!r} has non-ASCII characters before the "
            "@, which a certificate cannot hold; give an ASCII address."
        )
        raise ConfigurationError(msg)
    address = f"{local}@{_dns_name(domain, value).value}"
    if len(address) > _MAX_LENGTHS[NameOID.EMAIL_ADDRESS]:
        msg = f"The e-mail address {value!r} is too long for a certificate."
        raise ConfigurationError(msg)
    return address


def _date(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _self_signed(certificate: x509.Certificate) -> bool:
    """
    Whether a certificate names itself as issuer and its signature does not
    contradict that (one made with a hash cryptography no longer verifies,
    such as SHA-1, counts by its name).
    """
    return (
        certificate.issuer == certificate.subject
        and _issue_fault(certificate, certificate) != "signature"
    )


def _issue_fault(child: x509.Certificate, parent: x509.Certificate) -> str | None:
    """
    Returns:
        None if ``parent`` issued ``child`` (its subject is the child's
        issuer, and its key verifies the child's signature); else
        ``"name"``, ``"signature"``, or ``"unsupported"`` for a signature
        cryptography cannot check (SHA-1, an unknown algorithm).
    """
    if child.issuer != parent.subject:
        return "name"
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        return "signature"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "unsupported"
    return None


def _validity_problems(
    label: str, certificate: x509.Certificate, now: datetime.datetime
) -> list[str]:
    if certificate.not_valid_after_utc < now:
        return [
            f"{label} expired on {_date(certificate.not_valid_after_utc)}; ask "
            "the CA for a current one (renew it)."
        ]
    if certificate.not_valid_before_utc > now:
        return [
            f"{label} is not valid before {_date(certificate.not_valid_before_utc)}; "
            "check this machine's clock, or install it from then on."
        ]
    return []


def _signature_problems(
    label: str, certificate: x509.Certificate, *, in_chain: bool = False
) -> list[str]:
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return [
            f"{label} is signed with an algorithm tls4d does not know "
            f"({certificate.signature_algorithm_oid.dotted_string}); ask the "
            "CA for a certificate signed with SHA-256."
        ]
    if not isinstance(algorithm, _BROKEN_HASHES):
        return []
    fix = (
        "leave this root out of the chain (clients have it already)"
        if in_chain and _self_signed(certificate)
        else "ask the CA for one signed with SHA-256 or better"
    )
    return [
        f"{label} is signed with {algorithm.name.upper()}, whose signatures can "
        f"be forged and which clients refuse; {fix}."
    ]


def _chain_problems(
    leaf: x509.Certificate, chain: Sequence[x509.Certificate]
) -> list[str]:
    """
    Returns:
        At most one sentence: where the first link of ``leaf`` then
        ``chain`` is not issued by the next.
    """
    path = [leaf, *chain]
    for i in range(len(path) - 1):
        child, parent = path[i], path[i + 1]
        fault = _issue_fault(child, parent)
        if fault is None or (fault == "unsupported" and _signature_problems("", child)):
            continue
        child_name = child.subject.rfc4514_string()
        parent_name = parent.subject.rfc4514_string()
        elsewhere = [
            j
            for j, c in enumerate(chain, 1)
            if c is not parent and _issue_fault(child, c) is None
        ]
        if elsewhere:
            return [
                f"The chain is in the wrong order: {child_name!r} is issued by "
                f"chain certificate {elsewhere[0]}, not by the next one "
                f"({parent_name!r}); list the certificates leaf first, each "
                "followed by the one that issued it."
            ]
        if fault == "signature":
            return [
                f"The chain does not verify: {parent_name!r} has the name of "
                f"{child_name!r}'s issuer but not its key (another generation of "
                "that CA); get the current chain from the CA."
            ]
        if fault == "unsupported":
            return [
                f"The signature of {child_name!r} by {parent_name!r} uses an "
                "algorithm tls4d cannot check; ask the CA for an ECDSA or RSA "
                "chain."
            ]
        return [
            f"The chain has a gap: nothing in it issued {child_name!r} (issuer "
            f"{child.issuer.rfc4514_string()!r}); {parent_name!r} follows it "
            "but did not issue it. Add the missing intermediate certificate the "
            "CA provides between them."
        ]
    return []
