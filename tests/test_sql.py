"""
Tests of the SQL server, its line format, its client and ``tls4d sql``.

Most tests run the server in memory (TLS through ``iosim``, time on a
``task.Clock``) with a thread pool stand-in that runs database calls at once;
`EndToEndTests` and `CommandTests` use real loopback sockets and the factory's
real database threads.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet import defer, reactor, task
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ProcessDone,
    ProcessTerminated,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests import support
from tests.test_app import closed_port, expired_client_identity, listen_scripted
from twisted_tls4d import clienttls, pki
from twisted_tls4d.app.client import describe_tls_failure
from twisted_tls4d.sql import command, wire
from twisted_tls4d.sql.client import (
    Result,
    SQLClient,
    SQLConnectionError,
    SQLError,
    _SQLClientProtocol,
    connect,
    format_table,
)
from twisted_tls4d.sql.protocol import SQLServerFactory
from twisted_tls4d.sql.session import Session

_REPOSITORY = Path(__file__).resolve().parent.parent


class _SynchronousThreadPool:
    """
    Stands in for a thread pool: runs each call at once, in the caller's
    thread, so in-memory tests need no real threads.
    """

    started = True

    def callInThreadWithCallback(  # noqa: N802 (ThreadPool's name)
        self, on_result: Callable[[bool, Any], object] | None, function: Any, *args: Any
    ) -> None:
        try:
            result, ok = function(*args), True
        except BaseException:
            result, ok = Failure(), False
        if on_result is not None:
            on_result(ok, result)

    def callInThread(self, function: Any, *args: Any) -> None:  # noqa: N802
        self.callInThreadWithCallback(None, function, *args)


class _QueuedThreadPool(_SynchronousThreadPool):
    """
    Stands in for a thread pool: keeps each call until the test runs it, to
    see what the server does while a statement is running.
    """

    def __init__(self) -> None:
        self.queued: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def callInThreadWithCallback(  # noqa: N802
        self, on_result: Callable[[bool, Any], object] | None, function: Any, *args: Any
    ) -> None:
        self.queued.append((on_result, function, args))

    def run_next(self) -> None:
        on_result, function, args = self.queued.pop(0)
        super().callInThreadWithCallback(on_result, function, *args)

    def drain(self) -> None:
        while self.queued:
            self.run_next()


class _ImmediateReactor:
    """
    Stands in for the reactor's ``callFromThread``: calls at once.
    """

    def callFromThread(  # noqa: N802 (the reactor's name)
        self, function: Any, *args: Any, **kwargs: Any
    ) -> None:
        function(*args, **kwargs)


class _LineClient(LineReceiver):
    """
    A bare client of the line format: records every line the server sends,
    parsed as JSON, and why the connection ended.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.messages.append(json.loads(line.decode("utf-8")))

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = reason


def _tables(database: Path) -> list[str]:
    """
    Returns:
        The names of the tables in ``database``, opened apart from the server;
        none if the file does not exist.
    """
    if not database.exists():
        return []
    connection = sqlite3.connect(str(database))
    try:
        return [r[0] for r in connection.execute("SELECT name FROM sqlite_master")]
    finally:
        connection.close()


def _count_rows(database: Path, table: str) -> int:
    """
    Returns:
        The number of rows of ``table``, read apart from the server.
    """
    connection = sqlite3.connect(str(database))
    try:
        (count,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(count)
    finally:
        connection.close()


def _remove_later(case: unittest.TestCase, path: Path) -> None:
    """
    Remove the temporary folder holding ``path`` when the test ends.
    """
    case.addCleanup(shutil.rmtree, path.parent, True)


class _InMemoryCase(unittest.TestCase):
    """
    A server root, a client identity and an SQL server factory whose database
    calls run at once, connected to in memory.
    """

    max_line_length = 1024

    def setUp(self) -> None:
        self.layout = support.make_root()
        _remove_later(self, self.layout.path)
        self.identity = support.make_client_identity(self.layout)
        _remove_later(self, self.identity.key.parent)
        self.clock = Clock()
        self.threadpool: _SynchronousThreadPool = self.make_threadpool()
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=self.clock,
            max_line_length=self.max_line_length,
            threadpool=self.threadpool,
            reactor=_ImmediateReactor(),
        )
        self.factory.start()
        self.addCleanup(self.factory.stop)

    def make_threadpool(self) -> _SynchronousThreadPool:
        """
        Returns:
            The stand-in for the database threads.
        """
        return _SynchronousThreadPool()

    def connect(self, client_tls: Any = None) -> tuple[Any, _LineClient, Any]:
        """
        Returns:
            The server's TLS protocol, a `_LineClient` connected to it (as the
            test identity unless ``client_tls`` says otherwise), and the pump.
        """
        client = _LineClient()
        server, _, pump = support.connect_in_memory(
            self.factory,
            support.server_creator(self.layout),
            client,
            client_tls or support.client_options(self.identity),
            self.clock,
        )
        return server, client, pump

    def ask(self, client: _LineClient, pump: Any, data: bytes) -> list[Any]:
        """
        Send ``data`` and return the messages that came back for it.
        """
        before = len(client.messages)
        client.transport.write(data)
        pump.flush()
        return client.messages[before:]


class SQLServerTests(_InMemoryCase):
    """
    The server's answers to statements, over in-memory TLS.
    """

    def test_greeting(self) -> None:
        """
        An authenticated client is greeted with the protocol version and the
        name in its certificate.
        """
        _, client, _ = self.connect()
        self.assertEqual(
            client.messages,
            [
                {
                    "hello": {
                        "server": "tls4d SQL server",
                        "protocol": 1,
                        "client": "alice",
                        "user": "alice",
                        "access": "full",
                        "login_required": False,
                        "features": ["parameters", "types", "streaming", "login"],
                    }
                }
            ],
        )

    def test_create_insert_select(self) -> None:
        """
        A table is created, filled and read back: columns, then each row as an
        array, then a status with the row count.
        """
        _, client, pump = self.connect()
        self.assertEqual(
            self.ask(client, pump, b"CREATE TABLE people (id INTEGER, name TEXT)\n"),
            [{"ok": True, "rows": 0, "in_transaction": False}],
        )
        self.assertEqual(
            self.ask(
                client, pump, b"INSERT INTO people VALUES (1, 'Ada'), (2, 'Grace')\n"
            ),
            [{"ok": True, "rows": 0, "changes": 2, "in_transaction": False}],
        )
        self.assertEqual(
            self.ask(client, pump, b"SELECT id, name FROM people ORDER BY id\n"),
            [
                {"columns": ["id", "name"], "types": ["integer", "text"]},
                [1, "Ada"],
                [2, "Grace"],
                {"ok": True, "rows": 2, "in_transaction": False},
            ],
        )

    def test_empty_result_has_columns(self) -> None:
        """
        A query that matches nothing still names its columns.
        """
        _, client, pump = self.connect()
        self.assertEqual(
            self.ask(client, pump, b"SELECT 1 AS one WHERE 0\n"),
            [
                {"columns": ["one"], "types": ["null"]},
                {"ok": True, "rows": 0, "in_transaction": False},
            ],
        )

    def test_values_of_every_type(self) -> None:
        """
        Text (UTF-8), NULL, reals, a BLOB (base64) and an infinite real (by
        name) are encoded unambiguously.
        """
        _, client, pump = self.connect()
        answer = self.ask(
            client, pump, "SELECT 'é😀', NULL, 2.5, x'00ff', 1e999, -1e999\n".encode()
        )
        self.assertEqual(
            answer[1],
            [
                "é😀",
                None,
                2.5,
                {"blob": "AP8="},
                {"real": "Infinity"},
                {"real": "-Infinity"},
            ],
        )

    def test_sql_error_then_session_goes_on(self) -> None:
        """
        An SQL error is answered with SQLite's message and the session runs
        the next statement.
        """
        _, client, pump = self.connect()
        self.assertEqual(
            self.ask(client, pump, b"SELECT * FROM missing\n"),
            [
                {
                    "ok": False,
                    "error": {
                        "code": "sql",
                        "message": "no such table: missing",
                        "sqlite_code": 1,
                        "sqlite_name": "SQLITE_ERROR",
                    },
                    "in_transaction": False,
                }
            ],
        )
        self.assertEqual(self.ask(client, pump, b"SELECT 7\n")[1], [7])

    def test_sql_error_is_logged_without_the_statement(self) -> None:
        """
        A failed statement is logged with the peer and SQLite's message, but
        not the statement's values.
        """
        _, client, pump = self.connect()
        with capturedLogs() as events:
            self.ask(client, pump, b"INSERT INTO missing VALUES ('secret-value')\n")
        failed = [e for e in events if "failed" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["error"], "no such table: missing")
        self.assertEqual(failed[0]["client"], "alice")
        self.assertNotIn("secret-value", repr(events))

    def test_one_statement_a_line(self) -> None:
        """
        Two statements on one line are refused with SQLite's message.
        """
        _, client, pump = self.connect()
        [status] = self.ask(client, pump, b"SELECT 1; SELECT 2\n")
        self.assertEqual(
            status["error"]["message"], "You can only execute one statement at a time."
        )

    def test_two_sessions_one_database(self) -> None:
        """
        Two clients share the database, and each one's open transaction is its
        own until committed.
        """
        _, first, first_pump = self.connect()
        _, second, second_pump = self.connect()
        self.ask(first, first_pump, b"CREATE TABLE t (a)\n")
        self.ask(first, first_pump, b"INSERT INTO t VALUES (1)\n")
        self.assertEqual(
            self.ask(first, first_pump, b"BEGIN\n")[-1]["in_transaction"], True
        )
        self.ask(first, first_pump, b"INSERT INTO t VALUES (2)\n")

        self.assertEqual(
            self.ask(second, second_pump, b"SELECT count(*) FROM t\n")[1], [1]
        )
        self.ask(first, first_pump, b"COMMIT\n")
        self.assertEqual(
            self.ask(second, second_pump, b"SELECT count(*) FROM t\n")[1], [2]
        )
        self.assertEqual(self.factory.sessions, 2)

    def test_dropped_connection_rolls_back(self) -> None:
        """
        A client that disconnects inside a transaction loses its uncommitted
        work, and its session is closed.
        """
        _, first, first_pump = self.connect()
        self.ask(first, first_pump, b"CREATE TABLE t (a)\n")
        self.ask(first, first_pump, b"BEGIN\n")
        self.ask(first, first_pump, b"INSERT INTO t VALUES (1)\n")
        with capturedLogs() as events:
            first.transport.loseConnection()
            first_pump.flush()
        self.assertEqual(self.factory.sessions, 0)
        self.assertTrue(
            any("rolled it back" in e.get("log_format", "") for e in events)
        )

        _, second, second_pump = self.connect()
        self.assertEqual(
            self.ask(second, second_pump, b"SELECT count(*) FROM t\n")[1], [0]
        )

    def test_database_is_in_wal_mode(self) -> None:
        """
        The database is switched to write-ahead logging.
        """
        _, client, pump = self.connect()
        self.assertEqual(self.ask(client, pump, b"PRAGMA journal_mode\n")[1], ["wal"])

    def test_attach_refused(self) -> None:
        """
        ATTACH and VACUUM INTO, which would reach other files, are refused.
        """
        _, client, pump = self.connect()
        other = self.layout.data / "other.sqlite"
        for statement in (f"ATTACH '{other}' AS other", f"VACUUM INTO '{other}'"):
            [status] = self.ask(client, pump, statement.encode() + b"\n")
            self.assertEqual(status["error"]["sqlite_name"], "SQLITE_AUTH")
        self.assertFalse(other.exists())

    def test_invalid_utf8(self) -> None:
        """
        A line that is not UTF-8 is answered with an encoding error and the
        session goes on.
        """
        _, client, pump = self.connect()
        [status] = self.ask(client, pump, b"SELECT '\xff'\n")
        self.assertEqual(status["ok"], False)
        self.assertEqual(status["error"]["code"], "encoding")
        self.assertIn("0xff at offset 8", status["error"]["message"])
        self.assertEqual(self.ask(client, pump, b"SELECT 1\n")[1], [1])
        self.assertIsNone(client.lost)

    def test_crlf_lines(self) -> None:
        """
        Lines ending in CRLF are taken like lines ending in LF.
        """
        _, client, pump = self.connect()
        self.assertEqual(self.ask(client, pump, b"SELECT 'a'\r\n")[1], ["a"])

    def test_empty_lines_ignored(self) -> None:
        """
        Empty and blank lines get no answer.
        """
        _, client, pump = self.connect()
        answer = self.ask(client, pump, b"\n\r\n   \nSELECT 1\n\n")
        self.assertEqual(
            answer,
            [
                {"columns": ["1"], "types": ["integer"]},
                [1],
                {"ok": True, "rows": 1, "in_transaction": False},
            ],
        )

    def test_pipelined_statements_answered_in_order(self) -> None:
        """
        Statements sent together are run and answered in the order sent.
        """
        _, client, pump = self.connect()
        answer = self.ask(
            client,
            pump,
            b"CREATE TABLE t (a)\nINSERT INTO t VALUES (5)\nSELECT a FROM t\n",
        )
        self.assertEqual(
            [m.get("ok") for m in answer if isinstance(m, dict)],
            [True, True, None, True],
        )
        self.assertEqual(answer[-2], [5])

    def test_overlong_line_closes(self) -> None:
        """
        A line over the limit is answered with an error and the connection is
        closed, without running it.
        """
        _, client, pump = self.connect()
        statement = b"CREATE TABLE " + b"x" * self.max_line_length + b" (a)\n"
        [status] = self.ask(client, pump, statement)
        self.assertEqual(status["error"]["code"], "line_too_long")
        self.assertIn("1024 bytes", status["error"]["message"])
        self.assertIsNotNone(client.lost)
        self.assertEqual(_tables(self.layout.database), [])
        self.assertEqual(self.factory.sessions, 0)

    def test_overlong_unterminated_line_closes(self) -> None:
        """
        Bytes over the limit without a line end are answered with an error and
        the connection is closed.
        """
        _, client, pump = self.connect()
        [status] = self.ask(client, pump, b"x" * (self.max_line_length + 10))
        self.assertEqual(status["error"]["code"], "line_too_long")
        self.assertIsNotNone(client.lost)

    def test_idle_timeout(self) -> None:
        """
        An authenticated client that stays silent is disconnected after the
        idle timeout.
        """
        _, client, pump = self.connect()
        self.clock.advance(self.factory.idle_timeout - 1)
        pump.flush()
        self.assertIsNone(client.lost)
        self.clock.advance(2)
        pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.factory.sessions, 0)

    def test_trickled_line_times_out(self) -> None:
        """
        A line that began arriving request_timeout seconds ago and is still
        incomplete closes the connection, though bytes keep coming.
        """
        _, client, pump = self.connect()
        with capturedLogs() as events:
            for _ in range(5):
                self.ask(client, pump, b"S")
                self.clock.advance(self.factory.request_timeout / 5 - 0.5)
                pump.flush()
            self.assertIsNone(client.lost)
            self.clock.advance(5)
            pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.factory.sessions, 0)
        self.assertIn(
            "is still incomplete (5 bytes so far; --request-timeout)",
            "\n".join(formatEvent(event) for event in events),
        )

    def test_slow_whole_lines_kept(self) -> None:
        """
        Each line's deadline starts at its own first byte: lines sent in
        halves, each within the timeout, keep the connection open.
        """
        _, client, pump = self.connect()
        half = self.factory.request_timeout * 0.75
        for _ in range(3):
            self.ask(client, pump, b"SELECT")
            self.clock.advance(half)
            pump.flush()
            self.assertEqual(self.ask(client, pump, b" 1\nSEL")[1], [1])
            self.clock.advance(half)
            pump.flush()
            self.ask(client, pump, b"ECT 2\n")
        self.assertIsNone(client.lost)

    def test_stop_closes_sessions(self) -> None:
        """
        Stopping the factory rolls back and closes every session and drops its
        connection; lines are refused until it starts again.
        """
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (a)\n")
        self.ask(client, pump, b"BEGIN\n")
        self.ask(client, pump, b"INSERT INTO t VALUES (1)\n")
        self.factory.stop()
        pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.factory.sessions, 0)
        self.assertEqual(_count_rows(self.layout.database, "t"), 0)


class StatementOrderTests(_InMemoryCase):
    """
    What the server does while a statement runs in a database thread.
    """

    def make_threadpool(self) -> _SynchronousThreadPool:
        threadpool = _QueuedThreadPool()
        # Runs after the factory's stop, so the sessions it closes are closed.
        self.addCleanup(threadpool.drain)
        return threadpool

    def test_next_line_waits_for_the_answer(self) -> None:
        """
        A session hands the database one statement at a time: the next line
        is read only once the previous answer is written.
        """
        threadpool = self.threadpool
        assert isinstance(threadpool, _QueuedThreadPool)
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (a)\nINSERT INTO t VALUES (1)\n")
        self.assertEqual(len(threadpool.queued), 1)
        threadpool.run_next()
        pump.flush()
        self.assertEqual(len(threadpool.queued), 1)
        threadpool.run_next()
        pump.flush()
        self.assertEqual(len(threadpool.queued), 0)
        statuses = [m for m in client.messages[1:]]
        self.assertEqual([m["ok"] for m in statuses], [True, True])
        self.assertEqual(statuses[1]["changes"], 1)

    def test_no_idle_timeout_while_running(self) -> None:
        """
        A client waiting for a long statement is not timed out as idle.
        """
        threadpool = self.threadpool
        assert isinstance(threadpool, _QueuedThreadPool)
        _, client, pump = self.connect()
        self.ask(client, pump, b"SELECT 1\n")
        self.clock.advance(self.factory.idle_timeout * 2)
        pump.flush()
        self.assertIsNone(client.lost)
        threadpool.run_next()
        pump.flush()
        self.assertEqual(client.messages[-1]["ok"], True)

    def test_short_read_answered_at_once(self) -> None:
        """
        Once the session's connection is open, a short read is answered
        without a database thread; a write still takes one.
        """
        threadpool = self.threadpool
        assert isinstance(threadpool, _QueuedThreadPool)
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (n)\n")
        threadpool.run_next()
        pump.flush()
        self.ask(client, pump, b"SELECT 41 + 1\n")
        self.assertEqual(threadpool.queued, [])
        self.assertEqual(client.messages[-2], [42])
        self.assertEqual(client.messages[-1]["ok"], True)
        self.ask(client, pump, b"INSERT INTO t VALUES (1)\n")
        self.assertEqual(len(threadpool.queued), 1)
        threadpool.run_next()
        pump.flush()
        self.assertEqual(client.messages[-1]["changes"], 1)

    def test_no_request_timeout_while_running(self) -> None:
        """
        Lines held back while a statement runs are not the client's delay:
        they are not timed out as an incomplete request.
        """
        threadpool = self.threadpool
        assert isinstance(threadpool, _QueuedThreadPool)
        _, client, pump = self.connect()
        # Writes, which always run in a database thread (a short read may be
        # answered at once).
        self.ask(client, pump, b"CREATE TABLE a (x)\nCREATE TABLE b (x)\nSELECT")
        self.clock.advance(self.factory.request_timeout * 2)
        pump.flush()
        self.assertIsNone(client.lost)
        threadpool.run_next()
        pump.flush()
        threadpool.run_next()
        pump.flush()
        self.assertEqual(client.messages[-1]["ok"], True)
        self.assertIsNone(client.lost)
        self.clock.advance(self.factory.request_timeout)
        pump.flush()
        self.assertIsNotNone(client.lost)

    def test_lost_connection_skips_and_closes(self) -> None:
        """
        When a client leaves before its statement starts, the statement is not
        run and the session is closed.
        """
        threadpool = self.threadpool
        assert isinstance(threadpool, _QueuedThreadPool)
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (a)\n")
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.factory.sessions, 0)
        threadpool.run_next()
        threadpool.run_next()
        self.assertEqual(threadpool.queued, [])
        self.assertEqual(_tables(self.layout.database), [])


class RefusalTests(_InMemoryCase):
    """
    Clients without a certificate from the root's CA run nothing.
    """

    def no_certificate_tls(self) -> support.RawClientCreator:
        """
        Returns:
            A client that trusts the root's CA but presents no certificate.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(X509.from_cryptography(pki.load_certificates(self.layout.ca)[0]))
        return support.RawClientCreator(context)

    def assert_refused(self, client_tls: Any) -> list[Any]:
        """
        Connect with ``client_tls``, send a statement, and check that the
        connection was refused without greeting and nothing ran.

        Returns:
            The log events of the attempt.
        """
        with capturedLogs() as events:
            _, client, pump = self.connect(client_tls)
            client.transport.write(b"CREATE TABLE stolen (a)\n")
            pump.flush()
        self.assertEqual(client.messages, [])
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.factory.sessions, 0)
        self.assertEqual(_tables(self.layout.database), [])
        return list(events)

    def test_no_client_certificate(self) -> None:
        """
        A client presenting no certificate is refused, the refusal logged,
        and its statement not run.
        """
        events = self.assert_refused(self.no_certificate_tls())
        refusals = [
            e for e in events if "refused TLS handshake" in e.get("log_format", "")
        ]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(refusals[0]["server"], "SQL server")

    def test_foreign_ca(self) -> None:
        """
        A client whose certificate another CA signed is refused, and its
        statement not run.
        """
        foreign = support.make_foreign_identity()
        _remove_later(self, foreign.key.parent)
        events = self.assert_refused(
            support.client_options(support.trusting(foreign, self.layout))
        )
        refusals = [
            e for e in events if "refused TLS handshake" in e.get("log_format", "")
        ]
        self.assertEqual(len(refusals), 1)
        self.assertIn("CA", refusals[0]["why"])

    def test_handshake_timeout(self) -> None:
        """
        A client that never completes the TLS handshake is disconnected after
        the handshake timeout.
        """
        tls_factory = TLSMemoryBIOFactory(
            support.server_creator(self.layout), False, self.factory, clock=self.clock
        )
        server = tls_factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.clock.advance(self.factory.handshake_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_lines_before_authentication_dropped(self) -> None:
        """
        Bytes reaching the protocol before a peer certificate is known are
        neither answered nor run.
        """
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"CREATE TABLE early (a)\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(_tables(self.layout.database), [])
        protocol.setTimeout(None)


class SessionTests(unittest.TestCase):
    """
    A session's SQLite connection, used directly.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        _remove_later(self, self.layout.path)

    def test_close_rolls_back(self) -> None:
        """
        Closing a session in a transaction rolls it back and says so.
        """
        session = Session(self.layout.database)
        session.execute("CREATE TABLE t (a)")
        session.execute("BEGIN")
        session.execute("INSERT INTO t VALUES (1)")
        self.assertTrue(session.close())
        self.assertFalse(session.close())
        reopened = Session(self.layout.database)
        self.addCleanup(reopened.close)
        self.assertIn(b"[0]", reopened.execute("SELECT count(*) FROM t").data)

    def test_closed_session_refuses(self) -> None:
        """
        A statement after close is answered with a shutdown error.
        """
        session = Session(self.layout.database)
        session.close()
        answer = session.execute("SELECT 1")
        self.assertFalse(answer.ok)
        self.assertEqual(json.loads(answer.data)["error"]["code"], "shutdown")

    def test_invalid_utf8_text(self) -> None:
        """
        TEXT that is not UTF-8 arrives with replacement characters rather
        than an error quoting the data.
        """
        session = Session(self.layout.database)
        self.addCleanup(session.close)
        answer = session.execute("SELECT CAST(x'61ff' AS TEXT)")
        self.assertTrue(answer.ok)
        self.assertIn('["a\ufffd"]'.encode(), answer.data)


class WireTests(unittest.TestCase):
    """
    The encoding of values and lines.
    """

    def test_values_round_trip(self) -> None:
        """
        Every value SQLite returns decodes back to itself.
        """
        for value in (None, 0, -(2**63), 2**63 - 1, 1.5, "", 'é\n"', b"", b"\x00\xff"):
            self.assertEqual(wire.decode_value(wire.encode_value(value)), value)
        self.assertEqual(wire.decode_value(wire.encode_value(math.inf)), math.inf)
        self.assertTrue(math.isnan(wire.decode_value(wire.encode_value(math.nan))))

    def test_line_is_one_line(self) -> None:
        """
        An encoded line holds no line end but its last, whatever the text.
        """
        line = wire.encode_line(["a\nb\r\u2028c"])
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        self.assertNotIn(b"\r", line)

    def test_unknown_cell_refused(self) -> None:
        """
        A cell object of an unknown kind is a format error.
        """
        self.assertRaises(
            wire.WireFormatError, wire.decode_value, {"date": "2026-01-01"}
        )
        self.assertRaises(wire.WireFormatError, wire.decode_value, [1])
        self.assertRaises(
            wire.WireFormatError, wire.decode_value, {"blob": "not base64!"}
        )

    def test_bad_line_refused(self) -> None:
        """
        A line that is not a JSON object or array is a format error.
        """
        for line in (b"\xff", b"{", b"42", b'"text"'):
            self.assertRaises(wire.WireFormatError, wire.decode_line, line)


class FormatTableTests(unittest.TestCase):
    """
    Results printed as text tables.
    """

    def test_table(self) -> None:
        """
        Columns and rows line up, numbers to the right, with a row count.
        """
        result = Result(
            ("id", "name", "data"), ((1, "Ada", None), (10, "Grace", b"\x01")), 2
        )
        self.assertEqual(
            format_table(result),
            "id | name  | data\n"
            "---+-------+------\n"
            " 1 | Ada   | NULL\n"
            "10 | Grace | X'01'\n"
            "(2 rows)",
        )

    def test_control_characters_escaped(self) -> None:
        """
        Line breaks and tabs in text cannot break the table.
        """
        result = Result(("t",), (("a\nb\tc",),), 1)
        self.assertIn("a\\nb\\tc", format_table(result))

    def test_statement_without_result_set(self) -> None:
        """
        A statement without columns prints OK and the rows it changed.
        """
        self.assertEqual(format_table(Result((), (), 0)), "OK")
        self.assertEqual(
            format_table(Result((), (), 0, changes=1)), "OK, 1 row changed"
        )
        self.assertEqual(
            format_table(Result((), (), 0, changes=3)), "OK, 3 rows changed"
        )


class ClientInMemoryTests(_InMemoryCase):
    """
    The client's parsing of answers, over in-memory TLS.
    """

    def connect_client(self) -> tuple[SQLClient, Any]:
        """
        Returns:
            An `SQLClient` connected in memory, and the pump.
        """
        protocol = _SQLClientProtocol("memory")
        _, _, pump = support.connect_in_memory(
            self.factory,
            support.server_creator(self.layout),
            protocol,
            support.client_options(self.identity),
            self.clock,
        )
        greeting = self.successResultOf(protocol.greeted)
        return SQLClient(protocol, greeting), pump

    def test_results_and_errors(self) -> None:
        """
        Results carry columns, decoded rows and counts; an SQL error fails
        with the server's message and the client goes on.
        """
        client, pump = self.connect_client()
        self.assertEqual(client.greeting["client"], "alice")
        created = client.execute("CREATE TABLE t (a, b)")
        inserted = client.execute("INSERT INTO t VALUES (x'00ff', 1e999)")
        missing = client.execute("SELECT * FROM missing")
        selected = client.execute("SELECT a, b FROM t")
        pump.flush()
        self.assertEqual(self.successResultOf(created), Result((), (), 0))
        self.assertEqual(self.successResultOf(inserted).changes, 1)
        error = self.failureResultOf(missing, SQLError).value
        self.assertEqual((error.code, error.message), ("sql", "no such table: missing"))
        self.assertEqual(
            self.successResultOf(selected),
            Result(("a", "b"), ((b"\x00\xff", math.inf),), 1, types=("blob", "real")),
        )

    def test_lost_connection_fails_pending(self) -> None:
        """
        Statements still waiting when the connection closes fail with
        `SQLConnectionError`, and so do later ones.
        """
        client, pump = self.connect_client()
        waiting = client.execute("SELECT 1")
        closed = client.close()
        pump.flush()
        self.successResultOf(closed)
        self.failureResultOf(waiting, SQLConnectionError)
        self.failureResultOf(client.execute("SELECT 1"), SQLConnectionError)

    def test_statement_with_line_break_refused(self) -> None:
        """
        The client refuses a statement spanning lines or an empty one before
        sending anything.
        """
        client, _ = self.connect_client()
        self.failureResultOf(client.execute("SELECT\n1"), ValueError)
        self.failureResultOf(client.execute("   "), ValueError)


class ClientProtocolTests(unittest.SynchronousTestCase):
    """
    The client protocol against servers that are not the SQL server.
    """

    def setUp(self) -> None:
        """Connect a client protocol to a string transport, handshake done."""
        self.transport = StringTransport()
        self.protocol = _SQLClientProtocol("example:1")
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()

    def test_binary_instead_of_greeting(self) -> None:
        """
        A first byte that cannot start a greeting drops the connection at
        once, without waiting for a line end.
        """
        self.protocol.dataReceived(b"\x00\x00\x00\x1c")
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        error = self.failureResultOf(self.protocol.greeted, SQLConnectionError).value
        self.assertEqual(
            str(error),
            "example:1 does not speak the tls4d SQL protocol: it sent "
            "'\\x00\\x00\\x00\\x1c' where the greeting belongs; is that the "
            "SQL server's port (19812 by default)?",
        )

    def test_json_other_than_greeting(self) -> None:
        """A JSON line that is not the greeting is refused, suggesting the port."""
        self.protocol.dataReceived(b'{"id": 1, "result": "pong"}\n')
        self.protocol.connectionLost(Failure(ConnectionDone()))
        error = self.failureResultOf(self.protocol.greeted, SQLConnectionError).value
        self.assertEqual(
            str(error),
            "The server at example:1 did not greet as a tls4d SQL server; is that "
            "the SQL server's port (19812 by default)?",
        )

    def test_greeting_in_pieces(self) -> None:
        """A greeting that arrives a byte at a time is still a greeting."""
        greeting = wire.encode_line(wire.hello("alice"))
        for index in range(len(greeting)):
            self.protocol.dataReceived(greeting[index : index + 1])
        self.assertEqual(self.successResultOf(self.protocol.greeted)["client"], "alice")


class CommandOptionTests(unittest.SynchronousTestCase):
    """
    The options of ``tls4d sql``.
    """

    def parse_error(self, *argv: str) -> str:
        """Parse ``tls4d sql ARGV``, expecting misuse; return what argparse printed."""
        parser = argparse.ArgumentParser(prog="tls4d")
        command.add_parser(parser.add_subparsers(required=True))
        stderr = io.StringIO()
        with redirect_stderr(stderr), self.assertRaises(SystemExit) as raised:
            parser.parse_args(["sql", *argv])
        self.assertEqual(raised.exception.code, 2)
        return stderr.getvalue()

    def test_bad_timeout(self) -> None:
        """A timeout that is not a positive number is misuse, naming the value."""
        for value in ("-1", "0", "nan", "soon"):
            self.assertIn(
                f"'{value}' is not a positive number of seconds",
                self.parse_error("--timeout", value),
            )

    def test_bad_port(self) -> None:
        """A port outside 1-65535 is misuse, naming the value."""
        for value in ("0", "99999", "sql"):
            self.assertIn(
                f"'{value}' is not a TCP port", self.parse_error("--port", value)
            )


class _ServerCase(unittest.TestCase):
    """
    An SQL server listening on a loopback port with its own database threads.
    """

    async def start_server(self) -> int:
        """
        Make a root and a client identity, and listen on a free loopback
        port until the test ends.

        Returns:
            The port.
        """
        self.layout = support.make_root()
        _remove_later(self, self.layout.path)
        self.identity = support.make_client_identity(self.layout)
        _remove_later(self, self.identity.key.parent)
        # Not started by hand: listening starts it, as in the real service.
        self.factory = SQLServerFactory(database=self.layout.database, clock=reactor)
        self.tls_factory = TLSMemoryBIOFactory(
            support.server_creator(self.layout), False, self.factory
        )
        self.port = reactor.listenTCP(0, self.tls_factory, interface="127.0.0.1")
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_server(self.port)))
        return int(self.port.getHost().port)

    async def stop_server(self, port: Any) -> None:
        """
        Stop listening, wait for the server side of every connection to be
        gone, and stop the factory.
        """
        await defer.maybeDeferred(port.stopListening)
        for _ in range(200):
            if not self.tls_factory.protocols and self.factory.sessions == 0:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.factory.stop()


class EndToEndTests(_ServerCase):
    """
    The real client against a real listener with real database threads.
    """

    async def test_client_session(self) -> None:
        """
        The client creates, fills and reads a table, gets SQL errors as
        `SQLError`, and closes.
        """
        port = await self.start_server()
        client = await connect(reactor, "127.0.0.1", port, self.identity)
        self.assertEqual(client.greeting["client"], "alice")
        created = await client.execute("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
        self.assertEqual(created, Result((), (), 0))
        inserted = await client.execute(
            "INSERT INTO t VALUES (1, 'é', x'00'), (2, NULL, NULL)"
        )
        self.assertEqual(inserted.changes, 2)
        selected = await client.execute("SELECT a, b, c FROM t ORDER BY a")
        self.assertEqual(selected.columns, ("a", "b", "c"))
        self.assertEqual(selected.rows, ((1, "é", b"\x00"), (2, None, None)))
        self.assertEqual(selected.row_count, 2)
        with self.assertRaises(SQLError) as caught:
            await client.execute("SELECT * FROM missing")
        self.assertEqual(caught.exception.message, "no such table: missing")
        self.assertEqual(caught.exception.sqlite_name, "SQLITE_ERROR")
        pipelined = [
            client.execute(f"INSERT INTO t VALUES ({i}, '', NULL)")
            for i in range(3, 23)
        ]
        await defer.gatherResults(pipelined)
        counted = await client.execute("SELECT count(*) FROM t")
        self.assertEqual(counted.rows, ((22,),))
        await client.close()
        with self.assertRaises(SQLConnectionError):
            await client.execute("SELECT 1")

    async def test_stop_rolls_back_open_sessions(self) -> None:
        """
        Stopping the factory closes a client's connection and rolls back its
        open transaction in the database threads before it returns.
        """
        port = await self.start_server()
        client = await connect(reactor, "127.0.0.1", port, self.identity)
        await client.execute("CREATE TABLE t (a)")
        await client.execute("BEGIN")
        await client.execute("INSERT INTO t VALUES (1)")
        self.factory.stop()
        self.assertEqual(_count_rows(self.layout.database, "t"), 0)
        with self.assertRaises(SQLConnectionError):
            await client.execute("SELECT 1")
        await client.close()

    async def test_port_stop_ends_sessions(self) -> None:
        """
        When its port stops listening, the factory rolls back and closes the
        open sessions and stops its database threads.
        """
        port = await self.start_server()
        client = await connect(reactor, "127.0.0.1", port, self.identity)
        await client.execute("CREATE TABLE t (a)")
        await client.execute("BEGIN")
        await client.execute("INSERT INTO t VALUES (1)")
        threadpool = self.factory.threadpool
        assert threadpool is not None
        self.assertTrue(threadpool.started)
        await self.port.stopListening()
        self.assertFalse(threadpool.started)
        self.assertEqual(self.factory.sessions, 0)
        self.assertEqual(_count_rows(self.layout.database, "t"), 0)
        await client.close()

    async def test_host_name_not_covered(self) -> None:
        """
        A client dialling an address the server's certificate does not cover
        refuses the server.
        """
        await self.start_server()
        try:
            other = reactor.listenTCP(0, self.tls_factory, interface="127.0.0.2")
        except CannotListenError as e:
            raise unittest.SkipTest(f"127.0.0.2 is not usable here: {e}") from e
        self.addCleanup(other.stopListening)
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.2", other.getHost().port, self.identity)
        self.assertEqual(
            str(caught.exception),
            f"The TLS handshake with 127.0.0.2:{other.getHost().port} failed: the "
            "server's certificate does not cover the host name or address dialled "
            "(127.0.0.2); use --host with a name it covers.",
        )
        self.assertIn("IPAddressMismatch", caught.exception.detail or "")

    async def test_foreign_client_refused(self) -> None:
        """
        Connecting with a certificate from another CA fails with
        `SQLConnectionError` saying the server refused it.
        """
        port = await self.start_server()
        foreign = support.make_foreign_identity()
        _remove_later(self, foreign.key.parent)
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(
                reactor, "127.0.0.1", port, support.trusting(foreign, self.layout)
            )
        # The application client words the same failure the same way.
        unknown_ca = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
        self.assertEqual(
            str(caught.exception),
            f"The TLS handshake with 127.0.0.1:{port} failed: "
            f"{describe_tls_failure(unknown_ca)}.",
        )
        self.assertIn("refused this client's certificate", str(caught.exception))
        self.assertIn("alert unknown ca", caught.exception.detail or "")

    async def test_server_not_trusted(self) -> None:
        """
        A client whose CA did not sign the server's certificate refuses the
        server.
        """
        port = await self.start_server()
        distrusting = clienttls.ClientIdentity(
            self.identity.key, self.identity.cert, support.make_foreign_identity().ca
        )
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, distrusting)
        self.assertEqual(
            str(caught.exception),
            f"The TLS handshake with 127.0.0.1:{port} failed: the server's "
            f"certificate is not signed by the CA in {distrusting.ca}.",
        )

    async def test_expired_client_certificate(self) -> None:
        """
        A client whose certificate expired is told so, naming the file.
        """
        port = await self.start_server()
        expired = expired_client_identity(self.layout)
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, expired)
        self.assertEqual(
            str(caught.exception),
            f"The TLS handshake with 127.0.0.1:{port} failed: this client's "
            f"certificate ({expired.cert}) has expired; issue a new one with "
            "'tls4d client'.",
        )

    async def test_no_greeting(self) -> None:
        """
        A TLS server that never greets (the application server, say) fails
        connect after the timeout, asking whether it is the SQL server's port.
        """
        await self.start_server()
        port = listen_scripted(self, creator=support.server_creator(self.layout))
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, self.identity, timeout=0.3)
        self.assertEqual(
            str(caught.exception),
            f"No SQL server greeting from 127.0.0.1:{port} within 0.3 s; is that "
            "the SQL server's port (19812 by default)?",
        )

    async def test_no_tls_handshake(self) -> None:
        """
        A server that never completes the TLS handshake fails connect after
        the timeout, saying so.
        """
        await self.start_server()
        port = listen_scripted(self)
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, self.identity, timeout=0.3)
        self.assertIn(
            f"No TLS handshake with 127.0.0.1:{port} within 0.3 s",
            str(caught.exception),
        )

    async def test_server_closes_at_once(self) -> None:
        """
        A server that closes the connection at once fails connect naming the
        peer and the likely cause.
        """
        await self.start_server()
        port = listen_scripted(self, close=True)
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, self.identity)
        self.assertEqual(
            str(caught.exception),
            f"The TLS handshake with 127.0.0.1:{port} failed: the server closed "
            "the connection; check that this is the SQL server's port.",
        )

    async def test_other_protocol_at_once(self) -> None:
        """
        A TLS server that sends something other than a greeting fails connect
        at once, well before the timeout.
        """
        await self.start_server()
        port = listen_scripted(
            self,
            send=b'\x00\x00\x00\x09{"id":1}',
            creator=support.server_creator(self.layout),
        )
        started = reactor.seconds()
        with self.assertRaises(SQLConnectionError) as caught:
            await connect(reactor, "127.0.0.1", port, self.identity, timeout=60)
        self.assertLess(reactor.seconds() - started, 30)
        self.assertEqual(
            str(caught.exception),
            f"127.0.0.1:{port} does not speak the tls4d SQL protocol: it sent "
            "'\\x00\\x00\\x00\\t{\"id\":1}' where the greeting belongs; is "
            "that the SQL server's port (19812 by default)?",
        )


class _Process(ProcessProtocol):
    """
    Collects a child process's output, after writing ``stdin`` to it.
    """

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.out += data

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.err += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            self.ended.callback(reason.value.exitCode)
        else:
            self.ended.errback(reason)


class CommandTests(_ServerCase):
    """
    ``tls4d sql`` run as a separate process against a real listener.
    """

    async def tls4d_sql(self, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """
        Returns:
            The exit status, standard output and standard error of
            ``tls4d sql ARGS``.
        """
        env = dict(os.environ, PYTHONPATH=str(_REPOSITORY))
        process = _Process(stdin)
        argv = [sys.executable, "-m", "twisted_tls4d.cli", "sql", *args]
        reactor.spawnProcess(
            process, sys.executable, argv, env=env, path=str(_REPOSITORY)
        )
        status = await process.ended
        return status, process.out.decode(), process.err.decode()

    def identity_args(self, port: int) -> list[str]:
        """
        Returns:
            The options that reach the test server as the test identity.
        """
        return [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--identity",
            str(self.identity.key.parent),
        ]

    async def test_execute(self) -> None:
        """
        --execute runs each statement in order and prints a table for each.
        """
        port = await self.start_server()
        status, out, err = await self.tls4d_sql(
            *self.identity_args(port),
            "--execute",
            "CREATE TABLE t (id INTEGER, name TEXT)",
            "-e",
            "INSERT INTO t VALUES (1, 'Ada')",
            "-e",
            "SELECT id, name FROM t",
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out,
            "OK\n\nOK, 1 row changed\n\nid | name\n---+-----\n 1 | Ada\n(1 row)\n",
        )

    async def test_failed_statement(self) -> None:
        """
        A failing statement prints SQLite's message on one line, stops the
        run and exits 1.
        """
        port = await self.start_server()
        status, out, err = await self.tls4d_sql(
            *self.identity_args(port), "-e", "SELECT * FROM missing", "-e", "SELECT 1"
        )
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(err, "tls4d: SQL error: no such table: missing\n")

    async def test_statements_from_stdin(self) -> None:
        """
        Without --execute, each line of standard input is a statement.
        """
        port = await self.start_server()
        status, out, err = await self.tls4d_sql(
            *self.identity_args(port), stdin=b"-- a comment\n\nSELECT 'x' AS v\n"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "v\n-\nx\n(1 row)\n")

    async def test_refused_client(self) -> None:
        """
        A client certificate from another CA ends the command with one line
        and status 1.
        """
        port = await self.start_server()
        foreign = support.make_foreign_identity()
        _remove_later(self, foreign.key.parent)
        status, out, err = await self.tls4d_sql(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--key",
            str(foreign.key),
            "--cert",
            str(foreign.cert),
            "--ca",
            str(self.layout.ca),
            "-e",
            "SELECT 1",
        )
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("refused this client's certificate", err)

    async def test_no_server(self) -> None:
        """
        A port where nothing listens ends the command with one line and
        status 1.
        """
        await self.start_server()
        unused = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = unused.getHost().port
        await unused.stopListening()
        status, out, err = await self.tls4d_sql(
            *self.identity_args(port), "-e", "SELECT 1"
        )
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("Cannot connect to the SQL server at 127.0.0.1", err)

    async def assert_one_line_failure(self, *args: str) -> str:
        """
        Run ``tls4d sql ARGS`` and check that it fails with status 1, nothing
        on standard output and exactly one line on standard error.

        Returns:
            That line.
        """
        status, out, err = await self.tls4d_sql(*args)
        self.assertEqual((status, out), (1, ""), err)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("tls4d: "), lines)
        return lines[0]

    async def test_application_server_port(self) -> None:
        """
        A TLS server that never greets ends the command after --timeout with
        one line asking whether it is the SQL server's port.
        """
        await self.start_server()
        port = listen_scripted(self, creator=support.server_creator(self.layout))
        line = await self.assert_one_line_failure(
            *self.identity_args(port), "--timeout", "0.5", "-e", "SELECT 1"
        )
        self.assertEqual(
            line,
            f"tls4d: No SQL server greeting from 127.0.0.1:{port} within 0.5 s; is "
            "that the SQL server's port (19812 by default)?",
        )

    async def test_other_protocol(self) -> None:
        """A server sending another protocol ends the command in one line."""
        await self.start_server()
        port = listen_scripted(
            self,
            send=b"HTTP/1.1 400 Bad Request\r\n\r\n",
            creator=support.server_creator(self.layout),
        )
        line = await self.assert_one_line_failure(
            *self.identity_args(port), "-e", "SELECT 1"
        )
        self.assertIn("does not speak the tls4d SQL protocol: it sent 'HTTP/1.1", line)

    async def test_server_closes_at_once(self) -> None:
        """A server that closes at once ends the command in one line."""
        await self.start_server()
        port = listen_scripted(self, close=True)
        line = await self.assert_one_line_failure(
            *self.identity_args(port), "-e", "SELECT 1"
        )
        self.assertIn("the server closed the connection", line)

    async def test_identity_incomplete(self) -> None:
        """An identity folder without its ca.pem ends the command in one line."""
        await self.start_server()
        folder = support.temporary_folder("tls4d-partial-")
        _remove_later(self, folder / "key.pem")
        for name in ("key.pem", "cert.pem"):
            (folder / name).write_bytes((self.identity.key.parent / name).read_bytes())
        line = await self.assert_one_line_failure(
            "--port", str(await closed_port()), "--identity", str(folder), "-e", "1"
        )
        self.assertIn(str(folder / "ca.pem"), line)
