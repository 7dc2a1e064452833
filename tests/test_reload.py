"""
Tests for reloading keys and certificates without a restart, and for the
expiry warnings.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tests import support
from twisted_tls4d import clienttls, pki, reloader, revocation, root, service, settings
from twisted_tls4d.app import wire
from twisted_tls4d.app.protocol import AppServerFactory
from twisted_tls4d.errors import ConfigurationError


def _replace_web_certificate(layout: root.RootLayout, common_name: str) -> int:
    """
    Give the root's web and SQL servers a new key and certificate from its
    CA, as an operator installing a renewed certificate would.

    Returns:
        The new certificate's serial number.
    """
    ca = root.load_local_ca(layout)
    key = pki.generate_private_key()
    certificate = pki.issue_certificate(
        ca, key.public_key(), common_name, server_names=root.server_names("testhost")
    )
    pki.write_private_key(layout.key, key)
    pki.write_certificates(layout.cert, [certificate])
    return certificate.serial_number


def _build(layout: root.RootLayout, clock: Any, **values: Any) -> service.Tls4dService:
    values = {"interface": "127.0.0.1", "https_port": 0, "http_port": 0, **values}
    return service.build_service(settings.resolve(values, layout.path), clock)


def _served_serial(creator: Any) -> int:
    """The serial number of the certificate a new connection is served."""
    context = SSL.Context(SSL.TLS_METHOD)
    raw = support.RawClientCreator(context)
    support.connect_in_memory(Factory.forProtocol(Protocol), creator, Protocol(), raw)
    certificate = raw.connections[0].get_peer_certificate(as_cryptography=True)
    assert certificate is not None
    return certificate.serial_number


class ReloadTests(unittest.TestCase):
    """
    A reload serves new connections with the files as they are now, or keeps
    everything if a file is broken.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.top = _build(self.layout, Clock(), web=True, app=True)
        self.creator = self.top.creators["https"]

    def test_new_certificate_served(self) -> None:
        """After a reload, a new connection gets the newly installed certificate."""
        before = _served_serial(self.creator)
        serial = _replace_web_certificate(self.layout, "renewed")
        self.assertEqual(_served_serial(self.creator), before)
        with capturedLogs() as events:
            self.assertTrue(self.top.reload())
        self.assertEqual(_served_serial(self.creator), serial)
        self.assertEqual(self.top.identities["https"].certificate.serial_number, serial)
        self.assertTrue(any("Reload done" in e["log_format"] for e in events))

    def test_established_connection_untouched(self) -> None:
        """A connection made before a reload goes on with its own certificate."""
        received: list[bytes] = []

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:  # noqa: N802
                received.append(data)

        raw = support.RawClientCreator(SSL.Context(SSL.TLS_METHOD))
        server, client, pump = support.connect_in_memory(
            Factory.forProtocol(Protocol), self.creator, Collect(), raw
        )
        old = raw.connections[0].get_peer_certificate(as_cryptography=True)
        _replace_web_certificate(self.layout, "renewed")
        self.assertTrue(self.top.reload())
        server.write(b"still here")
        pump.flush()
        self.assertEqual(b"".join(received), b"still here")
        now = raw.connections[0].get_peer_certificate(as_cryptography=True)
        self.assertEqual(now, old)

    def test_broken_certificate_keeps_configuration(self) -> None:
        """A broken cert.pem fails the reload, is logged, and changes nothing."""
        before = _served_serial(self.creator)
        identities = dict(self.top.identities)
        self.layout.cert.write_text("not a certificate\n")
        with capturedLogs() as events:
            self.assertFalse(self.top.reload())
        [error] = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertIn(str(self.layout.cert), error["error"])
        self.assertIn("keep the configuration", error["log_format"])
        self.assertEqual(_served_serial(self.creator), before)
        self.assertEqual(self.top.identities, identities)

    def test_mismatched_key_keeps_configuration(self) -> None:
        """A key that does not match the certificate fails the whole reload."""
        before = _served_serial(self.top.creators["app"])
        self.layout.app_key.write_bytes(self.layout.key.read_bytes())
        self.assertFalse(self.top.reload())
        self.assertEqual(_served_serial(self.top.creators["app"]), before)

    def test_strict_refuses_exposed_key(self) -> None:
        """
        With strict, building the servers fails on a key file others may
        read, and a reload fails on one and keeps the configuration; without
        it, the key is named in a warning.
        """
        self.layout.ca_key.chmod(0o640)
        with capturedLogs() as events:
            self.assertTrue(self.top.reload())
        [warning] = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(warning["path"], str(self.layout.ca_key))
        e = self.assertRaises(
            ConfigurationError, _build, self.layout, Clock(), web=True, strict=True
        )
        self.assertIn(f"run chmod 600 {self.layout.ca_key}", str(e))

        self.layout.ca_key.chmod(0o600)
        strict = _build(self.layout, Clock(), web=True, app=True, strict=True)
        before = _served_serial(strict.creators["app"])
        _replace_web_certificate(self.layout, "renewed")
        self.layout.app_key.chmod(0o644)
        with capturedLogs() as events:
            self.assertFalse(strict.reload())
        [error] = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertIn(f"run chmod 600 {self.layout.app_key}", error["error"])
        self.assertEqual(_served_serial(strict.creators["app"]), before)
        self.layout.app_key.chmod(0o600)
        self.assertTrue(strict.reload())

    def test_redirect_follows_certificate(self) -> None:
        """With HSTS, the redirect takes the names of the reloaded certificate."""
        top = _build(self.layout, Clock(), web=True, hsts=True)
        assert top.redirect is not None
        before = top.redirect.certificate
        _replace_web_certificate(self.layout, "renewed")
        self.assertTrue(top.reload())
        self.assertNotEqual(top.redirect.certificate, before)
        self.assertEqual(top.redirect.certificate, top.identities["https"].certificate)


class ExpiryTests(unittest.TestCase):
    """
    Certificates near or past expiry are logged at start and once a day.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        # Without the CA's key, the root cannot renew its certificates itself,
        # as with certificates from a public CA.
        self.layout.ca_key.unlink()
        self.clock = Clock()
        self.top = _build(self.layout, self.clock, web=True)
        self.expires = self.top.identities["https"].certificate.not_valid_after_utc

    def set_time(self, moment: datetime.datetime) -> None:
        self.clock.advance(moment.timestamp() - self.clock.seconds())

    def expiry_events(self) -> list[dict[str, Any]]:
        with capturedLogs() as events:
            self.top.check_expiry()
        return [e for e in events if "path" in e]

    def test_fresh_certificate_silent(self) -> None:
        """A certificate with months left is not mentioned."""
        self.set_time(self.expires - datetime.timedelta(days=200))
        self.assertEqual(self.expiry_events(), [])

    def test_warning_within_30_days(self) -> None:
        """A certificate expiring in 10 days is a warning with its days left."""
        self.set_time(self.expires - datetime.timedelta(days=10, hours=1))
        [event] = self.expiry_events()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["days"], event["path"]), (10, str(self.layout.cert)))

    def test_error_once_expired(self) -> None:
        """An expired certificate is an error."""
        self.set_time(self.expires + datetime.timedelta(days=3, hours=1))
        [event] = self.expiry_events()
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["days"], 3)

    def test_daily(self) -> None:
        """Started, the service checks at once and then every day."""
        for child in list(self.top):
            child.disownServiceParent()
        self.set_time(self.expires - datetime.timedelta(days=5, hours=1))
        with capturedLogs() as events:
            self.top.startService()
            self.clock.advance(service.EXPIRY_CHECK_INTERVAL - 1)
            first = [e.get("days") for e in events if "path" in e]
            self.clock.advance(1)
        self.top.stopService()
        self.assertEqual(first, [5])
        self.assertEqual([e.get("days") for e in events if "path" in e], [5, 4])


class RenewalTests(unittest.TestCase):
    """
    Certificates the root's CA generated renew themselves before expiry.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.clock = Clock()
        self.top = _build(self.layout, self.clock, web=True, app=True)
        self.old = self.top.identities["https"].certificate

    def at(self, days_before_expiry: float) -> list[dict[str, Any]]:
        moment = self.old.not_valid_after_utc - datetime.timedelta(
            days=days_before_expiry
        )
        self.clock.advance(moment.timestamp() - self.clock.seconds())
        with capturedLogs() as events:
            self.top.check_expiry()
        return list(events)

    def test_generated_lifespan(self) -> None:
        """A generated server certificate lives 90 days."""
        lifespan = self.old.not_valid_after_utc - self.old.not_valid_before_utc
        self.assertEqual(
            lifespan, datetime.timedelta(days=root.GENERATED_CERTIFICATE_DAYS)
        )

    def test_not_yet(self) -> None:
        """With more than 30 days left, nothing is renewed."""
        self.at(31)
        self.assertEqual(self.top.identities["https"].certificate, self.old)

    def test_renewed_and_served(self) -> None:
        """With 20 days left, both generated pairs are renewed, served, and logged."""
        old_app = self.top.identities["app"].certificate
        events = self.at(20)
        new = self.top.identities["https"].certificate
        self.assertNotEqual(new.serial_number, self.old.serial_number)
        self.assertNotEqual(self.top.identities["app"].certificate, old_app)
        self.assertEqual(new.subject, self.old.subject)
        self.assertEqual(
            new.extensions.get_extension_for_class(x509.SubjectAlternativeName),
            self.old.extensions.get_extension_for_class(x509.SubjectAlternativeName),
        )
        self.assertEqual(_served_serial(self.top.creators["https"]), new.serial_number)
        renewals = [e for e in events if "Renewed" in e["log_format"]]
        self.assertEqual(len(renewals), 2)
        self.assertFalse([e for e in events if e["log_level"] is LogLevel.warn])

    def test_foreign_certificate_left_alone(self) -> None:
        """A certificate from another CA is not renewed, only warned about."""
        other = root.load_local_ca(support.make_root("elsewhere"))
        key = pki.generate_private_key()
        certificate = pki.issue_certificate(
            other, key.public_key(), "localhost", server_names=["localhost"], days=60
        )
        pki.write_private_key(self.layout.key, key)
        pki.write_certificates(self.layout.cert, [certificate])
        self.assertTrue(self.top.reload())
        self.old = certificate
        events = self.at(10)
        self.assertEqual(self.top.identities["https"].certificate, certificate)
        self.assertEqual(pki.load_certificates(self.layout.cert), [certificate])
        self.assertIn(
            10, [e.get("days") for e in events if e["log_level"] is LogLevel.warn]
        )


@implementer(IHandshakeListener)
class _Handshaker(Protocol):
    """
    Closes once its TLS handshake completes; ``done`` fires when the
    connection is gone, failing if the handshake never completed.
    """

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        self.shook = False

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.shook = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.shook:
            self.done.callback(None)
        else:
            self.done.errback(reason)


class ReloadUnderLoadTests(unittest.TestCase):
    """
    Reloads while clients keep connecting make no handshake fail.
    """

    @defer.inlineCallbacks
    def test_no_failed_handshake(self) -> Any:
        """120 handshakes by 4 clients succeed while the server reloads every 10 ms."""
        layout = support.make_root()
        top = _build(layout, reactor, web=True, no_http=True)
        top.startService()
        self.addCleanup(top.stopService)
        port = top.listener("https").port.getHost().port  # type: ignore[union-attr]
        trust = ssl.Certificate.loadPEM(layout.ca.read_bytes())
        options = ssl.optionsForClientTLS("localhost", trust)
        reloads = []

        def reload() -> None:
            _replace_web_certificate(layout, f"renewed {len(reloads)}")
            reloads.append(top.reload())

        looping = LoopingCall(reload)
        looping.start(0.01, now=False)
        self.addCleanup(lambda: looping.running and looping.stop())

        failures: list[Any] = []

        @defer.inlineCallbacks
        def client(count: int) -> Any:
            for _ in range(count):
                endpoint = wrapClientTLS(
                    options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
                )
                try:
                    protocol = yield endpoint.connect(Factory.forProtocol(_Handshaker))
                    yield protocol.done
                except Exception as e:
                    failures.append(e)

        yield defer.gatherResults([client(30) for _ in range(4)])
        looping.stop()
        self.assertEqual(failures, [])
        self.assertGreater(len(reloads), 5)
        self.assertTrue(all(reloads))


class ReloadCommandTests(unittest.TestCase):
    """
    ``tls4d reload`` signals the processes listed in ROOT/Run/.
    """

    def test_stale_entries_forgotten(self) -> None:
        """An entry for a process that is gone is removed, and nobody is signalled."""
        layout = support.make_root()
        entry = reloader.register(layout, pid=2**22 + 12345)
        self.assertEqual(reloader.signal_servers(layout), [])
        self.assertFalse(entry.exists())

    def test_no_server(self) -> None:
        """Without a running server, the command fails with one line naming Run/."""
        from twisted_tls4d import cli

        layout = support.make_root()
        self.assertEqual(cli.main(["reload", "--root", str(layout.path)]), 1)


@implementer(IOpenSSLClientConnectionCreator)
class _ResumingClient:
    """
    A pyOpenSSL client that offers the session of its previous connection,
    as a returning client does, and tells whether the server resumed it.
    """

    def __init__(
        self, version: int, identity: clienttls.ClientIdentity | None = None
    ) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(version)
        self.context.set_max_proto_version(version)
        self.context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        if identity is not None:
            self.context.use_certificate_file(str(identity.cert))
            self.context.use_privatekey_file(str(identity.key))
        self.connections: list[SSL.Connection] = []

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self.context, None)
        if self.connections:
            session = self.connections[-1].get_session()
            assert session is not None
            connection.set_session(session)
        self.connections.append(connection)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection

    @property
    def resumed(self) -> bool:
        """Whether the last connection resumed the session before it."""
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(self.connections[-1]._ssl))


@implementer(IHandshakeListener)
class _PingClient(Int32StringReceiver):
    """Pings the application server once its handshake completes."""

    def __init__(self) -> None:
        self.answers: list[Any] = []

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        self.sendString(wire.encode_payload({"id": 1, "op": "ping"}))

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.answers.append(json.loads(string))

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        pass


_VERSIONS = {"TLS 1.2": SSL.TLS1_2_VERSION, "TLS 1.3": SSL.TLS1_3_VERSION}


class ResumptionTests(unittest.TestCase):
    """
    A returning client resumes its session without a full handshake, until
    a reload or the renewal of the session ticket keys; a client revoked
    meanwhile cannot resume its way past the revocation.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.top = _build(self.layout, Clock(), web=True, app=True)

    def handshake(self, client: _ResumingClient, name: str = "https") -> None:
        support.connect_in_memory(
            Factory.forProtocol(Protocol), self.top.creators[name], Protocol(), client
        )

    def test_resumed(self) -> None:
        """With TLS 1.2 and 1.3, the second connection resumes the first's session."""
        for label, version in _VERSIONS.items():
            client = _ResumingClient(version)
            self.handshake(client)
            self.assertFalse(client.resumed, label)
            self.handshake(client)
            self.assertTrue(client.resumed, label)

    def test_reload_ends_sessions(self) -> None:
        """After a reload, even of unchanged files, a session is not resumed."""
        for label, version in _VERSIONS.items():
            client = _ResumingClient(version)
            self.handshake(client)
            self.assertTrue(self.top.reload())
            self.handshake(client)
            self.assertFalse(client.resumed, label)
            self.handshake(client)
            self.assertTrue(client.resumed, label)

    def test_key_renewal_ends_sessions(self) -> None:
        """Renewing the session ticket keys ends the sessions, and logs it."""
        client = _ResumingClient(SSL.TLS1_3_VERSION)
        self.handshake(client)
        identities = dict(self.top.identities)
        with capturedLogs() as events:
            self.assertTrue(self.top.rotate_session_keys())
        self.handshake(client)
        self.assertFalse(client.resumed)
        self.assertEqual(self.top.identities, identities)
        self.assertTrue(any("ticket keys" in e["log_format"] for e in events))

    def test_key_renewal_scheduled(self) -> None:
        """A started server renews its keys every SESSION_KEY_LIFETIME seconds."""
        clock = MemoryReactorClock()
        top = _build(self.layout, clock, web=True, no_http=True)
        top.startService()
        self.addCleanup(top.stopService)
        client = _ResumingClient(SSL.TLS1_3_VERSION)
        self.top = top
        self.handshake(client)
        clock.advance(service.SESSION_KEY_LIFETIME - 1)
        self.handshake(client)
        self.assertTrue(client.resumed)
        clock.advance(1)
        self.handshake(client)
        self.assertFalse(client.resumed)

    def ping(self, client: _ResumingClient) -> tuple[_PingClient, str]:
        """Ping the application server as ``client``; return it and the log."""
        clock = Clock()
        pinger = _PingClient()
        with capturedLogs() as events:
            _, _, pump = support.connect_in_memory(
                AppServerFactory(clock=clock),
                self.top.creators["app"],
                pinger,
                client,
                clock,
            )
            pump.flush()
        return pinger, "\n".join(formatEvent(event) for event in events)

    def test_mutual_resumed_with_identity(self) -> None:
        """
        A client of the application server resumes its session and is known
        by the certificate it presented when the session began.
        """
        for label, version in _VERSIONS.items():
            alice = support.make_client_identity(self.layout, "alice")
            client = _ResumingClient(version, alice)
            self.ping(client)
            pinger, log = self.ping(client)
            self.assertTrue(client.resumed, label)
            self.assertEqual(pinger.answers, [{"id": 1, "result": "pong"}], label)
            self.assertIn("authenticated as 'alice'", log)

    def test_revoked_client_not_resumed(self) -> None:
        """
        After alice's certificate is revoked and the server reloaded, her
        session is not resumed: a full handshake refuses her certificate.
        """
        for label, version in _VERSIONS.items():
            alice = support.make_client_identity(self.layout, "alice")
            client = _ResumingClient(version, alice)
            self.ping(client)
            self.ping(client)
            self.assertTrue(client.resumed, label)
            serial = pki.load_certificates(alice.cert)[0].serial_number
            revocation.revoke(self.layout, [serial])
            self.assertTrue(self.top.reload())
            pinger, log = self.ping(client)
            self.assertFalse(client.resumed, label)
            self.assertEqual(pinger.answers, [], label)
            self.assertIn("its certificate has been revoked", log)
