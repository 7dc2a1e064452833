"""
The TLS side of tls4d's own clients: a client identity (key, certificate and
the CA that signed the server's certificate), and Twisted client options that
present it and verify the server, host name included, with service-identity.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from twisted_tls4d import pki
from twisted_tls4d.errors import ConfigurationError

#: File names that `tls4d client NAME --out DIR` writes and clients read.
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"


@attrs.frozen
class ClientIdentity:
    """
    Where a client finds its key, its certificate, and the CA it trusts.

    Attributes:
        key: PEM private key of the client.
        cert: PEM certificate of the client, issued by the server's CA.
        ca: PEM certificates trusted to have signed the server's certificate.
    """

    key: Path
    cert: Path
    ca: Path

    @classmethod
    def from_directory(cls, directory: Path) -> ClientIdentity:
        """
        Args:
            directory: A folder written by ``tls4d client NAME --out DIR``.

        Returns:
            The identity in it (``key.pem``, ``cert.pem``, ``ca.pem``).
        """
        return cls(directory / KEY_FILE, directory / CERT_FILE, directory / CA_FILE)

    @classmethod
    def from_options(
        cls,
        directory: Path | None,
        key: Path | None = None,
        cert: Path | None = None,
        ca: Path | None = None,
    ) -> ClientIdentity:
        """
        The identity a client command's options give: a folder, with
        ``--key``, ``--cert`` and ``--ca`` taking precedence over its files.

        Args:
            directory: The ``--identity`` folder, or None.
            key: The ``--key`` file, or None.
            cert: The ``--cert`` file, or None.
            ca: The ``--ca`` file, or None.

        Returns:
            The key, certificate and CA files to use.

        Raises:
            ConfigurationError: ``directory`` is not a folder, or a file is
                given neither by it nor by its own option.
        """
        base = None
        if directory is not None:
            if not directory.is_dir():
                msg = (
                    f"--identity {directory} is not a folder; give the folder "
                    "that 'tls4d client NAME --out DIR' wrote."
                )
                raise ConfigurationError(msg)
            base = cls.from_directory(directory)
        key = key or (base.key if base else None)
        cert = cert or (base.cert if base else None)
        ca = ca or (base.ca if base else None)
        if key is None or cert is None or ca is None:
            missing = [
                option
                for option, value in (("--key", key), ("--cert", cert), ("--ca", ca))
                if value is None
            ]
            msg = (
                f"No client identity given ({', '.join(missing)} missing); pass "
                "--identity DIR (a folder from 'tls4d client NAME --out DIR') or "
                "--key, --cert and --ca."
            )
            raise ConfigurationError(msg)
        return cls(key, cert, ca)


def client_options(
    host: str, identity: ClientIdentity
) -> IOpenSSLClientConnectionCreator:
    """
    TLS options for connecting to a tls4d server as this identity.

    Args:
        host: The host name or IP address dialled; the server's certificate
            must cover it.
        identity: The key, certificate and trusted CA.

    Returns:
        A connection creator for `twisted.internet.endpoints.wrapClientTLS`.

    Raises:
        PEMError: A file cannot be read or parsed.
        KeyMismatchError: The certificate was not issued for the key.
    """
    chain = pki.load_certificates(identity.cert)
    key = pki.load_private_key(identity.key)
    pki.check_key_matches(chain[0], key, identity.cert, identity.key)
    cas = pki.load_certificates(identity.ca)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = chain[0].public_bytes(serialization.Encoding.PEM)
    trust = ssl.trustRootFromCertificates(
        [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in cas
        ]
    )
    client_certificate = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    return ssl.optionsForClientTLS(
        host, trustRoot=trust, clientCertificate=client_certificate
    )
