"""
The server root: where each file of a tls4d installation lives, laid out as
4D's documentation places them, and the first start that creates whatever is
missing.
"""

from __future__ import annotations

import datetime
import re
import socket
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from twisted.logger import Logger

from twisted_tls4d import pki
from twisted_tls4d.errors import ConfigurationError, PEMError

_log = Logger()

#: Lifespan of the server certificates a root generates for itself, which
#: Mozilla's "modern" profile caps at 90 days; they are renewed automatically.
GENERATED_CERTIFICATE_DAYS = 90

#: A generated certificate is renewed when it has fewer days left than this.
RENEW_BEFORE_DAYS = 30

_START_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tls4d</title>
</head>
<body>
<h1>tls4d is serving this root over TLS</h1>
<p>This start page was created on first start. Put your own files in the
root's <code>WebFolder</code> to replace it.</p>
</body>
</html>
"""

_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$"
)


@attrs.frozen
class RootLayout:
    """
    The paths of one server root.

    Attributes:
        path: The root folder itself.
    """

    path: Path

    @property
    def key(self) -> Path:
        """Private key of the web and SQL servers."""
        return self.path / "key.pem"

    @property
    def cert(self) -> Path:
        """Certificate chain of the web and SQL servers."""
        return self.path / "cert.pem"

    @property
    def dhparams(self) -> Path:
        """Diffie-Hellman parameters for DHE suites."""
        return self.path / "dhparams.pem"

    @property
    def resources(self) -> Path:
        """Folder of the application server's files and the CA."""
        return self.path / "Resources"

    @property
    def app_key(self) -> Path:
        """Private key of the application server."""
        return self.resources / "key.pem"

    @property
    def app_cert(self) -> Path:
        """Certificate chain of the application server."""
        return self.resources / "cert.pem"

    @property
    def ca(self) -> Path:
        """Certificates trusted to sign client certificates; the local CA's."""
        return self.resources / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """Private key of the root's local CA."""
        return self.resources / "ca-key.pem"

    @property
    def web_folder(self) -> Path:
        """Static files of the web server."""
        return self.path / "WebFolder"

    @property
    def data(self) -> Path:
        """Folder of the SQL server's database."""
        return self.path / "Data"

    @property
    def database(self) -> Path:
        """The SQL server's SQLite database."""
        return self.data / "tls4d.sqlite"

    @property
    def settings_file(self) -> Path:
        """The optional settings file."""
        return self.path / "Settings" / "tls4d.toml"

    def require_existing(self) -> None:
        """
        Check that the root exists, for the commands that work on one.

        Raises:
            ConfigurationError: There is no folder at `path`.
        """
        if not self.path.is_dir():
            msg = (
                f"{self.path} is not a server root (no such folder); point "
                "--root at the root's folder, or start the servers once to "
                "create it."
            )
            raise ConfigurationError(msg)

    def server_pairs(self) -> list[tuple[str, Path, Path]]:
        """
        Returns:
            ``(servers, key, cert)`` for each key pair the root serves with.
        """
        return [
            ("web and SQL servers", self.key, self.cert),
            ("application server", self.app_key, self.app_cert),
        ]


def server_names(hostname: str | None = None) -> list[str]:
    """
    The names a generated server certificate covers.

    Args:
        hostname: The machine's host name; ``socket.gethostname()`` if None.

    Returns:
        ``localhost``, ``127.0.0.1``, ``::1`` and the host name when it is a
        valid DNS name other than those.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname() if hostname is None else hostname
    if hostname and _HOST_NAME.match(hostname) and hostname.lower() not in names:
        names.append(hostname.rstrip("."))
    return names


def load_local_ca(layout: RootLayout) -> pki.LocalCA:
    """
    Load the root's local CA (``Resources/ca.pem`` and ``Resources/ca-key.pem``).

    Args:
        layout: The root.

    Returns:
        The CA whose key matches the first certificate of ``ca.pem``.

    Raises:
        PEMError: A file is missing, unreadable, or the two do not match.
    """
    certificate = pki.load_certificates(layout.ca)[0]
    key = pki.load_private_key(layout.ca_key)
    pki.check_key_matches(certificate, key, layout.ca, layout.ca_key)
    return pki.LocalCA(certificate, key)


def _issue_generated(
    ca: pki.LocalCA, names: list[str], now: datetime.datetime | None = None
) -> tuple[pki.PrivateKey, x509.Certificate]:
    """
    A new key and a `GENERATED_CERTIFICATE_DAYS` server certificate for
    ``names`` from the root's CA.
    """
    key = pki.generate_private_key()
    certificate = pki.issue_certificate(
        ca,
        key.public_key(),
        names[0],
        server_names=names,
        days=GENERATED_CERTIFICATE_DAYS,
        now=now,
    )
    return key, certificate


def renew_generated_certificates(
    layout: RootLayout, now: datetime.datetime | None = None
) -> list[Path]:
    """
    Renew the server certificates that the root's local CA issued itself once
    they have fewer than `RENEW_BEFORE_DAYS` days left, with a new key each and
    the same names. Certificates from any other CA are the operator's to renew
    and are left alone.

    Args:
        layout: The root.
        now: The time to judge expiry by; the current time if None.

    Returns:
        The certificate files renewed (each logged).

    Raises:
        PEMError: The root's CA files cannot be used.
    """
    if not layout.ca_key.exists():
        return []
    now = now or pki.utc_now()
    ca = load_local_ca(layout)
    renewed = []
    for servers, key_path, cert_path in layout.server_pairs():
        try:
            certificate = pki.load_certificates(cert_path)[0]
            certificate.verify_directly_issued_by(ca.certificate)
        except (PEMError, ValueError, TypeError, InvalidSignature):
            continue
        left = certificate.not_valid_after_utc - now
        if left > datetime.timedelta(days=RENEW_BEFORE_DAYS):
            continue
        try:
            names = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            continue
        key, new = _issue_generated(
            ca,
            [
                str(n.value)
                for n in names
                if isinstance(n, (x509.DNSName, x509.IPAddress))
            ],
            now,
        )
        pki.write_private_key(key_path, key)
        pki.write_certificates(cert_path, [new])
        renewed.append(cert_path)
        _log.info(
            "Renewed the generated certificate of the {servers}, {days} days "
            "before it expired: {path} now {certificate}",
            servers=servers,
            days=left.days,
            path=str(cert_path),
            certificate=pki.describe(new),
        )
    return renewed


def bootstrap(layout: RootLayout, hostname: str | None = None) -> list[Path]:
    """
    Create whatever the root lacks: its folders, a start page, a local CA,
    the server keys and certificates it signs, and DH parameters. What
    exists is left as it is.

    Args:
        layout: The root.
        hostname: The machine's host name for the certificates; looked up
            if None.

    Returns:
        The files created, in order; each is also logged.

    Raises:
        ConfigurationError: Half of a pair exists (a key without its
            certificate, or the reverse), so tls4d cannot tell what to make.
        PEMError: An existing CA file cannot be used to sign what is missing.
    """
    created: list[Path] = []

    def note(path: Path, what: str) -> None:
        created.append(path)
        _log.info("First start: created {what} at {path}", what=what, path=str(path))

    # Never more open than 0755 whatever the umask; the database's folder is
    # its owner's only.
    folders = [
        (layout.path, 0o755),
        (layout.resources, 0o755),
        (layout.data, 0o700),
        (layout.web_folder, 0o755),
    ]
    web_folder_is_new = not layout.web_folder.exists()
    for folder, mode in folders:
        try:
            folder.mkdir(mode=mode, parents=True, exist_ok=True)
        except OSError as e:
            msg = (
                f"Cannot create the folder {folder} of the server root: "
                f"{e.strerror}; point --root at a folder tls4d may create."
            )
            raise ConfigurationError(msg) from e
    if web_folder_is_new:
        index = layout.web_folder / "index.html"
        pki.write_public_file(index, _START_PAGE.encode("utf-8"))
        note(index, "the start page")

    missing_pairs = []
    for servers, key_path, cert_path in layout.server_pairs():
        if key_path.exists() != cert_path.exists():
            present, absent = (
                (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
            )
            msg = (
                f"{present} exists but {absent} does not; install the missing "
                f"file for the {servers}, or remove {present} to have tls4d "
                "generate both."
            )
            raise ConfigurationError(msg)
        if not key_path.exists():
            missing_pairs.append((servers, key_path, cert_path))

    if not layout.ca.exists() and layout.ca_key.exists():
        msg = (
            f"{layout.ca_key} exists but {layout.ca} does not; restore the CA "
            f"certificate, or remove {layout.ca_key} to start a new local CA."
        )
        raise ConfigurationError(msg)
    if not layout.ca.exists():
        ca = pki.create_local_ca(
            f"{server_names(hostname)[-1]} {layout.path.resolve()}"
        )
        pki.write_private_key(layout.ca_key, ca.key)
        note(layout.ca_key, "the local CA's private key (mode 0600)")
        pki.write_certificates(layout.ca, [ca.certificate])
        note(layout.ca, "the local CA's certificate")

    if missing_pairs:
        if not layout.ca_key.exists():
            msg = (
                f"{missing_pairs[0][1]} is missing and {layout.ca_key} is not "
                "there to sign a new certificate; install your key and "
                "certificate, or the local CA's key."
            )
            raise ConfigurationError(msg)
        ca = load_local_ca(layout)
        names = server_names(hostname)
        for servers, key_path, cert_path in missing_pairs:
            key, certificate = _issue_generated(ca, names)
            pki.write_private_key(key_path, key)
            note(key_path, f"the ECDSA P-256 private key of the {servers} (mode 0600)")
            pki.write_certificates(cert_path, [certificate])
            note(cert_path, f"the certificate of the {servers} for {', '.join(names)}")
            _log.warn(
                "{path} is a certificate generated by the root's local CA, "
                "trusted only by clients given {ca}; install one issued by a "
                "public or company CA for production.",
                path=str(cert_path),
                ca=str(layout.ca),
            )

    if not layout.dhparams.exists():
        pki.write_public_file(layout.dhparams, pki.FFDHE2048_PEM)
        note(layout.dhparams, "the RFC 7919 ffdhe2048 DH parameters")
    return created
