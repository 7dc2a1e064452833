"""
The reference of the application-protocol figures: a bare Twisted
``Int32StringReceiver`` that sends each frame back as it came, over mutual
TLS built the stock Twisted way (``CertificateOptions``) from tls4d's
application-server key, chain and client CA.

Run: ``python -m bench.echo_server --key K --chain C --ca CA``; it prints
``echo listening on 127.0.0.1:PORT`` and serves until it is stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL.crypto import X509
from twisted.internet import endpoints, protocol, reactor, ssl
from twisted.protocols.basic import Int32StringReceiver

#: The largest frame echoed: room for the bulk figure's 1 MiB frames.
MAX_FRAME = 4 * 1024 * 1024


class Echo(Int32StringReceiver):
    """Sends every frame back, whole, in one write."""

    MAX_LENGTH = MAX_FRAME

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        """Echo ``string``."""
        self.sendString(string)


def options(key: Path, chain: Path, ca: Path) -> ssl.CertificateOptions:
    """
    Returns:
        Stock Twisted server options presenting ``key`` and ``chain`` and
        requiring a client certificate from ``ca``, TLS 1.2 or later.
    """
    certificates = x509.load_pem_x509_certificates(chain.read_bytes())
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(key.read_bytes(), None),
        certificate=certificates[0],
        extraCertChain=certificates[1:],
        verify=True,
        caCerts=[
            X509.from_cryptography(c)
            for c in x509.load_pem_x509_certificates(ca.read_bytes())
        ],
        requireCertificate=True,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def main(arguments: list[str]) -> None:
    """Serve the echo on 127.0.0.1 (``--port``, 0 by default) until stopped."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--chain", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    given = parser.parse_args(arguments)
    endpoint = endpoints.SSL4ServerEndpoint(
        reactor,
        given.port,
        options(given.key, given.chain, given.ca),
        interface="127.0.0.1",
    )

    def listening(port: object) -> None:
        print(f"echo listening on 127.0.0.1:{port.getHost().port}", flush=True)  # type: ignore[attr-defined]

    def failed(failure: object) -> None:
        print(f"echo could not listen: {failure}", flush=True)
        reactor.stop()  # type: ignore[attr-defined]

    endpoint.listen(protocol.Factory.forProtocol(Echo)).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
