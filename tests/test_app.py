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
import re
import sys
import textwrap
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import IPAddressMismatch
from service_identity.hazmat import IPAddress_ID
from twisted.internet import defer, error, reactor, ssl, task
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
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
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from tests import support
from twisted_tls4d import pki, revocation, root, service, settings, tap, tls
from twisted_tls4d.app import command, wire
from twisted_tls4d.app.client import (
    AppClient,
    AppClientProtocol,
    AppConnectionError,
    Notification,
    ServerInfo,
    connect,
    describe_tls_failure,
)
from twisted_tls4d.app.database import SQLDatabase, sql_server_sessions
from twisted_tls4d.app.ops import Identity, Registry, Request, load_registry
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


@functools.cache
def _bob() -> ClientIdentity:
    """
    Returns:
        A second client identity signed by the module's root CA.
    """
    return support.make_client_identity(_root(), "bob")


@functools.cache
def _server_only() -> ClientIdentity:
    """
    Returns:
        An identity whose certificate the module's root CA issued for a
        server (serverAuth), not for a client.
    """
    layout = _root()
    folder = support.temporary_folder("tls4d-purpose-")
    key = pki.generate_private_key()
    certificate = pki.issue_certificate(
        root.load_local_ca(layout),
        key.public_key(),
        "webserver",
        server_names=["webserver.example"],
    )
    pki.write_private_key(folder / "key.pem", key)
    pki.write_certificates(folder / "cert.pem", [certificate])
    return ClientIdentity(folder / "key.pem", folder / "cert.pem", layout.ca)


@functools.cache
def _revoked() -> tuple[ClientIdentity, x509.CertificateRevocationList]:
    """
    Returns:
        A client identity of the module's root CA, and a revocation list of
        that CA naming its certificate.
    """
    layout = _root()
    identity = support.make_client_identity(layout, "rita")
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(pki.load_certificates(identity.cert)[0].serial_number)
        .revocation_date(pki.utc_now())
        .build()
    )
    return identity, revocation.build_crl(root.load_local_ca(layout), [entry], 1)


def _app_creator(
    crl: x509.CertificateRevocationList | None = None,
) -> tls.ServerConnectionCreator:
    """
    Returns:
        The application server's connection creator for the module's root,
        refusing the certificates ``crl`` lists.
    """
    layout = _root()
    context = tls.build_context(
        tls.TLSPolicy(dh_parameters=layout.dhparams),
        tls.load_identity(layout.app_cert, layout.app_key),
        tls.load_client_cas(layout.ca),
        crl=crl,
    )
    return tls.ServerConnectionCreator(context)


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


HELLO = {"id": "hello", "op": "hello", "args": {"version": 1}}


def _authenticated(
    factory: AppServerFactory, transport: StringTransport | None = None
) -> tuple[AppServerProtocol, StringTransport]:
    """
    Returns:
        A protocol of ``factory`` on a string transport, as if alice had
        completed the TLS handshake, and the transport.
    """
    protocol = factory.buildProtocol(None)
    transport = transport or StringTransport()
    protocol.makeConnection(transport)
    protocol.peer_certificate = pki.load_certificates(_alice().cert)[0]
    protocol.peer_authenticated()
    return protocol, transport


def _answers(transport: StringTransport) -> list[Any]:
    """
    Returns:
        The frames written to ``transport`` so far, decoded, and clears it.
    """
    data = transport.value()
    transport.clear()
    frames = []
    while data:
        (length,) = wire.HEADER.unpack(data[:4])
        frames.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


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
        self.lost: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> AppServerProtocol:  # noqa: N802
        """Build the protocol and keep it, with a Deferred of its end."""
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        lost: defer.Deferred[None] = defer.Deferred()
        self.lost.append(lost)
        original = protocol.connectionLost

        def connection_lost(reason: Failure = connectionDone) -> None:
            original(reason)
            lost.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol


def listen_app(
    case: TestCase,
    factory: RecordingFactory,
    creator: tls.ServerConnectionCreator | None = None,
) -> Any:
    """
    Serve ``factory`` through TLS on a free 127.0.0.1 port until ``case``
    ends and every connection is over.

    Returns:
        The listening port.
    """
    tls_factory = TLSMemoryBIOFactory(
        creator or support.server_creator(_root(), app=True), False, factory
    )
    port = reactor.listenTCP(0, tls_factory, interface="127.0.0.1")
    case.addCleanup(lambda: defer.gatherResults(factory.lost))
    case.addCleanup(lambda: port.connected and port.stopListening())
    return port


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
        creator: tls.ServerConnectionCreator | None = None,
    ) -> None:
        self.clock = clock
        self.client = client
        self.factory = factory
        creator = creator or support.server_creator(_root(), app=True)
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
        creator: tls.ServerConnectionCreator | None = None,
    ) -> _Connection:
        clock = factory.clock if factory is not None else Clock()
        assert isinstance(clock, Clock)
        factory = factory or RecordingFactory(clock=clock)
        client = client or FrameCollector()
        if client_tls is None:
            client_tls = support.client_options(identity or _alice())
        return _Connection(factory, client, client_tls, clock, creator)


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

    def test_echo_any_names(self) -> None:
        """echo sends back any argument names, "request" and non-ASCII included."""
        connection = self.connect()
        args = {"request": 1, "op": 2, "é-x": 3, "self": 4}
        answer = connection.request({"id": 3, "op": "echo", "args": args})
        self.assertEqual(answer, {"id": 3, "result": args})

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
        """Each answer and each event leaves in a single transport.write."""
        factory = RecordingFactory(clock=Clock())
        transport = StringTransport()
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        protocol, _ = _authenticated(factory, transport)
        listener, listened = _authenticated(factory)
        listener.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame({"id": 1, "op": "subscribe", "args": {"topic": "t"}})
        )
        protocol.dataReceived(
            wire.encode_frame(PING)
            + _frame(b"[]")
            + wire.encode_frame(HELLO)
            + wire.encode_frame({"id": 2, "op": "notify", "args": {"topic": "t"}})
        )
        self.assertEqual(len(writes), 4)
        self.assertEqual(json.loads(writes[0][4:]), {"id": 1, "result": "pong"})
        self.assertEqual(
            json.loads(writes[3][4:]), {"id": 2, "result": {"delivered": 1}}
        )
        for write in writes:
            self.assertEqual(wire.HEADER.unpack(write[:4])[0], len(write) - 4)
        event = _answers(listened)[-1]
        self.assertEqual(event["event"], "notification")

    def test_internal_error(self) -> None:
        """A handler that raises gets internal_error, is logged, and serving goes on."""
        registry = Registry()

        @registry.op
        def boom(request: Any) -> Any:
            raise RuntimeError("handler bug")

        factory = RecordingFactory(clock=Clock(), registry=registry)
        connection = self.connect(factory=factory)
        connection.request(HELLO)
        answer = connection.request({"id": 9, "op": "boom"})
        self.assertEqual(answer["error"]["code"], wire.INTERNAL_ERROR)
        self.assertNotIn("handler bug", answer["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(connection.request(PING)["result"], "pong")

    def test_unencodable_result(self) -> None:
        """A result JSON cannot express gets internal_error instead of a crash."""
        registry = Registry()
        registry.add("odd", lambda request: {"value": object()})
        factory = RecordingFactory(clock=Clock(), registry=registry)
        connection = self.connect(factory=factory)
        connection.request(HELLO)
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
        protocol, transport = _authenticated(RecordingFactory(clock=Clock()))
        self.assertIs(transport.producer, protocol)
        self.assertTrue(transport.streaming)

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

    def test_trickled_frame_times_out(self) -> None:
        """
        A frame still incomplete request_timeout seconds after its first byte
        gets a closing event and the connection closes, though bytes trickle.
        """
        events = _capture_logs(self)
        clock = Clock()
        factory = RecordingFactory(clock=clock, request_timeout=30.0)
        connection = self.connect(factory=factory)
        frame = wire.encode_frame(PING)
        for index in range(6):
            connection.write(frame[index : index + 1])
            clock.advance(4.9)
        connection.pump.flush()
        assert isinstance(connection.client, FrameCollector)
        self.assertIsNone(connection.client.lost)
        clock.advance(1)
        connection.pump.flush()
        [closing] = connection.client.answers
        self.assertEqual(closing["event"], "closing")
        self.assertEqual(closing["reason"], "request_timeout")
        self.assertIsNotNone(connection.client.lost)
        self.assertIn(
            "a request it began 30 s ago is still incomplete (6 bytes so far",
            _log_text(events),
        )

    def test_frames_in_pieces_kept(self) -> None:
        """
        Each frame's deadline starts at its own first byte: frames sent in
        pieces, each whole within the timeout, are all served.
        """
        clock = Clock()
        factory = RecordingFactory(clock=clock, request_timeout=30.0)
        connection = self.connect(factory=factory)
        frame = wire.encode_frame(PING)
        connection.write(frame[:3])
        for _ in range(4):
            clock.advance(20)
            connection.write(frame[3:] + frame[:3])
        assert isinstance(connection.client, FrameCollector)
        self.assertEqual([a["result"] for a in connection.client.answers], ["pong"] * 4)
        self.assertIsNone(connection.client.lost)

    def test_no_request_timeout_while_paused(self) -> None:
        """
        Frames the server holds back while its client does not read are not
        timed: what is missing is the server's reading, not the client's bytes.
        """
        clock = Clock()
        protocol, transport = _authenticated(
            RecordingFactory(clock=clock, request_timeout=30.0)
        )
        # As at the end of the handshake, which this skips.
        protocol.setTimeout(protocol.idle_timeout)
        protocol.pauseProducing()
        frame = wire.encode_frame(PING)
        protocol.dataReceived(frame + frame[:3])
        clock.advance(60)
        self.assertFalse(transport.disconnecting)
        protocol.resumeProducing()
        self.assertEqual([a["result"] for a in _answers(transport)], ["pong"])
        clock.advance(30)
        self.assertEqual(_answers(transport)[0]["reason"], "request_timeout")


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
        self.assertEqual(connection.server.requests_answered, 1, "hello only")

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
        """
        A request over the limit the server announced fails with
        frame_too_large unsent, and the connection goes on.
        """
        client, connection = self.connect_client(
            factory=RecordingFactory(clock=Clock(), max_frame_size=300)
        )
        call = client.call("echo", data="x" * 300)
        connection.pump.flush()
        error = self.failureResultOf(call, AppError).value
        self.assertEqual(error.code, wire.FRAME_TOO_LARGE)
        self.assertIn("it was not sent", error.message)
        ping = client.call("ping")
        connection.pump.flush()
        self.assertEqual(self.successResultOf(ping), "pong")

    def test_frame_too_large_before_hello(self) -> None:
        """
        A request over the server's limit sent before the hello answer came
        gets frame_too_large from the server, which closes the connection.
        """
        client, connection = self.connect_client(
            factory=RecordingFactory(clock=Clock(), max_frame_size=300)
        )
        assert client.protocol is not None
        client.protocol.server = None
        call = client.call("echo", data="x" * 300)
        connection.pump.flush()
        error = self.failureResultOf(call, AppError).value
        self.assertEqual(error.code, wire.FRAME_TOO_LARGE)
        self.failureResultOf(client.call("ping"), AppConnectionError)


class ClientProtocolTests(SynchronousTestCase):
    """
    The client protocol against answers a correct server never sends.
    """

    def setUp(self) -> None:
        """Connect a client protocol to a string transport, handshake done."""
        self.transport = StringTransport()
        self.protocol = AppClientProtocol(peer="example:1", greet=False)
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


def _hex_dump(message: dict[str, Any]) -> str:
    """
    Returns:
        ``message`` as a frame, shown as docs/app-protocol.md shows frames:
        16 bytes a line in hex, then as ASCII.
    """
    payload = wire.encode_payload(message)
    frame = wire.HEADER.pack(len(payload)) + payload
    lines = [f"{frame[:4].hex(' '):<48} length {len(payload)}"]
    for start in range(4, len(frame), 16):
        chunk = frame[start : start + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{chunk.hex(' '):<48} {text}".rstrip())
    return "\n".join(lines)


def _documented_exchange() -> list[tuple[str, str, bytes]]:
    """
    Play the worked exchange of docs/app-protocol.md with the real server.

    Returns:
        Who sent or got each payload, its direction and the payload.
    """
    runner = _QueuedRunner()
    database, _ = _database(run=runner)
    setup = database.open("setup")
    for statement in (
        "CREATE TABLE stock (name TEXT, qty INTEGER)",
        "INSERT INTO stock VALUES ('bolts', 3), ('nuts', 40)",
    ):
        setup.execute(statement, [], 10000)
        runner.run_next()
    factory = RecordingFactory(clock=Clock(), name="db.example.com", database=database)
    bob = factory.buildProtocol(None)
    bob.makeConnection(StringTransport())
    bob.peer_certificate = pki.load_certificates(_bob().cert)[0]
    bob.peer_authenticated()
    alice, _ = _authenticated(factory)
    steps: list[tuple[str, str, bytes]] = []
    names = {id(alice): "alice", id(bob): "bob"}

    def send(protocol: AppServerProtocol, message: dict[str, Any]) -> None:
        steps.append((names[id(protocol)], "->", wire.encode_payload(message)))
        protocol.dataReceived(wire.encode_frame(message))

    def receive(protocol: AppServerProtocol) -> None:
        for answer in _answers(protocol.transport):
            steps.append((names[id(protocol)], "<-", wire.encode_payload(answer)))

    send(bob, {"id": 1, "op": "hello", "args": {"version": 1}})
    receive(bob)
    send(bob, {"id": 2, "op": "subscribe", "args": {"topic": "stock"}})
    receive(bob)
    send(alice, {"id": 1, "op": "hello", "args": {"version": 1}})
    receive(alice)
    query = "SELECT name, qty FROM stock WHERE qty < ?"
    send(alice, {"id": 2, "op": "sql", "args": {"statement": query, "params": [5]}})
    send(alice, {"id": 3, "op": "ping"})
    receive(alice)
    runner.run_next()
    receive(alice)
    data = {"name": "bolts", "qty": 3}
    send(alice, {"id": 4, "op": "notify", "args": {"topic": "stock", "data": data}})
    receive(alice)
    receive(bob)
    insert = "INSERT INTO stock VALUES (?, ?)"
    send(
        alice,
        {"id": 5, "op": "sql", "args": {"statement": insert, "params": ["washers"]}},
    )
    runner.run_next()
    receive(alice)
    return steps


class ReadmeTests(SynchronousTestCase):
    """
    The README's "Application server" section shows code that works.
    """

    def blocks(self) -> list[str]:
        """The Python code blocks of the section."""
        text = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
        section = text.split("\n## Application server\n", 1)[1].split("\n## ", 1)[0]
        return re.findall(r"```python\n(.*?)```", section, re.S)

    def test_blocks_compile(self) -> None:
        """Every example is Python without syntax errors."""
        blocks = self.blocks()
        self.assertEqual(len(blocks), 3)
        for block in blocks:
            compile(block, "README.md", "exec")

    def test_example_handler(self) -> None:
        """The example handler reserves stock and notifies the other clients."""
        namespace: dict[str, Any] = {"__name__": "stockapp"}
        exec(compile(self.blocks()[0], "README.md", "exec"), namespace)
        database, _ = _database()
        setup = database.open("setup")
        setup.execute("CREATE TABLE stock (name TEXT, qty INTEGER)", [], 10000)
        setup.execute("INSERT INTO stock VALUES ('bolts', 3)", [], 10000)
        factory = RecordingFactory(
            clock=Clock(), registry=namespace["ops"], database=database
        )
        listener, listened = _authenticated(factory)
        listener.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame(
                {"id": 1, "op": "subscribe", "args": {"topic": "stock"}}
            )
        )
        protocol, transport = _authenticated(factory)
        for qty, expected in ((2, {"result": True}), (2, {"result": False})):
            protocol.dataReceived(
                wire.encode_frame(HELLO)
                + wire.encode_frame(
                    {"id": 2, "op": "reserve", "args": {"item": "bolts", "qty": qty}}
                )
            )
            self.assertEqual(_answers(transport)[-1], {"id": 2, **expected})
        protocol.dataReceived(
            wire.encode_frame(
                {"id": 3, "op": "reserve", "args": {"item": "bolts", "qty": 0}}
            )
        )
        self.assertEqual(_answers(transport)[-1]["error"]["code"], "bad_quantity")
        events = [a for a in _answers(listened) if "event" in a]
        self.assertEqual(
            [e["data"] for e in events], [{"item": "bolts", "by": "alice"}]
        )


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

    def test_worked_exchange(self) -> None:
        """
        The worked exchange of docs/app-protocol.md is what the server
        sends, byte for byte.
        """
        doc = (Path(__file__).parent.parent / "docs" / "app-protocol.md").read_text(
            encoding="utf-8"
        )
        for who, direction, payload in _documented_exchange():
            self.assertIn(f"{who} {direction} {payload.decode()}\n", doc)
        for message in (
            {"id": 1, "op": "hello", "args": {"version": 1}},
            {
                "event": "notification",
                "topic": "stock",
                "data": {"name": "bolts", "qty": 3},
                "sender": "alice",
            },
        ):
            self.assertIn(_hex_dump(message), doc)

        protocol, transport = _authenticated(RecordingFactory(clock=Clock()))
        protocol.dataReceived(
            wire.encode_frame({"id": 1, "op": "hello", "args": {"version": 2}})
        )
        protocol.dataReceived(wire.HEADER.pack(wire.DEFAULT_MAX_FRAME_SIZE + 1))
        for answer in _answers(transport):
            self.assertIn(f"\n{wire.encode_payload(answer).decode()}\n", doc)

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


#: Handlers of an example application, loaded by name in the tests of
#: ``--app-handlers`` (``tests.test_app:EXAMPLE_OPS``).
EXAMPLE_OPS = Registry()


@EXAMPLE_OPS.op
def greet(request: Request, name: str = "world") -> str:
    """Greet ``name`` on behalf of the caller."""
    return f"Hello {name}, from {request.identity.common_name}"


@EXAMPLE_OPS.op("stock.low")
def low_stock(request: Request, below: int = 5) -> defer.Deferred[Any]:
    """List the stock rows under ``below``, through the request's database."""
    query = request.sql("SELECT name, qty FROM stock WHERE qty < ?", [below])
    return query.addCallback(lambda result: result["rows"])


def _run_now(function: Any, *args: Any) -> defer.Deferred[Any]:
    """Run database work at once, in the reactor thread: for tests only."""
    return defer.maybeDeferred(function, *args)


class _QueuedRunner:
    """Runs database work only when a test says so, to order answers."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((function, args, done))
        return done

    def run_next(self) -> None:
        """Run the oldest piece of work waiting."""
        function, args, done = self.queue.pop(0)
        defer.maybeDeferred(function, *args).chainDeferred(done)


def _database(run: Any = _run_now, **kwargs: Any) -> tuple[SQLDatabase, Path]:
    """
    Returns:
        A started database of the ``sql`` op on a new SQLite file, running
        its work with ``run``, and the file.
    """
    path = support.temporary_folder("tls4d-app-sql-") / "test.sqlite"
    opener = sql_server_sessions(path, kwargs.pop("users", None), "full")
    database = SQLDatabase(kwargs.pop("open_session", opener), run=run, **kwargs)
    database.start()
    return database, path


class HelloTests(_InMemoryTestCase):
    """
    The hello exchange that opens a protocol version 1 connection.
    """

    def test_hello_answer(self) -> None:
        """hello answers the version, the server's name, the client, ops and limits."""
        factory = RecordingFactory(
            clock=Clock(), name="db.example.com", database=_database()[0]
        )
        answer = self.connect(factory=factory).request(
            {"id": 1, "op": "hello", "args": {"version": 1, "agent": "desk/2.0"}}
        )
        self.assertEqual(
            answer,
            {
                "id": 1,
                "result": {
                    "version": 1,
                    "server": "tls4d",
                    "name": "db.example.com",
                    "client": "alice",
                    "ops": [
                        "echo",
                        "hello",
                        "notify",
                        "ping",
                        "sql",
                        "subscribe",
                        "unsubscribe",
                        "whoami",
                    ],
                    "limits": {
                        "max_frame_size": 1048576,
                        "max_outstanding": 32,
                        "idle_timeout": 600.0,
                        "handshake_timeout": 10.0,
                    },
                },
            },
        )

    def test_hello_lists_application_ops_and_limits(self) -> None:
        """hello lists the application's ops and the limits given."""
        factory = RecordingFactory(
            clock=Clock(),
            registry=EXAMPLE_OPS,
            sql_op=False,
            max_frame_size=5000,
            max_outstanding=3,
            idle_timeout=30,
        )
        result = self.connect(factory=factory).request(HELLO)["result"]
        self.assertIn("greet", result["ops"])
        self.assertIn("stock.low", result["ops"])
        self.assertNotIn("sql", result["ops"])
        self.assertEqual(
            result["limits"],
            {
                "max_frame_size": 5000,
                "max_outstanding": 3,
                "idle_timeout": 30,
                "handshake_timeout": 10.0,
            },
        )

    def test_hello_logged(self) -> None:
        """The server logs the version and the agent a client says hello with."""
        events = _capture_logs(self)
        self.connect().request(
            {"id": 1, "op": "hello", "args": {"version": 1, "agent": "desk/2.0"}}
        )
        self.assertIn("(alice) speaks protocol 1 (desk/2.0)", _log_text(events))

    def test_unsupported_version(self) -> None:
        """
        An unknown version gets unsupported_version listing the versions
        spoken; the connection stays open for a hello it supports.
        """
        connection = self.connect()
        answer = connection.request({"id": 1, "op": "hello", "args": {"version": 2}})
        self.assertEqual(answer["error"]["code"], wire.UNSUPPORTED_VERSION)
        self.assertEqual(answer["error"]["details"], {"versions": [1]})
        self.assertEqual(
            answer["error"]["message"],
            "This server speaks protocol version 1, not 2; use a client for that "
            "version.",
        )
        self.assertEqual(connection.request(HELLO)["result"]["version"], 1)

    def test_version_not_an_integer(self) -> None:
        """A version that is not an integer, or none, gets invalid_args."""
        connection = self.connect()
        for args in ({"version": "1"}, {"version": True}, {"version": 1.0}, {}):
            answer = connection.request({"id": 1, "op": "hello", "args": args})
            self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS, args)

    def test_hello_twice(self) -> None:
        """A second hello gets invalid_request."""
        connection = self.connect()
        connection.request(HELLO)
        answer = connection.request({"id": 2, "op": "hello", "args": {"version": 1}})
        self.assertEqual(answer["error"]["code"], wire.INVALID_REQUEST)

    def test_hello_required(self) -> None:
        """The ops of version 1 need hello first; the first release's do not."""
        factory = RecordingFactory(clock=Clock(), registry=EXAMPLE_OPS)
        connection = self.connect(factory=factory)
        for op, args in (
            ("subscribe", {"topic": "t"}),
            ("notify", {"topic": "t"}),
            ("sql", {"statement": "SELECT 1"}),
            ("greet", {}),
        ):
            answer = connection.request({"id": 1, "op": op, "args": args})
            self.assertEqual(answer["error"]["code"], wire.HELLO_REQUIRED, op)
        self.assertEqual(connection.request(PING)["result"], "pong")
        self.assertEqual(
            connection.request({"id": 2, "op": "echo", "args": {"a": 1}})["result"],
            {"a": 1},
        )
        self.assertEqual(
            connection.request({"id": 3, "op": "whoami"})["result"]["common_name"],
            "alice",
        )
        connection.request(HELLO)
        answer = connection.request({"id": 4, "op": "greet", "args": {"name": "Bo"}})
        self.assertEqual(answer["result"], "Hello Bo, from alice")

    def test_unknown_op_before_hello(self) -> None:
        """An unknown op is unknown_op, hello or not."""
        answer = self.connect().request({"id": 1, "op": "drop"})
        self.assertEqual(answer["error"]["code"], wire.UNKNOWN_OP)


class _Slow:
    """
    Handlers whose answers come when the test fires them.
    """

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[Any]] = []
        self.cancelled = 0
        self.registry = Registry()
        self.registry.add("slow", self.slow)

    def slow(self, request: Request, value: Any = None) -> defer.Deferred[Any]:
        """Answer ``value`` once the test fires it."""

        def cancel(_: defer.Deferred[Any]) -> None:
            self.cancelled += 1

        waiting: defer.Deferred[Any] = defer.Deferred(canceller=cancel)
        self.waiting.append(waiting)
        return waiting.addCallback(lambda _: value)


class PipeliningTests(SynchronousTestCase):
    """
    Requests sent before the answers come are served as they arrive and
    answered as they complete, out of order, within the limits.
    """

    def setUp(self) -> None:
        self.slow = _Slow()
        self.factory = RecordingFactory(
            clock=Clock(), registry=self.slow.registry, max_outstanding=2
        )
        self.protocol, self.transport = _authenticated(self.factory)
        self.protocol.dataReceived(wire.encode_frame(HELLO))
        _answers(self.transport)

    def send(self, *messages: dict[str, Any]) -> None:
        """Send ``messages`` in one piece."""
        self.protocol.dataReceived(b"".join(wire.encode_frame(m) for m in messages))

    def test_out_of_order(self) -> None:
        """A slow request's answer comes after those of later quick ones."""
        self.send(
            {"id": 1, "op": "slow", "args": {"value": "late"}},
            {"id": 2, "op": "ping"},
            {"id": 3, "op": "echo", "args": {"n": 3}},
        )
        self.assertEqual(
            _answers(self.transport),
            [{"id": 2, "result": "pong"}, {"id": 3, "result": {"n": 3}}],
        )
        self.slow.waiting[0].callback(None)
        self.assertEqual(_answers(self.transport), [{"id": 1, "result": "late"}])

    def test_answers_in_completion_order(self) -> None:
        """Two slow requests are answered in the order they complete."""
        self.send(
            {"id": "a", "op": "slow", "args": {"value": 1}},
            {"id": "b", "op": "slow", "args": {"value": 2}},
        )
        self.slow.waiting[1].callback(None)
        self.slow.waiting[0].callback(None)
        self.assertEqual(
            _answers(self.transport),
            [{"id": "b", "result": 2}, {"id": "a", "result": 1}],
        )

    def test_outstanding_limit(self) -> None:
        """
        With max_outstanding requests in progress the server reads no more
        from the client, and reads again as answers go out.
        """
        self.send(
            {"id": 1, "op": "slow"},
            {"id": 2, "op": "slow"},
            {"id": 3, "op": "slow"},
            {"id": 4, "op": "ping"},
        )
        self.assertEqual(len(self.slow.waiting), 2)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(_answers(self.transport), [])

        self.slow.waiting[0].callback(None)
        self.assertEqual(len(self.slow.waiting), 3)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(_answers(self.transport), [{"id": 1, "result": None}])

        self.slow.waiting[1].callback(None)
        self.assertEqual(
            _answers(self.transport),
            [{"id": 2, "result": None}, {"id": 4, "result": "pong"}],
        )
        self.assertEqual(self.transport.producerState, "producing")
        self.slow.waiting[2].callback(None)
        self.assertEqual(_answers(self.transport), [{"id": 3, "result": None}])

    def test_limit_and_full_transport(self) -> None:
        """
        Reading resumes only once neither a full transport nor the
        outstanding limit holds it back.
        """
        self.send({"id": 1, "op": "slow"}, {"id": 2, "op": "slow"})
        self.protocol.pauseProducing()
        self.slow.waiting[0].callback(None)
        self.assertEqual(self.transport.producerState, "paused")
        self.send({"id": 3, "op": "ping"})
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(_answers(self.transport)[-1], {"id": 3, "result": "pong"})

    def test_id_in_progress(self) -> None:
        """
        A request reusing the id of one in progress gets invalid_request
        with a null id; the first still gets its answer.
        """
        self.send({"id": 7, "op": "slow"}, {"id": 7, "op": "ping"})
        [refused] = _answers(self.transport)
        self.assertEqual(refused["id"], None)
        self.assertEqual(refused["error"]["code"], wire.INVALID_REQUEST)
        self.slow.waiting[0].callback(None)
        self.assertEqual(_answers(self.transport), [{"id": 7, "result": None}])
        self.send({"id": 7, "op": "ping"})
        self.assertEqual(_answers(self.transport), [{"id": 7, "result": "pong"}])

    def test_split_at_every_byte(self) -> None:
        """Pipelined frames split in two at any byte are all answered."""
        data = b"".join(
            wire.encode_frame(m)
            for m in (HELLO, {"id": 1, "op": "echo", "args": {"é": [1]}}, PING)
        )
        expected = [
            {"id": 1, "result": {"é": [1]}},
            {"id": 1, "result": "pong"},
        ]
        for split in range(len(data) + 1):
            protocol, transport = _authenticated(RecordingFactory(clock=Clock()))
            protocol.dataReceived(data[:split])
            protocol.dataReceived(data[split:])
            self.assertEqual(_answers(transport)[1:], expected, split)

    def test_cancelled_on_disconnect(self) -> None:
        """A handler's Deferred is cancelled when its client leaves; nothing is sent."""
        self.send({"id": 1, "op": "slow"})
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.slow.cancelled, 1)
        self.assertEqual(_answers(self.transport), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_result_too_large(self) -> None:
        """An answer over the frame limit becomes result_too_large."""
        registry = Registry()
        registry.add("big", lambda request: "x" * 200)
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), registry=registry, max_frame_size=150)
        )
        protocol.dataReceived(
            wire.encode_frame(HELLO) + wire.encode_frame({"id": 1, "op": "big"})
        )
        answer = _answers(transport)[-1]
        self.assertEqual(answer["error"]["code"], wire.RESULT_TOO_LARGE)
        self.assertFalse(transport.disconnecting)

    def test_idle_timer_waits_for_answers(self) -> None:
        """
        A connection is not idle while a request is in progress; once
        answered, silence closes it with a closing event.
        """
        clock = Clock()
        slow = _Slow()
        protocol, transport = _authenticated(
            RecordingFactory(clock=clock, registry=slow.registry, idle_timeout=10)
        )
        protocol.dataReceived(
            wire.encode_frame(HELLO) + wire.encode_frame({"id": 1, "op": "slow"})
        )
        clock.advance(60)
        self.assertFalse(transport.disconnecting)
        slow.waiting[0].callback(None)
        clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        closing = _answers(transport)[-1]
        self.assertEqual(closing["event"], "closing")
        self.assertEqual(closing["reason"], "idle_timeout")
        self.assertNotIn("id", closing)


class HandlerTests(_InMemoryTestCase):
    """
    An application's own operations: the Registry API, what handlers get,
    and what becomes of what they return or raise.
    """

    def call(
        self, registry: Registry, op: str, args: dict[str, Any] | None = None
    ) -> Any:
        """Say hello and call ``op`` of ``registry``; return the answer."""
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), registry=registry)
        )
        protocol.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame({"id": 1, "op": op, "args": args or {}})
        )
        return _answers(transport)[-1]

    def test_arguments_and_identity(self) -> None:
        """A handler gets the args as keywords and the caller's identity."""
        self.assertEqual(
            self.call(EXAMPLE_OPS, "greet", {"name": "Bo"}),
            {"id": 1, "result": "Hello Bo, from alice"},
        )
        self.assertEqual(
            self.call(EXAMPLE_OPS, "greet")["result"], "Hello world, from alice"
        )

    def test_identity(self) -> None:
        """The request's identity is the verified certificate's."""
        registry = Registry()
        seen: list[Request] = []
        registry.add("who", lambda request: seen.append(request))
        self.call(registry, "who")
        certificate = pki.load_certificates(_alice().cert)[0]
        self.assertEqual(seen[0].identity, Identity.from_certificate(certificate))
        self.assertEqual(
            seen[0].identity.fingerprint_sha256, pki.fingerprint_sha256(certificate)
        )
        self.assertEqual(seen[0].peer_certificate, certificate)

    def test_arguments_that_do_not_fit(self) -> None:
        """Args the handler does not take get invalid_args naming what it takes."""
        answer = self.call(EXAMPLE_OPS, "greet", {"nom": "Bo"})
        self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS)
        self.assertIn("takes name", answer["error"]["message"])
        clash = self.call(EXAMPLE_OPS, "greet", {"request": "x"})
        self.assertEqual(clash["error"]["code"], wire.INVALID_ARGS)
        self.assertEqual(self.flushLoggedErrors(), [])
        ping = self.call(Registry(), "ping", {"x": 1})
        self.assertEqual(
            ping["error"]["message"],
            "The 'ping' operation takes no arguments; got 'x'.",
        )

    def test_app_error(self) -> None:
        """An AppError raised, or failed in a Deferred, is the answer's error."""
        registry = Registry()

        @registry.op("orders.take")
        def take(request: Request) -> None:
            raise AppError("out_of_stock", "Nothing left.", {"sku": 7})

        @registry.op
        def later(request: Request) -> defer.Deferred[None]:
            return defer.fail(AppError("busy", "Try later."))

        self.assertEqual(
            self.call(registry, "orders.take"),
            {
                "id": 1,
                "error": {
                    "code": "out_of_stock",
                    "message": "Nothing left.",
                    "details": {"sku": 7},
                },
            },
        )
        self.assertEqual(self.call(registry, "later")["error"]["code"], "busy")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failed_deferred(self) -> None:
        """A Deferred failing with another exception is internal_error, logged."""
        registry = Registry()
        registry.add("broken", lambda request: defer.fail(KeyError("secret-key")))
        answer = self.call(registry, "broken")
        self.assertEqual(answer["error"]["code"], wire.INTERNAL_ERROR)
        self.assertNotIn("secret", answer["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_deferred_and_coroutine(self) -> None:
        """A handler may return a Deferred, or be a coroutine function."""
        registry = Registry()
        registry.add("deferred", lambda request, n: defer.succeed(n * 2))

        @registry.op
        async def sums(request: Request, a: int, b: int) -> int:
            first = await defer.succeed(a)
            return first + b

        self.assertEqual(self.call(registry, "deferred", {"n": 4})["result"], 8)
        self.assertEqual(self.call(registry, "sums", {"a": 1, "b": 2})["result"], 3)

    def test_handler_notifies(self) -> None:
        """A handler's request.notify reaches the subscribers of the topic."""
        registry = Registry()

        @registry.op
        def restock(request: Request, name: str) -> int:
            return request.notify("stock", {"name": name})

        factory = RecordingFactory(clock=Clock(), registry=registry)
        listener, listened = _authenticated(factory)
        listener.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame(
                {"id": 1, "op": "subscribe", "args": {"topic": "stock"}}
            )
        )
        protocol, transport = _authenticated(factory)
        protocol.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame({"id": 2, "op": "restock", "args": {"name": "bolts"}})
        )
        self.assertEqual(_answers(transport)[-1], {"id": 2, "result": 1})
        self.assertEqual(
            _answers(listened)[-1],
            {
                "event": "notification",
                "topic": "stock",
                "data": {"name": "bolts"},
                "sender": "alice",
            },
        )

    def test_handler_uses_the_database(self) -> None:
        """A handler's request.sql works even where clients may not run SQL."""
        database, _ = _database()
        factory = RecordingFactory(
            clock=Clock(), registry=EXAMPLE_OPS, database=database, sql_op=False
        )
        protocol, transport = _authenticated(factory)
        protocol.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame(
                {
                    "id": 1,
                    "op": "sql",
                    "args": {"statement": "CREATE TABLE stock (name, qty)"},
                }
            )
        )
        self.assertEqual(_answers(transport)[-1]["error"]["code"], wire.UNAVAILABLE)
        database.open("setup").execute(
            "CREATE TABLE stock (name TEXT, qty INTEGER)", [], 10000
        )
        database.open("setup").execute(
            "INSERT INTO stock VALUES ('bolts', 3), ('nuts', 50)", [], 10000
        )
        protocol.dataReceived(
            wire.encode_frame({"id": 2, "op": "stock.low", "args": {"below": 10}})
        )
        self.assertEqual(_answers(transport)[-1], {"id": 2, "result": [["bolts", 3]]})
        photos = database.open("setup")
        photos.execute("CREATE TABLE photo (b BLOB)", [], 10000)
        registry = Registry()
        registry.add(
            "store",
            lambda request: request.sql("INSERT INTO photo VALUES (?)", [b"\x89P"]),
        )
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), registry=registry, database=database)
        )
        protocol.dataReceived(
            wire.encode_frame(HELLO) + wire.encode_frame({"id": 3, "op": "store"})
        )
        self.assertEqual(_answers(transport)[-1]["result"]["changes"], 1)

    def test_registry_refusals(self) -> None:
        """The registry refuses bad names, twice-given ops and unusable handlers."""
        registry = Registry()
        registry.add("ok", lambda request: None)
        for name, handler in (
            ("ok", lambda request: None),
            ("", lambda request: None),
            ("9lives", lambda request: None),
            ("has space", lambda request: None),
            ("x" * 65, lambda request: None),
            ("nothing", 42),
            ("no_request", lambda: None),
            ("keywords_only", lambda *, request: None),
        ):
            with self.assertRaises(ConfigurationError, msg=name):
                registry.add(name, handler)  # type: ignore[arg-type]

    def test_builtin_names_refused(self) -> None:
        """A factory refuses an application that redefines a built-in op."""
        for name in ("ping", "sql", "hello"):
            registry = Registry()
            registry.add(name, lambda request: None)
            with self.assertRaises(ConfigurationError, msg=name):
                AppServerFactory(clock=Clock(), registry=registry)

    def test_load_registry(self) -> None:
        """--app-handlers names a registry, or a mapping, as module:attribute."""
        self.assertIs(load_registry("tests.test_app:EXAMPLE_OPS"), EXAMPLE_OPS)
        mapping = load_registry("tests.test_app:EXAMPLE_MAPPING")
        self.assertEqual(mapping.names(), ["double"])

    def test_load_registry_errors(self) -> None:
        """Each way --app-handlers can be wrong gets a message naming it."""
        cases = {
            "tests.test_app": "is not MODULE:ATTRIBUTE",
            "tests.no_such_module:ops": "cannot import module 'tests.no_such_module'",
            "tests.test_app:NOTHING": "has no 'NOTHING'",
            "tests.test_app:_frame": "is function, not a twisted_tls4d.app.Registry",
            "tests.test_app:CLASHING_OPS": "defines op 'ping', which the server has",
        }
        for spec, expected in cases.items():
            with self.assertRaises(ConfigurationError, msg=spec) as raised:
                load_registry(spec)
            self.assertIn(expected, str(raised.exception), spec)


#: A mapping of handlers, which --app-handlers also takes.
EXAMPLE_MAPPING = {"double": lambda request, n: 2 * n}

#: Handlers that redefine a built-in op, which --app-handlers refuses.
CLASHING_OPS = Registry()
CLASHING_OPS.add("ping", lambda request: "mine")


class NotifyTests(_InMemoryTestCase):
    """
    subscribe, unsubscribe and notify: one client reaching the others
    subscribed to a topic with an event frame.
    """

    def setUp(self) -> None:
        self.factory = RecordingFactory(clock=Clock())
        self.alice = self.connect(factory=self.factory)
        self.alice.request(HELLO)
        self.bob = self.connect(_bob(), factory=self.factory)
        self.bob.request(HELLO)

    def events(self, connection: _Connection) -> list[Any]:
        """The events ``connection`` received."""
        connection.pump.flush()
        assert isinstance(connection.client, FrameCollector)
        return [a for a in connection.client.answers if "id" not in a]

    def op(self, connection: _Connection, op: str, **args: Any) -> Any:
        """Call ``op`` with ``args`` on ``connection``; return the answer."""
        return connection.request({"id": 9, "op": op, "args": args})

    def test_notify_reaches_subscribers(self) -> None:
        """A notification reaches the subscribers, with the sender's name."""
        self.assertEqual(
            self.op(self.bob, "subscribe", topic="stock"),
            {"id": 9, "result": {"topics": ["stock"]}},
        )
        self.assertEqual(
            self.op(self.alice, "notify", topic="stock", data={"qty": 3}),
            {"id": 9, "result": {"delivered": 1}},
        )
        self.assertEqual(
            self.events(self.bob),
            [
                {
                    "event": "notification",
                    "topic": "stock",
                    "data": {"qty": 3},
                    "sender": "alice",
                }
            ],
        )

    def test_sender_and_other_topics_not_notified(self) -> None:
        """The sender and subscribers of other topics get nothing."""
        self.op(self.alice, "subscribe", topic="stock")
        self.op(self.bob, "subscribe", topic="orders")
        result = self.op(self.alice, "notify", topic="stock")["result"]
        self.assertEqual(result, {"delivered": 0})
        self.assertEqual(self.events(self.alice) + self.events(self.bob), [])

    def test_unsubscribe_and_disconnect(self) -> None:
        """Unsubscribing, or leaving, ends the notifications."""
        self.op(self.bob, "subscribe", topic="a")
        self.op(self.bob, "subscribe", topic="b")
        self.assertEqual(
            self.op(self.bob, "unsubscribe", topic="a")["result"], {"topics": ["b"]}
        )
        self.assertEqual(
            self.op(self.alice, "notify", topic="a")["result"], {"delivered": 0}
        )
        self.bob.client.transport.loseConnection()  # type: ignore[union-attr]
        self.bob.pump.flush()
        self.assertEqual(self.factory.subscribers("b"), [])
        self.assertEqual(
            self.op(self.alice, "notify", topic="b")["result"], {"delivered": 0}
        )

    def test_slow_reader_misses(self) -> None:
        """
        A subscriber whose transport is full misses notifications; the next
        it gets says how many.
        """
        self.op(self.bob, "subscribe", topic="t")
        bob_server = self.factory.built[-1]
        bob_server.pauseProducing()
        self.assertEqual(
            self.op(self.alice, "notify", topic="t", data=1)["result"],
            {"delivered": 0},
        )
        self.op(self.alice, "notify", topic="t", data=2)
        bob_server.resumeProducing()
        self.op(self.alice, "notify", topic="t", data=3)
        self.bob.pump.flush()
        [event] = self.events(self.bob)
        self.assertEqual((event["data"], event["missed"]), (3, 2))

    def test_bad_topics(self) -> None:
        """A topic that is missing, empty, too long or not text is invalid_args."""
        for args in (
            {},
            {"topic": ""},
            {"topic": "x" * (wire.MAX_TOPIC_LENGTH + 1)},
            {"topic": 3},
            {"topic": "t", "extra": 1},
        ):
            for op in ("subscribe", "unsubscribe", "notify"):
                answer = self.op(self.alice, op, **args)
                self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS, (op, args))

    def test_subscription_limit(self) -> None:
        """A connection subscribes to at most MAX_SUBSCRIPTIONS topics."""
        for number in range(wire.MAX_SUBSCRIPTIONS):
            self.assertIn("result", self.op(self.alice, "subscribe", topic=str(number)))
        answer = self.op(self.alice, "subscribe", topic="one more")
        self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS)
        self.assertIn("result", self.op(self.alice, "subscribe", topic="0"))

    def test_notification_over_frame_limit(self) -> None:
        """A notification that would be over the frame limit is refused."""
        factory = RecordingFactory(clock=Clock(), max_frame_size=400)
        connection = self.connect(factory=factory)
        connection.request(HELLO)
        answer = connection.request(
            {"id": 1, "op": "notify", "args": {"topic": "t", "data": "x" * 340}}
        )
        self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS)


class SQLOpTests(SynchronousTestCase):
    """
    The sql op: statements with parameters against the SQL server's
    database, in a session per connection.
    """

    def setUp(self) -> None:
        self.database, self.path = _database()
        self.factory = RecordingFactory(clock=Clock(), database=self.database)
        self.protocol, self.transport = self.open()

    def open(self) -> tuple[AppServerProtocol, StringTransport]:
        """Connect alice and say hello."""
        protocol, transport = _authenticated(self.factory)
        protocol.dataReceived(wire.encode_frame(HELLO))
        _answers(transport)
        return protocol, transport

    def sql(
        self, statement: str, *params: Any, protocol: AppServerProtocol | None = None
    ) -> Any:
        """Run ``statement`` on ``protocol``'s connection; return the answer."""
        protocol = protocol or self.protocol
        args = {"statement": statement, "params": list(params)}
        protocol.dataReceived(wire.encode_frame({"id": 1, "op": "sql", "args": args}))
        return _answers(protocol.transport)[-1]

    def test_statements_with_parameters(self) -> None:
        """Statements run with ? parameters; a query answers columns and rows."""
        self.sql("CREATE TABLE stock (name TEXT, qty INTEGER, photo BLOB)")
        inserted = self.sql(
            "INSERT INTO stock VALUES (?, ?, ?)", "bolts", 3, {"blob": "AAE="}
        )
        self.assertEqual(
            inserted["result"],
            {"columns": [], "rows": [], "changes": 1, "in_transaction": False},
        )
        self.sql("INSERT INTO stock VALUES (?, ?, NULL)", "o'brien; DROP TABLE", 7)
        answer = self.sql("SELECT name, qty, photo FROM stock WHERE qty < ?", 10)
        self.assertEqual(
            answer["result"],
            {
                "columns": ["name", "qty", "photo"],
                "types": ["text", "integer", "blob"],
                "rows": [
                    ["bolts", 3, {"blob": "AAE="}],
                    ["o'brien; DROP TABLE", 7, None],
                ],
                "changes": None,
                "in_transaction": False,
            },
        )

    def test_sql_error(self) -> None:
        """A failing statement gets sql_error with SQLite's message and details."""
        answer = self.sql("SELEKT 1")
        self.assertEqual(answer["error"]["code"], wire.SQL_ERROR)
        self.assertIn("syntax error", answer["error"]["message"])
        self.assertEqual(answer["error"]["details"]["sql_code"], "sql")
        self.assertEqual(answer["error"]["details"]["in_transaction"], False)

    def test_transaction_spans_calls_and_rolls_back(self) -> None:
        """
        A transaction lasts across calls of one connection, and is rolled
        back when the client leaves without committing.
        """
        events = _capture_logs(self)
        self.sql("CREATE TABLE t (n INTEGER)")
        self.assertTrue(self.sql("BEGIN")["result"]["in_transaction"])
        self.sql("INSERT INTO t VALUES (1)")
        other, _ = self.open()
        self.assertEqual(
            self.sql("SELECT count(*) FROM t", protocol=other)["result"]["rows"],
            [[0]],
        )
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(
            self.sql("SELECT count(*) FROM t", protocol=other)["result"]["rows"],
            [[0]],
        )
        self.assertIn(
            "alice left with a transaction open; rolled it back", _log_text(events)
        )

    def test_result_too_large(self) -> None:
        """A result over the frame limit is result_too_large; the session goes on."""
        factory = RecordingFactory(
            clock=Clock(), database=self.database, max_frame_size=2000
        )
        protocol, transport = _authenticated(factory)
        protocol.dataReceived(wire.encode_frame(HELLO))
        self.sql("CREATE TABLE big (s TEXT)", protocol=protocol)
        for _ in range(30):
            self.sql("INSERT INTO big VALUES (?)", "x" * 100, protocol=protocol)
        answer = self.sql("SELECT s FROM big", protocol=protocol)
        self.assertEqual(answer["error"]["code"], wire.RESULT_TOO_LARGE)
        self.assertEqual(
            self.sql("SELECT count(*) FROM big", protocol=protocol)["result"]["rows"],
            [[30]],
        )

    def test_bad_arguments(self) -> None:
        """A missing statement or parameters that are not an array are invalid_args."""
        for args in (
            {},
            {"statement": ""},
            {"statement": 3},
            {"statement": "SELECT ?", "params": {"a": 1}},
            {"statement": "SELECT ?", "params": [[1]]},
            {"statement": "SELECT 1", "other": 1},
        ):
            self.protocol.dataReceived(
                wire.encode_frame({"id": 1, "op": "sql", "args": args})
            )
            answer = _answers(self.transport)[-1]
            self.assertEqual(answer["error"]["code"], wire.INVALID_ARGS, args)

    def test_refused_or_absent(self) -> None:
        """Without a database, or with --app-no-sql, sql is unavailable."""
        for factory in (
            RecordingFactory(clock=Clock()),
            RecordingFactory(clock=Clock(), database=self.database, sql_op=False),
        ):
            protocol, transport = _authenticated(factory)
            protocol.dataReceived(wire.encode_frame(HELLO))
            answer = self.sql("SELECT 1", protocol=protocol)
            self.assertEqual(answer["error"]["code"], wire.UNAVAILABLE)

    def test_stopped_database(self) -> None:
        """Once the database is stopped, sql is unavailable."""
        self.database.stop()
        self.assertEqual(self.sql("SELECT 1")["error"]["code"], wire.UNAVAILABLE)

    def test_access_level(self) -> None:
        """The sql op allows a client no more than the SQL server would."""
        path = support.temporary_folder("tls4d-app-sql-") / "ro.sqlite"
        database = SQLDatabase(
            sql_server_sessions(path, None, "read-only"), run=_run_now
        )
        database.start()
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), database=database)
        )
        protocol.dataReceived(wire.encode_frame(HELLO))
        answer = self.sql("CREATE TABLE t (n)", protocol=protocol)
        self.assertEqual(answer["error"]["code"], wire.SQL_ERROR)
        self.assertEqual(answer["error"]["details"]["sql_code"], "access")

    def test_statements_in_order_answers_out_of_order(self) -> None:
        """
        A connection's statements run one at a time in the order sent, while
        a quicker request's answer overtakes them.
        """
        runner = _QueuedRunner()
        database, _ = _database(run=runner)
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), database=database)
        )
        protocol.dataReceived(
            wire.encode_frame(HELLO)
            + wire.encode_frame(
                {"id": 1, "op": "sql", "args": {"statement": "CREATE TABLE t (n)"}}
            )
            + wire.encode_frame(
                {"id": 2, "op": "sql", "args": {"statement": "SELECT count(*) FROM t"}}
            )
            + wire.encode_frame({"id": 3, "op": "ping"})
        )
        self.assertEqual(_answers(transport)[1:], [{"id": 3, "result": "pong"}])
        self.assertEqual(len(runner.queue), 1)
        runner.run_next()
        runner.run_next()
        self.assertEqual(
            [a["id"] for a in _answers(transport)], [1, 2], "CREATE, then SELECT"
        )


class IdentityTests(_InMemoryTestCase):
    """
    Every reason the server refuses a client's certificate, in memory: each
    refusal serves nothing and is logged once, with the peer and the reason.
    """

    def refused(
        self,
        identity: ClientIdentity,
        factory: RecordingFactory | None = None,
        creator: tls.ServerConnectionCreator | None = None,
    ) -> tuple[FrameCollector, str]:
        """
        Connect ``identity``, which should be refused.

        Returns:
            The client, and the one log line of the refusal.
        """
        events = _capture_logs(self)
        client = FrameCollector(send_on_handshake=wire.encode_frame(PING))
        connection = self.connect(
            identity, factory=factory, client=client, creator=creator
        )
        connection.pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(connection.server.requests_answered, 0)
        self.assertIsNone(connection.server.identity)
        lines = [
            line
            for line in _log_text(events).splitlines()
            if "refused TLS handshake" in line
        ]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^application server: refused TLS handshake from ")
        self.assertNotIn("authenticated as", _log_text(events))
        return client, lines[0]

    def test_expired(self) -> None:
        """An expired client certificate is refused: 'has expired'."""
        client, line = self.refused(expired_client_identity(_root()))
        self.assertEqual(client.answers, [])
        self.assertIn("its certificate has expired", line)

    def test_revoked(self) -> None:
        """A certificate the CA's revocation list names is refused: 'revoked'."""
        identity, crl = _revoked()
        client, line = self.refused(identity, creator=_app_creator(crl))
        self.assertEqual(client.answers, [])
        self.assertIn("its certificate has been revoked", line)

    def test_not_revoked(self) -> None:
        """With the revocation list, other certificates are served."""
        _, crl = _revoked()
        connection = self.connect(creator=_app_creator(crl))
        self.assertEqual(connection.request(PING)["result"], "pong")

    def test_server_purpose(self) -> None:
        """A certificate for servers only (no clientAuth) is refused."""
        client, line = self.refused(_server_only())
        self.assertEqual(client.answers, [])
        self.assertIn("not meant for client authentication", line)

    def test_unknown_ca(self) -> None:
        """A certificate of another CA is refused: 'does not hold'."""
        _, line = self.refused(_foreign())
        self.assertIn("a CA that Resources/ca.pem does not hold", line)

    def test_no_certificate(self) -> None:
        """A client without a certificate is refused: 'no certificate'."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(_root().ca))
        events = _capture_logs(self)
        client = FrameCollector(send_on_handshake=wire.encode_frame(PING))
        connection = self.connect(
            client=client, client_tls=support.RawClientCreator(context)
        )
        connection.pump.flush()
        self.assertEqual(client.answers, [])
        lines = [
            line
            for line in _log_text(events).splitlines()
            if "refused TLS handshake" in line
        ]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("the client presented no certificate", lines[0])

    def test_not_allowed(self) -> None:
        """
        With --app-allow, another name is refused after the handshake: the
        client gets not_allowed with a null id, then the connection closes.
        """
        factory = RecordingFactory(clock=Clock(), allowed_names=["bob", "carol"])
        client, line = self.refused(_alice(), factory=factory)
        self.assertIn(
            "its certificate name 'alice' is not among those --app-allow admits",
            line,
        )
        [refusal] = client.answers
        self.assertEqual(refusal["id"], None)
        self.assertEqual(refusal["error"]["code"], wire.NOT_ALLOWED)
        self.assertNotIn("bob", refusal["error"]["message"])

    def test_allowed(self) -> None:
        """With --app-allow, a name it lists is served."""
        factory = RecordingFactory(clock=Clock(), allowed_names=["bob", "alice"])
        connection = self.connect(factory=factory)
        self.assertEqual(connection.request(PING)["result"], "pong")


class ClientFeatureTests(_InMemoryTestCase):
    """
    The client API of protocol version 1: hello, events, refusals, keepalive.
    """

    def connect_client(
        self,
        identity: ClientIdentity | None = None,
        factory: RecordingFactory | None = None,
        **kwargs: Any,
    ) -> tuple[AppClient, _Connection]:
        """Connect an `AppClient` in memory to a server of ``factory``."""
        factory = factory or RecordingFactory(clock=Clock())
        protocol = AppClientProtocol(peer="testhost:19813", agent="tests")
        client = AppClient(protocol, clock=factory.clock, **kwargs)
        connection = _Connection(
            factory,
            protocol,
            support.client_options(identity or _alice()),
            factory.clock,
        )
        return client, connection

    def test_server_info(self) -> None:
        """After hello the client knows the server's name, version and limits."""
        factory = RecordingFactory(clock=Clock(), name="db.example.com")
        client, _ = self.connect_client(factory=factory)
        assert client.protocol is not None
        info = self.successResultOf(client.protocol.wait_until_ready())
        self.assertEqual(info, client.server)
        self.assertEqual(
            (info.version, info.name, info.client), (1, "db.example.com", "alice")
        )
        assert info.limits is not None
        self.assertEqual(info.limits.max_outstanding, 32)
        self.assertIn("notify", info.ops)

    def test_notifications(self) -> None:
        """A subscriber's callback gets each notification of its topic."""
        factory = RecordingFactory(clock=Clock())
        listener, listening = self.connect_client(_bob(), factory=factory)
        received: list[Notification] = []
        subscribed = listener.subscribe("stock", received.append)
        listening.pump.flush()
        self.successResultOf(subscribed)
        sender, sending = self.connect_client(factory=factory)
        delivered = sender.notify("stock", {"qty": 3})
        sending.pump.flush()
        listening.pump.flush()
        self.assertEqual(self.successResultOf(delivered), 1)
        self.assertEqual(
            received, [Notification(topic="stock", data={"qty": 3}, sender="alice")]
        )
        unsubscribed = listener.unsubscribe("stock")
        listening.pump.flush()
        self.successResultOf(unsubscribed)
        again = sender.notify("stock")
        sending.pump.flush()
        self.assertEqual(self.successResultOf(again), 0)

    def test_sql(self) -> None:
        """AppClient.sql sends bytes as blobs and answers the result."""
        database, _ = _database()
        client, connection = self.connect_client(
            factory=RecordingFactory(clock=Clock(), database=database)
        )
        created = client.sql("CREATE TABLE t (b BLOB, n INTEGER)")
        inserted = client.sql("INSERT INTO t VALUES (?, ?)", b"\x00\xff", 2)
        selected = client.sql("SELECT b, n FROM t")
        connection.pump.flush()
        self.successResultOf(created)
        self.assertEqual(self.successResultOf(inserted)["changes"], 1)
        self.assertEqual(
            self.successResultOf(selected)["rows"], [[{"blob": "AP8="}, 2]]
        )

    def test_not_allowed(self) -> None:
        """A client the server does not admit learns why, in one sentence."""
        protocol = AppClientProtocol(peer="testhost:19813")
        ready = protocol.wait_until_ready()
        _Connection(
            RecordingFactory(clock=Clock(), allowed_names=["bob"]),
            protocol,
            support.client_options(_alice()),
            Clock(),
        )
        error = self.failureResultOf(ready, AppConnectionError).value
        self.assertTrue(
            str(error).startswith(
                "The application server at testhost:19813 refused this client: "
                "This server admits only the clients its operator named, and the "
                "certificate name 'alice' is not among them"
            ),
            str(error),
        )

    def test_closed_as_idle(self) -> None:
        """A connection the server closes as idle fails later calls saying so."""
        clock = Clock()
        client, connection = self.connect_client(
            factory=RecordingFactory(clock=clock, idle_timeout=10)
        )
        clock.advance(11)
        connection.pump.flush()
        clock.advance(1)
        connection.pump.flush()
        error = self.failureResultOf(client.call("ping"), AppConnectionError).value
        self.assertEqual(
            str(error),
            "The connection to testhost:19813 ended: the server closed it: The "
            "connection sent nothing for 10 s, this server's limit; connect again, "
            "or send ping now and then to stay.",
        )

    def test_keepalive(self) -> None:
        """keep_alive pings, so that the server does not close the connection."""
        clock = Clock()
        factory = RecordingFactory(clock=clock, idle_timeout=10)
        client, connection = self.connect_client(factory=factory, keepalive=4.0)
        for _ in range(10):
            clock.advance(4)
            connection.pump.flush()
        assert client.protocol is not None
        self.assertTrue(client.protocol.ready)
        ping = client.call("ping")
        connection.pump.flush()
        self.assertEqual(self.successResultOf(ping), "pong")
        self.assertGreaterEqual(connection.server.requests_answered, 10)
        client.close()
        connection.pump.flush()


class ClientHelloTests(SynchronousTestCase):
    """
    The client's side of hello against answers only other servers give.
    """

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.protocol = AppClientProtocol(peer="example:1", agent="tests")
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()
        self.ready = self.protocol.wait_until_ready()

    def test_hello_sent(self) -> None:
        """The client says hello, with its version and agent, as it connects."""
        [hello] = _answers(self.transport)
        self.assertEqual(
            hello,
            {"id": 1, "op": "hello", "args": {"version": 1, "agent": "tests"}},
        )

    def test_first_release_server(self) -> None:
        """A server that knows no hello is taken as version 0."""
        self.protocol.dataReceived(
            wire.encode_frame(
                {"id": 1, "error": {"code": "unknown_op", "message": "Unknown op"}}
            )
        )
        self.assertEqual(self.successResultOf(self.ready), ServerInfo(version=0))

    def test_unsupported_version(self) -> None:
        """A server of another version is given up on, with its words."""
        self.protocol.dataReceived(
            wire.encode_frame(
                {
                    "id": 1,
                    "error": {
                        "code": "unsupported_version",
                        "message": "This server speaks protocol version 2, not 1.",
                        "details": {"versions": [2]},
                    },
                }
            )
        )
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.protocol.connectionLost(Failure(error.ConnectionAborted()))
        message = str(self.failureResultOf(self.ready, AppConnectionError).value)
        self.assertIn("the server does not speak protocol version 1", message)
        self.assertIn("speaks protocol version 2", message)

    def test_malformed_hello_answer(self) -> None:
        """A hello answer without limits is given up on."""
        self.protocol.dataReceived(
            wire.encode_frame({"id": 1, "result": {"version": 1}})
        )
        self.protocol.connectionLost(Failure(error.ConnectionAborted()))
        message = str(self.failureResultOf(self.ready, AppConnectionError).value)
        self.assertIn("hello answer is not usable", message)

    def test_events_without_listener(self) -> None:
        """Events nobody listens to, and unknown ones, are ignored."""
        self.protocol.dataReceived(
            wire.encode_frame({"event": "notification", "topic": "t", "data": 1})
            + wire.encode_frame({"event": "from_the_future"})
        )
        self.assertFalse(self.transport.disconnecting)


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


_BLOCKING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from twisted_tls4d.app.blocking import BlockingClient, blocking_call
    from twisted_tls4d.clienttls import ClientIdentity

    port = int(sys.argv[1])
    alice = ClientIdentity.from_directory(Path(sys.argv[2]))
    bob = ClientIdentity.from_directory(Path(sys.argv[3]))
    results = []
    with BlockingClient("127.0.0.1", port, alice, agent="script") as client:
        results.append(client.server.version)
        results.append(client.call("ping"))
        results.append(client.call("greet", name="Bo"))
        results.append(client.sql("SELECT ? + 1", 41)["rows"])
        try:
            client.call("nope")
        except Exception as e:
            results.append(e.code)
        client.subscribe("stock")
        with BlockingClient("127.0.0.1", port, bob) as other:
            results.append(other.notify("stock", {"qty": 2}))
        notification = next(client.notifications(timeout=10))
        results.append([notification.sender, notification.data])
    results.append(blocking_call("127.0.0.1", port, alice, "echo", {"a": 1}))
    print(json.dumps(results))
    """
)


class EndToEndTests(TestCase):
    """
    The server on a real loopback listener, with the real client and command.
    """

    def setUp(self) -> None:
        """
        Listen on 127.0.0.1 with the example application and a database in
        threads of its own.
        """
        path = support.temporary_folder("tls4d-app-e2e-") / "data.sqlite"
        self.factory = RecordingFactory(
            clock=reactor,
            registry=EXAMPLE_OPS,
            database=SQLDatabase(
                sql_server_sessions(path, None, "full"), reactor=reactor
            ),
            name="db.example.com",
        )
        self.port_number = listen_app(self, self.factory).getHost().port

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
        """A foreign CA's client certificate fails connect, with the reason."""
        with self.assertRaises(AppConnectionError) as raised:
            await connect(reactor, "127.0.0.1", self.port_number, _foreign())
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

    async def test_command_protocol_1(self) -> None:
        """``tls4d app`` says hello, runs SQL, calls application ops, notifies."""
        common = [
            "--port",
            str(self.port_number),
            "--identity",
            str(_alice().key.parent),
        ]

        async def run(*argv: str) -> Any:
            out, err, status = await self.run_command("app", *argv, *common)
            self.assertEqual(status, 0, err)
            return json.loads(out)

        hello = await run("hello")
        self.assertEqual(
            (hello["version"], hello["name"], hello["client"]),
            (1, "db.example.com", "alice"),
        )
        self.assertEqual(hello["limits"]["max_frame_size"], wire.DEFAULT_MAX_FRAME_SIZE)
        await run("sql", "CREATE TABLE stock (name TEXT, qty INTEGER)")
        inserted = await run("sql", "INSERT INTO stock VALUES (?, ?)", "bolts", "3")
        self.assertEqual(inserted["changes"], 1)
        selected = await run("sql", "SELECT name, qty FROM stock WHERE qty < ?", "5")
        self.assertEqual(selected["rows"], [["bolts", 3]])
        self.assertEqual(await run("call", "greet", "name=Bo"), "Hello Bo, from alice")
        self.assertEqual(await run("call", "stock.low", "below=5"), [["bolts", 3]])
        self.assertEqual(await run("notify", "stock", '{"qty": 1}'), {"delivered": 0})
        out, err, status = await self.run_command("app", "sql", "SELEKT", *common)
        self.assertEqual(status, 1)
        self.assertIn("(error sql_error)", err.decode())

    async def test_command_listen(self) -> None:
        """``tls4d app listen`` prints each notification as a line of JSON."""
        common = [
            "--port",
            str(self.port_number),
            "--identity",
            str(_alice().key.parent),
        ]
        listening = defer.ensureDeferred(
            self.run_command("app", "listen", "stock", "--count", "2", *common)
        )
        await _until(lambda: self.factory.subscribers("stock"), "the subscription")
        client = await connect(reactor, "127.0.0.1", self.port_number, _bob())
        try:
            self.assertEqual(await client.notify("stock", 1), 1)
            self.assertEqual(await client.notify("stock", {"b": [2]}), 1)
        finally:
            await client.close()
        out, err, status = await listening
        self.assertEqual(status, 0, err)
        self.assertEqual(
            [json.loads(line) for line in out.decode().splitlines()],
            [
                {"topic": "stock", "data": 1, "sender": "bob", "missed": 0},
                {"topic": "stock", "data": {"b": [2]}, "sender": "bob", "missed": 0},
            ],
        )

    async def test_blocking_client(self) -> None:
        """The blocking client calls, runs SQL, and receives notifications."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).parent.parent)
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            [
                "-c",
                _BLOCKING_SCRIPT,
                str(self.port_number),
                str(_alice().key.parent),
                str(_bob().key.parent),
            ],
            env=env,
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(
            json.loads(out),
            [
                1,
                "pong",
                "Hello Bo, from alice",
                [[42]],
                "unknown_op",
                1,
                ["bob", {"qty": 2}],
                {"a": 1},
            ],
        )

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


async def _until(condition: Any, what: str, deadline: float = 10.0) -> None:
    """
    Wait, on the real reactor, until ``condition()`` is true.

    Raises:
        AssertionError: It did not become true within ``deadline`` seconds.
    """
    for _ in range(int(deadline / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    msg = f"{what} did not happen within {deadline} s"
    raise AssertionError(msg)


class LoopbackRefusalTests(TestCase):
    """
    Each reason to refuse a client, over real loopback TLS with the real
    client: the client gets one sentence saying why, and the server logs
    the refusal once with the peer's address.
    """

    def setUp(self) -> None:
        self.events = _capture_logs(self)
        _, crl = _revoked()
        self.factory = RecordingFactory(
            clock=reactor,
            allowed_names=["alice", "mallory", "old", "rita", "webserver"],
        )
        self.port = listen_app(self, self.factory, _app_creator(crl)).getHost().port

    async def assert_refused(
        self, identity: ClientIdentity | None, client_says: str, server_says: str
    ) -> None:
        """
        Connect as ``identity`` (with no certificate if None) and check that
        both sides say why the client was refused.
        """
        if identity is None:
            protocol = AppClientProtocol(peer=f"127.0.0.1:{self.port}")
            trust = ssl.Certificate.loadPEM(_root().ca.read_bytes())
            endpoint = wrapClientTLS(
                ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust),
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
            )
            await connectProtocol(endpoint, protocol)
            attempt = protocol.wait_until_ready()
        else:
            attempt = connect(reactor, "127.0.0.1", self.port, identity, timeout=10)
        with self.assertRaises(AppConnectionError) as raised:
            await attempt
        self.assertIn(client_says, str(raised.exception))
        await defer.gatherResults(self.factory.lost)
        lines = [
            line
            for line in _log_text(self.events).splitlines()
            if "refused TLS handshake" in line
        ]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(
            lines[0],
            r"^application server: refused TLS handshake from 127\.0\.0\.1:\d+: "
            + server_says,
        )

    async def test_no_certificate(self) -> None:
        """No certificate: refused, 'no certificate'."""
        await self.assert_refused(
            None,
            "the server requires a client certificate and got none it accepts",
            "the client presented no certificate",
        )

    async def test_unknown_ca(self) -> None:
        """Another CA's certificate: refused, 'does not hold'."""
        await self.assert_refused(
            _foreign(),
            "the server does not trust the CA that issued it",
            "its certificate was issued by a CA that Resources/ca.pem does not hold",
        )

    async def test_expired(self) -> None:
        """An expired certificate: refused, 'has expired'."""
        await self.assert_refused(
            expired_client_identity(_root()),
            "has expired; issue a new one",
            "its certificate has expired",
        )

    async def test_revoked(self) -> None:
        """A revoked certificate: refused, 'revoked'."""
        await self.assert_refused(
            _revoked()[0], "it is revoked", "its certificate has been revoked"
        )

    async def test_server_purpose(self) -> None:
        """A server certificate used as a client's: refused, 'not meant for'."""
        await self.assert_refused(
            _server_only(),
            "it is not meant for client authentication",
            r"its certificate is not meant for client authentication \(no clientAuth\)",
        )

    async def test_not_allowed(self) -> None:
        """A name --app-allow does not list: refused, 'not among'."""
        await self.assert_refused(
            _bob(),
            "refused this client: This server admits only the clients its operator "
            "named, and the certificate name 'bob' is not among them",
            "its certificate name 'bob' is not among those --app-allow admits",
        )

    async def test_admitted(self) -> None:
        """alice, allowed and not revoked, is served through the same listener."""
        client = await connect(reactor, "127.0.0.1", self.port, _alice())
        try:
            self.assertEqual(await client.call("ping"), "pong")
        finally:
            await client.close()


class ReconnectTests(TestCase):
    """
    connect(..., reconnect=True) over real loopback: calls in flight on a
    lost connection fail clearly, and the client connects again, says hello
    again and subscribes again.
    """

    def setUp(self) -> None:
        self.slow = _Slow()
        self.factory = RecordingFactory(clock=reactor, registry=self.slow.registry)
        self.listening = listen_app(self, self.factory)
        self.port = self.listening.getHost().port

    def connect(self, **kwargs: Any) -> defer.Deferred[AppClient]:
        """Connect alice, reconnecting every 50 ms unless told otherwise."""
        kwargs.setdefault("retry_policy", lambda attempt: 0.05)
        return connect(
            reactor, "127.0.0.1", self.port, _alice(), reconnect=True, **kwargs
        )

    async def test_reconnects(self) -> None:
        """A dropped connection fails its pending call, and the client goes on."""
        client = await self.connect()
        try:
            received: list[Notification] = []
            await client.subscribe("stock", received.append)
            pending = client.call("slow")
            await _until(lambda: self.slow.waiting, "the slow call")
            self.factory.built[0].transport.abortConnection()
            with self.assertRaises(AppConnectionError) as raised:
                await pending
            self.assertIn(
                f"The connection to 127.0.0.1:{self.port} ended before the answer to "
                "'slow' arrived",
                str(raised.exception),
            )
            self.assertEqual(await client.call("ping"), "pong")
            self.assertEqual(len(self.factory.built), 2)
            self.assertEqual(self.factory.built[1].version, 1)
            await _until(
                lambda: self.factory.subscribers("stock"), "the new subscription"
            )
            other = await connect(reactor, "127.0.0.1", self.port, _bob())
            try:
                self.assertEqual(await other.notify("stock", 5), 1)
            finally:
                await other.close()
            await _until(lambda: received, "the notification")
            self.assertEqual(received[0].data, 5)
        finally:
            await client.close()

    async def test_next_attempt_fails(self) -> None:
        """A call made while the server is gone fails once the next attempt does."""
        client = await self.connect()
        try:
            await self.listening.stopListening()
            await _until(lambda: client.protocol is None, "the loss")
            with self.assertRaises(AppConnectionError) as raised:
                await client.call("ping")
            self.assertIn(
                f"Cannot reconnect to 127.0.0.1:{self.port}: the connection was "
                "refused",
                str(raised.exception),
            )
        finally:
            await client.close()

    async def test_first_connection_must_succeed(self) -> None:
        """With nobody listening, connect fails at once and stops trying."""
        port = await closed_port()
        with self.assertRaises(AppConnectionError) as raised:
            await connect(
                reactor,
                "127.0.0.1",
                port,
                _alice(),
                reconnect=True,
                retry_policy=lambda attempt: 0.05,
            )
        self.assertIn(f"Cannot connect to 127.0.0.1:{port}", str(raised.exception))

    async def test_refused_hello_is_retried_with_backoff(self) -> None:
        """
        Attempts whose handshake or hello fails count as failures, so that
        the delay before the next one grows.
        """
        delays: list[int] = []

        def policy(attempt: int) -> float:
            delays.append(attempt)
            return 0.01

        client = await self.connect(retry_policy=policy)
        try:
            self.factory.allowed_names = frozenset({"nobody"})
            self.factory.built[0].transport.abortConnection()
            await _until(lambda: len(delays) >= 3, "three retries")
            self.assertEqual(delays[:3], [1, 2, 3])
        finally:
            await client.close()


class ServiceTests(TestCase):
    """
    The application server as twistd runs it: build_service with the
    options of this issue, over loopback.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.alice = support.make_client_identity(self.layout, "alice")
        self.rita = support.make_client_identity(self.layout, "rita")
        self.bob = support.make_client_identity(self.layout, "bob")
        options = tap.Options()
        options.parseOptions(
            [
                "--root",
                str(self.layout.path),
                "--app",
                "--interface",
                "127.0.0.1",
                "--app-port",
                "0",
                "--app-max-outstanding",
                "4",
                "--app-allow",
                "alice, rita",
                "--app-handlers",
                "tests.test_app:EXAMPLE_OPS",
                "--app-name",
                "desk",
            ]
        )
        self.top = service.build_service(options.settings, reactor)
        self.top.startService()
        listener = self.top.listener("app")
        self.addCleanup(
            _until,
            lambda: not cast(Any, listener.factory).protocols,
            "the server's connections to close",
        )
        self.addCleanup(self.top.stopService)
        assert listener.port is not None
        self.port = int(listener.port.getHost().port)

    def connect(self, identity: ClientIdentity) -> defer.Deferred[AppClient]:
        """Connect ``identity`` to the service's application server."""
        return connect(reactor, "localhost", self.port, identity, timeout=10)

    async def test_served(self) -> None:
        """The options reach the server: name, limits, handlers, database."""
        client = await self.connect(self.alice)
        try:
            assert client.server is not None and client.server.limits is not None
            self.assertEqual(client.server.name, "desk")
            self.assertEqual(client.server.limits.max_outstanding, 4)
            self.assertIn("sql", client.server.ops)
            self.assertEqual(
                await client.call("greet", name="Bo"), "Hello Bo, from alice"
            )
            await client.sql("CREATE TABLE stock (name TEXT, qty INTEGER)")
            await client.sql("INSERT INTO stock VALUES (?, ?)", "bolts", 2)
            self.assertEqual(await client.call("stock.low"), [["bolts", 2]])
        finally:
            await client.close()
        self.assertTrue(self.layout.database.exists())

    async def test_not_allowed(self) -> None:
        """A name --app-allow leaves out is refused."""
        with self.assertRaises(AppConnectionError) as raised:
            await self.connect(self.bob)
        self.assertIn("certificate name 'bob' is not among them", str(raised.exception))

    async def test_revoked_after_reload(self) -> None:
        """A certificate revoked, then a reload, is refused by the real service."""
        client = await self.connect(self.rita)
        await client.close()
        serial = pki.load_certificates(self.rita.cert)[0].serial_number
        revocation.revoke(self.layout, [serial])
        self.assertTrue(self.top.reload())
        with self.assertRaises(AppConnectionError) as raised:
            await self.connect(self.rita)
        self.assertIn("it is revoked", str(raised.exception))
        client = await self.connect(self.alice)
        await client.close()

    async def test_shutdown_tells_clients(self) -> None:
        """Stopping the service tells connected clients it is shutting down."""
        client = await self.connect(self.alice)
        await self.top.stopService()
        with self.assertRaises(AppConnectionError) as raised:
            await client.call("ping")
        self.assertIn(
            "the server closed it: The server is shutting down", str(raised.exception)
        )

    def test_bad_handlers(self) -> None:
        """Handlers that cannot be loaded stop the start with the reason."""
        settings_ = settings.resolve(
            {"app": True, "app_handlers": "tests.test_app:NOTHING"},
            self.layout.path,
        )
        with self.assertRaises(ConfigurationError) as raised:
            service.build_service(settings_, reactor)
        self.assertIn("has no 'NOTHING'", str(raised.exception))


class AppSettingsTests(SynchronousTestCase):
    """
    The application server's options, on the command line and in the
    settings file.
    """

    def test_defaults(self) -> None:
        """Without options: 32 outstanding, no handlers, all admitted, sql on."""
        defaults = settings.Settings()
        self.assertEqual(
            (
                defaults.app_max_outstanding,
                defaults.app_handlers,
                defaults.app_allow,
                defaults.app_name,
                defaults.app_no_sql,
            ),
            (32, None, None, None, False),
        )

    def test_command_line(self) -> None:
        """twistd tls4d takes every option of the application server."""
        folder = support.temporary_folder("tls4d-app-settings-")
        options = tap.Options()
        options.parseOptions(
            [
                "--root",
                str(folder),
                "--app-max-outstanding",
                "5",
                "--app-allow",
                "alice, bob",
                "--app-no-sql",
                "--app-handlers",
                "myapp.ops:registry",
                "--app-name",
                "desk",
            ]
        )
        chosen = options.settings
        self.assertEqual(chosen.app_max_outstanding, 5)
        self.assertEqual(chosen.app_allow, ("alice", "bob"))
        self.assertTrue(chosen.app_no_sql)
        self.assertEqual(chosen.app_handlers, "myapp.ops:registry")
        self.assertEqual(chosen.app_name, "desk")

    def test_settings_file(self) -> None:
        """The settings file takes them too, app-allow as a list."""
        folder = support.temporary_folder("tls4d-app-settings-")
        (folder / "Settings").mkdir()
        (folder / "Settings" / "tls4d.toml").write_text(
            'app-allow = ["alice", "bob"]\napp-no-sql = true\napp-max-outstanding = 8\n'
        )
        chosen = settings.resolve({}, folder)
        self.assertEqual(chosen.app_allow, ("alice", "bob"))
        self.assertTrue(chosen.app_no_sql)
        self.assertEqual(chosen.app_max_outstanding, 8)

    def test_refused_values(self) -> None:
        """Impossible values stop the start with a sentence naming them."""
        folder = support.temporary_folder("tls4d-app-settings-")
        for given, expected in (
            ({"app_max_outstanding": 0}, "app-max-outstanding must be 1 or more"),
            ({"app_handlers": "myapp"}, "is not MODULE:ATTRIBUTE"),
            ({"app_allow": ""}, "names no client or an empty name"),
            ({"app_allow": "alice,,bob"}, "names no client or an empty name"),
            ({"app_name": " "}, "app-name is empty"),
        ):
            with self.assertRaises(ConfigurationError) as raised:
                settings.resolve(given, folder)
            self.assertIn(expected, str(raised.exception), given)


class PostgresSQLOpTests(TestCase):
    """
    The sql op on the SQL server's PostgreSQL database (``--sql-database``),
    against the SQL server tests' throwaway cluster, emptied for each test.
    """

    def setUp(self) -> None:
        # Imported here: tests.test_sql_postgres imports tests.test_sql, which
        # imports this module.
        from tests import test_sql_postgres

        reason = test_sql_postgres._skip_reason()
        if reason is not None:
            raise SkipTest(reason)
        self.cluster = test_sql_postgres.shared_cluster()
        test_sql_postgres._ClusterCase.reset(self)  # type: ignore[arg-type]

    def protocol(self, access: str) -> tuple[AppServerProtocol, StringTransport]:
        """
        Returns:
            alice's connection to a server whose database is the cluster,
            where a certificate gets ``access``, after hello.
        """
        opener = sql_server_sessions(
            Path("unused.sqlite"), None, access, self.cluster.backend()
        )
        database = SQLDatabase(opener, run=_run_now)
        database.start()
        self.addCleanup(database.stop)
        protocol, transport = _authenticated(
            RecordingFactory(clock=Clock(), database=database)
        )
        self.addCleanup(protocol.connectionLost, Failure(error.ConnectionDone()))
        protocol.dataReceived(wire.encode_frame(HELLO))
        _answers(transport)
        return protocol, transport

    def sql(self, connection: tuple[Any, Any], statement: str, *params: Any) -> Any:
        """Run ``statement``; return the answer."""
        protocol, transport = connection
        args = {"statement": statement, "params": list(params)}
        protocol.dataReceived(wire.encode_frame({"id": 1, "op": "sql", "args": args}))
        return _answers(transport)[-1]

    def test_statements(self) -> None:
        """Statements with ? parameters run on PostgreSQL, bytes and all."""
        full = self.protocol("full")
        self.sql(full, "CREATE TABLE stock (name text, qty integer, photo bytea)")
        inserted = self.sql(
            full, "INSERT INTO stock VALUES (?, ?, ?)", "bolts", 3, {"blob": "AAE="}
        )
        self.assertEqual(inserted["result"]["changes"], 1)
        answer = self.sql(full, "SELECT name, qty, photo FROM stock WHERE qty < ?", 5)
        self.assertEqual(answer["result"]["columns"], ["name", "qty", "photo"])
        self.assertEqual(answer["result"]["rows"], [["bolts", 3, {"blob": "AAE="}]])
        failed = self.sql(full, "SELECT nothing FROM stock")
        self.assertEqual(failed["error"]["code"], wire.SQL_ERROR)
        self.assertEqual(failed["error"]["details"]["sqlstate"], "42703")

    def test_access_level(self) -> None:
        """A read-only client cannot write through the sql op."""
        self.sql(self.protocol("full"), "CREATE TABLE t (n integer)")
        answer = self.sql(self.protocol("read-only"), "INSERT INTO t VALUES (1)")
        self.assertEqual(answer["error"]["code"], wire.SQL_ERROR)
        self.assertEqual(answer["error"]["details"]["sql_code"], "access")
