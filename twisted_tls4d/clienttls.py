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
