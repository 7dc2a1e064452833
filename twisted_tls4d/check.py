"""
``tls4d check``: what a server root serves and whether it is sound, for an
operator or a deployment pipeline.

`check_root` inspects the root without changing anything and returns a
`CheckReport`; `render_text` and `CheckReport.to_json` present it. Every
problem found is an error (a server would fail to start, or clients would
fail or be put at risk) or a warning (worth a look, but working).
"""

from __future__ import annotations

import argparse
import datetime
import json
import ssl
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from twisted_tls4d import dhparams, pki, revocation, root, settings, tls
from twisted_tls4d.errors import ConfigurationError, KeyMismatchError, PEMError
from twisted_tls4d.settings import add_root_option

#: The version of the JSON layout; it changes only when a field changes
#: meaning or goes away (new fields may appear without a change).
JSON_FORMAT = 1

#: A certificate expiring within this many days is warned of.
EXPIRY_WARNING_DAYS = 30

#: Smallest DH prime that passes current audits (Mozilla, sslyze).
MIN_DH_BITS = 2048

ERROR = "error"
WARNING = "warning"


@attrs.frozen
class Problem:
    """
    One thing found wrong.

    Attributes:
        severity: ``"error"`` or ``"warning"``.
        about: The file (or ``"TLS policy"``) it concerns.
        message: A sentence saying what and how to fix it.
    """

    severity: str
    about: str
    message: str


@attrs.frozen
class ChainReport:
    """
    Whether a served chain lets clients build a path to a trusted CA.

    Attributes:
        length: Certificates in the file.
        in_order: Each certificate was issued by the one after it.
        complete: In order, and the last one is self-issued or issued by a
            CA found in ``Resources/ca.pem`` or the system's trust store.
        anchor: Where the chain ends: ``"self-issued"`` (its last certificate
            is a root), ``"ca.pem"``, ``"system"``, or None.
        anchor_subject: The subject of the certificate the chain ends at.
    """

    length: int
    in_order: bool
    complete: bool
    anchor: str | None
    anchor_subject: str | None


@attrs.frozen
class ServerReport:
    """
    One key pair the root serves with.

    Attributes:
        used_by: Which servers use it ("web and SQL servers").
        certificate: The certificate chain's file.
        key: The private key's file.
        subject: The leaf's subject (RFC 4514).
        names: Its subject alternative names (DNS names and IP addresses).
        issuer: The leaf's issuer (RFC 4514).
        serial: Its serial number in hex.
        not_before: Start of validity, ISO 8601 UTC.
        not_after: End of validity, ISO 8601 UTC.
        days_left: Whole days until ``not_after`` (negative once expired).
        key_type: ``"ECDSA"``, ``"RSA"``, or another algorithm's name.
        key_size: The key's size in bits.
        key_curve: The ECDSA curve (``"P-256"``), or None.
        key_matches: Whether the key file holds the certificate's key (None
            when either could not be read).
        key_mode: The key file's permission bits in octal (``"0600"``).
        chain: The chain's soundness (None when the file could not be read).
    """

    used_by: str
    certificate: str
    key: str
    subject: str | None = None
    names: tuple[str, ...] = ()
    issuer: str | None = None
    serial: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    days_left: int | None = None
    key_type: str | None = None
    key_size: int | None = None
    key_curve: str | None = None
    key_matches: bool | None = None
    key_mode: str | None = None
    chain: ChainReport | None = None


@attrs.frozen
class CACertificateReport:
    """
    One certificate trusted to sign client certificates.

    Attributes:
        subject: Its subject (RFC 4514).
        not_after: End of validity, ISO 8601 UTC.
        days_left: Whole days until then.
    """

    subject: str
    not_after: str
    days_left: int


@attrs.frozen
class CAReport:
    """
    The client CAs and the local CA's key.

    Attributes:
        certificates_file: ``Resources/ca.pem``.
        certificates: What it holds.
        key: ``Resources/ca-key.pem``.
        key_present: Whether the local CA's key is there (it may be kept
            offline; ``tls4d client`` and ``tls4d revoke`` need it).
        key_mode: Its permission bits in octal, when present.
        key_matches: Whether it holds the key of ca.pem's first certificate
            (None when absent or unreadable).
    """

    certificates_file: str
    certificates: tuple[CACertificateReport, ...]
    key: str
    key_present: bool
    key_mode: str | None
    key_matches: bool | None


@attrs.frozen
class CRLReport:
    """
    The local CA's revocation list (``tls4d revoke``).

    Attributes:
        path: ``Resources/crl.pem``.
        present: Whether the file exists (absent: nothing revoked).
        revoked: How many certificates it lists.
        last_update: When it was signed, ISO 8601 UTC.
        next_update: The next update it announces, ISO 8601 UTC.
    """

    path: str
    present: bool
    revoked: int | None = None
    last_update: str | None = None
    next_update: str | None = None


@attrs.frozen
class SuiteReport:
    """
    One cipher suite the policy allows.

    Attributes:
        name: OpenSSL's name (``ECDHE-ECDSA-AES128-GCM-SHA256``,
            ``TLS_AES_128_GCM_SHA256``).
        version: ``"1.3"`` or ``"1.2"``.
        forward_secret: Whether its key exchange is ephemeral (ECDHE, DHE, or
            any TLS 1.3 suite).
    """

    name: str
    version: str
    forward_secret: bool


@attrs.frozen
class PolicyReport:
    """
    The TLS policy the servers would start with.

    Attributes:
        settings_file: ``Settings/tls4d.toml`` if it exists, else None.
        min_version: The lowest TLS version accepted (None if the settings
            are unusable).
        ciphers: The OpenSSL cipher string for TLS 1.2.
        suites: Every suite allowed, TLS 1.3 first, in preference order.
    """

    settings_file: str | None
    min_version: str | None
    ciphers: str | None
    suites: tuple[SuiteReport, ...]


@attrs.frozen
class DHReport:
    """
    The Diffie-Hellman parameters for the DHE suites.

    Attributes:
        path: ``dhparams.pem``.
        present: Whether the file exists.
        bits: The prime's size.
        generator: The generator g.
        group: ``"ffdhe2048"``, ``"ffdhe3072"`` or ``"ffdhe4096"`` when it is
            that RFC 7919 group; None for custom parameters.
    """

    path: str
    present: bool
    bits: int | None = None
    generator: int | None = None
    group: str | None = None


@attrs.frozen
class CheckReport:
    """
    What `check_root` found.

    Attributes:
        root: The root's path.
        checked_at: When, ISO 8601 UTC.
        servers: Each key pair served.
        ca: The client CAs and the local CA's key.
        crl: The revocation list.
        tls: The TLS policy.
        dh_parameters: The DH parameters.
        problems: Errors and warnings, in the order found.
    """

    root: str
    checked_at: str
    servers: tuple[ServerReport, ...]
    ca: CAReport
    crl: CRLReport
    tls: PolicyReport
    dh_parameters: DHReport
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity error."""
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity warning."""
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """Whether no error was found (warnings allowed)."""
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """
        Returns:
            The report as the documented JSON object: ``format``, ``ok``,
            ``errors`` and ``warnings`` (counts), then every field of this
            class, nested objects as objects.
        """
        document: dict[str, Any] = {
            "format": JSON_FORMAT,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }
        document.update(attrs.asdict(self))
        return document


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _days_left(moment: datetime.datetime, now: datetime.datetime) -> int:
    return (moment - now).days


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def system_trust_store() -> tuple[list[x509.Certificate], str | None]:
    """
    The CA certificates this machine's OpenSSL trusts by default.

    Returns:
        The certificates of the default CA file (those cryptography cannot
        parse are skipped) and the file's path, or nothing and None when
        there is no such file.
    """
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return [], None
    try:
        data = Path(cafile).read_bytes()
    except OSError:
        return [], None
    end = b"-----END CERTIFICATE-----"
    found = []
    with warnings.catch_warnings():
        # Some trusted roots carry serial numbers RFC 5280 forbids; they are
        # still what this machine trusts, so cryptography's warning is noise.
        warnings.simplefilter("ignore")
        for block in data.split(end)[:-1]:
            start = block.find(b"-----BEGIN CERTIFICATE-----")
            if start < 0:
                continue
            try:
                found.append(x509.load_pem_x509_certificate(block[start:] + end))
            except ValueError:
                continue
    return found, cafile


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


class _Checker:
    """Collects problems while the sections of the report are built."""

    def __init__(
        self,
        layout: root.RootLayout,
        now: datetime.datetime,
        trust_store: Sequence[x509.Certificate] | None,
    ) -> None:
        self.layout = layout
        self.now = now
        self.problems: list[Problem] = []
        self._trust_store = trust_store
        self._trust_file: str | None = None

    def error(self, about: Path | str, message: str) -> None:
        self.problems.append(Problem(ERROR, str(about), message))

    def warning(self, about: Path | str, message: str) -> None:
        self.problems.append(Problem(WARNING, str(about), message))

    def trust_store(self) -> Sequence[x509.Certificate]:
        if self._trust_store is None:
            self._trust_store, self._trust_file = system_trust_store()
        return self._trust_store

    def key_mode(self, path: Path) -> str | None:
        """The mode of a private key file, with an error if others may read it."""
        mode = _mode(path)
        if mode is None:
            return None
        if mode & 0o007:
            self.error(
                path,
                f"{path} holds a private key and has mode {mode:04o}: every user "
                f"of this machine has access to it; run chmod 600 {path}.",
            )
        elif mode & 0o070:
            self.warning(
                path,
                f"{path} holds a private key and has mode {mode:04o}: its group "
                f"has access to it; run chmod 600 {path} unless that is meant.",
            )
        return f"{mode:04o}"

    def validity(self, certificate: x509.Certificate, path: Path, what: str) -> None:
        """Errors for an expired or not yet valid certificate, a warning near expiry."""
        not_after = certificate.not_valid_after_utc
        not_before = certificate.not_valid_before_utc
        if not_after <= self.now:
            self.error(
                path,
                f"{what} in {path} expired on {not_after:%Y-%m-%d %H:%M} UTC; "
                "install a renewed certificate.",
            )
        elif not_before > self.now:
            self.error(
                path,
                f"{what} in {path} is not valid before {not_before:%Y-%m-%d %H:%M} "
                "UTC; check this machine's clock, or install a certificate valid "
                "now.",
            )
        elif _days_left(not_after, self.now) < EXPIRY_WARNING_DAYS:
            self.warning(
                path,
                f"{what} in {path} expires in {_days_left(not_after, self.now)} "
                f"days ({not_after:%Y-%m-%d}); renew it.",
            )

    def chain(
        self,
        chain: Sequence[x509.Certificate],
        path: Path,
        cas: Sequence[x509.Certificate],
    ) -> ChainReport:
        in_order = True
        for index in range(len(chain) - 1):
            if not _issued_by(chain[index], chain[index + 1]):
                in_order = False
                self.error(
                    path,
                    f"The certificates in {path} are not in order: certificate "
                    f"{index + 2} ({chain[index + 1].subject.rfc4514_string()!r}) "
                    f"did not issue certificate {index + 1} "
                    f"({chain[index].subject.rfc4514_string()!r}); put the leaf "
                    "first, then each certificate's issuer, and nothing else.",
                )
                break
        last = chain[-1]
        anchor: str | None = None
        anchor_subject: str | None = None
        if last.subject == last.issuer and _issued_by(last, last):
            anchor, anchor_subject = "self-issued", last.subject.rfc4514_string()
        else:
            for where, candidates in (("ca.pem", cas), ("system", None)):
                pool = candidates if candidates is not None else self.trust_store()
                issuer = next((c for c in pool if _issued_by(last, c)), None)
                if issuer is not None:
                    anchor = where
                    anchor_subject = issuer.subject.rfc4514_string()
                    break
        if anchor is None:
            store = self._trust_file or "none found"
            self.warning(
                path,
                f"The chain in {path} ends with a certificate issued by "
                f"{last.issuer.rfc4514_string()!r}, which is neither in {path}, "
                f"{self.layout.ca} nor the system's trust store ({store}). If that "
                "is an intermediate CA, append its certificate to the file; if it "
                "is a private root CA, only clients given its certificate will "
                "connect.",
            )
        elif anchor == "self-issued" and len(chain) == 1:
            self.warning(
                path,
                f"{path} holds a self-signed certificate: only clients told to "
                "trust this very certificate accept it; install one issued by a CA.",
            )
        return ChainReport(
            len(chain),
            in_order,
            in_order and anchor is not None,
            anchor,
            anchor_subject,
        )


def _key_description(
    public_key: Any,
) -> tuple[str, int | None, str | None]:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        curve = public_key.curve.name
        return "ECDSA", public_key.key_size, curves.get(curve, curve)
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size, None
    return type(public_key).__name__.removesuffix("PublicKey").lstrip("_"), None, None


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for name in extension.value:
        if isinstance(name, x509.IPAddress):
            names.append(str(name.value))
        elif isinstance(name, x509.DNSName | x509.UniformResourceIdentifier):
            names.append(name.value)
        elif isinstance(name, x509.RFC822Name):
            names.append(f"email:{name.value}")
    return tuple(names)


def _check_server(
    checker: _Checker,
    servers: str,
    key_path: Path,
    cert_path: Path,
    cas: Sequence[x509.Certificate],
) -> tuple[ServerReport, pki.PrivateKey | None]:
    report = ServerReport(servers, str(cert_path), str(key_path))
    if not key_path.exists() and not cert_path.exists():
        checker.warning(
            cert_path,
            f"{cert_path} and {key_path} are missing; tls4d generates them for "
            f"the {servers} at its next start.",
        )
        return report, None
    for present, absent in ((key_path, cert_path), (cert_path, key_path)):
        if present.exists() and not absent.exists():
            checker.error(
                absent,
                f"{present} exists but {absent} does not, so the {servers} cannot "
                f"start; install {absent}, or remove {present} to have tls4d "
                "generate both.",
            )

    chain: list[x509.Certificate] | None = None
    if cert_path.exists():
        try:
            chain = pki.load_certificates(cert_path)
        except PEMError as e:
            checker.error(cert_path, str(e))
    key: pki.PrivateKey | None = None
    if key_path.exists():
        report = attrs.evolve(report, key_mode=checker.key_mode(key_path))
        try:
            key = pki.load_private_key(key_path)
        except PEMError as e:
            checker.error(key_path, str(e))
    if chain is None:
        return report, key

    leaf = chain[0]
    key_type, key_size, key_curve = _key_description(leaf.public_key())
    report = attrs.evolve(
        report,
        subject=leaf.subject.rfc4514_string(),
        names=_names(leaf),
        issuer=leaf.issuer.rfc4514_string(),
        serial=revocation.format_serial(leaf.serial_number),
        not_before=_iso(leaf.not_valid_before_utc),
        not_after=_iso(leaf.not_valid_after_utc),
        days_left=_days_left(leaf.not_valid_after_utc, checker.now),
        key_type=key_type,
        key_size=key_size,
        key_curve=key_curve,
        chain=checker.chain(chain, cert_path, cas),
    )
    checker.validity(leaf, cert_path, "The certificate")
    for index, issuer in enumerate(chain[1:], start=2):
        checker.validity(issuer, cert_path, f"Certificate {index}")
    lifespan = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    if lifespan > pki.MAX_SERVER_CERTIFICATE_DAYS:
        checker.warning(
            cert_path,
            f"The certificate in {cert_path} is valid for {lifespan} days; browsers "
            "and Mozilla's profiles refuse server certificates valid longer than "
            f"{pki.MAX_SERVER_CERTIFICATE_DAYS} days.",
        )
    if not report.names:
        checker.warning(
            cert_path,
            f"The certificate in {cert_path} names no host (no subject alternative "
            "names); current clients ignore the common name, so install one that "
            "names the hosts clients dial.",
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        checker.error(
            cert_path,
            f"The certificate in {cert_path} is not meant for servers (its extended "
            "key usage lacks serverAuth), so clients refuse it; install a server "
            "certificate.",
        )
    if key is not None:
        try:
            pki.check_key_matches(leaf, key, cert_path, key_path)
        except KeyMismatchError as e:
            checker.error(cert_path, str(e))
            report = attrs.evolve(report, key_matches=False)
        except PEMError as e:
            checker.error(cert_path, str(e))
        else:
            report = attrs.evolve(report, key_matches=True)
    return report, key


def _check_ca(
    checker: _Checker, layout: root.RootLayout
) -> tuple[CAReport, list[x509.Certificate]]:
    cas: list[x509.Certificate] = []
    try:
        cas = pki.load_certificates(layout.ca)
    except PEMError as e:
        checker.error(
            layout.ca,
            f"{e} The application and SQL servers cannot verify clients without it.",
        )
    reports = []
    for index, ca in enumerate(cas, start=1):
        reports.append(
            CACertificateReport(
                ca.subject.rfc4514_string(),
                _iso(ca.not_valid_after_utc),
                _days_left(ca.not_valid_after_utc, checker.now),
            )
        )
        checker.validity(ca, layout.ca, f"CA certificate {index}")
    present = layout.ca_key.exists()
    mode = checker.key_mode(layout.ca_key) if present else None
    matches = None
    if present and cas:
        try:
            ca_key = pki.load_private_key(layout.ca_key)
            pki.check_key_matches(cas[0], ca_key, layout.ca, layout.ca_key)
        except KeyMismatchError as e:
            checker.error(
                layout.ca_key, f"{e} 'tls4d client' and 'tls4d revoke' need the pair."
            )
            matches = False
        except PEMError as e:
            checker.error(layout.ca_key, str(e))
        else:
            matches = True
    report = CAReport(
        str(layout.ca), tuple(reports), str(layout.ca_key), present, mode, matches
    )
    return report, cas


def _check_crl(
    checker: _Checker, layout: root.RootLayout, cas: Sequence[x509.Certificate]
) -> CRLReport:
    path = revocation.crl_path(layout)
    report = CRLReport(str(path), path.exists())
    if not report.present or not cas:
        return report
    try:
        crl = tls.load_crl(path, cas)
    except PEMError as e:
        checker.error(path, str(e))
        return report
    assert crl is not None
    next_update = crl.next_update_utc
    report = attrs.evolve(
        report,
        revoked=len(crl),
        last_update=_iso(crl.last_update_utc),
        next_update=_iso(next_update) if next_update is not None else None,
    )
    if next_update is not None and next_update < checker.now:
        checker.warning(
            path,
            f"{path} is past its next update ({next_update:%Y-%m-%d}); the tls4d "
            "servers still refuse what it lists, but other tools may not accept "
            "it: sign it again with 'tls4d revoke --refresh'.",
        )
    return report


def _check_policy(
    checker: _Checker, layout: root.RootLayout, keys: Sequence[tuple[str, Any]]
) -> PolicyReport:
    settings_file = layout.settings_file
    shown_file = str(settings_file) if settings_file.exists() else None
    try:
        resolved = settings.resolve({}, layout.path)
    except ConfigurationError as e:
        checker.error(settings_file, str(e))
        return PolicyReport(shown_file, None, None, ())
    about = shown_file or "TLS policy"
    try:
        tls.min_version_number(resolved.min_tls)
    except ConfigurationError as e:
        checker.error(about, str(e))
        return PolicyReport(shown_file, resolved.min_tls, resolved.ciphers, ())
    ciphers = resolved.ciphers or tls.DEFAULT_CIPHERS
    suites = [
        SuiteReport(name, "1.3", True) for name in tls.TLS13_CIPHERSUITES.split(":")
    ]
    if resolved.min_tls == "1.2":
        try:
            tls12 = tls.tls12_suites(ciphers)
        except ConfigurationError as e:
            checker.error(about, str(e))
            tls12 = []
        suites += [SuiteReport(n, "1.2", tls.is_forward_secret(n)) for n in tls12]
        weak = [s.name for s in suites if not s.forward_secret]
        if weak:
            checker.warning(
                about,
                f"The TLS 1.2 cipher list allows {len(weak)} suites without "
                f"forward secrecy: {', '.join(weak)}; remove them from ciphers, "
                "or leave it unset for Mozilla's intermediate list.",
            )
        for servers, key in keys:
            if tls12 and not tls.suites_for_key(tls12, key):
                kind = "RSA" if isinstance(key, rsa.RSAPrivateKey) else "ECDSA"
                checker.warning(
                    about,
                    f"None of the TLS 1.2 suites allowed suits the {kind} key of "
                    f"the {servers}, so TLS 1.2 clients will fail; allow suites "
                    "for that key in ciphers, or set min-tls to 1.3.",
                )
    return PolicyReport(shown_file, resolved.min_tls, ciphers, tuple(suites))


def _check_dh(checker: _Checker, layout: root.RootLayout) -> DHReport:
    path = layout.dhparams
    if not path.exists():
        checker.warning(
            path,
            f"{path} is missing; tls4d writes the RFC 7919 ffdhe2048 group at its "
            "next start.",
        )
        return DHReport(str(path), False)
    try:
        info = dhparams.inspect_parameters(path)
    except PEMError as e:
        checker.error(path, str(e))
        return DHReport(str(path), True)
    if info.bits < MIN_DH_BITS:
        checker.error(
            path,
            f"{path} holds {info.bits}-bit DH parameters, weaker than the "
            f"{MIN_DH_BITS} bits current audits require; run 'tls4d dhparams "
            f"--group ffdhe2048 --root {layout.path}'.",
        )
    return DHReport(str(path), True, info.bits, info.generator, info.group)


def check_root(
    layout: root.RootLayout,
    *,
    now: datetime.datetime | None = None,
    trust_store: Sequence[x509.Certificate] | None = None,
) -> CheckReport:
    """
    Inspect a server root, changing nothing.

    Errors: a key or certificate file missing (one of a pair), unreadable or
    damaged; a key that does not match its certificate; a certificate (or a
    CA of ``ca.pem``) expired or not yet valid; a chain out of order or not
    reaching a self-issued root, ``ca.pem`` or the system's trust store; a
    server certificate without the serverAuth purpose; a private key file
    that every user may read; unusable settings, TLS version or ciphers; DH
    parameters unreadable, refused by OpenSSL's check (a prime that is not a
    safe prime, say) or under 2048 bits; a revocation list damaged or not
    signed by a CA of ``ca.pem``.

    Warnings: a certificate expiring within 30 days, valid longer than 366
    days, self-signed, or naming no host; a key file its group may read; a
    cipher list allowing suites without forward secrecy, or none for a key;
    a missing pair or ``dhparams.pem`` (made at next start); a revocation
    list past its next update.

    Args:
        layout: The root.
        now: The time to check validity at; the current time if None.
        trust_store: CA certificates a chain may also end at; the system's
            default CA file if None.

    Returns:
        The report.

    Raises:
        ConfigurationError: The root folder does not exist.
    """
    layout.require_existing()
    now = now or pki.utc_now()
    checker = _Checker(layout, now, trust_store)
    ca_report, cas = _check_ca(checker, layout)
    servers = []
    keys = []
    for name, key_path, cert_path in layout.server_pairs():
        report, key = _check_server(checker, name, key_path, cert_path, cas)
        servers.append(report)
        if key is not None:
            keys.append((name, key))
    return CheckReport(
        root=str(layout.path),
        checked_at=_iso(now),
        servers=tuple(servers),
        ca=ca_report,
        crl=_check_crl(checker, layout, cas),
        tls=_check_policy(checker, layout, keys),
        dh_parameters=_check_dh(checker, layout),
        problems=tuple(checker.problems),
    )


def _yes_no(value: bool | None, yes: str, no: str, unknown: str = "unknown") -> str:
    if value is None:
        return unknown
    return yes if value else no


def _render_server(server: ServerReport) -> list[str]:
    lines = [f"{server.used_by}: {server.certificate}"]
    if server.subject is None:
        lines.append("  certificate  not readable")
    else:
        left = f"{server.days_left} days left"
        if server.days_left is not None and server.days_left < 0:
            left = "EXPIRED"
        lines += [
            f"  subject      {server.subject}",
            f"  names        {', '.join(server.names) or '(none)'}",
            f"  issuer       {server.issuer}",
            f"  valid until  {server.not_after} ({left})",
        ]
        key = f"{server.key_type} {server.key_curve or ''}".strip()
        if server.key_size is not None:
            key += f" ({server.key_size} bits)"
        lines.append(f"  key          {key}")
    if server.chain is not None:
        chain = server.chain
        order = "in order" if chain.in_order else "NOT in order"
        if chain.anchor is None:
            end = "INCOMPLETE"
        else:
            where = {
                "self-issued": "a self-issued root in the file",
                "ca.pem": "a CA in Resources/ca.pem",
                "system": "a CA of the system's trust store",
            }[chain.anchor]
            end = f"complete up to {where} ({chain.anchor_subject})"
        lines.append(f"  chain        {chain.length} certificate(s), {order}, {end}")
    lines.append(
        f"  key file     {server.key} "
        f"(mode {server.key_mode or 'unknown'}, "
        + _yes_no(
            server.key_matches,
            "matches the certificate",
            "DOES NOT match the certificate",
            "match not checked",
        )
        + ")"
    )
    return lines


def render_text(report: CheckReport) -> str:
    """
    Args:
        report: What `check_root` found.

    Returns:
        The report as text for a person: each section, then the errors and
        warnings, then a one-line verdict.
    """
    lines = [f"tls4d check of {report.root} at {report.checked_at}", ""]
    for server in report.servers:
        lines += _render_server(server)
        lines.append("")

    ca = report.ca
    lines.append(f"client CAs: {ca.certificates_file}")
    for certificate in ca.certificates:
        lines.append(
            f"  {certificate.subject} (until {certificate.not_after}, "
            f"{certificate.days_left} days left)"
        )
    if ca.key_present:
        lines.append(
            f"  local CA key {ca.key} (mode {ca.key_mode or 'unknown'}, "
            + _yes_no(
                ca.key_matches,
                "matches the first CA",
                "DOES NOT match the first CA",
                "match not checked",
            )
            + ")"
        )
    else:
        lines.append(f"  local CA key {ca.key} absent (kept offline?)")
    crl = report.crl
    if crl.present and crl.revoked is not None:
        lines.append(
            f"  revocations  {crl.path}: {crl.revoked} revoked, next update "
            f"{crl.next_update}"
        )
    elif crl.present:
        lines.append(f"  revocations  {crl.path}: not usable")
    else:
        lines.append(f"  revocations  none ({crl.path} absent)")
    lines.append("")

    policy = report.tls
    source = policy.settings_file or "defaults, no settings file"
    lines.append(f"TLS policy ({source})")
    lines.append(f"  minimum version  TLS {policy.min_version or 'unknown'}")
    width = max((len(suite.name) for suite in policy.suites), default=0)
    for suite in policy.suites:
        secrecy = "forward-secret" if suite.forward_secret else "NOT forward-secret"
        lines.append(f"  TLS {suite.version}  {suite.name:<{width}}  {secrecy}")
    lines.append("")

    dh = report.dh_parameters
    if not dh.present:
        lines.append(f"DH parameters: {dh.path} absent")
    elif dh.bits is None:
        lines.append(f"DH parameters: {dh.path} not usable")
    else:
        kind = f"RFC 7919 {dh.group}" if dh.group else "custom"
        lines.append(f"DH parameters: {dh.path}: {dh.bits} bits, {kind}")
    lines.append("")

    for severity, problems in (
        ("Errors", report.errors),
        ("Warnings", report.warnings),
    ):
        if problems:
            lines.append(f"{severity}:")
            lines += [f"  - {problem.message}" for problem in problems]
            lines.append("")
    errors, warnings = len(report.errors), len(report.warnings)
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: {errors} error(s), {warnings} warning(s).")
    return "\n".join(lines) + "\n"


_DESCRIPTION = """\
Inspect a server root and report, for each key pair served (web and SQL:
ROOT/key.pem and cert.pem; application: Resources/key.pem and cert.pem), the
certificate's subject, names, issuer, key and days left, whether the chain is
in order and complete, whether key and certificate match, and the key file's
permissions; the client CAs, the local CA's key and the revocation list; the
TLS policy the servers would start with (settings file included) and every
cipher suite it allows; and the DH parameters. Nothing is changed.

Errors (exit status 1) are what stops a server or makes clients fail or
exposes a key: a missing half of a pair, an unreadable or damaged file, an
expired or not yet valid certificate, a key that does not match, a broken or
incomplete chain, a private key readable by every user, unusable settings,
DH parameters that are unusable or under 2048 bits, a damaged revocation
list. Warnings (exit status 0, or 1 with --strict) are worth a look: expiry
within 30 days, a self-signed or over-long certificate, a key file its group
may read, suites without forward secrecy, a revocation list past its next
update.
"""

_EPILOG = """\
examples:
  tls4d check --root tls4d-root
  tls4d check --root tls4d-root --json | jq '.servers[].days_left'

exit status: 0 without errors; 1 with errors (or warnings, with --strict),
or when the root does not exist; 2 on misuse.
"""


def add_parser(commands: Any) -> None:
    """
    Add the ``check`` subcommand to the ``tls4d`` command.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "check",
        help="report on a root's keys, certificates, TLS policy and DH parameters",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_root_option(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (documented in the README) instead of text",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on warnings too",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = check_root(root.RootLayout(args.root))
    if args.json:
        json.dump(report.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(render_text(report))
    failed = not report.ok or (args.strict and bool(report.warnings))
    return 1 if failed else 0
