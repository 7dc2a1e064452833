"""
What the tests share: a freshly bootstrapped server root, client identities
made by the project's own PKI code, and in-memory TLS connections between a
server factory and a client protocol.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from twisted_tls4d import clienttls, identity, root, tls


def temporary_folder(prefix: str) -> Path:
    """
    Returns:
        A new folder below the working directory, which trial makes its own
        ``_trial_temp`` and empties at its next run, so that the keys the
        tests make do not pile up in the system's temporary folder.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir=Path.cwd())).resolve()


def make_root(hostname: str = "testhost") -> root.RootLayout:
    """
    Returns:
        A new server root in a temporary folder, bootstrapped (local CA,
        server keys and certificates, DH parameters).
    """
    layout = root.RootLayout(temporary_folder("tls4d-test-") / "root")
    root.bootstrap(layout, hostname=hostname)
    return layout


def make_client_identity(
    layout: root.RootLayout, name: str = "alice"
) -> clienttls.ClientIdentity:
    """
    Returns:
        A client identity for ``name`` signed by the root's CA, in a new
        temporary folder.
    """
    out = temporary_folder("tls4d-client-") / name
    return identity.issue_client_identity(layout, name, out)


def make_foreign_identity(name: str = "mallory") -> clienttls.ClientIdentity:
    """
    Returns:
        A client identity signed by another root's CA, whose ``ca.pem`` is
        that other CA (so it trusts nothing of the test root).
    """
    return make_client_identity(make_root("elsewhere"), name)


def trusting(
    identity: clienttls.ClientIdentity, layout: root.RootLayout
) -> clienttls.ClientIdentity:
    """
    Returns:
        ``identity`` made to trust ``layout``'s CA for the server, whoever
        signed the client's own certificate.
    """
    return clienttls.ClientIdentity(identity.key, identity.cert, layout.ca)


def server_creator(
    layout: root.RootLayout,
    *,
    app: bool = False,
    mutual: bool = True,
    policy: tls.TLSPolicy | None = None,
) -> tls.ServerConnectionCreator:
    """
    Returns:
        A connection creator for the root's web/SQL identity (or the
        application server's with ``app``), requiring client certificates
        chained to ``Resources/ca.pem`` when ``mutual``.
    """
    key, cert = (layout.app_key, layout.app_cert) if app else (layout.key, layout.cert)
    server_identity = tls.load_identity(cert, key)
    policy = policy or tls.TLSPolicy(dh_parameters=layout.dhparams)
    cas = tls.load_client_cas(layout.ca) if mutual else []
    return tls.ServerConnectionCreator(tls.build_context(policy, server_identity, cas))


@implementer(IOpenSSLClientConnectionCreator)
class RawClientCreator:
    """
    A client connection creator from a bare pyOpenSSL context, for tests
    that need a client the project's own options would not make (an old
    TLS version, a given cipher, no certificate).
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context
        self.connections: list[SSL.Connection] = []

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self.context, None)
        self.connections.append(connection)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def connect_in_memory(
    server_factory: Factory,
    creator: tls.ServerConnectionCreator,
    client_protocol: Protocol,
    client_tls: IOpenSSLClientConnectionCreator | RawClientCreator,
    clock: Clock | None = None,
) -> tuple[Any, Any, iosim.IOPump]:
    """
    Connect ``client_protocol`` to a protocol of ``server_factory`` through
    TLS in memory, and run the handshake. The TLS layers flush their writes
    on ``clock``, which each pump advances a little.

    Returns:
        The server-side and client-side TLS protocols, and the pump that moves
        bytes between them (call ``pump.flush()`` after writing).
    """
    clock = clock or Clock()
    server_tls_factory = TLSMemoryBIOFactory(
        creator, False, server_factory, clock=clock
    )
    client_tls_factory = TLSMemoryBIOFactory(
        client_tls, True, Factory.forProtocol(lambda: client_protocol), clock=clock
    )
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_tls_factory.buildProtocol(None),
        lambda: client_tls_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return server, client, pump


def client_options(
    identity: clienttls.ClientIdentity, host: str = "localhost"
) -> IOpenSSLClientConnectionCreator:
    """
    Returns:
        The project's own client TLS options for ``identity``.
    """
    return clienttls.client_options(host, identity)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Returns:
        ``data`` cut at the given offsets (taken modulo its length + 1), the
        pieces in order; a piece may be empty where offsets repeat an end.
    """
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces
