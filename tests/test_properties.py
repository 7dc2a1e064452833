"""
Property-based tests (hypothesis) of every parser of tls4d: the application
server's frames, the SQL server's lines, and the PEM files of keys,
certificates and revocation lists.

Each property is checked on a bounded number of generated examples, so the
module runs in seconds; a failure prints the smallest example hypothesis
found and a blob to replay it with ``@reproduce_failure``.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests.test_sql import _ImmediateReactor, _SynchronousThreadPool
from twisted_tls4d import lifecycle, pki, revocation, root, tls
from twisted_tls4d.app import wire as app_wire
from twisted_tls4d.app.protocol import AppServerFactory, AppServerProtocol
from twisted_tls4d.errors import PEMError
from twisted_tls4d.sql import wire as sql_wire
from twisted_tls4d.sql.protocol import SQLServerFactory, SQLServerProtocol

#: Multiplies every property's number of examples: CI runs 1; set
#: ``TLS4D_HYPOTHESIS_SCALE=50`` in the environment for a deeper search.
SCALE = max(1, int(os.environ.get("TLS4D_HYPOTHESIS_SCALE", "1")))


def bounded(examples: int) -> settings:
    """
    Returns:
        The settings of a property: ``examples`` examples (times `SCALE`),
        no time limit on one (a 1 MiB frame or a TLS key takes a while on a
        busy CI machine), and no example database left behind; a failure
        prints the blob that replays it.
    """
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


#: Byte sequences that are not UTF-8 whatever surrounds them.
INVALID_UTF8 = st.sampled_from(
    [b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]
)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)

JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

JSON_OBJECTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5)


@functools.cache
def _layout() -> root.RootLayout:
    """
    Returns:
        One bootstrapped server root for the module.
    """
    return support.make_root()


@functools.cache
def _alice() -> x509.Certificate:
    """
    Returns:
        The certificate of a client "alice" of the module's root.
    """
    return pki.load_certificates(support.make_client_identity(_layout()).cert)[0]


def _nested(depth: int, opener: str) -> bytes:
    """
    Returns:
        A JSON object whose member ``a`` nests ``depth`` arrays (``[``) or
        objects (``{``) deep.
    """
    if opener == "[":
        inner = "[" * depth + "]" * depth
    else:
        inner = '{"a":' * depth + "1" + "}" * depth
    return ('{"a":' + inner + "}").encode()


def _frame(payload: bytes) -> bytes:
    """
    Returns:
        ``payload`` behind its 4-byte length header.
    """
    return app_wire.HEADER.pack(len(payload)) + payload


def _frames_of(data: bytes) -> list[Any]:
    """
    Returns:
        The payloads of the whole frames in ``data``, decoded as JSON.
    """
    frames = []
    while len(data) >= 4:
        (length,) = app_wire.HEADER.unpack(data[:4])
        frames.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def assert_well_formed_answer(case: SynchronousTestCase, answer: Any) -> None:
    """
    Assert that an application server's frame is an answer with an ``id``
    and either a result or an error with a string code and message.
    """
    case.assertIsInstance(answer, dict)
    case.assertIn("id", answer)
    case.assertNotEqual("result" in answer, "error" in answer, answer)
    if "error" in answer:
        case.assertIsInstance(answer["error"]["code"], str)
        case.assertIsInstance(answer["error"]["message"], str)


class AppWireProperties(SynchronousTestCase):
    """
    The application protocol's payload encoding and decoding
    (`twisted_tls4d.app.wire`).
    """

    @bounded(40)
    @given(JSON_OBJECTS)
    def test_round_trip(self, message: dict[str, Any]) -> None:
        """Every JSON object decodes back from its encoding unchanged."""
        payload = app_wire.encode_payload(message)
        self.assertEqual(app_wire.decode_payload(payload), message)
        self.assertEqual(app_wire.encode_frame(message), _frame(payload))

    @bounded(200)
    @given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    def test_decode_is_total(self, payload: bytes) -> None:
        """Any bytes decode to an object or raise FrameDecodeError, nothing else."""
        try:
            value = app_wire.decode_payload(payload)
        except app_wire.FrameDecodeError as e:
            self.assertIn(e.code, (app_wire.INVALID_JSON, app_wire.NOT_AN_OBJECT))
            self.assertTrue(e.description)
        else:
            self.assertIsInstance(value, dict)

    @bounded(40)
    @given(JSON_VALUES.filter(lambda value: not isinstance(value, dict)))
    def test_not_an_object(self, value: Any) -> None:
        """JSON that is not an object is refused as not_an_object."""
        payload = json.dumps(value).encode()
        with self.assertRaises(app_wire.FrameDecodeError) as caught:
            app_wire.decode_payload(payload)
        self.assertEqual(caught.exception.code, app_wire.NOT_AN_OBJECT)

    @bounded(40)
    @given(st.binary(max_size=20), INVALID_UTF8, st.binary(max_size=20))
    def test_invalid_utf8(self, before: bytes, bad: bytes, after: bytes) -> None:
        """A payload with bytes that are not UTF-8 is refused as invalid_json."""
        with self.assertRaises(app_wire.FrameDecodeError) as caught:
            app_wire.decode_payload(before + bad + after)
        self.assertEqual(caught.exception.code, app_wire.INVALID_JSON)
        self.assertIn("UTF-8", caught.exception.description)

    @bounded(40)
    @given(st.integers(min_value=1, max_value=100_000), st.sampled_from("[{"))
    @example(100_000, "[")
    @example(100_000, "{")
    def test_deep_nesting_decodes_or_is_refused(self, depth: int, opener: str) -> None:
        """
        JSON nested to any depth decodes or is refused as invalid_json,
        never with a RecursionError.
        """
        try:
            app_wire.decode_payload(_nested(depth, opener))
        except app_wire.FrameDecodeError as e:
            self.assertEqual(e.code, app_wire.INVALID_JSON)

    @bounded(40)
    @given(st.integers(min_value=1, max_value=100_000))
    def test_deep_nesting_encodes_or_is_refused(self, depth: int) -> None:
        """
        A message nested to any depth encodes, or raises ValueError, never a
        RecursionError.
        """
        value: Any = 1
        for _ in range(depth):
            value = [value]
        try:
            payload = app_wire.encode_payload({"a": value})
        except ValueError:
            return
        self.assertTrue(payload.startswith(b'{"a":['))


class AppServerFramingProperties(SynchronousTestCase):
    """
    The application server's protocol on a string transport, as if alice had
    completed the TLS handshake: the frames it is given, however they are
    cut, sized or filled.
    """

    def serve(
        self, max_frame_size: int = app_wire.DEFAULT_MAX_FRAME_SIZE
    ) -> tuple[AppServerProtocol, StringTransport]:
        """
        Returns:
            A protocol of a new server, authenticated as alice, and its
            transport.
        """
        factory = AppServerFactory(clock=Clock(), max_frame_size=max_frame_size)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.peer_certificate = _alice()
        protocol.peer_authenticated()
        return protocol, transport

    def answers_to(self, pieces: list[bytes], **kwargs: Any) -> list[Any]:
        """
        Returns:
            The frames a new server answers to ``pieces``, each given to it
            in one ``dataReceived``.
        """
        protocol, transport = self.serve(**kwargs)
        for piece in pieces:
            protocol.dataReceived(piece)
        return _frames_of(transport.value())

    def assert_still_serves(self, protocol: AppServerProtocol, transport: Any) -> None:
        """Assert that the connection is open and answers a ping."""
        self.assertFalse(transport.disconnecting)
        transport.clear()
        protocol.dataReceived(app_wire.encode_frame({"id": "last", "op": "ping"}))
        self.assertEqual(
            _frames_of(transport.value()), [{"id": "last", "result": "pong"}]
        )

    @bounded(60)
    @given(
        st.lists(
            st.one_of(
                st.builds(
                    lambda n, args: {"id": n, "op": "echo", "args": args},
                    st.integers(0, 1000),
                    JSON_OBJECTS,
                ),
                st.integers(0, 1000).map(lambda n: {"id": n, "op": "ping"}),
                st.just({"id": "h", "op": "hello", "args": {"version": 1}}),
                st.builds(lambda op: {"id": 5, "op": op}, st.text(max_size=8)),
            ).map(app_wire.encode_frame)
            | st.binary(max_size=30).map(_frame),
            min_size=1,
            max_size=6,
        ),
        st.lists(st.integers(min_value=0), max_size=12),
    )
    def test_split_and_joined_anywhere(
        self, frames: list[bytes], cuts: list[int]
    ) -> None:
        """
        Frames joined and cut at arbitrary points get the same answers as
        the same frames sent one by one.
        """
        expected = self.answers_to(frames)
        self.assertEqual(len(expected), len(frames))
        self.assertEqual(
            self.answers_to(support.split_at(b"".join(frames), cuts)), expected
        )

    @bounded(25)
    @given(
        st.lists(st.integers(0, 200_000), min_size=1, max_size=3),
        st.lists(st.integers(min_value=0), max_size=40),
    )
    def test_large_frames_split_anywhere(
        self, sizes: list[int], cuts: list[int]
    ) -> None:
        """
        Frames around and above the size from which the server gathers a
        frame piece by piece, cut anywhere (a piece may end one frame and
        start the next), get the same answers as frames sent whole.
        """
        frames = [
            app_wire.encode_frame({"id": n, "op": "echo", "args": {"t": "x" * size}})
            for n, size in enumerate(sizes)
        ]
        expected = self.answers_to(frames)
        self.assertEqual(len(expected), len(frames))
        pieces = support.split_at(b"".join(frames), cuts)
        self.assertEqual(self.answers_to(pieces), expected)

    @bounded(60)
    @given(
        st.integers(min_value=1, max_value=4096)
        | st.just(app_wire.DEFAULT_MAX_FRAME_SIZE),
        st.sampled_from(["zero", "one", "below", "limit", "above", "largest"]),
    )
    def test_lengths_at_and_past_the_limit(self, limit: int, which: str) -> None:
        """
        A frame of 0, 1 or up to the limit's bytes gets one answer and the
        connection goes on; a header announcing the limit + 1 or 2**32 - 1
        bytes gets frame_too_large and the connection closes, reading
        nothing more.
        """
        length = {
            "zero": 0,
            "one": 1,
            "below": limit - 1,
            "limit": limit,
            "above": limit + 1,
            "largest": app_wire.MAX_HEADER_LENGTH,
        }[which]
        protocol, transport = self.serve(max_frame_size=limit)
        if length <= limit:
            ping = b'{"id":1,"op":"ping"}'
            payload = ping.ljust(length) if length >= len(ping) else b" " * length
            protocol.dataReceived(_frame(payload))
            [answer] = _frames_of(transport.value())
            assert_well_formed_answer(self, answer)
            if length >= len(ping):
                self.assertIn(answer.get("result"), ("pong", None))
            if limit >= 32:
                self.assert_still_serves(protocol, transport)
            self.assertFalse(transport.disconnecting)
            return
        protocol.dataReceived(app_wire.HEADER.pack(length) + b"x" * min(length, 64))
        [answer] = _frames_of(transport.value())
        self.assertIsNone(answer["id"])
        self.assertEqual(answer["error"]["code"], app_wire.FRAME_TOO_LARGE)
        self.assertIn(str(length), answer["error"]["message"])
        self.assertTrue(transport.disconnecting)
        transport.clear()
        protocol.dataReceived(app_wire.encode_frame({"id": 2, "op": "ping"}))
        self.assertEqual(transport.value(), b"")

    @bounded(40)
    @given(st.binary(max_size=20), INVALID_UTF8, st.binary(max_size=20))
    def test_invalid_utf8(self, before: bytes, bad: bytes, after: bytes) -> None:
        """A frame that is not UTF-8 gets invalid_json; the connection goes on."""
        protocol, transport = self.serve()
        protocol.dataReceived(_frame(before + bad + after))
        [answer] = _frames_of(transport.value())
        self.assertEqual(answer["id"], None)
        self.assertEqual(answer["error"]["code"], app_wire.INVALID_JSON)
        self.assert_still_serves(protocol, transport)

    @bounded(40)
    @given(JSON_VALUES.filter(lambda value: not isinstance(value, dict)))
    def test_not_an_object(self, value: Any) -> None:
        """A frame of JSON that is not an object gets not_an_object."""
        protocol, transport = self.serve()
        protocol.dataReceived(_frame(json.dumps(value).encode()))
        [answer] = _frames_of(transport.value())
        self.assertEqual(answer["error"]["code"], app_wire.NOT_AN_OBJECT)
        self.assert_still_serves(protocol, transport)

    @bounded(25)
    @given(st.integers(min_value=1, max_value=60_000), st.sampled_from("[{"))
    @example(60_000, "[")
    def test_deep_nesting(self, depth: int, opener: str) -> None:
        """
        An echo of args nested to any depth gets one answer (its result or
        an error), never a crash; the connection goes on.
        """
        protocol, transport = self.serve()
        args = _nested(depth, opener)
        protocol.dataReceived(_frame(b'{"id":1,"op":"echo","args":%s}' % args))
        [answer] = _frames_of(transport.value())
        assert_well_formed_answer(self, answer)
        self.assert_still_serves(protocol, transport)

    @bounded(40)
    @given(
        st.sampled_from(
            [0, 1, app_wire.MAX_TOPIC_LENGTH, app_wire.MAX_TOPIC_LENGTH + 1, 10_000]
        ),
        st.sampled_from(["subscribe", "unsubscribe", "notify"]),
    )
    def test_topic_lengths_at_and_past_the_limit(self, length: int, op: str) -> None:
        """
        A topic of 1 to MAX_TOPIC_LENGTH characters is taken; an empty or a
        longer one gets invalid_args, and the connection goes on.
        """
        protocol, transport = self.serve()
        hello = {"id": 0, "op": "hello", "args": {"version": 1}}
        request = {"id": 1, "op": op, "args": {"topic": "t" * length}}
        protocol.dataReceived(
            app_wire.encode_frame(hello) + app_wire.encode_frame(request)
        )
        [_, answer] = _frames_of(transport.value())
        if 1 <= length <= app_wire.MAX_TOPIC_LENGTH:
            self.assertIn("result", answer)
        else:
            self.assertEqual(answer["error"]["code"], app_wire.INVALID_ARGS)
            self.assertIn(str(app_wire.MAX_TOPIC_LENGTH), answer["error"]["message"])
        self.assert_still_serves(protocol, transport)

    @bounded(80)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
    def test_arbitrary_payloads(self, payloads: list[bytes]) -> None:
        """
        Frames of arbitrary bytes get one well-formed answer each, and the
        connection goes on.
        """
        protocol, transport = self.serve()
        protocol.dataReceived(b"".join(_frame(payload) for payload in payloads))
        answers = _frames_of(transport.value())
        self.assertEqual(len(answers), len(payloads))
        for answer in answers:
            assert_well_formed_answer(self, answer)
        self.assert_still_serves(protocol, transport)


#: Values of SQL cells and parameters, as SQLite returns them.
SQL_VALUES = (
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16)
)


class SQLWireProperties(SynchronousTestCase):
    """
    The SQL protocol's line format (`twisted_tls4d.sql.wire`).
    """

    @bounded(100)
    @given(SQL_VALUES)
    def test_values_round_trip(self, value: Any) -> None:
        """Every cell value decodes back from its JSON form unchanged."""
        line = sql_wire.encode_line([sql_wire.encode_value(value)])
        [cell] = sql_wire.decode_line(line.rstrip(b"\n"))
        decoded = sql_wire.decode_value(cell)
        if isinstance(value, float) and math.isnan(value):
            self.assertTrue(math.isnan(decoded))  # type: ignore[arg-type]
        else:
            self.assertEqual(decoded, value)

    @bounded(40)
    @given(st.text(max_size=40), st.lists(SQL_VALUES, max_size=4))
    def test_statement_request_round_trip(
        self, statement: str, parameters: list[Any]
    ) -> None:
        """A statement request parses back to its statement and parameters."""
        line = sql_wire.statement_request(statement, parameters)
        self.assertEqual(line.count(b"\n"), 1)
        request = sql_wire.parse_request(line.decode().rstrip("\n"))
        self.assertEqual(request.statement, statement)
        self.assertEqual(len(request.parameters), len(parameters))
        for got, sent in zip(request.parameters, parameters, strict=True):
            if isinstance(sent, float) and math.isnan(sent):
                self.assertTrue(math.isnan(got))  # type: ignore[arg-type]
            else:
                self.assertEqual(got, sent)

    @bounded(150)
    @given(
        st.text(max_size=60)
        | st.builds(lambda text: "{" + text, st.text(max_size=60))
        | JSON_OBJECTS.map(json.dumps)
        | st.builds(
            lambda params: json.dumps({"sql": "SELECT ?", "params": params}),
            st.lists(JSON_VALUES, max_size=3),
        )
        | st.builds(
            lambda login: json.dumps({"login": login}), JSON_VALUES | JSON_OBJECTS
        )
        | st.integers(1, 100_000).map(
            lambda depth: '{"sql": "x", "params": ' + "[" * depth + "]" * depth + "}"
        )
    )
    @example('{"sql": "x", "params": ' + "[" * 100_000 + "]" * 100_000 + "}")
    @example('{"sql": "\\ud800"}')
    @example('{"login": {"user": "bob", "password": "\\udfff"}}')
    def test_parse_request_is_total(self, text: str) -> None:
        """
        Any line parses to a request or raises WireFormatError: never a
        RecursionError, a KeyError, or a request whose text UTF-8 cannot
        carry.
        """
        try:
            request = sql_wire.parse_request(text)
        except sql_wire.WireFormatError as e:
            self.assertTrue(str(e))
            return
        for part in (request.statement, request.user, request.password):
            if part is not None:
                part.encode("utf-8")
        for value in request.parameters:
            if isinstance(value, str):
                value.encode("utf-8")

    @bounded(40)
    @given(
        st.sampled_from(
            [
                [["s3cr3t-value"]],
                [{"blob": "s3cr3t-value!"}],
                [{"real": "s3cr3t-value"}],
                [{"s3cr3t-value": 1}],
                [1, {"blob": "s3cr3t-value"}],
            ]
        )
    )
    def test_errors_do_not_quote_values(self, parameters: list[Any]) -> None:
        """
        A parameter of no valid form is refused with a message that names
        its place, not its content (which the server logs).
        """
        text = json.dumps({"sql": "SELECT ?", "params": parameters})
        with self.assertRaises(sql_wire.WireFormatError) as caught:
            sql_wire.parse_request(text)
        self.assertNotIn("s3cr3t", str(caught.exception))
        self.assertIn("Parameter", str(caught.exception))

    @bounded(150)
    @given(st.binary(max_size=60) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
    @example(b"[" * 100_000 + b"]" * 100_000)
    def test_decode_line_is_total(self, line: bytes) -> None:
        """
        Any line from a server decodes to a message or a row, or raises
        WireFormatError.
        """
        try:
            value = sql_wire.decode_line(line)
        except sql_wire.WireFormatError:
            return
        self.assertIsInstance(value, (dict, list))

    @bounded(40)
    @given(
        st.text(max_size=20), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    )
    def test_encode_line_carries_lone_surrogates(self, text: str, lone: str) -> None:
        """
        A message quoting a lone surrogate still encodes as one line of
        valid UTF-8 JSON that decodes back to it.
        """
        line = sql_wire.encode_line({"message": text + lone})
        self.assertEqual(line.count(b"\n"), 1)
        line.decode("utf-8")
        self.assertEqual(json.loads(line), {"message": text + lone})


class SQLServerLineProperties(SynchronousTestCase):
    """
    The SQL server's protocol on a string transport, as if alice had
    completed the TLS handshake, with database calls run at once: the lines
    it is given, however they are cut, ended, sized or filled.
    """

    max_line_length = 256

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=Clock(),
            max_line_length=self.max_line_length,
            threadpool=_SynchronousThreadPool(),  # type: ignore[arg-type]
            reactor=_ImmediateReactor(),  # type: ignore[arg-type]
        )
        self.factory.start()
        self.addCleanup(self.factory.stop)

    def serve(self) -> tuple[SQLServerProtocol, StringTransport]:
        """
        Returns:
            A greeted connection of the server, with the greeting cleared
            from its transport.
        """
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.peer_certificate = _alice()
        protocol.peer_authenticated()
        transport.clear()
        self.addCleanup(protocol.connectionLost)
        return protocol, transport

    def messages(self, transport: StringTransport) -> list[Any]:
        """
        Returns:
            Every line the server wrote, parsed as JSON, and clears them.
        """
        data = transport.value()
        transport.clear()
        self.assertTrue(data == b"" or data.endswith(b"\n"))
        return [json.loads(line) for line in data.splitlines()]

    def statuses(self, messages: list[Any]) -> list[dict[str, Any]]:
        """
        Returns:
            The messages that end an answer (the objects with ``ok``), each
            checked for its shape.
        """
        found = [m for m in messages if isinstance(m, dict) and "ok" in m]
        for status in found:
            if status["ok"] is False:
                self.assertIsInstance(status["error"]["code"], str)
                self.assertIsInstance(status["error"]["message"], str)
        return found

    def assert_still_serves(self, protocol: SQLServerProtocol, transport: Any) -> None:
        """Assert that the connection is open and answers SELECT 1."""
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"SELECT 1\n")
        self.assertEqual(self.messages(transport)[1:], [[1], self.ok(1)])

    def ok(self, rows: int) -> dict[str, Any]:
        """
        Returns:
            The status of a statement that succeeded with ``rows`` rows
            outside a transaction.
        """
        return {"ok": True, "rows": rows, "in_transaction": False}

    @bounded(60)
    @given(
        st.lists(
            st.integers(-1000, 1000).map(lambda n: f"SELECT {n}".encode())
            | st.just(b"SELECT * FROM nowhere")
            | st.just(b"")
            | st.just(b"  \t")
            | st.builds(
                lambda n: sql_wire.statement_request("SELECT ?", [n]).rstrip(b"\n"),
                SQL_VALUES,
            ),
            min_size=1,
            max_size=6,
        ),
        st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=6, max_size=6),
        st.lists(st.integers(min_value=0), max_size=12),
    )
    def test_split_and_joined_anywhere(
        self, lines: list[bytes], ends: list[bytes], cuts: list[int]
    ) -> None:
        """
        Lines ended by LF or CRLF, joined and cut at arbitrary points, get
        the same answers as the same lines sent one by one.
        """
        data = [line + end for line, end in zip(lines, ends, strict=False)]
        protocol, transport = self.serve()
        for line in data:
            protocol.dataReceived(line)
        expected = self.messages(transport)
        answered = [line for line in lines if line.strip()]
        self.assertEqual(len(self.statuses(expected)), len(answered))

        protocol, transport = self.serve()
        for piece in support.split_at(b"".join(data), cuts):
            protocol.dataReceived(piece)
        self.assertEqual(self.messages(transport), expected)

    @bounded(40)
    @given(st.binary(max_size=20), st.binary(min_size=1, max_size=3), st.booleans())
    def test_nul_bytes(self, before: bytes, nuls: bytes, json_request: bool) -> None:
        """
        A line holding NUL bytes, raw or escaped in a JSON request, gets one
        error or answer, and the session goes on.
        """
        nul_run = b"\x00" * len(nuls)
        if json_request:
            statement = (b"SELECT 1" + nul_run).decode()
            line = sql_wire.statement_request(statement)
        else:
            line = b"SELECT 1" + before.replace(b"\n", b"") + nul_run + b"\n"
        protocol, transport = self.serve()
        protocol.dataReceived(line)
        self.assertEqual(len(self.statuses(self.messages(transport))), 1)
        self.assert_still_serves(protocol, transport)

    @bounded(40)
    @given(st.binary(max_size=20), INVALID_UTF8, st.binary(max_size=20))
    def test_invalid_utf8(self, before: bytes, bad: bytes, after: bytes) -> None:
        """
        A line that is not UTF-8 gets the error encoding, naming the byte
        and its offset, and the session goes on.
        """
        line = (before + bad + after).replace(b"\n", b" ") + b"\n"
        protocol, transport = self.serve()
        protocol.dataReceived(line)
        [status] = self.statuses(self.messages(transport))
        self.assertEqual(status["error"]["code"], sql_wire.ERROR_ENCODING)
        self.assertIn("offset", status["error"]["message"])
        self.assert_still_serves(protocol, transport)

    @bounded(60)
    @given(
        st.integers(min_value=-3, max_value=3),
        st.sampled_from([b"\n", b"\r\n"]),
        st.integers(min_value=0, max_value=3),
    )
    def test_line_length_at_and_past_the_limit(
        self, over: int, end: bytes, pieces: int
    ) -> None:
        """
        A line of up to --max-line-length bytes (its LF or CRLF not counted)
        is served; a longer one gets line_too_long, the connection closes,
        and nothing the client sends after it runs.
        """
        length = self.max_line_length + over
        line = b"SELECT 1".ljust(length) + end
        after, later = (f"t{uuid.uuid4().hex}" for _ in range(2))
        protocol, transport = self.serve()
        for piece in support.split_at(
            line, [len(line) * (i + 1) // (pieces + 1) for i in range(pieces)]
        ):
            protocol.dataReceived(piece)
        protocol.dataReceived(f"CREATE TABLE {after} (a)\n".encode())
        messages = self.messages(transport)
        if over <= 0:
            self.assertEqual(messages[1:2], [[1]])
            self.assertEqual(len(self.statuses(messages)), 2)
            self.assertFalse(transport.disconnecting)
            return
        [status] = self.statuses(messages)
        self.assertEqual(status["error"]["code"], sql_wire.ERROR_LINE_TOO_LONG)
        self.assertIn(str(self.max_line_length), status["error"]["message"])
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(f"CREATE TABLE {later} (a)\n".encode())
        self.assertEqual(transport.value(), b"")
        self.assertNotIn(after, self.tables())
        self.assertNotIn(later, self.tables())

    def tables(self) -> list[str]:
        """
        Returns:
            The tables of the server's database, read apart from it.
        """
        if not self.layout.database.exists():
            return []
        connection = sqlite3.connect(str(self.layout.database))
        try:
            return [r[0] for r in connection.execute("SELECT name FROM sqlite_master")]
        finally:
            connection.close()

    @bounded(40)
    @given(
        st.lists(
            st.sampled_from([b"\n", b"\r\n", b" \n", b"\t\r\n", b"\r\r\n", b"   \n"]),
            min_size=1,
            max_size=5,
        )
    )
    def test_delimiter_only_lines(self, lines: list[bytes]) -> None:
        """
        Lines of nothing but a line end (or blanks) get no answer, and the
        next statement is answered.
        """
        protocol, transport = self.serve()
        protocol.dataReceived(b"".join(lines))
        self.assertEqual(self.messages(transport), [])
        self.assert_still_serves(protocol, transport)

    @bounded(40)
    @given(
        st.text(
            st.characters(codec="utf-8", exclude_characters="'\"\n\r\x00"),
            min_size=4,
            max_size=12,
        ).filter(str.strip),
        st.sampled_from(
            [
                "SELECT '{v}' '{v}' '{v}'",
                "SELECT * FROM nowhere WHERE a = '{v}'",
                "SELECT '{v}",
                "INSERT INTO nowhere VALUES ('{v}')",
                "SELECT '{v}'; SELECT 2",
                "SELECT x'{v}'",
            ]
        ),
    )
    def test_failures_logged_without_literals(self, value: str, template: str) -> None:
        """
        A failed statement is logged with the database's message but not
        the string literals of the statement, which SQLite quotes back.
        """
        value = "v-" + value
        protocol, transport = self.serve()
        with capturedLogs() as events:
            protocol.dataReceived(template.format(v=value).encode() + b"\n")
        [status] = self.statuses(self.messages(transport))
        self.assertIs(status["ok"], False)
        [failed] = [e for e in events if "failed: {error}" in e["log_format"]]
        self.assertNotIn(value, failed["error"])
        self.assertNotIn(value, formatEvent(failed))
        self.assertTrue(failed["error"])

    @bounded(80)
    @given(st.lists(st.binary(max_size=60), min_size=1, max_size=5))
    def test_arbitrary_lines(self, lines: list[bytes]) -> None:
        """
        Lines of arbitrary bytes get one well-formed answer each (none for
        blank ones), and the session goes on.
        """
        lines = [line.replace(b"\n", b"") for line in lines]
        protocol, transport = self.serve()
        protocol.dataReceived(b"".join(line + b"\n" for line in lines))
        expected = 0
        for line in lines:
            try:
                expected += bool(line.removesuffix(b"\r").decode("utf-8").strip())
            except UnicodeDecodeError:
                expected += 1
        self.assertEqual(len(self.statuses(self.messages(transport))), expected)
        protocol.dataReceived(b"ROLLBACK\n")
        self.messages(transport)
        self.assert_still_serves(protocol, transport)


class PEMProperties(SynchronousTestCase):
    """
    Reading keys, certificates and revocation lists from PEM files that are
    truncated, wrapped in junk, mixed in their line endings, or hold several
    keys: each load gives the right objects or raises PEMError naming the
    file, never another exception.
    """

    def setUp(self) -> None:
        self.layout = _layout()
        self.folder = support.temporary_folder("tls4d-pem-")
        self.cert_pem = self.layout.cert.read_bytes()
        self.key_pem = self.layout.key.read_bytes()
        self.ca_pem = self.layout.ca.read_bytes()
        self.chain = pki.load_certificates(self.layout.cert)
        self.key = pki.load_private_key(self.layout.key)

    def write(self, name: str, data: bytes) -> Path:
        """
        Returns:
            The path of a file of the test folder holding ``data``, readable
            by its owner only.
        """
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def assert_identity_or_error(
        self, cert_data: bytes, key_data: bytes, same: bool = True
    ) -> bool:
        """
        Assert that the files load as the root's own identity (or, unless
        ``same``, as any identity), or fail with a PEMError naming one of
        them.

        Returns:
            Whether they loaded.
        """
        cert = self.write("cert.pem", cert_data)
        key = self.write("key.pem", key_data)
        try:
            identity = tls.load_identity(cert, key)
        except PEMError as e:
            self.assertTrue(str(cert) in str(e) or str(key) in str(e), str(e))
            return False
        if same:
            self.assertEqual(identity.chain, self.chain)
            self.assertEqual(_spki(identity.key), _spki(self.key))
        return True

    def assert_installable_or_error(
        self, cert_data: bytes, key_data: bytes, same: bool = True
    ) -> None:
        """
        Assert that ``tls4d install`` reads the files as the root's own
        certificate and key (or, unless ``same``, as any), or refuses them
        with a PEMError naming one.
        """
        cert = self.write("install-cert.pem", cert_data)
        key = self.write("install-key.pem", key_data)
        try:
            installable = lifecycle.load_for_install(cert, key=key)
            lifecycle.check_installable(installable)
        except PEMError as e:
            self.assertTrue(str(cert) in str(e) or str(key) in str(e), str(e))
            return
        if same:
            self.assertEqual(installable.certificate, self.chain[0])
            self.assertEqual(_spki(installable.key), _spki(self.key))

    @bounded(60)
    @given(st.booleans(), st.integers(min_value=0))
    def test_truncated(self, truncate_key: bool, at: int) -> None:
        """A truncated certificate or key file loads whole or fails with PEMError."""
        cert, key = self.cert_pem, self.key_pem
        if truncate_key:
            key = key[: at % len(key)]
        else:
            cert = cert[: at % len(cert)]
        self.assert_identity_or_error(cert, key)
        self.assert_installable_or_error(cert, key)

    @bounded(60)
    @given(
        st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
        st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
        st.booleans(),
    )
    def test_junk_before_and_after(
        self, before: bytes, after: bytes, in_key: bool
    ) -> None:
        """
        Junk before and after the PEM blocks is ignored when it holds no
        PEM boundary; otherwise the load succeeds or fails with PEMError.
        """
        cert, key = self.cert_pem, self.key_pem
        if in_key:
            key = before + b"\n" + key + after
        else:
            cert = before + b"\n" + cert + after
        loaded = self.assert_identity_or_error(cert, key)
        if b"-----" not in before + after:
            self.assertTrue(loaded)
        self.assert_installable_or_error(cert, key)

    @bounded(60)
    @given(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1))
    def test_mixed_line_endings(self, endings: list[bytes]) -> None:
        """
        Certificate and key files whose lines end in any mix of LF, CRLF and
        CR load as the same objects.
        """

        def mixed(data: bytes) -> bytes:
            """Give each line of ``data`` the next of the line ends, in turn."""
            lines = data.splitlines()
            return b"".join(
                line + endings[i % len(endings)] for i, line in enumerate(lines)
            )

        self.assertTrue(
            self.assert_identity_or_error(mixed(self.cert_pem), mixed(self.key_pem))
        )
        self.assertEqual(
            tls.load_client_cas(self.write("ca.pem", mixed(self.ca_pem))),
            pki.load_certificates(self.layout.ca),
        )
        installable = lifecycle.load_for_install(
            self.write("c.pem", mixed(self.cert_pem)),
            key=self.write("k.pem", mixed(self.key_pem)),
        )
        self.assertEqual(installable.certificate, self.chain[0])

    @bounded(40)
    @given(st.integers(min_value=1, max_value=4), st.integers(min_value=0, max_value=4))
    def test_several_keys(self, others: int, position: int) -> None:
        """
        A key file holding more than one private key is refused with a
        PEMError that names the file and the count, whatever the key's place.
        """
        keys = [pki.private_key_pem(pki.generate_private_key()) for _ in range(others)]
        keys.insert(position % (others + 1), self.key_pem)
        key = self.write("keys.pem", b"".join(keys))
        with self.assertRaises(PEMError) as caught:
            pki.load_private_key(key)
        self.assertIn(str(key), str(caught.exception))
        self.assertIn(f"holds {others + 1} private keys", str(caught.exception))
        self.assertFalse(self.assert_identity_or_error(self.cert_pem, b"".join(keys)))
        self.assert_installable_or_error(self.cert_pem, b"".join(keys))

    @bounded(40)
    @given(st.booleans())
    def test_key_and_certificate_in_one_file(self, key_first: bool) -> None:
        """
        A file holding the certificate and its key loads as both, in either
        order.
        """
        data = (
            self.key_pem + self.cert_pem if key_first else self.cert_pem + self.key_pem
        )
        self.assertTrue(self.assert_identity_or_error(data, data))
        installable = lifecycle.load_for_install(self.write("both.pem", data))
        self.assertEqual(_spki(installable.key), _spki(self.key))

    @bounded(150)
    @given(
        st.sampled_from(["certificate", "chain", "key"]),
        st.lists(
            st.tuples(st.integers(min_value=0), st.integers(0, 255)),
            min_size=1,
            max_size=3,
        ),
    )
    def test_damaged_contents(self, which: str, changes: list[tuple[int, int]]) -> None:
        """
        A certificate or key whose DER bytes are damaged (well-formed PEM
        around them) loads, or fails with PEMError naming the file, also
        where cryptography parses lazily (extensions, names, public key).
        """
        if which == "key":
            der = self.key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            key = _pem(b"PRIVATE KEY", _damaged(der, changes))
            cert = self.cert_pem
        else:
            index = 0 if which == "certificate" else len(self.chain) - 1
            ders = [c.public_bytes(serialization.Encoding.DER) for c in self.chain]
            ders[index] = _damaged(ders[index], changes)
            cert = b"".join(_pem(b"CERTIFICATE", der) for der in ders)
            key = self.key_pem
        self.assert_identity_or_error(cert, key, same=False)
        self.assert_installable_or_error(cert, key, same=False)
        if which != "key":
            path = self.write("cas.pem", cert)
            try:
                tls.load_client_cas(path)
            except PEMError as e:
                self.assertIn(str(path), str(e))

    @bounded(80)
    @given(
        st.lists(
            st.tuples(st.integers(min_value=0), st.integers(0, 255)),
            min_size=1,
            max_size=3,
        ),
        st.integers(min_value=0),
    )
    def test_damaged_revocation_list(
        self, changes: list[tuple[int, int]], cut: int
    ) -> None:
        """
        A revocation list that is damaged or truncated loads (if its
        signature still holds) or fails with PEMError naming the file.
        """
        cas = pki.load_certificates(self.layout.ca)
        crl = revocation.build_crl(root.load_local_ca(self.layout), [], 1)
        der = crl.public_bytes(serialization.Encoding.DER)
        data = _pem(b"X509 CRL", _damaged(der, changes))
        for content in (data, data[: cut % len(data)]):
            path = self.write("crl.pem", content)
            try:
                loaded = tls.load_crl(path, cas)
            except PEMError as e:
                self.assertIn(str(path), str(e))
            else:
                self.assertIsInstance(loaded, x509.CertificateRevocationList)

    @bounded(60)
    @given(st.binary(max_size=200), st.binary(max_size=200))
    def test_arbitrary_bytes(self, cert_data: bytes, key_data: bytes) -> None:
        """Files of arbitrary bytes fail with PEMError naming the file."""
        self.assertFalse(self.assert_identity_or_error(cert_data, key_data))
        path = self.write("cas.pem", cert_data)
        with self.assertRaises(PEMError) as caught:
            tls.load_client_cas(path)
        self.assertIn(str(path), str(caught.exception))


def _spki(key: Any) -> bytes:
    """
    Returns:
        The DER SubjectPublicKeyInfo of a private key's public key.
    """
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _pem(label: bytes, der: bytes) -> bytes:
    """
    Returns:
        ``der`` as a PEM block with the given label.
    """
    body = base64.encodebytes(der)
    return (
        b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"
    )


def _damaged(der: bytes, changes: list[tuple[int, int]]) -> bytes:
    """
    Returns:
        ``der`` with the byte at each offset (modulo its length) replaced.
    """
    damaged = bytearray(der)
    for offset, value in changes:
        damaged[offset % len(damaged)] = value
    return bytes(damaged)
