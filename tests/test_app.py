"""
Tests for the application server, its client and the ``tls4d app`` command.

Most run in memory: TLS through `TLSMemoryBIOFactory` and `iosim`, time on
`task.Clock`. `EndToEndTests` starts a real listener on 127.0.0.1 and talks to
it with the real client and the real command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import ipaddress
import json
import os
import sys
import textwrap
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import IPAddressMismatch
from service_identity.hazmat import IPAddress_ID
from twisted.internet import defer, error, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests import support
from twisted_tls4d import pki, root, tls
from twisted_tls4d.app import command, wire
from twisted_tls4d.app.client import (
    AppClient,
    AppClientProtocol,
    AppConnectionError,
    connect,
    describe_tls_failure,
)
from twisted_tls4d.app.protocol import AppServerFactory, AppServerProtocol
from twisted_tls4d.app.wire import AppError
from twisted_tls4d.clienttls import ClientIdentity
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.root import RootLayout

PING = {"id": 1, "op": "ping"}


@functools.cache
def _root() -> RootLayout:
    """
    Returns:
        One bootstrapped server root for the whole module.
    """
    return support.make_root()


@functools.cache
def _alice() -> ClientIdentity:
    """
    Returns:
        A client identity signed by the module's root CA.
    """
    return support.make_client_identity(_root(), "alice")


@functools.cache
def _foreign() -> ClientIdentity:
    """
    Returns:
        A client identity signed by another CA, trusting the module's root
        for the server.
    """
    return support.trusting(support.make_foreign_identity("mallory"), _root())


def _issued_in_the_past(
    layout: RootLayout, name: str, *, client: bool, server_names: list[str]
) -> tuple[Path, Path]:
    """
    Write a key and a certificate signed by ``layout``'s CA that was valid
    for three days, ten days ago.

    Returns:
        The key file and the certificate file, in a new folder.
    """
    folder = support.temporary_folder("tls4d-expired-")
    key = pki.generate_private_key()
    issued = pki.utc_now() - datetime.timedelta(days=10)
    certificate = pki.issue_certificate(
        root.load_local_ca(layout),
        key.public_key(),
        name,
        client=client,
        server_names=server_names,
        days=3,
        now=issued,
    )
    pki.write_private_key(folder / "key.pem", key)
    pki.write_certificates(folder / "cert.pem", [certificate])
    return folder / "key.pem", folder / "cert.pem"


def expired_client_identity(layout: RootLayout) -> ClientIdentity:
    """
    Returns:
        A client identity signed by ``layout``'s CA, trusting it for the
        server, whose certificate expired a week ago.
    """
    key, cert = _issued_in_the_past(layout, "old", client=True, server_names=[])
    return ClientIdentity(key, cert, layout.ca)


def expired_server_creator(layout: RootLayout) -> tls.ServerConnectionCreator:
    """
    Returns:
        A server connection creator like the root's, but serving a
        certificate for localhost and 127.0.0.1 that expired a week ago.
    """
    key, cert = _issued_in_the_past(
        layout, "testhost", client=False, server_names=["localhost", "127.0.0.1"]
    )
    context = tls.build_context(
        tls.TLSPolicy(dh_parameters=layout.dhparams),
        tls.load_identity(cert, key),
        tls.load_client_cas(layout.ca),
    )
    return tls.ServerConnectionCreator(context)


class ScriptedServer(Protocol):
    """
    A server playing a part no tls4d server plays: it sends given bytes as
    soon as it can, closes at once, or says nothing at all.
    """

    def __init__(self, send: bytes, close: bool, ended: defer.Deferred[None]) -> None:
        self.send = send
        self.close = close
        self.ended = ended

    def connectionMade(self) -> None:  # noqa: N802
        """Send what there is to send, and close if told to."""
        if self.send:
            self.transport.write(self.send)  # type: ignore[union-attr]
        if self.close:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Let the test know this connection is over."""
        self.ended.callback(None)


class ScriptedServerFactory(Factory):
    """
    Builds `ScriptedServer` protocols and keeps a Deferred for the end of
    each connection.
    """

    def __init__(self, send: bytes = b"", close: bool = False) -> None:
        self.send = send
        self.close = close
        self.ended: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> ScriptedServer:  # noqa: N802
        """Build a server that plays the factory's part."""
        ended: defer.Deferred[None] = defer.Deferred()
        self.ended.append(ended)
        return ScriptedServer(self.send, self.close, ended)


def listen_scripted(
    case: TestCase,
    *,
    send: bytes = b"",
    close: bool = False,
    creator: tls.ServerConnectionCreator | None = None,
) -> int:
    """
    Listen on a free 127.0.0.1 port with a `ScriptedServer`, behind TLS if
    ``creator`` is given, until ``case`` ends and every connection is over.

    Returns:
        The port.
    """
    factory = ScriptedServerFactory(send, close)
    listening = reactor.listenTCP(
        0,
        TLSMemoryBIOFactory(creator, False, factory) if creator else factory,
        interface="127.0.0.1",
    )
    case.addCleanup(lambda: defer.gatherResults(factory.ended))
    case.addCleanup(listening.stopListening)
    return int(listening.getHost().port)


async def closed_port() -> int:
    """
    Returns:
        A 127.0.0.1 port that was free a moment ago and has nobody listening.
    """
    listening = reactor.listenTCP(
        0, Factory.forProtocol(Protocol), interface="127.0.0.1"
    )
    number = int(listening.getHost().port)
    await defer.maybeDeferred(listening.stopListening)
    return number


def _capture_logs(test: SynchronousTestCase) -> list[dict[str, Any]]:
    """
    Returns:
        A list that receives every log event until the test ends.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def _log_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(event) for event in events)


def _frame(payload: bytes) -> bytes:
    return wire.HEADER.pack(len(payload)) + payload


@implementer(IHandshakeListener)
class FrameCollector(Int32StringReceiver):
    """
    A bare client that sends raw frames and keeps every answer.
    """

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, send_on_handshake: bytes = b"") -> None:
        self.answers: list[Any] = []
        self.lost: Failure | None = None
        self.handshake_done = False
        self.send_on_handshake = send_on_handshake

    def handshakeCompleted(self) -> None:  # noqa: N802
        """Note the handshake, and send what was to be sent right after it."""
        self.handshake_done = True
        if self.send_on_handshake:
            self.transport.write(self.send_on_handshake)  # type: ignore[union-attr]

    def stringReceived(self, string: bytes) -> None:  # noqa: N802
        """Keep an answer."""
        self.answers.append(json.loads(string))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Keep why the connection ended."""
        self.lost = reason


class RecordingFactory(AppServerFactory):
    """
    An application server factory that keeps the protocols it builds, since
    the TLS layer lets go of its protocol when the connection ends.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.built: list[AppServerProtocol] = []

    def buildProtocol(self, addr: Any) -> AppServerProtocol:  # noqa: N802
        """Build the protocol and keep it."""
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class _Connection:
    """
    A client connected in memory to an application server.
    """

    def __init__(
        self,
        factory: Factory,
        client: Protocol,
        client_tls: Any,
        clock: Clock,
    ) -> None:
        self.clock = clock
        self.client = client
        self.factory = factory
        creator = support.server_creator(_root(), app=True)
        self.server_tls, self.client_tls, self.pump = support.connect_in_memory(
            factory, creator, client, client_tls, clock
        )

    @property
    def server(self) -> AppServerProtocol:
        assert isinstance(self.factory, RecordingFactory)
        return self.factory.built[-1]

    def write(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]
        self.pump.flush()

    def request(self, message: dict[str, Any]) -> Any:
        """
        Send one request and return the answer it got.
        """
        assert isinstance(self.client, FrameCollector)
        before = len(self.client.answers)
        self.write(wire.encode_frame(message))
        assert len(self.client.answers) == before + 1, self.client.answers[before:]
        return self.client.answers[-1]


class _InMemoryTestCase(SynchronousTestCase):
    """
    Connects in-memory clients to an application server.
    """

    def connect(
        self,
        identity: ClientIdentity | None = None,
        *,
        factory: RecordingFactory | None = None,
        client: Protocol | None = None,
        client_tls: Any = None,
    ) -> _Connection:
        clock = factory.clock if factory is not None else Clock()
        assert isinstance(clock, Clock)
        factory = factory or RecordingFactory(clock=clock)
        client = client or FrameCollector()
        if client_tls is None:
            client_tls = support.client_options(identity or _alice())
        return _Connection(factory, client, client_tls, clock)


class OperationTests(_InMemoryTestCase):
    """
    The operations of issue 2: ping, echo and whoami.
    """

    def test_ping(self) -> None:
        """A ping is answered "pong" under the request's id."""
        connection = self.connect()
        self.assertEqual(connection.request(PING), {"id": 1, "result": "pong"})

    def test_string_id(self) -> None:
        """A string id is carried back as it was sent."""
        connection = self.connect()
        answer = connection.request({"id": "req-7", "op": "ping"})
        self.assertEqual(answer, {"id": "req-7", "result": "pong"})

    def test_echo(self) -> None:
        """An echo's result is the request's args, non-ASCII text included."""
        connection = self.connect()
        args = {"text": "grüße, 世界", "n": [1, 2.5, None, True], "o": {"k": "v"}}
        answer = connection.request({"id": 2, "op": "echo", "args": args})
        self.assertEqual(answer, {"id": 2, "result": args})

    def test_echo_without_args(self) -> None:
        """An echo without args answers an empty object."""
        connection = self.connect()
        answer = connection.request({"id": 3, "op": "echo"})
        self.assertEqual(answer, {"id": 3, "result": {}})

    def test_whoami(self) -> None:
        """whoami shows the client certificate's subject and SHA-256 fingerprint."""
        connection = self.connect()
        answer = connection.request({"id": 4, "op": "whoami"})
        certificate = pki.load_certificates(_alice().cert)[0]
        self.assertEqual(answer["id"], 4)
        self.assertEqual(
            answer["result"],
            {
                "subject": "CN=alice",
                "common_name": "alice",
                "issuer": certificate.issuer.rfc4514_string(),
                "fingerprint_sha256": pki.fingerprint_sha256(certificate),
            },
        )

    def test_ping_refuses_args(self) -> None:
        """A ping with arguments gets invalid_args, and the connection stays open."""
        connection = self.connect()
        answer = connection.request({"id": 5, "op": "ping", "args": {"x": 1}})
        self.assertEqual(answer["id"], 5)
        self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS)
        self.assertEqual(connection.request(PING)["result"], "pong")

    def test_pipelined_requests(self) -> None:
        """Several requests in one write are each answered, in order."""
        connection = self.connect()
        frames = b"".join(
            wire.encode_frame({"id": n, "op": "echo", "args": {"n": n}})
            for n in range(5)
        )
        connection.write(frames)
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual(
            connection.client.answers, [{"id": n, "result": {"n": n}} for n in range(5)]
        )

    def test_each_answer_one_write(self) -> None:
        """Each answer leaves the protocol in a single transport.write."""
        protocol = RecordingFactory(clock=Clock()).buildProtocol(None)
        transport = StringTransport()
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        protocol.makeConnection(transport)
        protocol.peer_certificate = pki.load_certificates(_alice().cert)[0]
        protocol.dataReceived(wire.encode_frame(PING) + _frame(b"[]"))
        self.assertEqual(len(writes), 2)
        self.assertEqual(json.loads(writes[0][4:]), {"id": 1, "result": "pong"})

    def test_internal_error(self) -> None:
        """A handler that raises gets internal_error, is logged, and serving goes on."""
        factory = RecordingFactory(clock=Clock())

        def boom(request: Any) -> Any:
            raise RuntimeError("handler bug")

        factory.ops["boom"] = boom
        connection = self.connect(factory=factory)
        answer = connection.request({"id": 9, "op": "boom"})
        self.assertEqual(answer["error"]["code"], wire.INTERNAL_ERROR)
        self.assertNotIn("handler bug", answer["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(connection.request(PING)["result"], "pong")

    def test_unencodable_result(self) -> None:
        """A result JSON cannot express gets internal_error instead of a crash."""
        factory = RecordingFactory(clock=Clock())
        factory.ops["odd"] = lambda request: {"value": object()}
        connection = self.connect(factory=factory)
        answer = connection.request({"id": 10, "op": "odd"})
        self.assertEqual(answer, {"id": 10, "error": answer["error"]})
        self.assertEqual(answer["error"]["code"], wire.INTERNAL_ERROR)
        self.assertEqual(connection.request(PING)["result"], "pong")


class RefusalTests(_InMemoryTestCase):
    """
    Clients without an acceptable certificate are refused before any request
    is served.
    """

    def assert_refused(self, connection: _Connection) -> None:
        """Assert that the server closed ``connection`` and served nothing."""
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual(connection.client.answers, [])
        self.assertIsNotNone(connection.client.lost)
        self.assertIsNone(connection.server.peer_certificate)
        self.assertEqual(connection.server.requests_answered, 0)

    def test_no_client_certificate(self) -> None:
        """A client with no certificate is refused; its request is never served."""
        events = _capture_logs(self)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(_root().ca))
        context.set_verify(
            SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok)
        )
        client = FrameCollector(send_on_handshake=wire.encode_frame(PING))
        connection = self.connect(
            client=client, client_tls=support.RawClientCreator(context)
        )
        connection.pump.flush()
        self.assertTrue(client.handshake_done, "TLS 1.3 lets the client finish")
        self.assert_refused(connection)
        self.assertIn("application server: refused TLS handshake", _log_text(events))

    def test_foreign_ca(self) -> None:
        """A certificate from a CA outside Resources/ca.pem is refused and logged."""
        events = _capture_logs(self)
        client = FrameCollector(send_on_handshake=wire.encode_frame(PING))
        connection = self.connect(_foreign(), client=client)
        connection.pump.flush()
        self.assert_refused(connection)
        self.assertIn("does not hold", _log_text(events))

    def test_data_before_handshake(self) -> None:
        """Bytes arriving before a verified certificate close the connection."""
        protocol = RecordingFactory(clock=Clock()).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode_frame(PING))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)


class BadFrameTests(_InMemoryTestCase):
    """
    Frames that are not requests get an error answer and never crash the
    server.
    """

    def assert_error_then_ping(
        self, payload: bytes, code: str, request_id: Any = None
    ) -> None:
        """Assert that ``payload`` gets error ``code`` and a later ping works."""
        connection = self.connect()
        connection.write(_frame(payload))
        assert isinstance(connection.client, FrameCollector)
        [answer] = connection.client.answers
        self.assertEqual(answer["id"], request_id, payload)
        self.assertEqual(answer["error"]["code"], code, payload)
        self.assertIsInstance(answer["error"]["message"], str)
        self.assertIsNone(connection.client.lost)
        self.assertEqual(connection.request(PING), {"id": 1, "result": "pong"})

    def test_malformed_json(self) -> None:
        """A payload that is not JSON gets invalid_json and the connection goes on."""
        self.assert_error_then_ping(b'{"id": 1, "op": "ping"', wire.INVALID_JSON)

    def test_not_utf8(self) -> None:
        """A payload that is not UTF-8 gets invalid_json."""
        self.assert_error_then_ping(b'{"id": 1, "op": "\xff"}', wire.INVALID_JSON)

    def test_nan(self) -> None:
        """NaN, which is not JSON, gets invalid_json."""
        self.assert_error_then_ping(
            b'{"id": 1, "op": "echo", "args": {"x": NaN}}', wire.INVALID_JSON
        )

    def test_huge_number(self) -> None:
        """A number beyond a double's range gets invalid_json."""
        self.assert_error_then_ping(
            b'{"id": 1, "op": "echo", "args": {"x": 1e999}}', wire.INVALID_JSON
        )

    def test_empty_payload(self) -> None:
        """An empty payload gets invalid_json."""
        self.assert_error_then_ping(b"", wire.INVALID_JSON)

    def test_json_array(self) -> None:
        """A JSON array gets not_an_object and the connection goes on."""
        self.assert_error_then_ping(b'[{"id": 1, "op": "ping"}]', wire.NOT_AN_OBJECT)

    def test_json_string(self) -> None:
        """A JSON string gets not_an_object."""
        self.assert_error_then_ping(b'"ping"', wire.NOT_AN_OBJECT)

    def test_missing_id(self) -> None:
        """A request without an id gets invalid_request with a null id."""
        self.assert_error_then_ping(b'{"op": "ping"}', wire.INVALID_REQUEST)

    def test_unusable_id(self) -> None:
        """An id that is neither string nor integer gets invalid_request."""
        for raw_id in (b"null", b"true", b"1.5", b"[1]", b"{}"):
            self.assert_error_then_ping(
                b'{"id": ' + raw_id + b', "op": "ping"}', wire.INVALID_REQUEST
            )

    def test_missing_op(self) -> None:
        """A request without an op gets invalid_request under its id."""
        self.assert_error_then_ping(b'{"id": 7}', wire.INVALID_REQUEST, 7)

    def test_op_not_string(self) -> None:
        """An op that is not a string gets invalid_request under its id."""
        self.assert_error_then_ping(b'{"id": 7, "op": 3}', wire.INVALID_REQUEST, 7)

    def test_unknown_op(self) -> None:
        """An unknown op gets unknown_op under its id, naming the known ops."""
        self.assert_error_then_ping(b'{"id": 8, "op": "drop"}', wire.UNKNOWN_OP, 8)

    def test_args_not_object(self) -> None:
        """Args that are not an object get invalid_args under the request's id."""
        self.assert_error_then_ping(
            b'{"id": 8, "op": "echo", "args": [1, 2]}', wire.INVALID_ARGS, 8
        )

    def test_deep_nesting(self) -> None:
        """Deeply nested args get an answer at every depth, never a crash."""
        connection = self.connect()
        assert isinstance(connection.client, FrameCollector)
        for number, depth in enumerate((10, 500, 900, 980, 1000, 5000, 200_000)):
            args = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
            payload = b'{"id": %d, "op": "echo", "args": %s}' % (number, args)
            connection.write(_frame(payload))
            answer = connection.client.answers[-1]
            self.assertEqual(len(connection.client.answers), number + 1)
            self.assertTrue("result" in answer or "error" in answer, depth)
        self.assertIsNone(connection.client.lost)
        self.assertEqual(connection.request(PING)["result"], "pong")

    def test_lone_surrogate(self) -> None:
        """An escaped lone surrogate is echoed back as valid JSON."""
        connection = self.connect()
        connection.write(_frame(b'{"id": 1, "op": "echo", "args": {"s": "\\ud800"}}'))
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual(
            connection.client.answers, [{"id": 1, "result": {"s": "\ud800"}}]
        )

    def test_bad_frame_logged_without_payload(self) -> None:
        """A bad frame is logged with the peer and the problem, not its contents."""
        events = _capture_logs(self)
        connection = self.connect()
        connection.write(_frame(b'{"password": "s3cret-value", '))
        text = _log_text(events)
        self.assertIn("refused a frame from", text)
        self.assertIn("(alice)", text)
        self.assertIn(wire.INVALID_JSON, text)
        self.assertNotIn("s3cret", text)

    def test_oversized_frame(self) -> None:
        """A length header just over the limit gets frame_too_large and a close."""
        events = _capture_logs(self)
        connection = self.connect()
        limit = wire.DEFAULT_MAX_FRAME_SIZE
        connection.write(wire.HEADER.pack(limit + 1) + b"x" * 100)
        assert isinstance(connection.client, FrameCollector)
        [answer] = connection.client.answers
        self.assertEqual(answer["id"], None)
        self.assertEqual(answer["error"]["code"], wire.FRAME_TOO_LARGE)
        self.assertIn(str(limit + 1), answer["error"]["message"])
        self.assertIsNotNone(connection.client.lost)
        self.assertIn(wire.FRAME_TOO_LARGE, _log_text(events))

    def test_oversized_frame_other_clients_served(self) -> None:
        """After closing one client for a large frame, the server serves others."""
        factory = RecordingFactory(clock=Clock(), max_frame_size=64)
        first = self.connect(factory=factory)
        first.write(wire.HEADER.pack(65))
        second = self.connect(factory=factory)
        self.assertEqual(second.request(PING)["result"], "pong")

    def test_frame_at_limit(self) -> None:
        """A frame exactly at the size limit is served."""
        factory = RecordingFactory(clock=Clock(), max_frame_size=64)
        connection = self.connect(factory=factory)
        payload = b'{"id": 1, "op": "ping"}'.ljust(64)
        connection.write(_frame(payload))
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual(connection.client.answers, [{"id": 1, "result": "pong"}])
        self.assertIsNone(connection.client.lost)

    def test_split_at_every_byte(self) -> None:
        """A frame split in two at any byte boundary still parses."""
        connection = self.connect()
        assert isinstance(connection.client, FrameCollector)
        frame = wire.encode_frame({"id": 0, "op": "echo", "args": {"k": "v"}})
        for split in range(1, len(frame)):
            connection.write(frame[:split])
            self.assertEqual(len(connection.client.answers), split - 1)
            connection.write(frame[split:])
            self.assertEqual(len(connection.client.answers), split)
        self.assertEqual(connection.client.answers[-1], {"id": 0, "result": {"k": "v"}})

    def test_byte_by_byte(self) -> None:
        """Two frames sent one byte per write are both answered."""
        connection = self.connect()
        data = wire.encode_frame(PING) + wire.encode_frame({"id": 2, "op": "ping"})
        for index in range(len(data)):
            connection.write(data[index : index + 1])
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual([a["id"] for a in connection.client.answers], [1, 2])

    def test_factory_refuses_impossible_settings(self) -> None:
        """The factory refuses a frame size or timeout that cannot work."""
        for kwargs in (
            {"max_frame_size": 0},
            {"max_frame_size": 2**32},
            {"handshake_timeout": 0},
            {"idle_timeout": -1},
        ):
            with self.assertRaises(ValueError):
                AppServerFactory(clock=Clock(), **kwargs)


class FlowControlTests(SynchronousTestCase):
    """
    A client that does not read its answers stops the server reading its
    requests.
    """

    def test_paused_protocol_serves_nothing(self) -> None:
        """While its transport pauses it, the server reads and answers no frame."""
        protocol = RecordingFactory(clock=Clock()).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(transport.producer, protocol)
        self.assertTrue(transport.streaming)
        protocol.peer_certificate = pki.load_certificates(_alice().cert)[0]

        protocol.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(wire.encode_frame(PING) * 3)
        self.assertEqual(transport.value(), b"")

        protocol.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(protocol.requests_answered, 3)


@implementer(IHandshakeListener)
class _SilentClient(Protocol):
    lost: Failure | None = None
    handshake_done = False

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshake_done = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Keep why the connection ended."""
        self.lost = reason


class TimeoutTests(_InMemoryTestCase):
    """
    Silent connections are closed: before the handshake and when idle.
    """

    def test_handshake_timeout(self) -> None:
        """A client that never starts TLS is closed after the handshake timeout."""
        events = _capture_logs(self)
        clock = Clock()
        factory = RecordingFactory(clock=clock, handshake_timeout=10.0)
        tls_factory = TLSMemoryBIOFactory(
            support.server_creator(_root(), app=True), False, factory, clock=clock
        )
        client = _SilentClient()
        _, _, pump = iosim.connectedServerAndClient(
            lambda: tls_factory.buildProtocol(None),
            lambda: client,
            greet=False,
            clock=clock,
        )
        pump.flush()
        clock.advance(9.9)
        pump.flush()
        self.assertIsNone(client.lost)
        clock.advance(0.2)
        pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertIn("TLS handshake timeout", _log_text(events))

    def test_idle_timeout(self) -> None:
        """An authenticated client that stays silent is closed; activity resets it."""
        clock = Clock()
        factory = RecordingFactory(clock=clock, idle_timeout=600.0)
        connection = self.connect(factory=factory)
        clock.advance(599)
        self.assertEqual(connection.request(PING)["result"], "pong")
        clock.advance(599)
        connection.pump.flush()
        assert isinstance(connection.client, FrameCollector)
        self.assertIsNone(connection.client.lost)
        clock.advance(2)
        connection.pump.flush()
        self.assertIsNotNone(connection.client.lost)


class _SwallowingServer(Protocol):
    """A server that reads requests and never answers."""


class ClientTests(_InMemoryTestCase):
    """
    The client API: calls, error answers and lost connections.
    """

    def connect_client(
        self,
        identity: ClientIdentity | None = None,
        factory: Factory | None = None,
    ) -> tuple[AppClient, _Connection]:
        """Connect an `AppClient` in memory to a server built by ``factory``."""
        protocol = AppClientProtocol(peer="testhost:19813", identity=identity)
        connection = _Connection(
            factory or RecordingFactory(clock=Clock()),
            protocol,
            support.client_options(identity or _alice()),
            Clock(),
        )
        return AppClient(protocol), connection

    def test_call_results(self) -> None:
        """Calls fire with their results, matched to their requests by id."""
        client, connection = self.connect_client()
        ping = client.call("ping")
        echo = client.call("echo", greeting="hello", op="named op", n=[1, 2])
        whoami = client.call("whoami")
        connection.pump.flush()
        self.assertEqual(self.successResultOf(ping), "pong")
        self.assertEqual(
            self.successResultOf(echo),
            {"greeting": "hello", "op": "named op", "n": [1, 2]},
        )
        self.assertEqual(self.successResultOf(whoami)["common_name"], "alice")

    def test_error_answer(self) -> None:
        """An error answer fails the call with AppError carrying code and message."""
        client, connection = self.connect_client()
        call = client.call("drop_tables")
        connection.pump.flush()
        error = self.failureResultOf(call, AppError).value
        self.assertEqual(error.code, wire.UNKNOWN_OP)
        self.assertIn("'drop_tables'", error.message)
        self.assertEqual(error.message + " (error unknown_op)", str(error))
        ping = client.call("ping")
        connection.pump.flush()
        self.assertEqual(self.successResultOf(ping), "pong")

    def test_unencodable_args(self) -> None:
        """Arguments JSON cannot express fail the call with ValueError, unsent."""
        client, connection = self.connect_client()
        self.failureResultOf(client.call("echo", x=object()), ValueError)
        self.failureResultOf(client.call("echo", x=float("nan")), ValueError)
        connection.pump.flush()
        self.assertEqual(connection.server.requests_answered, 0)

    def test_lost_connection_fails_pending_calls(self) -> None:
        """A lost connection fails every pending call with a clear error."""
        client, connection = self.connect_client(
            factory=Factory.forProtocol(_SwallowingServer)
        )
        first = client.call("ping")
        second = client.call("whoami")
        connection.pump.flush()
        self.assertNoResult(first)
        connection.server_tls.transport.loseConnection()
        connection.pump.flush()
        for call, op in ((first, "ping"), (second, "whoami")):
            error = self.failureResultOf(call, AppConnectionError).value
            self.assertIn("testhost:19813", str(error))
            self.assertIn(f"before the answer to {op!r}", str(error))
        later = self.failureResultOf(client.call("ping"), AppConnectionError).value
        self.assertIn("testhost:19813", str(later))

    def test_close(self) -> None:
        """close() fails pending calls and fires once the connection is closed."""
        client, connection = self.connect_client(
            factory=Factory.forProtocol(_SwallowingServer)
        )
        pending = client.call("ping")
        connection.pump.flush()
        closed = client.close()
        connection.pump.flush()
        self.assertIsNone(self.successResultOf(closed))
        error = self.failureResultOf(pending, AppConnectionError).value
        self.assertIn("closed before the answer", str(error))
        self.failureResultOf(client.call("ping"), AppConnectionError)

    def test_refused_certificate(self) -> None:
        """
        A server refusing the client's certificate fails the call with one
        sentence; OpenSSL's own words stay in the error's detail.
        """
        client, connection = self.connect_client(_foreign())
        call = client.call("ping")
        connection.pump.flush()
        error = self.failureResultOf(call, AppConnectionError).value
        self.assertEqual(
            str(error),
            "The TLS handshake with testhost:19813 failed: the server refused this "
            "client's certificate: the server does not trust the CA that issued "
            "it; use an identity from 'tls4d client' for that server's root.",
        )
        self.assertIn("alert unknown ca", error.detail or "")

    def test_untrusted_server(self) -> None:
        """A server certificate from a CA the client does not trust fails TLS."""
        stranger = support.make_foreign_identity("stranger")
        protocol = AppClientProtocol(peer="testhost:19813", identity=stranger)
        handshake = protocol.wait_for_handshake()
        _Connection(
            RecordingFactory(clock=Clock()),
            protocol,
            support.client_options(stranger),
            Clock(),
        )
        error = self.failureResultOf(handshake, AppConnectionError).value
        self.assertEqual(
            str(error),
            "The TLS handshake with testhost:19813 failed: the server's "
            f"certificate is not signed by the CA in {stranger.ca}.",
        )
        self.assertIn("certificate verify failed", error.detail or "")

    def test_host_not_covered(self) -> None:
        """
        Dialling an address the server's certificate does not cover fails
        the handshake naming that address and the fix, without Python's
        representation of service-identity's error.
        """
        protocol = AppClientProtocol(peer="127.0.0.2:19813", host="127.0.0.2")
        handshake = protocol.wait_for_handshake()
        _Connection(
            RecordingFactory(clock=Clock()),
            protocol,
            support.client_options(_alice(), host="127.0.0.2"),
            Clock(),
        )
        error = self.failureResultOf(handshake, AppConnectionError).value
        self.assertEqual(
            str(error),
            "The TLS handshake with 127.0.0.2:19813 failed: the server's "
            "certificate does not cover the host name or address dialled "
            "(127.0.0.2); use --host with a name it covers.",
        )
        self.assertIn("IPAddressMismatch", error.detail or "")

    def test_expired_client_certificate(self) -> None:
        """A server refusing an expired client certificate is reported as such."""
        expired = expired_client_identity(_root())
        client, connection = self.connect_client(expired)
        call = client.call("ping")
        connection.pump.flush()
        error = self.failureResultOf(call, AppConnectionError).value
        self.assertEqual(
            str(error),
            "The TLS handshake with testhost:19813 failed: this client's "
            f"certificate ({expired.cert}) has expired; issue a new one with "
            "'tls4d client'.",
        )

    def test_expired_server_certificate(self) -> None:
        """A server whose certificate expired is told apart from an unknown CA."""
        protocol = AppClientProtocol(peer="testhost:19813", identity=_alice())
        handshake = protocol.wait_for_handshake()
        support.connect_in_memory(
            RecordingFactory(clock=Clock()),
            expired_server_creator(_root()),
            protocol,
            support.client_options(_alice()),
        )
        message = str(self.failureResultOf(handshake, AppConnectionError).value)
        self.assertIn("failed: the server's certificate expired on ", message)
        self.assertTrue(message.endswith(" (UTC)."), message)

    def test_frame_too_large_fails_calls(self) -> None:
        """A request over the server's limit fails with frame_too_large."""
        client, connection = self.connect_client(
            factory=RecordingFactory(clock=Clock(), max_frame_size=100)
        )
        call = client.call("echo", data="x" * 200)
        connection.pump.flush()
        self.assertEqual(
            self.failureResultOf(call, AppError).value.code, wire.FRAME_TOO_LARGE
        )
        self.failureResultOf(client.call("ping"), AppConnectionError)


class ClientProtocolTests(SynchronousTestCase):
    """
    The client protocol against answers a correct server never sends.
    """

    def setUp(self) -> None:
        """Connect a client protocol to a string transport, handshake done."""
        self.transport = StringTransport()
        self.protocol = AppClientProtocol(peer="example:1")
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()

    def test_request_frame(self) -> None:
        """A call writes one frame holding id, op and args."""
        self.protocol.call("echo", {"a": 1})
        data = self.transport.value()
        (length,) = wire.HEADER.unpack(data[:4])
        self.assertEqual(length, len(data) - 4)
        self.assertEqual(
            json.loads(data[4:]), {"id": 1, "op": "echo", "args": {"a": 1}}
        )

    def test_unknown_id_ignored(self) -> None:
        """An answer to no pending request is ignored."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(wire.encode_frame({"id": 99, "result": "pong"}))
        self.assertNoResult(call)
        self.protocol.dataReceived(wire.encode_frame({"id": 1, "result": "pong"}))
        self.assertEqual(self.successResultOf(call), "pong")

    def test_malformed_answer(self) -> None:
        """An answer that is not JSON drops the connection and fails pending calls."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(_frame(b"not json"))
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(Failure(Exception("aborted")))
        error = self.failureResultOf(call, AppConnectionError).value
        self.assertIn("not valid JSON", str(error))

    def test_answer_without_result(self) -> None:
        """An answer with neither result nor error fails its call."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(wire.encode_frame({"id": 1}))
        self.failureResultOf(call, AppConnectionError)

    def test_malformed_error(self) -> None:
        """A malformed error object still fails the call with AppError."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(wire.encode_frame({"id": 1, "error": "bad"}))
        self.assertEqual(self.failureResultOf(call, AppError).value.code, "unknown")

    def test_cancel_forgets_call(self) -> None:
        """A cancelled call's late answer is ignored."""
        call = self.protocol.call("ping", {})
        call.cancel()
        self.failureResultOf(call, defer.CancelledError)
        self.protocol.dataReceived(wire.encode_frame({"id": 1, "result": "pong"}))

    def test_sql_server_greeting(self) -> None:
        """
        The SQL server's greeting, read as a frame length, is reported at
        once as another protocol, naming the peer and the likely cause.
        """
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(b'{"hello":{"protocol":1,"server":"tls4d"}}\n')
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(
            str(self.failureResultOf(call, AppConnectionError).value),
            "example:1 does not speak the application protocol: it greets like "
            "the tls4d SQL server; is that the application server's port (19813 "
            "by default)?",
        )
        later = self.failureResultOf(self.protocol.call("ping", {}))
        self.assertIn("does not speak the application protocol", str(later.value))

    def test_other_protocol(self) -> None:
        """Text where a frame length belongs is shown as another protocol."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(b"HTTP/1.1 400 Bad")
        self.protocol.dataReceived(b" Request\r\n\r\n")
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(
            str(self.failureResultOf(call, AppConnectionError).value),
            "example:1 does not speak the application protocol: it sent "
            "'HTTP/1.1 400 Bad Request' where an answer belongs; is that the "
            "application server's port (19813 by default)?",
        )

    def test_answer_over_limit(self) -> None:
        """A binary length over the client's limit is reported as too large."""
        call = self.protocol.call("ping", {})
        self.protocol.dataReceived(wire.HEADER.pack(65 * 1024 * 1024))
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        message = str(self.failureResultOf(call, AppConnectionError).value)
        self.assertIn("an answer of 68157440 bytes, over this client's limit", message)


class TLSFailureWordingTests(SynchronousTestCase):
    """
    `describe_tls_failure`, which words TLS failures for both clients.
    """

    identity = ClientIdentity.from_directory(Path("id"))

    def describe(self, value: BaseException, **kwargs: Any) -> str | None:
        """Describe ``value`` for a client of ``identity`` that dialled 127.0.0.2."""
        return describe_tls_failure(
            value, host="127.0.0.2", identity=self.identity, **kwargs
        )

    def test_openssl_reasons(self) -> None:
        """Each common OpenSSL reason becomes a sentence naming the fix."""
        cases = {
            "tlsv1 alert unknown ca": "the server refused this client's "
            "certificate: the server does not trust the CA that issued it; use an "
            "identity from 'tls4d client' for that server's root",
            "tls alert certificate expired": "this client's certificate "
            "(id/cert.pem) has expired; issue a new one with 'tls4d client'",
            "certificate verify failed": "the server's certificate is not signed "
            "by the CA in id/ca.pem",
            "tlsv13 alert certificate required": "the server requires a client "
            "certificate and got none it accepts",
            "wrong version number": "the server does not speak TLS on this port",
            "tlsv1 alert protocol version": "the server accepts none of the TLS "
            "versions this client offers",
            "sslv3 alert illegal parameter": "TLS failed (sslv3 alert illegal "
            "parameter)",
        }
        for reason, expected in cases.items():
            error = SSL.Error([("SSL routines", "", reason)])
            self.assertEqual(self.describe(error), expected, reason)

    def test_host_mismatch(self) -> None:
        """service-identity's error becomes the address dialled and the fix."""
        mismatch = IPAddressMismatch(
            mismatched_id=IPAddress_ID(ipaddress.ip_address("127.0.0.2"))
        )
        self.assertEqual(
            self.describe(VerificationError(errors=[mismatch])),
            "the server's certificate does not cover the host name or address "
            "dialled (127.0.0.2); use --host with a name it covers",
        )

    def test_server_certificate_dates(self) -> None:
        """A failed verification names an expired or future server certificate."""
        layout = _root()
        _, cert = _issued_in_the_past(
            layout, "testhost", client=False, server_names=["localhost"]
        )
        expired = pki.load_certificates(cert)[0]
        verify_failed = SSL.Error([("SSL routines", "", "certificate verify failed")])
        expiry = expired.not_valid_after_utc
        self.assertEqual(
            self.describe(verify_failed, server_certificate=expired),
            f"the server's certificate expired on {expiry:%Y-%m-%d} (UTC)",
        )
        key = pki.generate_private_key()
        start = pki.utc_now() + datetime.timedelta(days=2)
        future = pki.issue_certificate(
            root.load_local_ca(layout),
            key.public_key(),
            "testhost",
            server_names=["localhost"],
            now=start,
        )
        self.assertIn(
            "is not valid before",
            self.describe(verify_failed, server_certificate=future),
        )
        current = pki.load_certificates(layout.cert)[0]
        self.assertEqual(
            self.describe(verify_failed, server_certificate=current),
            "the server's certificate is not signed by the CA in id/ca.pem",
        )

    def test_not_tls(self) -> None:
        """Other failures are left to the caller."""
        self.assertIsNone(self.describe(error.ConnectionRefusedError()))
        self.assertIsNone(self.describe(error.ConnectionDone()))


class WireTests(SynchronousTestCase):
    """
    The frame encoding, as docs/app-protocol.md shows it.
    """

    def test_documented_example(self) -> None:
        """The worked example of docs/app-protocol.md encodes to its bytes."""
        self.assertEqual(
            wire.encode_frame({"id": 1, "op": "ping"}).hex(" "),
            "00 00 00 14 7b 22 69 64 22 3a 31 2c 22 6f 70 22 3a 22 70 69 6e 67 22 7d",
        )
        self.assertEqual(
            wire.encode_frame({"id": 1, "result": "pong"}).hex(" "),
            "00 00 00 18 7b 22 69 64 22 3a 31 2c 22 72 65 73 75 6c 74 22 3a 22 70 6f "
            "6e 67 22 7d",
        )

    def test_error_codes_documented(self) -> None:
        """Every error code appears in docs/app-protocol.md."""
        doc = Path(__file__).parent.parent / "docs" / "app-protocol.md"
        text = doc.read_text(encoding="utf-8")
        for code in wire.ERROR_CODES:
            self.assertIn(f"`{code}`", text)


class CommandTests(SynchronousTestCase):
    """
    The arguments of ``tls4d app``.
    """

    def parse(self, *argv: str) -> argparse.Namespace:
        """Parse ``tls4d app ARGV``."""
        parser = argparse.ArgumentParser(prog="tls4d")
        commands = parser.add_subparsers(required=True)
        command.add_parser(commands)
        return parser.parse_args(["app", *argv])

    def parse_error(self, *argv: str) -> str:
        """Parse ``tls4d app ARGV``, expecting misuse; return what argparse printed."""
        stderr = io.StringIO()
        with redirect_stderr(stderr), self.assertRaises(SystemExit) as raised:
            self.parse(*argv)
        self.assertEqual(raised.exception.code, 2)
        return stderr.getvalue()

    def test_defaults(self) -> None:
        """ping defaults to localhost, port 19813, and no arguments."""
        args = self.parse("ping", "--identity", ".")
        self.assertEqual(
            (args.host, args.port, args.app_op), ("localhost", 19813, "ping")
        )
        self.assertEqual(command.call_arguments(args), {})
        self.assertIs(args.run, command.run)

    def test_options_before_operation(self) -> None:
        """The options may come before the operation's name."""
        args = self.parse("--port", "1234", "--host", "h", "--identity", "d", "whoami")
        self.assertEqual((args.host, args.port, args.app_op), ("h", 1234, "whoami"))
        self.assertEqual(args.identity, Path("d"))
        self.assertEqual(args.timeout, 30.0)

    def test_options_on_both_sides(self) -> None:
        """Options after the operation's name add to those before, and win."""
        args = self.parse("--port", "1234", "--key", "k", "echo", "a=1", "--port", "99")
        self.assertEqual((args.host, args.port), ("localhost", 99))
        self.assertEqual(args.key, Path("k"))
        self.assertEqual(command.call_arguments(args), {"a": 1})

    def test_identity_folder(self) -> None:
        """--identity DIR names key.pem, cert.pem and ca.pem in DIR."""
        folder = _alice().key.parent
        args = self.parse("whoami", "--identity", str(folder))
        self.assertEqual(
            command.identity_from_args(args), ClientIdentity.from_directory(folder)
        )

    def test_identity_files_override(self) -> None:
        """--key, --cert and --ca override the folder's files."""
        folder = _alice().key.parent
        args = self.parse("ping", "--identity", str(folder), "--ca", "/other/ca.pem")
        identity = command.identity_from_args(args)
        self.assertEqual(identity.ca, Path("/other/ca.pem"))
        self.assertEqual(identity.key, folder / "key.pem")

    def test_identity_files(self) -> None:
        """--key, --cert and --ca together suffice without a folder."""
        args = self.parse("ping", "--key", "k", "--cert", "c", "--ca", "a")
        self.assertEqual(
            command.identity_from_args(args),
            ClientIdentity(Path("k"), Path("c"), Path("a")),
        )

    def test_identity_missing(self) -> None:
        """Without an identity the command names the missing options."""
        args = self.parse("ping", "--key", "k")
        with self.assertRaises(ConfigurationError) as raised:
            command.identity_from_args(args)
        self.assertIn("--cert, --ca missing", str(raised.exception))

    def test_identity_not_a_folder(self) -> None:
        """An --identity that is not a folder is named in the error."""
        args = self.parse("ping", "--identity", "/nonexistent/alice")
        with self.assertRaises(ConfigurationError) as raised:
            command.identity_from_args(args)
        self.assertIn("/nonexistent/alice", str(raised.exception))

    def test_echo_key_values(self) -> None:
        """echo's KEY=VALUE values are JSON when they parse, strings otherwise."""
        args = self.parse(
            "echo",
            "n=3",
            "flag=true",
            "list=[1,2]",
            "name=alice",
            "empty=",
            "eq=a=b",
            "--host",
            "db.example.com",
            "--port",
            "1234",
        )
        self.assertEqual(
            command.call_arguments(args),
            {
                "n": 3,
                "flag": True,
                "list": [1, 2],
                "name": "alice",
                "empty": "",
                "eq": "a=b",
            },
        )
        self.assertEqual((args.host, args.port), ("db.example.com", 1234))

    def test_echo_json_object(self) -> None:
        """echo takes a JSON object, merged with KEY=VALUE pairs."""
        args = self.parse("echo", '{"a": {"b": [1]}}', "c=x")
        self.assertEqual(command.call_arguments(args), {"a": {"b": [1]}, "c": "x"})

    def test_echo_nan_stays_text(self) -> None:
        """A value that is not finite JSON is sent as a string."""
        args = self.parse("echo", "x=NaN", "y=1e999")
        self.assertEqual(command.call_arguments(args), {"x": "NaN", "y": "1e999"})

    def test_echo_duplicate_key(self) -> None:
        """A key given twice is refused, naming the key."""
        args = self.parse("echo", "a=1", '{"a": 2}')
        with self.assertRaises(ConfigurationError) as raised:
            command.call_arguments(args)
        self.assertIn("'a'", str(raised.exception))

    def test_echo_bad_argument(self) -> None:
        """An echo argument that is neither KEY=VALUE nor an object is misuse."""
        self.assertIn(
            "neither KEY=VALUE nor a JSON object", self.parse_error("echo", "x")
        )
        self.assertIn("is not a valid JSON object", self.parse_error("echo", "{1: 2"))

    def test_bad_port(self) -> None:
        """A port outside 1-65535 is misuse, naming the value."""
        self.assertIn(
            "'70000' is not a TCP port", self.parse_error("ping", "--port", "70000")
        )

    def test_bad_timeout(self) -> None:
        """A timeout that is not a positive number is misuse."""
        self.assertIn(
            "not a positive number", self.parse_error("ping", "--timeout", "0")
        )

    def test_unknown_operation(self) -> None:
        """An operation other than ping, echo and whoami is misuse."""
        self.assertIn("invalid choice", self.parse_error("drop"))

    def test_ping_takes_no_arguments(self) -> None:
        """ping takes no positional arguments."""
        self.assertIn("unrecognized arguments", self.parse_error("ping", "a=1"))


_COMMAND_SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    from twisted_tls4d.app import command
    from twisted_tls4d.errors import Tls4dError

    parser = argparse.ArgumentParser(prog="tls4d")
    command.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(sys.argv[1:])
    try:
        sys.exit(args.run(args))
    except Tls4dError as e:
        print(f"tls4d: {e}", file=sys.stderr)
        sys.exit(1)
    """
)


class EndToEndTests(TestCase):
    """
    The server on a real loopback listener, with the real client and command.
    """

    def setUp(self) -> None:
        """Listen on 127.0.0.1, keeping track of each server connection."""
        self.server_lost: list[defer.Deferred[None]] = []
        factory = RecordingFactory(clock=reactor)
        build = factory.buildProtocol

        def tracking_build(addr: Any) -> AppServerProtocol:
            protocol = build(addr)
            lost: defer.Deferred[None] = defer.Deferred()
            self.server_lost.append(lost)
            original = protocol.connectionLost

            def connection_lost(reason: Failure = connectionDone) -> None:
                original(reason)
                lost.callback(None)

            protocol.connectionLost = connection_lost  # type: ignore[method-assign]
            return protocol

        factory.buildProtocol = tracking_build  # type: ignore[method-assign]
        tls_factory = TLSMemoryBIOFactory(
            support.server_creator(_root(), app=True), False, factory
        )
        self.port = reactor.listenTCP(0, tls_factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.addCleanup(self.wait_for_server_connections)
        self.addCleanup(self.port.stopListening)

    def wait_for_server_connections(self) -> defer.Deferred[Any]:
        """Wait until every server connection has closed."""
        return defer.gatherResults(self.server_lost)

    async def test_calls(self) -> None:
        """The real client pings, echoes and asks whoami over loopback TLS."""
        client = await connect(reactor, "127.0.0.1", self.port_number, _alice())
        try:
            self.assertEqual(await client.call("ping"), "pong")
            self.assertEqual(await client.call("echo", a=[1, "b"]), {"a": [1, "b"]})
            identity = await client.call("whoami")
            certificate = pki.load_certificates(_alice().cert)[0]
            self.assertEqual(
                identity["fingerprint_sha256"], pki.fingerprint_sha256(certificate)
            )
            with self.assertRaises(AppError) as raised:
                await client.call("nope")
            self.assertEqual(raised.exception.code, wire.UNKNOWN_OP)
        finally:
            await client.close()

    async def test_host_name(self) -> None:
        """The client verifies the server by the name dialled: localhost works."""
        client = await connect(reactor, "localhost", self.port_number, _alice())
        try:
            self.assertEqual(await client.call("ping"), "pong")
        finally:
            await client.close()

    async def test_oversized_request(self) -> None:
        """A request over 1 MiB fails with frame_too_large over real TCP."""
        client = await connect(reactor, "127.0.0.1", self.port_number, _alice())
        try:
            with self.assertRaises(AppError) as raised:
                await client.call("echo", data="x" * (wire.DEFAULT_MAX_FRAME_SIZE + 10))
            self.assertEqual(raised.exception.code, wire.FRAME_TOO_LARGE)
        finally:
            await client.close()

    async def test_refused_client(self) -> None:
        """A foreign CA's client certificate fails the first call, with the reason."""
        client = await connect(reactor, "127.0.0.1", self.port_number, _foreign())
        with self.assertRaises(AppConnectionError) as raised:
            await client.call("ping")
        self.assertIn("does not trust the CA", str(raised.exception))

    async def test_connection_refused(self) -> None:
        """A port nobody listens on fails connect with a clear error."""
        port = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(AppConnectionError) as raised:
            await connect(reactor, "127.0.0.1", number, _alice())
        self.assertIn(f"Cannot connect to 127.0.0.1:{number}", str(raised.exception))
        self.assertIn("refused", str(raised.exception))

    async def run_command(self, *argv: str) -> tuple[bytes, bytes, int]:
        """Run the ``tls4d app`` command in a child process."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).parent.parent)
        result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
            sys.executable, ["-c", _COMMAND_SCRIPT, *argv], env=env
        )
        return result

    async def test_command(self) -> None:
        """``tls4d app`` prints results as JSON and exits 0."""
        folder = str(_alice().key.parent)
        common = ["--port", str(self.port_number), "--identity", folder]
        out, err, status = await self.run_command("app", "ping", *common)
        self.assertEqual((json.loads(out), status), ("pong", 0), err)
        out, err, status = await self.run_command("app", "echo", "n=3", "s=x", *common)
        self.assertEqual((json.loads(out), status), ({"n": 3, "s": "x"}, 0), err)
        out, err, status = await self.run_command("app", *common, "whoami")
        self.assertEqual(json.loads(out)["common_name"], "alice", err)

    async def test_command_refused(self) -> None:
        """A refused certificate exits 1 with one line naming the reason."""
        foreign = _foreign()
        out, err, status = await self.run_command(
            "app",
            "ping",
            "--port",
            str(self.port_number),
            "--key",
            str(foreign.key),
            "--cert",
            str(foreign.cert),
            "--ca",
            str(foreign.ca),
        )
        self.assertEqual(status, 1)
        self.assertEqual(out, b"")
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("does not trust the CA", lines[0])

    async def assert_one_line_failure(self, *argv: str) -> str:
        """
        Run ``tls4d app ARGV`` and check that it fails with status 1, nothing
        on standard output and exactly one line on standard error.

        Returns:
            That line.
        """
        out, err, status = await self.run_command("app", *argv)
        self.assertEqual((status, out), (1, b""), err)
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("tls4d: "), lines)
        return lines[0]

    def common(self, port: int) -> list[str]:
        """The options that reach ``port`` on 127.0.0.1 as alice."""
        return ["--host", "127.0.0.1", "--port", str(port)] + [
            "--identity",
            str(_alice().key.parent),
        ]

    async def test_command_sql_server_port(self) -> None:
        """Pointed at an SQL server, the command says so at once, in one line."""
        port = listen_scripted(
            self,
            send=b'{"hello":{"protocol":1,"server":"tls4d","client":"alice"}}\n',
            creator=support.server_creator(_root()),
        )
        line = await self.assert_one_line_failure("ping", *self.common(port))
        self.assertEqual(
            line,
            f"tls4d: 127.0.0.1:{port} does not speak the application protocol: it "
            "greets like the tls4d SQL server; is that the application server's "
            "port (19813 by default)?",
        )

    async def test_command_silent_tls_server(self) -> None:
        """A TLS server that never answers ends the command after --timeout."""
        port = listen_scripted(self, creator=support.server_creator(_root()))
        line = await self.assert_one_line_failure(
            "ping", "--timeout", "0.5", *self.common(port)
        )
        self.assertEqual(
            line,
            f"tls4d: No answer from 127.0.0.1:{port} within 0.5 s; is that the "
            "application server's port (19813 by default)?",
        )

    async def test_command_silent_plain_server(self) -> None:
        """A server that never completes the TLS handshake is named as such."""
        port = listen_scripted(self)
        line = await self.assert_one_line_failure(
            "ping", "--timeout", "0.5", *self.common(port)
        )
        self.assertIn(f"No TLS handshake with 127.0.0.1:{port} within 0.5 s", line)

    async def test_command_server_closes(self) -> None:
        """A server that closes at once ends the command in one line."""
        port = listen_scripted(self, close=True)
        line = await self.assert_one_line_failure("ping", *self.common(port))
        self.assertEqual(
            line,
            f"tls4d: The TLS handshake with 127.0.0.1:{port} failed: the server "
            "closed the connection; check that this is the application server's port.",
        )

    async def test_command_not_tls(self) -> None:
        """A server that answers in clear text ends the command in one line."""
        port = listen_scripted(self, send=b"SSH-2.0-OpenSSH_9.6\r\n")
        line = await self.assert_one_line_failure("ping", *self.common(port))
        self.assertIn("the server does not speak TLS on this port", line)

    async def test_command_connection_refused(self) -> None:
        """A closed port ends the command in one line."""
        port = await closed_port()
        line = await self.assert_one_line_failure("whoami", *self.common(port))
        self.assertIn(f"Cannot connect to 127.0.0.1:{port}: the connection was", line)

    async def test_command_identity_incomplete(self) -> None:
        """An identity folder without its ca.pem ends the command in one line."""
        folder = support.temporary_folder("tls4d-partial-")
        for name in ("key.pem", "cert.pem"):
            (folder / name).write_bytes((_alice().key.parent / name).read_bytes())
        line = await self.assert_one_line_failure(
            "ping", "--port", str(self.port_number), "--identity", str(folder)
        )
        self.assertIn(str(folder / "ca.pem"), line)
