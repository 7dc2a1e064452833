"""
Tests for the connection guard: connection limits in total and per peer,
refusals logged once per peer and minute, the unsent-output bound, the close
grace and the TLS handshake deadline; in memory with StringTransport and
task.Clock, and once over a real loopback socket.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests import support
from twisted_tls4d import guard, service, settings, tap
from twisted_tls4d.errors import ConfigurationError


def _capture_logs(test: SynchronousTestCase) -> list[str]:
    """
    Returns:
        The text of every event logged until the test ends.
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class _Recorder(Protocol):
    """A protocol that keeps what it receives and whether it was closed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.lost = reason


@implementer(IPushProducer)
class _Producer:
    """A streaming producer that records what it was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.calls.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.calls.append("resume")

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.calls.append("stop")


def _address(host: str, port: int = 40000) -> Any:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class _GuardCase(SynchronousTestCase):
    def make_guard(self, **limits: Any) -> guard.ConnectionGuard:
        self.clock = Clock()
        self.logged = _capture_logs(self)
        factory = Factory.forProtocol(_Recorder)
        return guard.ConnectionGuard(
            factory, "Test server", guard.GuardLimits(**limits), self.clock
        )

    def connect(
        self, factory: guard.ConnectionGuard, host: str = "10.0.0.1"
    ) -> tuple[Any, StringTransport] | None:
        """
        Returns:
            The guarded protocol of a new connection from ``host`` and its
            transport, or None if the guard refused it.
        """
        address = _address(host)
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport


class LimitTests(_GuardCase):
    """
    Connections over the total or per-peer limit are refused at once, and
    room frees up as connections close.
    """

    def test_total_limit(self) -> None:
        """Past max_connections a new connection is refused; a close makes room."""
        factory = self.make_guard(max_connections=2)
        first = self.connect(factory, "10.0.0.1")
        self.assertIsNotNone(self.connect(factory, "10.0.0.2"))
        self.assertIsNone(self.connect(factory, "10.0.0.3"))
        self.assertEqual(factory.open_connections, 2)
        assert first is not None
        first[0].connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.connect(factory, "10.0.0.3"))

    def test_per_peer_limit(self) -> None:
        """Past max_connections_per_peer one address is refused, others are not."""
        factory = self.make_guard(max_connections=10, max_connections_per_peer=2)
        held = [self.connect(factory, "10.0.0.1") for _ in range(2)]
        self.assertIsNone(self.connect(factory, "10.0.0.1"))
        self.assertIsNotNone(self.connect(factory, "10.0.0.2"))
        self.assertEqual(factory.open_by_peer, {"10.0.0.1": 2, "10.0.0.2": 1})
        assert held[0] is not None
        held[0][0].connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.connect(factory, "10.0.0.1"))

    def test_counts_go_away(self) -> None:
        """Once a peer's connections are all closed, it is no longer counted."""
        factory = self.make_guard()
        connected = self.connect(factory)
        assert connected is not None
        connected[0].connectionLost(Failure(Exception("gone")))
        self.assertEqual((factory.open_connections, factory.open_by_peer), (0, {}))

    def test_ipv4_through_ipv6(self) -> None:
        """An IPv4 peer seen on an IPv6 socket counts as its IPv4 address."""
        factory = self.make_guard(max_connections_per_peer=1)
        self.assertIsNotNone(self.connect(factory, "::ffff:10.0.0.1"))
        self.assertIsNone(self.connect(factory, "10.0.0.1"))
        self.assertIn("from 10.0.0.1:", "\n".join(self.logged))

    def test_wrapped_refusal(self) -> None:
        """A connection the wrapped factory refuses is refused and not counted."""

        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:  # noqa: N802
                return None

        factory = guard.ConnectionGuard(
            Refusing(),
            "Test server",
            guard.GuardLimits(),
            Clock(),
        )
        self.assertIsNone(factory.buildProtocol(_address("10.0.0.1")))
        self.assertEqual(factory.open_connections, 0)

    def test_passes_data_both_ways(self) -> None:
        """Bytes reach the protocol, and its writes reach the transport."""
        factory = self.make_guard()
        connected = self.connect(factory)
        assert connected is not None
        protocol, transport = connected
        protocol.dataReceived(b"in")
        self.assertEqual(protocol.wrappedProtocol.received, b"in")
        protocol.wrappedProtocol.transport.write(b"out")
        self.assertEqual(transport.value(), b"out")


class RefusalLogTests(_GuardCase):
    """
    Refusals are logged once per peer and minute, with a count, not once per
    connection.
    """

    def refusals(self) -> list[str]:
        return [line for line in self.logged if "refused" in line]

    def test_once_a_minute(self) -> None:
        """A flood from one peer logs one line at once and a count a minute later."""
        factory = self.make_guard(max_connections_per_peer=1)
        self.connect(factory, "10.0.0.9")
        for _ in range(50):
            self.assertIsNone(self.connect(factory, "10.0.0.9"))
            self.clock.advance(1)
        self.assertEqual(len(self.refusals()), 1)
        self.assertIn(
            "Test server: refused a connection from 10.0.0.9: it holds 1 "
            "connections, the most --max-connections-per-peer allows",
            self.refusals()[0],
        )
        self.clock.advance(10)
        self.assertEqual(len(self.refusals()), 2)
        self.assertIn(
            "Test server: refused 49 more connection(s) from 10.0.0.9 in the last "
            "minute",
            self.refusals()[1],
        )

    def test_quiet_minute_forgets(self) -> None:
        """After a minute without refusals, the next one is logged at once."""
        factory = self.make_guard(max_connections_per_peer=1)
        self.connect(factory, "10.0.0.9")
        self.connect(factory, "10.0.0.9")
        self.clock.advance(guard.REFUSAL_LOG_INTERVAL)
        self.assertEqual(len(self.refusals()), 1)
        self.clock.advance(guard.REFUSAL_LOG_INTERVAL * 3)
        self.assertEqual(len(self.refusals()), 1)
        self.connect(factory, "10.0.0.9")
        self.assertEqual(len(self.refusals()), 2)
        self.assertIn("refused a connection from 10.0.0.9", self.refusals()[1])

    def test_each_peer(self) -> None:
        """Each refused peer gets its own line."""
        factory = self.make_guard(max_connections=1)
        self.connect(factory, "10.0.0.1")
        for host in ("10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.3"):
            self.connect(factory, host)
        self.assertEqual(len(self.refusals()), 2)
        self.assertIn(
            "from 10.0.0.2: the listener holds 1 connections, the most "
            "--max-connections allows",
            self.refusals()[0],
        )
        self.assertIn("from 10.0.0.3", self.refusals()[1])

    def test_many_peers_counted_together(self) -> None:
        """Past MAX_PEERS_LOGGED peers in a minute, further ones share one line."""
        self.patch(guard, "MAX_PEERS_LOGGED", 2)
        factory = self.make_guard(max_connections=0)
        for number in range(10):
            self.connect(factory, f"10.0.1.{number}")
        self.assertEqual(len(self.refusals()), 3)
        self.assertIn("refused a connection from other peers", self.refusals()[2])
        self.clock.advance(guard.REFUSAL_LOG_INTERVAL)
        self.assertIn(
            "refused 7 more connection(s) from other peers", self.refusals()[3]
        )

    def test_counts_logged_at_stop(self) -> None:
        """Refusals counted but not yet logged are logged when the listener stops."""
        factory = self.make_guard(max_connections=0)
        factory.doStart()
        for _ in range(3):
            self.connect(factory, "10.0.0.1")
        factory.doStop()
        self.assertIn("refused 2 more connection(s) from 10.0.0.1", self.refusals()[1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnsentBoundTests(_GuardCase):
    """
    Data written while the real transport is full is counted, and past the
    bound the connection is cut; the protocol's producer follows the
    transport's pauses.
    """

    def setUp(self) -> None:
        factory = self.make_guard(max_unsent=1000)
        connected = self.connect(factory)
        assert connected is not None
        self.protocol, self.transport = connected
        self.above = self.protocol.wrappedProtocol.transport

    def test_registered_on_transport(self) -> None:
        """The guard is the real transport's streaming producer from the start."""
        self.assertIsNotNone(self.transport.producer)
        self.assertTrue(self.transport.streaming)

    def test_cut_past_bound(self) -> None:
        """Past max_unsent bytes written while the transport is full, it is cut."""
        self.transport.producer.pauseProducing()
        self.above.write(b"x" * 600)
        self.assertFalse(self.transport.disconnected)
        self.above.write(b"x" * 600)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(len(self.transport.value()), 600)
        self.above.write(b"x")
        self.assertEqual(len(self.transport.value()), 600)
        self.assertIn(
            "Test server: cut off 10.0.0.1:40000: more than 1000 bytes waited "
            "unread for it (--max-unsent sets the limit)",
            self.logged,
        )

    def test_drain_resets(self) -> None:
        """Once the transport drained, the count starts again."""
        self.transport.producer.pauseProducing()
        self.above.write(b"x" * 900)
        self.transport.producer.resumeProducing()
        self.above.write(b"x" * 5000)
        self.transport.producer.pauseProducing()
        self.transport.producer.pauseProducing()
        self.above.write(b"x" * 900)
        self.assertFalse(self.transport.disconnected)

    def test_not_counted_while_taken(self) -> None:
        """Whatever is written while the peer reads does not count."""
        self.above.write(b"x" * 100_000)
        self.assertFalse(self.transport.disconnected)

    def test_producer_follows(self) -> None:
        """The protocol's streaming producer pauses and resumes with the transport."""
        producer = _Producer()
        self.above.registerProducer(producer, True)
        self.transport.producer.pauseProducing()
        self.transport.producer.pauseProducing()
        self.transport.producer.resumeProducing()
        self.transport.producer.stopProducing()
        self.assertEqual(producer.calls, ["pause", "resume", "stop"])
        self.above.unregisterProducer()
        self.transport.producer.pauseProducing()
        self.assertEqual(producer.calls, ["pause", "resume", "stop"])

    def test_registered_while_full(self) -> None:
        """A producer registered while the transport is full is paused at once."""
        self.transport.producer.pauseProducing()
        producer = _Producer()
        self.above.registerProducer(producer, True)
        self.assertEqual(producer.calls, ["pause"])
        with self.assertRaises(RuntimeError):
            self.above.registerProducer(_Producer(), True)

    def test_pull_producer(self) -> None:
        """A pulling producer is handed to the transport, and taken back after."""
        producer = _Producer()
        self.above.registerProducer(producer, False)
        self.assertIs(self.transport.producer, producer)
        self.above.unregisterProducer()
        self.assertIsInstance(self.transport.producer, guard._SendBuffer)

    def test_stop_consuming(self) -> None:
        """stopConsuming forgets the producer above and closes the connection."""
        self.above.registerProducer(_Producer(), True)
        self.above.stopConsuming()
        self.assertTrue(self.transport.disconnecting)
        self.above.registerProducer(_Producer(), True)

    def test_transport_calls_pass(self) -> None:
        """Pausing reading and the peer's address go to the real transport."""
        self.above.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.above.getPeer(), self.transport.getPeer())


class CloseTests(_GuardCase):
    """
    A connection asked to close lets the real transport close it, and is cut
    if it cannot send what is queued within the close grace.
    """

    def setUp(self) -> None:
        factory = self.make_guard()
        connected = self.connect(factory)
        assert connected is not None
        self.protocol, self.transport = connected
        self.above = self.protocol.wrappedProtocol.transport

    def test_close_releases_transport(self) -> None:
        """loseConnection unregisters the guard, so the transport can close."""
        self.above.loseConnection()
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)
        self.assertFalse(self.transport.disconnected)

    def test_cut_after_grace(self) -> None:
        """A close not done within CLOSE_GRACE seconds becomes an abort."""
        self.above.loseConnection()
        self.clock.advance(guard.CLOSE_GRACE)
        self.assertTrue(self.transport.disconnected)
        self.assertTrue(any("did not take the last" in line for line in self.logged))

    def test_no_cut_once_closed(self) -> None:
        """A connection that closed in time leaves no timer behind."""
        self.above.loseConnection()
        self.protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HandshakeTimeoutTests(_GuardCase):
    """
    With a handshake timeout, a TLS connection whose handshake is not done in
    time is closed; a completed one is left alone.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.creator = support.server_creator(self.layout, mutual=False)

    def make_tls_guard(self, timeout: float) -> guard.ConnectionGuard:
        factory = self.make_guard(handshake_timeout=timeout)
        factory.wrappedFactory = TLSMemoryBIOFactory(
            self.creator, False, Factory.forProtocol(_Recorder), clock=self.clock
        )
        return factory

    def test_silent_client_closed(self) -> None:
        """A client that sends nothing is closed after the handshake timeout."""
        factory = self.make_tls_guard(5)
        connected = self.connect(factory)
        assert connected is not None
        protocol, transport = connected
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertIn(
            "Test server: closing 10.0.0.1:40000: no TLS handshake within 5 s "
            "(--handshake-timeout)",
            self.logged,
        )

    def test_completed_handshake_kept(self) -> None:
        """A client that completed its handshake stays past the timeout."""
        factory = self.make_tls_guard(5)
        client_tls = TLSMemoryBIOFactory(
            support.RawClientCreator(_client_context(self.layout)),
            True,
            ClientFactory.forProtocol(_Recorder),
            clock=self.clock,
        )
        server_protocol: list[Any] = []

        def server() -> Any:
            built = factory.buildProtocol(_address("10.0.0.1"))
            server_protocol.append(built)
            return built

        _, _, pump = iosim.connectedServerAndClient(
            server,
            lambda: client_tls.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        self.assertTrue(guard._handshake_done(server_protocol[0].wrappedProtocol))
        self.clock.advance(10)
        pump.flush()
        self.assertFalse(pump.serverIO.disconnecting)
        self.assertFalse(any("no TLS handshake" in line for line in self.logged))

    def test_plain_listener_no_deadline(self) -> None:
        """Without a handshake timeout, a silent connection stays."""
        factory = self.make_guard()
        connected = self.connect(factory)
        assert connected is not None
        self.clock.advance(3600)
        self.assertFalse(connected[1].disconnected)


def _client_context(layout: Any) -> Any:
    """
    Returns:
        A pyOpenSSL client context trusting the root's CA.
    """
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(layout.ca))
    return context


class _Flooder(Protocol):
    """
    A server protocol that answers each byte with 256 KiB, ignoring whether
    the peer reads: what a protocol without flow control does.
    """

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        for _ in data:
            self.transport.write(b"x" * 256 * 1024)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.factory.lost.callback(reason.value)  # type: ignore[attr-defined]


class _NeverReads(Protocol):
    """A client that stops reading at once and sends a byte now and then."""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.sent = 0
        self.call: Any = None
        self._send()

    def _send(self) -> None:
        if self.sent >= 200 or not self.transport.connected:  # type: ignore[attr-defined]
            return
        self.sent += 1
        self.transport.write(b"?")
        self.call = reactor.callLater(0.01, self._send)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.call is not None and self.call.active():
            self.call.cancel()


class LoopbackTests(TestCase):
    """
    Over a real loopback socket, the guard learns from Twisted's own
    transport when a peer does not read.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_never_reading_peer_cut(self) -> Any:
        """A peer that reads nothing is cut once max_unsent bytes wait for it."""
        logged = _capture_logs(self)
        server = Factory.forProtocol(_Flooder)
        server.lost = defer.Deferred()  # type: ignore[attr-defined]
        guarded = guard.ConnectionGuard(
            server, "Test server", guard.GuardLimits(max_unsent=2_000_000), reactor
        )
        port = reactor.listenTCP(0, guarded, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = ClientFactory.forProtocol(_NeverReads)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)
        reason = yield server.lost  # type: ignore[attr-defined]
        self.assertIsInstance(reason, error.ConnectionAborted)
        self.assertTrue(
            any("cut off 127.0.0.1:" in line for line in logged), "\n".join(logged)
        )
        self.assertEqual(guarded.open_connections, 0)


class SettingsTests(SynchronousTestCase):
    """
    The guard's options come from the command line and the settings file,
    and every listener of the service is guarded with them.
    """

    def test_every_listener_guarded(self) -> None:
        """Each listener's factory is a guard outside TLS; HTTPS times handshakes."""
        folder = support.temporary_folder("tls4d-guard-")
        chosen = settings.resolve(
            {
                "interface": "127.0.0.1",
                "https_port": 0,
                "http_port": 0,
                "app_port": 0,
                "sql_port": 0,
                "max_connections": 7,
                "max_connections_per_peer": 3,
                "max_unsent": 5000,
                "handshake_timeout": 4.0,
            },
            folder / "root",
        )
        top = service.build_service(chosen, reactor)
        expected = {
            "https": ("HTTPS web server", True, 4.0),
            "http": ("HTTP web server", False, None),
            "app": ("Application server", True, None),
            "sql": ("SQL server", True, None),
        }
        for name, (label, over_tls, handshake) in expected.items():
            factory = top.listener(name).factory
            assert isinstance(factory, guard.ConnectionGuard)
            self.assertEqual(factory.label, label)
            self.assertEqual(
                factory.limits,
                guard.GuardLimits(
                    max_connections=7,
                    max_connections_per_peer=3,
                    max_unsent=5000,
                    handshake_timeout=handshake,
                ),
            )
            self.assertEqual(
                isinstance(factory.wrappedFactory, TLSMemoryBIOFactory), over_tls
            )

    def test_defaults(self) -> None:
        """The limits default to 100 connections, 32 per peer and 4 MiB unsent."""
        defaults = settings.Settings()
        self.assertEqual(
            guard.limits_from(defaults),
            guard.GuardLimits(
                max_connections=100,
                max_connections_per_peer=32,
                max_unsent=4 * 1024 * 1024,
            ),
        )

    def test_command_line_and_file(self) -> None:
        """The options and the settings file's keys set the limits."""
        root = support.temporary_folder("tls4d-guard-") / "root"
        (root / "Settings").mkdir(parents=True)
        (root / "Settings" / "tls4d.toml").write_text(
            "max-connections-per-peer = 9\nmax_unsent = 2048\n"
        )
        from_file = settings.resolve({}, root)
        self.assertEqual(
            (from_file.max_connections_per_peer, from_file.max_unsent), (9, 2048)
        )
        options = tap.Options()
        options.parseOptions(
            [
                "--root",
                str(root),
                "--max-connections-per-peer",
                "5",
                "--max-unsent",
                "1",
            ]
        )
        self.assertEqual(
            (options.settings.max_connections_per_peer, options.settings.max_unsent),
            (5, 1),
        )
        text = str(tap.Options())
        for option in ("--max-connections-per-peer", "--max-unsent"):
            self.assertIn(option, text)

    def test_positive(self) -> None:
        """A limit of zero or less is refused, naming the option."""
        for name in ("max_connections", "max_connections_per_peer", "max_unsent"):
            with self.assertRaises(ConfigurationError) as caught:
                settings.check(settings.Settings(**{name: 0}))
            self.assertIn(
                f"{name.replace('_', '-')} must be positive", str(caught.exception)
            )


class OpenFilesTests(SynchronousTestCase):
    """
    A limit on open files too low for the connection limits is warned of.
    """

    def test_warns_when_too_few(self) -> None:
        """Four listeners of 100 connections need more than 300 files."""
        import resource

        logged = _capture_logs(self)
        self.patch(resource, "getrlimit", lambda which: (300, 300))
        guard.warn_if_few_files(4, guard.GuardLimits(max_connections=100))
        self.assertEqual(len(logged), 1)
        self.assertIn("This process may open 300 files", logged[0])
        self.assertIn("ulimit -n 464", logged[0])

    def test_quiet_when_enough(self) -> None:
        """With enough files, nothing is logged."""
        import resource

        logged = _capture_logs(self)
        self.patch(resource, "getrlimit", lambda which: (1024, 4096))
        guard.warn_if_few_files(4, guard.GuardLimits(max_connections=100))
        self.assertEqual(logged, [])
