"""
Putting a server together: settings and the root feed one TLS policy, and the
policy feeds every listener (HTTPS and HTTP, application, SQL).
"""

from __future__ import annotations

import datetime
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_tls4d import guard, pki, reloader, revocation, root, tls, web
from twisted_tls4d.errors import Tls4dError
from twisted_tls4d.settings import Settings

if TYPE_CHECKING:
    from twisted_tls4d.workers import WorkerPool

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


@implementer(IStreamServerEndpoint)
@attrs.frozen
class InheritedPortEndpoint:
    """
    A listening socket another process bound and handed down as a file
    descriptor (the twistd process to its worker processes): `listen` serves
    it, sharing its connections with every other process holding it.

    Attributes:
        reactor: The reactor.
        fd: The descriptor of the listening socket.
        family: Its address family (``socket.AF_INET`` or ``AF_INET6``).
    """

    reactor: Any
    fd: int
    family: int

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        """
        Serve the inherited socket with ``factory``.

        Returns:
            A Deferred firing with the listening port.
        """
        return defer.execute(
            self.reactor.adoptStreamPort, self.fd, self.family, factory
        )


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


#: Certificates expiring within this many days are logged as warnings.
EXPIRY_WARNING_DAYS = 30

#: How often served certificates are checked for expiry, in seconds.
EXPIRY_CHECK_INTERVAL = 24 * 60 * 60

#: How long a TLS context serves before it is built again with fresh session
#: ticket keys and an empty session cache, in seconds; a reload also renews
#: them. A client resumes a session only with the context that issued it.
SESSION_KEY_LIFETIME = 12 * 60 * 60


@attrs.frozen
class TLSFiles:
    """
    What the TLS contexts are built from, as read from the root's files.

    Attributes:
        identities: The key and chain of each TLS listener, by name.
        client_cas: The CAs of client certificates (``Resources/ca.pem``),
            if a listener wants client certificates.
        crl: The revocation list of the local CA, if any.
    """

    identities: Mapping[str, tls.ServerIdentity]
    client_cas: list[x509.Certificate]
    crl: x509.CertificateRevocationList | None


@attrs.frozen
class TLSListener:
    """
    What a TLS listener serves, so that its context can be built again.

    Attributes:
        name: The listener's service name (``"https"``, ``"app"``, ``"sql"``).
        label: Its name in logs.
        cert_path: Its certificate chain.
        key_path: Its private key.
        mutual: Whether it requires client certificates from ``ca.pem``.
        alpn: The protocols it offers by ALPN, preferred first; none if
            empty.
        client_certificate_required: With ``mutual``, whether clients must
            present a certificate, or may log in otherwise.
    """

    name: str
    label: str
    cert_path: Path
    key_path: Path
    mutual: bool
    alpn: tuple[bytes, ...] = ()
    client_certificate_required: bool = True


class Tls4dService(MultiService):
    """
    The servers of one root, under one TLS policy.

    A reload (`reload`, SIGHUP under twistd, ``tls4d reload``) builds every
    TLS context again from the files; new connections get the new ones,
    established connections keep theirs, and if any file is broken nothing
    changes and the reason is logged.

    Attributes:
        settings: What it was built from.
        layout: The root's paths.
        policy: The TLS policy of every listener.
        clock: The reactor's clock, for the daily expiry check.
        listeners: The TLS listeners, in start order.
        creators: The connection creator of each TLS listener by name; a
            reload replaces their contexts.
        identities: The identity each TLS listener serves now, by name.
        on_identities: Called with `identities` after each (re)load.
        redirect: With HSTS, the plain HTTP redirect, which accepts the host
            names of the HTTPS certificate in force.
        under_twistd: Set by twistd's ``makeService``: a listener that cannot
            bind ends the process, SIGHUP reloads, and the process is listed
            in ``ROOT/Run/`` for ``tls4d reload``.
        factories: The server factory of each listener by name, inside its
            TLS layer for the TLS listeners.
        is_worker: A worker process (`twisted_tls4d.worker`): it serves
            listening sockets the twistd process bound, and leaves the expiry
            check, renewals, SIGHUP and ``ROOT/Run/`` to that process.
        workers: In the twistd process, its worker processes, if any; a
            reload reaches them too.
    """

    def __init__(
        self,
        settings: Settings,
        layout: root.RootLayout,
        policy: tls.TLSPolicy,
        clock: Any,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.layout = layout
        self.policy = policy
        self.clock = clock
        self.listeners: list[TLSListener] = []
        self.creators: dict[str, tls.ServerConnectionCreator] = {}
        self.identities: dict[str, tls.ServerIdentity] = {}
        self.on_identities: list[Callable[[dict[str, tls.ServerIdentity]], None]] = []
        self.under_twistd = False
        self.is_worker = False
        self.workers: WorkerPool | None = None
        self.factories: dict[str, IProtocolFactory] = {}
        self.redirect: web.RedirectToHTTPS | None = None
        self._expiry_check: LoopingCall | None = None
        self._key_rotation: LoopingCall | None = None
        self._files: TLSFiles | None = None
        self._previous_sighup: Any = None

    def read_tls_files(self) -> TLSFiles:
        """
        Read every listener's key and chain, and the client CAs and
        revocation list if a listener wants client certificates.

        Returns:
            What was read.

        Raises:
            Tls4dError: A key, certificate, CA or DH file cannot be used, or,
                with ``strict``, a key file is open to others.
        """
        if self.settings.strict:
            tls.refuse_exposed(
                [listener.key_path for listener in self.listeners]
                + [self.layout.ca_key]
            )
        client_cas: list[x509.Certificate] = []
        crl: x509.CertificateRevocationList | None = None
        if any(listener.mutual for listener in self.listeners):
            client_cas = tls.load_client_cas(self.layout.ca)
            crl = tls.load_crl(revocation.crl_path(self.layout), client_cas)
            if crl is not None:
                _log.info(
                    "{path}: {count} client certificate(s) revoked",
                    path=str(revocation.crl_path(self.layout)),
                    count=len(crl),
                )
        tls.warn_if_exposed(self.layout.ca_key)
        suites = tls.tls12_suites(self.policy.ciphers)
        identities: dict[Path, tls.ServerIdentity] = {}
        served = {}
        for listener in self.listeners:
            identity = identities.get(listener.cert_path)
            if identity is None:
                identity = tls.load_identity(listener.cert_path, listener.key_path)
                identities[listener.cert_path] = identity
            served[listener.name] = identity
            if self.policy.min_version == "1.2" and not tls.suites_for_key(
                suites, identity.key
            ):
                _log.warn(
                    "{label}: none of the TLS 1.2 suites allowed suits the {kind} "
                    "key of {path}, so TLS 1.2 clients will fail; allow suites for "
                    "that key in --ciphers, or set --min-tls 1.3",
                    label=listener.label,
                    kind="RSA"
                    if isinstance(identity.key, rsa.RSAPrivateKey)
                    else "ECDSA",
                    path=str(identity.cert_path),
                )
        return TLSFiles(served, client_cas, crl)

    def build_contexts(
        self, files: TLSFiles | None = None
    ) -> dict[str, tuple[SSL.Context, tls.ServerIdentity]]:
        """
        Build every listener's context, each with its own new session cache
        and session ticket keys.

        Args:
            files: What to build them from; read from the root now if None.

        Returns:
            The new context and identity of each TLS listener, by name.

        Raises:
            Tls4dError: A key, certificate, CA or DH file cannot be used.
        """
        if files is None:
            files = self.read_tls_files()
        built = {}
        for listener in self.listeners:
            identity = files.identities[listener.name]
            # The web server's protocol cannot see failed handshakes; the
            # others log them with the verification error that caused them.
            context = tls.build_context(
                self.policy,
                identity,
                files.client_cas if listener.mutual else (),
                log_alerts_as=None if listener.mutual else listener.label,
                crl=files.crl if listener.mutual else None,
                alpn=listener.alpn,
                require_client_certificate=listener.client_certificate_required,
                session_id=listener.name.encode("ascii"),
            )
            built[listener.name] = (context, identity)
        return built

    def load_tls(self) -> None:
        """
        Build every listener's context for the first time.

        Raises:
            Tls4dError: A key, certificate, CA or DH file cannot be used.
        """
        files = self.read_tls_files()
        built = self.build_contexts(files)
        self._files = files
        for name, (context, _) in built.items():
            self.creators[name] = tls.ServerConnectionCreator(context)
        self._took({name: identity for name, (_, identity) in built.items()})

    def reload(self) -> bool:
        """
        Read keys, certificates, ``dhparams.pem``, ``Resources/ca.pem`` and
        ``Resources/crl.pem`` again and serve new connections with them; in
        the twistd process, have every worker process do the same.

        Sessions established before cannot be resumed afterwards: each new
        context has its own session cache and ticket keys, so a client whose
        certificate was revoked meanwhile goes through a full handshake and
        its certificate is checked again.

        Returns:
            Whether the new files were taken here; if any is broken, the
            configuration in force stays (in every process), and the reason is
            logged.
        """
        _log.info(
            "Reloading keys and certificates of {root}", root=str(self.layout.path)
        )
        if not self.reload_tls():
            return False
        if self.workers is not None and self.workers.serving():
            # The pool logs "Reload done" once every worker has reloaded.
            self.workers.reload()
        else:
            _log.info("Reload done: new connections get the files read now")
        return True

    def reload_tls(self) -> bool:
        """
        Read the files and build every context again, in this process only.

        Returns:
            Whether the new files were taken; if any is broken, the contexts
            in force stay, and the reason is logged.
        """
        try:
            files = self.read_tls_files()
            built = self.build_contexts(files)
        except (Tls4dError, SSL.Error, OSError) as e:
            _log.error(
                "Reload failed, the servers keep the configuration they had: "
                "{error} Reload again once that is fixed.",
                error=str(e),
            )
            return False
        self._files = files
        for name, (context, _) in built.items():
            self.creators[name].replace(context)
        self._took({name: identity for name, (_, identity) in built.items()})
        return True

    def rotate_session_keys(self) -> bool:
        """
        Build every context again from the keys and certificates in force,
        without reading the files: new session ticket keys and an empty
        session cache, so that no session outlives `SESSION_KEY_LIFETIME`.

        Returns:
            Whether the contexts were replaced; if building one fails (the DH
            parameters file became unusable), the old ones stay and the
            reason is logged.
        """
        if self._files is None:
            return False
        try:
            built = self.build_contexts(self._files)
        except (Tls4dError, SSL.Error, OSError) as e:
            _log.error(
                "Cannot renew the TLS session ticket keys, the old ones stay: {error}",
                error=str(e),
            )
            return False
        for name, (context, _) in built.items():
            self.creators[name].replace(context)
        _log.info("Renewed the TLS session ticket keys; earlier sessions end")
        return True

    def _took(self, identities: dict[str, tls.ServerIdentity]) -> None:
        self.identities = identities
        for listener in self.listeners:
            identity = identities[listener.name]
            _log.info(
                "{label} serves {path}: {certificate}",
                label=listener.label,
                path=str(identity.cert_path),
                certificate=pki.describe(identity.certificate),
            )
        for callback in self.on_identities:
            callback(identities)

    def check_expiry(self) -> None:
        """
        Renew the root's generated certificates that near expiry (and reload
        them), then log each served certificate that expired (an error) or
        expires within `EXPIRY_WARNING_DAYS` (a warning), with its days left.
        """
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        try:
            renewed = root.renew_generated_certificates(self.layout, now)
        except (Tls4dError, OSError) as e:
            _log.error("Cannot renew generated certificates: {error}", error=str(e))
            renewed = []
        if renewed:
            self.reload()
        seen: set[Path] = set()
        for listener in self.listeners:
            identity = self.identities.get(listener.name)
            if identity is None or identity.cert_path in seen:
                continue
            seen.add(identity.cert_path)
            left = identity.certificate.not_valid_after_utc - now
            if left.total_seconds() <= 0:
                _log.error(
                    "{path} expired {days} days ago ({label}); clients refuse it: "
                    "install a new certificate and reload",
                    path=str(identity.cert_path),
                    days=(-left).days,
                    label=listener.label,
                )
            elif left.days < EXPIRY_WARNING_DAYS:
                _log.warn(
                    "{path} expires in {days} days ({label}); renew it, install "
                    "it and reload",
                    path=str(identity.cert_path),
                    days=left.days,
                    label=listener.label,
                )

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Bind every listener. Under twistd, a listener that cannot bind ends
        the process with one critical log line instead of a traceback.
        """
        try:
            super().privilegedStartService()
        except ListenError as e:
            if not self.under_twistd:
                raise
            _log.critical("tls4d cannot start: {message}", message=str(e))
            raise SystemExit(1) from e

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Start listening, checking expiry daily and renewing session ticket
        keys every `SESSION_KEY_LIFETIME`; under twistd, also reload on
        SIGHUP and list this process in ``ROOT/Run/``. A worker process only
        listens and renews its keys.
        """
        super().startService()
        self._key_rotation = LoopingCall(self.rotate_session_keys)
        self._key_rotation.clock = self.clock
        self._key_rotation.start(SESSION_KEY_LIFETIME, now=False)
        if self.is_worker:
            return
        self._expiry_check = LoopingCall(self.check_expiry)
        self._expiry_check.clock = self.clock
        self._expiry_check.start(EXPIRY_CHECK_INTERVAL, now=True)
        if self.under_twistd:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            reloader.register(self.layout)

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        """
        Stop the expiry check, key renewal, SIGHUP handling and listeners.
        """
        for timer in (self._expiry_check, self._key_rotation):
            if timer is not None and timer.running:
                timer.stop()
        if self.under_twistd and not self.is_worker:
            signal.signal(signal.SIGHUP, self._previous_sighup or signal.SIG_DFL)
            reloader.unregister(self.layout)
        return super().stopService()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(self.reload)

    def listener(self, name: str) -> ListenerService:
        """
        Returns:
            The child listener called ``name``.
        """
        child = self.getServiceNamed(name)
        assert isinstance(child, ListenerService)
        return child


def build_service(
    settings: Settings,
    reactor: Any = None,
    inherited: Mapping[str, tuple[int, int]] | None = None,
) -> Tls4dService:
    """
    Build the servers the settings ask for: bootstrap the root, load keys and
    certificates, build the TLS contexts, and prepare each listener.

    Args:
        settings: Checked settings.
        reactor: The reactor; the global one if None.
        inherited: For a worker process: the listening socket of each
            listener by name, as a file descriptor and its address family,
            bound by the twistd process, which also bootstrapped the root.

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
    if inherited is None:
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
    top = Tls4dService(settings, layout, policy, reactor)
    top.is_worker = inherited is not None
    tls_factories: dict[str, tuple[IProtocolFactory, int, dict[str, Any]]] = {}

    def add(
        name: str, label: str, port: int, factory: IProtocolFactory, **kw: Any
    ) -> None:
        endpoint: IStreamServerEndpoint
        if inherited is not None:
            endpoint = InheritedPortEndpoint(reactor, *inherited[name])
        else:
            endpoint = server_endpoint(reactor, settings.interface, port)
        service = ListenerService(
            label, endpoint, factory, port_option=f"--{name}-port", **kw
        )
        service.setName(name)
        service.setServiceParent(top)

    def add_tls(
        listener: TLSListener, port: int, factory: IProtocolFactory, **kw: Any
    ) -> None:
        top.listeners.append(listener)
        top.factories[listener.name] = factory
        tls_factories[listener.name] = (factory, port, kw)

    redirect: web.RedirectToHTTPS | None = None
    http_site = None
    if settings.web:
        web_options = web.options_from(settings, layout.path / "Logs")
        https_site, plain_site, redirect = web.build_sites(
            layout.web_folder,
            web_options,
            https_port=settings.https_port,
            reactor=reactor,
        )
        http_site = guard.ConnectionGuard(
            plain_site, "HTTP web server", guard.limits_from(settings), reactor
        )

        def https_bound(port: IListeningPort) -> None:
            if redirect is not None:
                redirect.https_port = port.getHost().port  # type: ignore[attr-defined]

        add_tls(
            TLSListener(
                "https",
                "HTTPS web server",
                layout.cert,
                layout.key,
                False,
                tuple(web.https_protocols()),
            ),
            settings.https_port,
            https_site,
            on_listening=https_bound,
        )
        if redirect is not None:
            top.redirect = covered = redirect

            def update_names(identities: dict[str, tls.ServerIdentity]) -> None:
                covered.certificate = identities["https"].certificate
                web.check_server_name(covered)

            top.on_identities.append(update_names)
        web.log_options(web_options)

    if settings.app:
        from twisted_tls4d.app.database import SQLDatabase, sql_server_sessions
        from twisted_tls4d.app.ops import load_registry
        from twisted_tls4d.app.protocol import AppServerFactory
        from twisted_tls4d.sql.postgres import postgres_backend
        from twisted_tls4d.sql.users import users_file

        app_database = SQLDatabase(
            sql_server_sessions(
                layout.database,
                users_file(layout.path),
                settings.sql_certificate_access,
                postgres_backend(
                    settings.sql_database,
                    settings.sql_database_read_write,
                    settings.sql_database_read_only,
                ),
            ),
            reactor=reactor,
        )
        app_factory = AppServerFactory(
            clock=reactor,
            max_frame_size=settings.max_frame_size,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
            request_timeout=settings.request_timeout,
            max_outstanding=settings.app_max_outstanding,
            registry=(
                load_registry(settings.app_handlers) if settings.app_handlers else None
            ),
            database=app_database,
            sql_op=not settings.app_no_sql,
            allowed_names=settings.app_allow,
            name=settings.app_name,
        )
        _log.info(
            "Application server: protocol version 1, application ops {ops}, "
            "sql op {sql}, clients admitted: {allowed}",
            ops=", ".join(app_factory.app_ops()) or "none",
            sql="refused (--app-no-sql)" if settings.app_no_sql else "offered",
            allowed=", ".join(settings.app_allow) if settings.app_allow else "all",
        )
        add_tls(
            TLSListener(
                "app", "Application server", layout.app_cert, layout.app_key, True
            ),
            settings.app_port,
            app_factory,
        )

    if settings.sql:
        from twisted_tls4d.sql.postgres import postgres_backend
        from twisted_tls4d.sql.protocol import SQLServerFactory
        from twisted_tls4d.sql.users import users_file

        sql_backend = postgres_backend(
            settings.sql_database,
            settings.sql_database_read_write,
            settings.sql_database_read_only,
        )
        if sql_backend is not None:
            _log.info(
                "SQL server: serving PostgreSQL ({backend})",
                backend=sql_backend.describe(),
            )
        sql_factory = SQLServerFactory(
            database=layout.database,
            clock=reactor,
            max_line_length=settings.max_line_length,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
            request_timeout=settings.request_timeout,
            users_file=users_file(layout.path),
            passwords=settings.sql_client_certificate == "optional",
            certificate_access=settings.sql_certificate_access,
            backend=sql_backend,
        )
        add_tls(
            TLSListener(
                "sql",
                "SQL server",
                layout.cert,
                layout.key,
                True,
                client_certificate_required=settings.sql_client_certificate
                == "required",
            ),
            settings.sql_port,
            sql_factory,
        )

    top.load_tls()
    for listener in top.listeners:
        factory, port, kw = tls_factories[listener.name]
        creator = top.creators[listener.name]
        # The guard goes outside TLS, so that a refused connection costs no
        # TLS work. The application and SQL protocols time their handshakes
        # themselves (and log why one failed); the guard times the web's.
        outer = guard.ConnectionGuard(
            TLSMemoryBIOFactory(creator, False, factory),
            listener.label,
            guard.limits_from(settings, tls_handshake=listener.name == "https"),
            reactor,
        )
        add(listener.name, listener.label, port, outer, **kw)
        if listener.name == "https" and http_site is not None and not settings.no_http:
            top.factories["http"] = http_site
            add("http", "HTTP web server", settings.http_port, http_site)
    guard.warn_if_few_files(len(list(top)), guard.limits_from(settings))
    return top
