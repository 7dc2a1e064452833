"""
Putting a server together: settings and the root feed one TLS policy, and the
policy feeds every listener (HTTPS and HTTP, application, SQL).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from twisted_tls4d import pki, root, tls, web
from twisted_tls4d.errors import Tls4dError
from twisted_tls4d.settings import Settings

_log = Logger()


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def server_endpoint(
    reactor: Any, interface: str | None, port: int
) -> IStreamServerEndpoint:
    """
    A TCP endpoint on ``interface`` (all addresses, IPv6 and IPv4, if None).

    Args:
        reactor: The reactor.
        interface: An IPv4 or IPv6 address, or None.
        port: The port; 0 takes a free one.

    Returns:
        The endpoint.
    """
    if interface is None:
        interface = "::" if _ipv6_available() else "0.0.0.0"
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, interface=interface)
    return TCP4ServerEndpoint(reactor, port, interface=interface)


def format_address(address: Any) -> str:
    """
    Returns:
        ``host:port`` of a listening address, IPv6 hosts in brackets.
    """
    host, port = address.host, address.port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenError(Tls4dError):
    """
    A listener cannot bind its address (the port is taken, or the address is
    not this machine's).
    """


class ListenerService(Service):
    """
    Listens on one endpoint while running, logging the address bound.

    Attributes:
        label: What is served, for the log (``"HTTPS web server"``).
        port: The listening port once started.
        port_option: The option that chooses the port, for error messages.
    """

    def __init__(
        self,
        label: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        on_listening: Callable[[IListeningPort], None] | None = None,
        port_option: str = "another port",
    ) -> None:
        self.label = label
        self.port_option = port_option
        self.endpoint = endpoint
        self.factory = factory
        self.on_listening = on_listening
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Bind now, before privileges are dropped; a failure to bind stops the
        start with the endpoint's error.
        """
        super().privilegedStartService()
        failures: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            reason = failures[0]
            if reason.check(CannotListenError):
                error = reason.value
                msg = (
                    f"The {self.label} cannot listen on port {error.port}"
                    f"{' of ' + error.interface if error.interface else ''}: "
                    f"{error.socketError}. Stop the program using that port, or "
                    f"choose another with {self.port_option}."
                )
                raise ListenError(msg)
            reason.raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        _log.info(
            "{label} listening on {address}",
            label=self.label,
            address=format_address(port.getHost()),
        )
        if self.on_listening is not None:
            self.on_listening(port)

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Listen, unless `privilegedStartService` already did.
        """
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        """
        Stop listening.

        Returns:
            A Deferred that fires once the port is closed, or None.
        """
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


class Tls4dService(MultiService):
    """
    The servers of one root, under one TLS policy.

    Attributes:
        settings: What it was built from.
        layout: The root's paths.
        exit_on_listen_error: End the process when a listener cannot bind
            (set by twistd's ``makeService``); raise `ListenError` if False.
        creators: The connection creator of each TLS listener by name
            (``"https"``, ``"app"``, ``"sql"``); a reload replaces their
            contexts.
    """

    def __init__(self, settings: Settings, layout: root.RootLayout) -> None:
        super().__init__()
        self.settings = settings
        self.layout = layout
        self.creators: dict[str, tls.ServerConnectionCreator] = {}
        self.exit_on_listen_error = False

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Bind every listener. Under twistd (``exit_on_listen_error``), a
        listener that cannot bind ends the process with one critical log line
        instead of a traceback.
        """
        try:
            super().privilegedStartService()
        except ListenError as e:
            if not self.exit_on_listen_error:
                raise
            _log.critical("tls4d cannot start: {message}", message=str(e))
            raise SystemExit(1) from e

    def listener(self, name: str) -> ListenerService:
        """
        Returns:
            The child listener called ``name``.
        """
        child = self.getServiceNamed(name)
        assert isinstance(child, ListenerService)
        return child


def _log_identity(label: str, identity: tls.ServerIdentity) -> None:
    _log.info(
        "{label} serves {path}: {certificate}",
        label=label,
        path=str(identity.cert_path),
        certificate=pki.describe(identity.certificate),
    )


def build_service(settings: Settings, reactor: Any = None) -> Tls4dService:
    """
    Build the servers the settings ask for: bootstrap the root, load keys and
    certificates, build the TLS contexts, and prepare each listener.

    Args:
        settings: Checked settings.
        reactor: The reactor; the global one if None.

    Returns:
        A service whose start binds every listener.

    Raises:
        ConfigurationError: The TLS policy or the root cannot be used.
        PEMError: A key, certificate or DH file cannot be used.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    layout = root.RootLayout(settings.root)
    root.bootstrap(layout)
    policy = tls.TLSPolicy(
        min_version=settings.min_tls,
        ciphers=settings.ciphers or tls.DEFAULT_CIPHERS,
        dh_parameters=layout.dhparams,
    )
    tls.check_ciphers(policy.ciphers)
    _log.info(
        "TLS policy: TLS {version} and later; TLS 1.2 suites {ciphers}",
        version=policy.min_version,
        ciphers=":".join(tls.tls12_suites(policy.ciphers)),
    )

    top = Tls4dService(settings, layout)

    def add(
        name: str, label: str, port: int, factory: IProtocolFactory, **kw: Any
    ) -> None:
        endpoint = server_endpoint(reactor, settings.interface, port)
        service = ListenerService(
            label, endpoint, factory, port_option=f"--{name}-port", **kw
        )
        service.setName(name)
        service.setServiceParent(top)

    def add_tls(
        name: str,
        label: str,
        port: int,
        identity: tls.ServerIdentity,
        factory: IProtocolFactory,
        client_cas: Sequence[x509.Certificate] = (),
        **kw: Any,
    ) -> None:
        _log_identity(label, identity)
        suites = tls.tls12_suites(policy.ciphers)
        if policy.min_version == "1.2" and not tls.suites_for_key(suites, identity.key):
            _log.warn(
                "{label}: none of the TLS 1.2 suites allowed suits the {kind} key "
                "of {path}, so TLS 1.2 clients will fail; allow suites for that "
                "key in --ciphers, or set --min-tls 1.3",
                label=label,
                kind="RSA" if isinstance(identity.key, rsa.RSAPrivateKey) else "ECDSA",
                path=str(identity.cert_path),
            )
        # The web server's protocol cannot see failed handshakes; the others
        # log them with the verification error that caused them.
        context = tls.build_context(
            policy, identity, client_cas, log_alerts_as=None if client_cas else label
        )
        creator = top.creators[name] = tls.ServerConnectionCreator(context)
        add(name, label, port, TLSMemoryBIOFactory(creator, False, factory), **kw)

    client_cas = tls.load_client_cas(layout.ca) if settings.app or settings.sql else []
    tls.warn_if_exposed(layout.ca_key)
    web_identity = None
    if settings.web or settings.sql:
        web_identity = tls.load_identity(layout.cert, layout.key)

    if settings.web:
        assert web_identity is not None
        https_site, http_site, redirect = web.build_sites(
            layout.web_folder,
            hsts_max_age=settings.hsts_max_age if settings.hsts else None,
            certificate=web_identity.certificate,
            https_port=settings.https_port,
        )

        def https_bound(port: IListeningPort) -> None:
            if redirect is not None:
                redirect.https_port = port.getHost().port  # type: ignore[attr-defined]

        add_tls(
            "https",
            "HTTPS web server",
            settings.https_port,
            web_identity,
            https_site,
            on_listening=https_bound,
        )
        if not settings.no_http:
            add("http", "HTTP web server", settings.http_port, http_site)
        if redirect is not None:
            _log.info(
                "HSTS on: HTTPS answers carry max-age={max_age}; plain HTTP "
                "redirects to HTTPS",
                max_age=settings.hsts_max_age,
            )

    if settings.app:
        from twisted_tls4d.app.protocol import AppServerFactory

        app_factory = AppServerFactory(
            clock=reactor,
            max_frame_size=settings.max_frame_size,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
        )
        app_identity = tls.load_identity(layout.app_cert, layout.app_key)
        add_tls(
            "app",
            "Application server",
            settings.app_port,
            app_identity,
            app_factory,
            client_cas,
        )

    if settings.sql:
        from twisted_tls4d.sql.protocol import SQLServerFactory

        assert web_identity is not None
        sql_factory = SQLServerFactory(
            database=layout.database,
            clock=reactor,
            max_line_length=settings.max_line_length,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
        )
        add_tls(
            "sql",
            "SQL server",
            settings.sql_port,
            web_identity,
            sql_factory,
            client_cas,
        )
    return top
