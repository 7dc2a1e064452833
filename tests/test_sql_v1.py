"""
Tests of the SQL protocol's version 1 features: parameters, typed columns,
streamed results, users with passwords and access levels, the DB-API
driver (durability across ``kill -9`` is in test_durability).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor, threads
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from tests import support
from tests.test_sql import (
    _count_rows,
    _ImmediateReactor,
    _InMemoryCase,
    _LineClient,
    _remove_later,
    _ServerCase,
)
from twisted_tls4d import cli, tls
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.sql import dbapi, protocol, session, wire
from twisted_tls4d.sql.client import SQLError, connect
from twisted_tls4d.sql.protocol import SQLServerFactory
from twisted_tls4d.sql.session import Session
from twisted_tls4d.sql.users import UserStore, users_file

_REPOSITORY = Path(__file__).resolve().parent.parent


def _add_users(layout: Any, *users: tuple[str, str, str]) -> Path:
    """
    Write the users file of ``layout`` with (name, password, access) users.

    Returns:
        The users file.
    """
    path = users_file(layout.path)
    store = UserStore.load(path)
    for name, password, access in users:
        store.add(name, password, access)
    store.save(path)
    return path


def _optional_certificate_creator(layout: Any) -> tls.ServerConnectionCreator:
    """
    Returns:
        A creator for the SQL listener that asks for a client certificate
        from the root's CA but does not require one (what the lead's
        ``require_client_certificate=False`` will build).
    """
    identity = tls.load_identity(layout.cert, layout.key)
    context = tls.build_context(
        tls.TLSPolicy(dh_parameters=layout.dhparams),
        identity,
        tls.load_client_cas(layout.ca),
    )
    context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return tls.ServerConnectionCreator(context)


def _trusting_ca_only(layout: Any) -> support.RawClientCreator:
    """
    Returns:
        A client that trusts the root's CA and presents no certificate.
    """
    from OpenSSL.crypto import X509

    from twisted_tls4d import pki

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(X509.from_cryptography(pki.load_certificates(layout.ca)[0]))
    return support.RawClientCreator(context)


class ParameterTests(_InMemoryCase):
    """
    Requests carrying a statement and its parameters apart, and typed
    column headers.
    """

    def request(self, statement: str, *params: Any) -> bytes:
        return wire.statement_request(statement, list(params))

    def test_parameters_of_every_type(self) -> None:
        """
        Integers, reals, text, NULL and bytes travel as parameters and come
        back the same, with the header declaring each column's type.
        """
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (i, r, s, n, b)\n")
        blob = bytes(range(256)) + b"\n\r\x00"
        answer = self.ask(
            client,
            pump,
            self.request(
                "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                2**62,
                -0.25,
                "a'b\n",
                None,
                blob,
            ),
        )
        self.assertEqual(answer[-1]["changes"], 1)
        answer = self.ask(client, pump, b"SELECT i, r, s, n, b FROM t\n")
        self.assertEqual(
            answer[0],
            {
                "columns": ["i", "r", "s", "n", "b"],
                "types": ["integer", "real", "text", "null", "blob"],
            },
        )
        row = tuple(wire.decode_value(c) for c in answer[1])
        self.assertEqual(row, (2**62, -0.25, "a'b\n", None, blob))

    def test_parameters_are_not_sql(self) -> None:
        """
        A parameter that looks like SQL is stored as text, never run.
        """
        _, client, pump = self.connect()
        self.ask(client, pump, b"CREATE TABLE t (s)\n")
        self.ask(
            client,
            pump,
            self.request("INSERT INTO t VALUES (?)", "x'); DROP TABLE t; --"),
        )
        answer = self.ask(
            client,
            pump,
            self.request("SELECT count(*) FROM t WHERE s = ?", "x'); DROP TABLE t; --"),
        )
        self.assertEqual(answer[1], [1])

    def test_statement_spanning_lines(self) -> None:
        """
        A statement sent in a request may span lines.
        """
        _, client, pump = self.connect()
        answer = self.ask(client, pump, self.request("SELECT\n  1 AS one"))
        self.assertEqual(answer[1], [1])

    def test_mixed_column_type(self) -> None:
        """
        A column whose first rows mix types is declared ``any``.
        """
        _, client, pump = self.connect()
        answer = self.ask(client, pump, b"SELECT 1 UNION ALL SELECT 'a'\n")
        self.assertEqual(answer[0]["types"], ["any"])

    def test_wrong_parameter_count(self) -> None:
        """
        A wrong number of parameters is SQLite's error, and the session goes
        on.
        """
        _, client, pump = self.connect()
        answer = self.ask(client, pump, self.request("SELECT ?, ?", 1))
        self.assertEqual(answer[0]["ok"], False)
        self.assertEqual(answer[0]["error"]["code"], "sql")
        self.assertIn("bindings", answer[0]["error"]["message"])
        self.assertEqual(self.ask(client, pump, b"SELECT 2\n")[1], [2])

    def test_bad_request(self) -> None:
        """
        A line starting with ``{`` that is not a request gets a ``request``
        error, and the session goes on.
        """
        _, client, pump = self.connect()
        answer = self.ask(client, pump, b'{"sql": 1}\n')
        self.assertEqual(answer[0]["error"]["code"], "request")
        answer = self.ask(client, pump, b"{nope\n")
        self.assertEqual(answer[0]["error"]["code"], "request")
        self.assertEqual(self.ask(client, pump, b"SELECT 2\n")[1], [2])

    def test_large_result_in_batches(self) -> None:
        """
        A result larger than a batch arrives whole, in order, with the right
        row count.
        """
        _, client, pump = self.connect()
        count = session.BATCH_ROWS * 3 + 7
        answer = self.ask(
            client,
            pump,
            self.request(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < ?) SELECT i FROM n",
                count,
            ),
        )
        for _ in range(10):
            if answer and isinstance(answer[-1], dict) and "ok" in answer[-1]:
                break
            more = self.ask(client, pump, b"")
            answer.extend(more)
        self.assertEqual([r[0] for r in answer[1:-1]], list(range(1, count + 1)))
        self.assertEqual(answer[-1]["rows"], count)


class AccessTests(unittest.TestCase):
    """
    Each access level, enforced by the session.
    """

    def setUp(self) -> None:
        folder = support.temporary_folder("tls4d-sql-")
        _remove_later(self, folder / "x")
        self.database = folder / "db.sqlite"
        owner = Session(self.database)
        owner.execute("CREATE TABLE t (a)")
        owner.execute("INSERT INTO t VALUES (1)")
        owner.close()

    def run_as(self, access: str, statement: str) -> dict[str, Any]:
        s = Session(self.database, access=access, user="bob")
        try:
            answer = s.execute(statement)
        finally:
            s.close()
        lines = [json.loads(x) for x in answer.data.splitlines()]
        return lines[-1]

    def test_read_only(self) -> None:
        """
        A read-only user reads, and every kind of write is refused with an
        ``access`` error naming the user and the level.
        """
        self.assertTrue(self.run_as("read-only", "SELECT * FROM t")["ok"])
        self.assertTrue(self.run_as("read-only", "BEGIN")["ok"])
        for statement in (
            "INSERT INTO t VALUES (2)",
            "UPDATE t SET a = 3",
            "DELETE FROM t",
            "CREATE TABLE u (a)",
            "DROP TABLE t",
            "PRAGMA query_only = OFF",
            "PRAGMA user_version = 3",
            "CREATE TEMP TABLE x (a)",
            "ATTACH 'other.sqlite' AS o",
        ):
            status = self.run_as("read-only", statement)
            self.assertEqual(status["ok"], False, statement)
            self.assertEqual(status["error"]["code"], "access", statement)
            self.assertIn("'bob' has read-only access", status["error"]["message"])
        self.assertEqual(_count_rows(self.database, "t"), 1)

    def test_read_write(self) -> None:
        """
        A read-write user changes rows but not the schema.
        """
        self.assertTrue(self.run_as("read-write", "INSERT INTO t VALUES (2)")["ok"])
        self.assertTrue(self.run_as("read-write", "UPDATE t SET a = a + 1")["ok"])
        for statement in (
            "CREATE TABLE u (a)",
            "DROP TABLE t",
            "ALTER TABLE t ADD COLUMN b",
            "CREATE INDEX i ON t (a)",
            "PRAGMA journal_mode = DELETE",
        ):
            status = self.run_as("read-write", statement)
            self.assertEqual(status["error"]["code"], "access", statement)
        self.assertEqual(_count_rows(self.database, "t"), 2)

    def test_full(self) -> None:
        """
        A full user changes the schema, but still cannot attach files.
        """
        self.assertTrue(self.run_as("full", "CREATE TABLE u (a)")["ok"])
        self.assertTrue(self.run_as("full", "DROP TABLE u")["ok"])
        status = self.run_as("full", "ATTACH 'other.sqlite' AS o")
        self.assertEqual(status["error"]["code"], "access")

    def test_durable_settings(self) -> None:
        """
        Sessions use WAL with full synchronous commits.
        """
        s = Session(self.database)
        answer = s.execute("PRAGMA synchronous")
        s.close()
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [2])

    def test_app_server_api(self) -> None:
        """
        ``Session(path).execute(statement)`` still returns a whole answer.
        """
        s = Session(self.database)
        answer = s.execute("SELECT a FROM t")
        s.abandon()
        s.close()
        self.assertTrue(answer.ok)
        self.assertEqual(answer.rows, 1)
        self.assertTrue(answer.done)


class UserStoreTests(unittest.TestCase):
    """
    The users file and ``tls4d users``.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        _remove_later(self, self.layout.path)

    def test_hashes_not_clear(self) -> None:
        """
        Passwords are stored as salted scrypt hashes, in a file only its
        owner reads, and checked.
        """
        path = _add_users(self.layout, ("bob", "s3cret!", "read-only"))
        text = path.read_text()
        self.assertNotIn("s3cret!", text)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        entry = json.loads(text)["users"]["bob"]
        self.assertEqual(entry["access"], "read-only")
        self.assertEqual(entry["scrypt"]["n"], 2**14)
        store = UserStore.load(path)
        self.assertEqual(store.verify("bob", "s3cret!"), "read-only")
        self.assertIsNone(store.verify("bob", "s3cret"))
        self.assertIsNone(store.verify("nobody", "s3cret!"))

    def test_same_password_different_hashes(self) -> None:
        """
        Two users with the same password get different salts and hashes.
        """
        path = _add_users(self.layout, ("a", "pw", "full"), ("b", "pw", "full"))
        users = json.loads(path.read_text())["users"]
        self.assertNotEqual(users["a"]["scrypt"]["hash"], users["b"]["scrypt"]["hash"])

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str]:
        old = sys.stdin
        sys.stdin = io.StringIO(stdin)
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                status = cli.main(list(argv))
        finally:
            sys.stdin = old
        return status, out.getvalue()

    def test_command(self) -> None:
        """
        ``tls4d users add|passwd|access|list|remove`` manage the file,
        reading passwords from standard input when it is not a terminal.
        """
        root = str(self.layout.path)
        status, out = self.run_cli(
            "users",
            "add",
            "carol",
            "--access",
            "read-only",
            "--root",
            root,
            stdin="pw1\n",
        )
        self.assertEqual(
            (status, out), (0, "Added SQL user 'carol' with read-only access.\n")
        )
        path = users_file(self.layout.path)
        self.assertEqual(UserStore.load(path).verify("carol", "pw1"), "read-only")
        self.run_cli("users", "passwd", "carol", "--root", root, stdin="pw2\n")
        self.assertEqual(UserStore.load(path).verify("carol", "pw2"), "read-only")
        self.run_cli("users", "access", "carol", "full", "--root", root)
        self.assertEqual(
            self.run_cli("users", "list", "--root", root)[1], "carol\tfull\n"
        )
        self.assertEqual(
            self.run_cli("users", "add", "carol", "--root", root, stdin="x\n")[0], 1
        )
        self.run_cli("users", "remove", "carol", "--root", root)
        self.assertEqual(UserStore.load(path).users, {})

    def test_bad_name(self) -> None:
        """
        A user name with odd characters is refused.
        """
        with self.assertRaises(ConfigurationError):
            UserStore({}).add("bob smith", "pw", "full")


class LoginTests(_InMemoryCase):
    """
    Password logins on a listener that asks for, but does not require, a
    client certificate.
    """

    def setUp(self) -> None:
        super().setUp()
        self.users = _add_users(
            self.layout,
            ("bob", "bob-pw", "read-only"),
            ("alice", "alice-pw", "read-write"),
        )
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=self.clock,
            threadpool=self.threadpool,
            reactor=_ImmediateReactor(),
            users_file=self.users,
            passwords=True,
        )
        self.factory.start()
        self.addCleanup(self.factory.stop)

    def connect_without_certificate(self) -> tuple[_LineClient, Any]:
        client = _LineClient()
        _, _, pump = support.connect_in_memory(
            self.factory,
            _optional_certificate_creator(self.layout),
            client,
            _trusting_ca_only(self.layout),
            self.clock,
        )
        return client, pump

    def test_login_required_before_statements(self) -> None:
        """
        A client without a certificate is greeted as needing a login, and
        each statement before it is refused without running.
        """
        client, pump = self.connect_without_certificate()
        hello = client.messages[0]["hello"]
        self.assertEqual((hello["client"], hello["user"]), (None, None))
        self.assertTrue(hello["login_required"])
        answer = self.ask(client, pump, b"CREATE TABLE stolen (a)\n")
        self.assertEqual(answer[0]["error"]["code"], "login_required")
        self.assertFalse(self.layout.database.exists())

    def test_login_then_access(self) -> None:
        """
        After a login the session has the user's access level.
        """
        client, pump = self.connect_without_certificate()
        answer = self.ask(client, pump, wire.login_request("bob", "bob-pw"))
        self.assertEqual(
            answer,
            [
                {
                    "ok": True,
                    "user": "bob",
                    "access": "read-only",
                    "in_transaction": False,
                }
            ],
        )
        self.assertEqual(self.ask(client, pump, b"SELECT 1\n")[1], [1])
        answer = self.ask(client, pump, b"CREATE TABLE t (a)\n")
        self.assertEqual(answer[0]["error"]["code"], "access")

    def test_failed_logins_logged_and_slowed(self) -> None:
        """
        A failed login is logged with the peer and not the password, and
        each further attempt from that host waits longer before it is
        checked.
        """
        client, pump = self.connect_without_certificate()
        with capturedLogs() as events:
            answer = self.ask(client, pump, wire.login_request("bob", "guess-1"))
        self.assertEqual(answer[0]["error"]["code"], "login")
        failed = [e for e in events if "failed login" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["user"], "bob")
        self.assertNotIn("guess-1", repr(list(events)))

        answer = self.ask(client, pump, wire.login_request("bob", "guess-2"))
        self.assertEqual(answer, [])
        self.clock.advance(session_delay := 0.5)
        pump.flush()
        self.assertEqual(client.messages[-1]["error"]["code"], "login")

        answer = self.ask(client, pump, wire.login_request("bob", "bob-pw"))
        self.assertEqual(answer, [])
        self.clock.advance(session_delay * 2)
        pump.flush()
        self.assertEqual(client.messages[-1]["user"], "bob")
        # A success forgets the failures.
        self.assertEqual(self.factory.login_slot("127.0.0.1"), 0.0)

    def test_certificate_user_access(self) -> None:
        """
        A certificate whose name is a user gets that user's access level.
        """
        _, client, pump = self.connect()
        hello = client.messages[0]["hello"]
        self.assertEqual((hello["client"], hello["access"]), ("alice", "read-write"))
        answer = self.ask(client, pump, b"CREATE TABLE t (a)\n")
        self.assertEqual(answer[0]["error"]["code"], "access")

    def test_required_certificate_still_refuses(self) -> None:
        """
        With the usual context (certificate required) a client without one
        never reaches the protocol.
        """
        client = _LineClient()
        support.connect_in_memory(
            self.factory,
            support.server_creator(self.layout),
            client,
            _trusting_ca_only(self.layout),
            self.clock,
        )
        self.assertEqual(client.messages, [])
        self.assertIsNotNone(client.lost)


class _RealServerCase(_ServerCase):
    """
    A real listener with users, that takes passwords.
    """

    async def start_with_users(self) -> int:
        port = await self.start_server()
        await defer.maybeDeferred(self.port.stopListening)
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=reactor,
            users_file=_add_users(
                self.layout,
                ("ro", "ro-pw", "read-only"),
                ("rw", "rw-pw", "read-write"),
            ),
            passwords=True,
        )
        self.tls_factory = TLSMemoryBIOFactory(
            _optional_certificate_creator(self.layout), False, self.factory
        )
        self.port = reactor.listenTCP(0, self.tls_factory, interface="127.0.0.1")
        port = int(self.port.getHost().port)
        return port


class StreamingTests(_RealServerCase):
    """
    A large result over a real socket, with a client that reads slowly.
    """

    async def test_million_rows_bounded_memory(self) -> None:
        """
        While a client does not read, the server reads only a few batches
        of a million-row result; once it reads, every row arrives.
        """
        port = await self.start_server()
        fetched = []
        real_fetch = Session.fetch

        def counting_fetch(s: Session) -> Any:
            answer = real_fetch(s)
            fetched.append(answer.rows)
            return answer

        self.patch(Session, "fetch", counting_fetch)
        pauses = []
        real_pause = protocol._AnswerStream.pauseProducing

        def counting_pause(stream: Any) -> None:
            pauses.append(sum(fetched))
            real_pause(stream)

        self.patch(protocol._AnswerStream, "pauseProducing", counting_pause)
        total = 1_000_000

        def slow_reader() -> tuple[int, int]:
            connection = dbapi.connect(
                "127.0.0.1", port, identity=self.identity.key.parent
            )
            connection.autocommit = True
            cursor = connection.cursor()
            cursor.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < ?) SELECT i, 'row ' || i FROM n",
                (total,),
            )
            time.sleep(3.0)
            held = sum(fetched)
            count = 0
            last = 0
            for row in cursor:
                count += 1
                last = row[0]
            connection.close()
            return held, count if last == total else -1

        held, count = await threads.deferToThread(slow_reader)
        # The transport paused the server's reading of rows once the socket
        # buffers were full: what was read while the client slept is what
        # those buffers hold (a few MB), far from all the rows.
        self.assertGreater(len(pauses), 0)
        self.assertLess(held, total // 4)
        self.assertEqual(count, total)


class DBAPITests(_RealServerCase):
    """
    The DB-API 2.0 driver against a real listener.
    """

    def connect_dbapi(self, port: int, **kwargs: Any) -> dbapi.Connection:
        if "user" not in kwargs:
            kwargs["identity"] = self.identity.key.parent
        else:
            kwargs["ca"] = self.layout.ca
        return dbapi.connect("127.0.0.1", port, **kwargs)

    async def test_module_globals(self) -> None:
        """
        The module declares the PEP's globals and exception hierarchy.
        """
        self.assertEqual((dbapi.apilevel, dbapi.paramstyle), ("2.0", "qmark"))
        self.assertTrue(issubclass(dbapi.IntegrityError, dbapi.DatabaseError))
        self.assertTrue(issubclass(dbapi.DatabaseError, dbapi.Error))
        self.assertTrue(issubclass(dbapi.InterfaceError, dbapi.Error))
        self.assertEqual(dbapi.NUMBER, "integer")
        self.assertEqual(dbapi.BINARY, "blob")

    async def test_cursor_commit_rollback(self) -> None:
        """
        Parameters, description, fetchone/fetchmany/fetchall, rowcount,
        commit and rollback behave as PEP 249 says; uncommitted work is
        invisible to another connection and lost on close.
        """
        port = await self.start_with_users()

        def work() -> None:
            one = self.connect_dbapi(port)
            cursor = one.cursor()
            cursor.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT, b BLOB)")
            one.commit()
            cursor.executemany(
                "INSERT INTO p (name, b) VALUES (?, ?)",
                [("Ada", dbapi.Binary(b"\x00\x01")), ("Grace", None), ("Zoë", b"")],
            )
            self.assertEqual(cursor.rowcount, 3)
            other = self.connect_dbapi(port)
            other_cursor = other.cursor()
            other_cursor.execute("SELECT count(*) FROM p")
            self.assertEqual(other_cursor.fetchone(), (0,))
            other.rollback()
            one.commit()
            other_cursor.execute("SELECT id, name, b FROM p ORDER BY id")
            self.assertEqual(
                [d[:2] for d in other_cursor.description],
                [("id", "integer"), ("name", "text"), ("b", "blob")],
            )
            self.assertEqual(other_cursor.fetchone(), (1, "Ada", b"\x00\x01"))
            self.assertEqual(other_cursor.fetchmany(1), [(2, "Grace", None)])
            self.assertEqual(other_cursor.fetchall(), [(3, "Zoë", b"")])
            self.assertEqual(other_cursor.fetchone(), None)
            self.assertEqual(other_cursor.rowcount, 3)
            cursor.execute("DELETE FROM p")
            one.rollback()
            cursor.execute("UPDATE p SET name = ? WHERE id = ?", ("Lovelace", 1))
            one.close()
            other_cursor.execute("SELECT name FROM p WHERE id = 1")
            self.assertEqual(other_cursor.fetchall(), [("Ada",)])
            other.close()
            with self.assertRaises(dbapi.InterfaceError):
                other_cursor.execute("SELECT 1")

        await threads.deferToThread(work)

    async def test_errors(self) -> None:
        """
        Database errors map to the PEP's classes and the connection goes on.
        """
        port = await self.start_with_users()

        def work() -> None:
            connection = self.connect_dbapi(port)
            connection.autocommit = True
            cursor = connection.cursor()
            cursor.execute("CREATE TABLE u (a UNIQUE)")
            cursor.execute("INSERT INTO u VALUES (1)")
            with self.assertRaises(dbapi.IntegrityError) as caught:
                cursor.execute("INSERT INTO u VALUES (1)")
            self.assertIn("UNIQUE constraint failed", str(caught.exception))
            with self.assertRaises(dbapi.ProgrammingError):
                cursor.execute("SELECT * FROM nowhere")
            with self.assertRaises(dbapi.ProgrammingError):
                cursor.execute("SELECT ?", (object(),))
            cursor.execute("SELECT 5")
            self.assertEqual(cursor.fetchone(), (5,))
            connection.close()

        await threads.deferToThread(work)

    async def test_password_users(self) -> None:
        """
        Users log in with passwords and without certificates; a read-only
        user cannot write, a wrong password is refused.
        """
        port = await self.start_with_users()

        def work() -> None:
            owner = self.connect_dbapi(port)
            owner.cursor().execute("CREATE TABLE q (a)")
            owner.commit()
            owner.close()
            writer = self.connect_dbapi(port, user="rw", password="rw-pw")
            self.assertEqual(writer.greeting["client"], None)
            writer.cursor().execute("INSERT INTO q VALUES (?)", (1,))
            writer.commit()
            with self.assertRaises(dbapi.ProgrammingError):
                writer.cursor().execute("DROP TABLE q")
            writer.close()
            reader = self.connect_dbapi(port, user="ro", password="ro-pw")
            cursor = reader.cursor()
            cursor.execute("SELECT a FROM q")
            self.assertEqual(cursor.fetchall(), [(1,)])
            with self.assertRaises(dbapi.ProgrammingError) as caught:
                cursor.execute("DELETE FROM q")
            self.assertEqual(caught.exception.code, "access")
            reader.close()
            with self.assertRaises(dbapi.OperationalError):
                self.connect_dbapi(port, user="ro", password="wrong")

        await threads.deferToThread(work)

    async def test_twisted_client_login(self) -> None:
        """
        The Twisted client logs in without a certificate and sends
        parameters.
        """
        port = await self.start_with_users()
        client = await connect(
            reactor,
            "127.0.0.1",
            port,
            None,
            ca=self.layout.ca,
            user="ro",
            password="ro-pw",
        )
        result = await client.execute("SELECT ? + 1, ?", [41, b"\x00"])
        self.assertEqual(result.rows, ((42, b"\x00"),))
        self.assertEqual(result.types, ("integer", "blob"))
        with self.assertRaises(SQLError):
            await client.execute("CREATE TABLE z (a)")
        await client.close()


class CommandLoginTests(_RealServerCase):
    """
    ``tls4d sql --user`` logs in with a password and no certificate.
    """

    async def test_user_without_certificate(self) -> None:
        """
        With --user and --ca the command logs in and runs statements at the
        user's access level.
        """
        port = await self.start_with_users()
        argv = [
            sys.executable,
            "-m",
            "twisted_tls4d.cli",
            "sql",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ca",
            str(self.layout.ca),
            "--user",
            "ro",
            "-e",
            "SELECT 40 + 2 AS answer",
        ]
        env = dict(os.environ, PYTHONPATH=str(_REPOSITORY), TLS4D_SQL_PASSWORD="ro-pw")
        result = await threads.deferToThread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, "answer\n------\n    42\n(1 row)\n")
