"""
A bounded fuzz run (hypothesis) against the application and SQL servers,
through TLS in memory: an authenticated client sends generated frames or
lines, well-formed and not, cut at arbitrary points. After each case the
server must have answered every whole request with a well-formed answer or
error (or closed that one connection, after saying why), logged its
refusals without the secret planted in the requests, and answer a
well-formed request on a fresh connection.

The number of cases is bounded so that the module takes well under a
minute; ``TLS4D_HYPOTHESIS_SCALE`` (see tests/test_properties.py) makes the
search deeper.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver, LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests.test_properties import assert_well_formed_answer, bounded
from tests.test_sql import _ImmediateReactor, _SynchronousThreadPool
from twisted_tls4d.app import wire as app_wire
from twisted_tls4d.app.database import SQLDatabase, sql_server_sessions
from twisted_tls4d.app.protocol import AppServerFactory
from twisted_tls4d.sql import wire as sql_wire
from twisted_tls4d.sql.protocol import MAX_LOGIN_DELAY, SQLServerFactory

#: What the fuzzed requests carry as values, statements' literals and
#: passwords: it must never reach the log.
SECRET = "s3cr3t-Fuzz-7b1e"

#: The application server's frame limit in these runs, small enough that
#: frames past it are cheap to make.
MAX_FRAME_SIZE = 2048

#: The SQL server's line limit in these runs.
MAX_LINE_LENGTH = 512

#: Answer codes the application server gives to frames it cannot read at
#: all, each of which it must log.
FRAME_REFUSALS = (
    app_wire.FRAME_TOO_LARGE,
    app_wire.INVALID_JSON,
    app_wire.NOT_AN_OBJECT,
)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Returns:
        ``data`` cut at the given offsets, without empty pieces.
    """
    return [piece for piece in support.split_at(data, cuts) if piece]


def _run_now(function: Any, *args: Any) -> Deferred[Any]:
    """Run database work at once, in the reactor thread: for tests only."""
    return maybeDeferred(function, *args)


def _log_text(events: list[dict[str, Any]]) -> str:
    """
    Returns:
        The log events as an operator reads them, then as the JSON log
        observer would store their fields.
    """
    return "\n".join(formatEvent(event) + repr(event) for event in events)


#: Values a request may carry; some hold the secret.
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.just(SECRET)
    | st.just({"blob": SECRET})
    | st.just({"real": SECRET}),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", SECRET]), children, max_size=3)
    ),
    max_leaves=8,
)

#: SQL statements, some with the secret as a literal, some broken.
STATEMENTS = st.sampled_from(
    [
        "SELECT 1",
        "CREATE TABLE IF NOT EXISTS fuzz (a)",
        f"INSERT INTO fuzz VALUES ('{SECRET}')",
        f"SELECT * FROM fuzz WHERE a = '{SECRET}'",
        f"SELECT * FROM fuzz WHERE a = '{SECRET}",
        f"SELECT '{SECRET}' '{SECRET}' '{SECRET}'",
        f"SELECT * FROM nowhere WHERE a = '{SECRET}'",
        f"INSERT INTO fuzz VALUES ('{SECRET}', 2)",
        f"SELECT '{SECRET}'; SELECT 2",
        "SELECT ?, ?",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "ATTACH 'other.sqlite' AS other",
    ]
) | st.text(max_size=20)


@st.composite
def app_requests(draw: st.DrawFn) -> dict[str, Any]:
    """
    Returns:
        A request-like object: usually with an id and an op of the server,
        args that may hold the secret; sometimes with members missing or of
        the wrong kind.
    """
    request: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        request["id"] = draw(
            st.integers(-3, 3) | st.text(max_size=3) | st.none() | st.booleans()
        )
    if draw(st.integers(0, 9)):
        request["op"] = draw(
            st.sampled_from(
                ["ping", "echo", "whoami", "hello", "subscribe", "unsubscribe"]
                + ["notify", "sql", "nope", ""]
            )
            | st.integers()
        )
    if draw(st.booleans()):
        if request.get("op") == "sql" and draw(st.booleans()):
            request["args"] = {
                "statement": draw(STATEMENTS),
                "params": draw(st.lists(VALUES, max_size=2)),
            }
        else:
            request["args"] = draw(
                st.dictionaries(
                    st.sampled_from(["version", "topic", "data", "statement", "x"]),
                    VALUES | st.integers(0, 2),
                    max_size=3,
                )
                | VALUES
            )
    return request


#: One item the fuzzing client sends to the application server: a whole
#: frame (first member True) or bytes that break the framing (False).
APP_ITEMS = st.one_of(
    app_requests().map(lambda r: (True, app_wire.encode_frame(r))),
    st.just(
        (True, app_wire.encode_frame({"id": 0, "op": "hello", "args": {"version": 1}}))
    ),
    st.binary(max_size=40).map(lambda b: (True, app_wire.HEADER.pack(len(b)) + b)),
    st.sampled_from(
        [
            f'{{"id": 1, "op": "echo", "args": {{"password": "{SECRET}"',
            f'["{SECRET}"]',
            f'"{SECRET}"',
            f'{{"id": 1, "op": "echo", "args": {{"x": NaN, "p": "{SECRET}"}}}}',
            '{"id": 2, "op": "echo", "args": ' + "[" * 5000 + "]" * 5000 + "}",
        ]
    ).map(
        lambda text: (True, app_wire.HEADER.pack(len(text.encode())) + text.encode())
    ),
    st.builds(
        lambda junk: (True, app_wire.HEADER.pack(len(junk)) + junk),
        st.builds(
            lambda a, b: a + SECRET.encode() + b"\xff" + b,
            st.binary(max_size=8),
            st.binary(max_size=8),
        ),
    ),
    st.integers(MAX_FRAME_SIZE + 1, app_wire.MAX_HEADER_LENGTH).map(
        lambda n: (True, app_wire.HEADER.pack(n) + SECRET.encode())
    ),
    st.binary(min_size=1, max_size=6).map(lambda b: (False, b)),
)


class _FrameClient(Int32StringReceiver):
    """
    A client of the application server that keeps every frame it gets, as
    the raw payload, and why its connection ended.
    """

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.lost: Failure | None = None

    def stringReceived(self, string: bytes) -> None:  # noqa: N802
        """Keep a frame."""
        self.payloads.append(string)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Keep why the connection ended."""
        self.lost = reason


class _LineClient(LineReceiver):
    """
    A client of the SQL server that keeps every line it gets, raw, and why
    its connection ended.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        """Keep a line."""
        self.lines.append(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Keep why the connection ended."""
        self.lost = reason


class _FuzzCase(SynchronousTestCase):
    """
    A server root, a client identity, a clock, and the log of the test.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.identity = support.make_client_identity(self.layout)
        self.client_tls = support.client_options(self.identity)
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, factory: Any, client: Protocol, app: bool) -> Any:
        """
        Returns:
            The pump of a new in-memory TLS connection of ``client`` to
            ``factory``, handshake done.
        """
        _, _, pump = support.connect_in_memory(
            factory, self.creator(app), client, self.client_tls, self.clock
        )
        return pump

    def creator(self, app: bool) -> Any:
        """
        Returns:
            The server's connection creator, made once per test.
        """
        key = "_app_creator" if app else "_sql_creator"
        if not hasattr(self, key):
            setattr(self, key, support.server_creator(self.layout, app=app))
        return getattr(self, key)

    def hang_up(self, client: Any, pump: Any) -> None:
        """
        Close the client's side of a connection, if still open, and let the
        server see it go.
        """
        if client.lost is None:
            client.transport.loseConnection()
            pump.flush()

    def assert_no_secret_logged(self, since: int) -> None:
        """Assert that no log event since index ``since`` holds the secret."""
        text = _log_text(self.events[since:])
        self.assertNotIn(SECRET, text)


class AppServerFuzz(_FuzzCase):
    """
    The application server, fuzzed with frames of generated requests, bad
    payloads, oversized headers and stray bytes.
    """

    def setUp(self) -> None:
        super().setUp()
        path = support.temporary_folder("tls4d-fuzz-app-") / "fuzz.sqlite"
        database = SQLDatabase(
            sql_server_sessions(path, None, "full"),
            run=_run_now,
        )
        self.factory = AppServerFactory(
            clock=self.clock,
            max_frame_size=MAX_FRAME_SIZE,
            database=database,
            name="fuzz",
        )
        self.factory.startFactory()
        self.addCleanup(self.factory.stopFactory)

    @bounded(60)
    @given(
        st.lists(APP_ITEMS, min_size=1, max_size=8),
        st.lists(st.integers(min_value=0), max_size=6),
    )
    def test_fuzzed_frames(
        self, items: list[tuple[bool, bytes]], cuts: list[int]
    ) -> None:
        """
        Whatever an authenticated client sends, each whole frame gets one
        well-formed answer until a frame over the limit (answered
        frame_too_large, then the connection closes); every unreadable frame
        is logged, no log line holds the secret, and a fresh connection is
        served.
        """
        since = len(self.events)
        client = _FrameClient()
        pump = self.connect(self.factory, client, app=True)
        data = b"".join(item for _, item in items)
        for piece in _cut(data, cuts):
            if client.lost is not None:
                break
            client.transport.write(piece)  # type: ignore[union-attr]
            pump.flush()

        answers = [json.loads(payload) for payload in client.payloads]
        for answer in answers:
            if "event" not in answer:
                assert_well_formed_answer(self, answer)
        if all(whole for whole, _ in items):
            expected = 0
            for _, item in items:
                expected += 1
                (length,) = app_wire.HEADER.unpack(item[:4])
                if length > MAX_FRAME_SIZE:
                    break
            replies = [a for a in answers if "event" not in a]
            self.assertEqual(len(replies), expected, answers)
            refused = replies[-1].get("error", {}).get("code") == "frame_too_large"
            self.assertEqual(client.lost is not None, refused)
        if client.lost is not None:
            [last] = [a for a in answers if "event" not in a][-1:]
            self.assertEqual(last["error"]["code"], app_wire.FRAME_TOO_LARGE)

        self.hang_up(client, pump)
        logged = _log_text(self.events[since:])
        for answer in answers:
            code = answer.get("error", {}).get("code")
            if code in FRAME_REFUSALS:
                self.assertIn(f"answered {code}", logged)
        self.assert_no_secret_logged(since)
        self.assert_fresh_connection_served()

    def assert_fresh_connection_served(self) -> None:
        """Assert that a new connection is greeted and gets its ping answered."""
        client = _FrameClient()
        pump = self.connect(self.factory, client, app=True)
        hello = {"id": 1, "op": "hello", "args": {"version": 1}}
        client.transport.write(  # type: ignore[union-attr]
            app_wire.encode_frame(hello)
            + app_wire.encode_frame({"id": 2, "op": "ping"})
        )
        pump.flush()
        answers = [json.loads(payload) for payload in client.payloads]
        self.assertEqual(answers[0]["result"]["client"], "alice")
        self.assertEqual(answers[1], {"id": 2, "result": "pong"})
        self.hang_up(client, pump)


#: One line the fuzzing client sends to the SQL server, without its end.
SQL_LINES = st.one_of(
    STATEMENTS.map(lambda statement: statement.replace("\n", " ").encode()),
    st.builds(
        lambda statement, params: sql_wire.statement_request(statement, params).rstrip(
            b"\n"
        ),
        STATEMENTS,
        st.lists(
            st.just(SECRET) | st.just(SECRET.encode()) | st.integers(), max_size=2
        ),
    ),
    st.lists(VALUES, max_size=2).map(
        lambda params: json.dumps({"sql": "SELECT ?", "params": params}).encode()
    ),
    st.just(json.dumps({"login": {"user": "nobody", "password": SECRET}}).encode()),
    st.sampled_from(
        [
            b"",
            b"   ",
            b"\r",
            f"SELECT '{SECRET}\x00'".encode(),
            f"SELECT '{SECRET}'\xff".encode("latin-1"),
            b'{"sql": "x", "params": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            json.dumps(
                {"sql": f"SELECT '{SECRET}'", "params": [{"blob": SECRET}]}
            ).encode(),
            b'{"sql": "\\ud800"}',
            b"{",
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.integers(1, 40).map(
        lambda extra: (f"SELECT '{SECRET}' " + "x" * (MAX_LINE_LENGTH + extra)).encode()
    ),
)


def _received(line: bytes, end: bytes) -> bytes:
    """
    Returns:
        The line the SQL server takes when ``line`` is sent with ``end``:
        without its LF, and without a CR before that.
    """
    return (line + end)[:-1].removesuffix(b"\r")


def _answered(line: bytes) -> bool:
    """
    Returns:
        Whether the SQL server answers ``line`` (as it takes it, see
        `_received`): all lines but the empty and blank ones do.
    """
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


class SQLServerFuzz(_FuzzCase):
    """
    The SQL server, fuzzed with generated statements, JSON requests, logins,
    bad bytes and overlong lines, ended by LF or CRLF.
    """

    def setUp(self) -> None:
        super().setUp()
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=self.clock,
            max_line_length=MAX_LINE_LENGTH,
            threadpool=_SynchronousThreadPool(),  # type: ignore[arg-type]
            reactor=_ImmediateReactor(),  # type: ignore[arg-type]
        )
        self.factory.start()
        self.addCleanup(self.factory.stop)

    def exchange(self, client: _LineClient, pump: Any, pieces: list[bytes]) -> None:
        """
        Send ``pieces`` one write each, and let the server answer them,
        advancing the clock past any login delay.
        """
        for piece in pieces:
            if client.lost is not None:
                return
            client.transport.write(piece)  # type: ignore[union-attr]
            pump.flush()
        for _ in range(8):
            self.clock.advance(MAX_LOGIN_DELAY + 1)
            pump.flush()

    @bounded(60)
    @given(
        st.lists(
            st.tuples(SQL_LINES, st.sampled_from([b"\n", b"\r\n"])),
            min_size=1,
            max_size=8,
        ).filter(lambda lines: sum(b"login" in line for line, _ in lines) <= 2),
        st.lists(st.integers(min_value=0), max_size=6),
    )
    def test_fuzzed_lines(
        self, lines: list[tuple[bytes, bytes]], cuts: list[int]
    ) -> None:
        """
        Whatever an authenticated client sends, each non-blank line gets one
        answer of well-formed JSON lines ending in a status, until a line
        over the limit (answered line_too_long, then the connection closes
        and nothing after it runs); every failure is logged, no log line
        holds the secret, and a fresh connection is served.
        """
        since = len(self.events)
        client = _LineClient()
        pump = self.connect(self.factory, client, app=False)
        self.assertEqual(len(client.lines), 1)
        data = b"".join(line + end for line, end in lines)
        self.exchange(client, pump, _cut(data, cuts))

        messages = [json.loads(line) for line in client.lines[1:]]
        statuses = [m for m in messages if isinstance(m, dict) and "ok" in m]
        expected = 0
        too_long = False
        for line, end in lines:
            received = _received(line, end)
            if len(received) > MAX_LINE_LENGTH:
                expected += 1
                too_long = True
                break
            expected += _answered(received)
        self.assertEqual(len(statuses), expected, messages)
        for status in statuses:
            if status["ok"] is False:
                self.assertIsInstance(status["error"]["code"], str)
                self.assertIsInstance(status["error"]["message"], str)
        if too_long:
            self.assertEqual(
                statuses[-1]["error"]["code"], sql_wire.ERROR_LINE_TOO_LONG
            )
            self.assertIsNotNone(client.lost)
        else:
            self.assertIsNone(client.lost)

        self.hang_up(client, pump)
        failures = [
            e
            for e in self.events[since:]
            if "failed: {error}" in e.get("log_format", "")
        ]
        self.assertEqual(len(failures), sum(s["ok"] is False for s in statuses))
        self.assert_no_secret_logged(since)
        self.assert_fresh_connection_served()

    def assert_fresh_connection_served(self) -> None:
        """Assert that a new connection is greeted and answers SELECT 1."""
        client = _LineClient()
        pump = self.connect(self.factory, client, app=False)
        client.transport.write(b"SELECT 1\n")  # type: ignore[union-attr]
        pump.flush()
        messages = [json.loads(line) for line in client.lines]
        self.assertEqual(messages[0]["hello"]["client"], "alice")
        self.assertEqual(
            messages[2:], [[1], {"ok": True, "rows": 1, "in_transaction": False}]
        )
        self.hang_up(client, pump)
