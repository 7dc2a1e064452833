"""
Tests of the SQL server in front of PostgreSQL: the same session behaviours
as with SQLite, run against both backends, and the access levels enforced
by PostgreSQL roles, against a throwaway PostgreSQL cluster started on
loopback (skipped when PostgreSQL's binaries or psycopg are missing).
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests import support
from tests.test_sql import _InMemoryCase
from twisted_tls4d import settings
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.sql import session, wire
from twisted_tls4d.sql.postgres import (
    PostgresBackend,
    PostgresSession,
    redact_url,
    translate_placeholders,
)
from twisted_tls4d.sql.protocol import SQLServerFactory
from twisted_tls4d.sql.session import Session

#: Seconds any one command of the cluster's set-up or tear-down may take.
_COMMAND_TIMEOUT = 60

#: The roles' password in the test cluster (which trusts loopback anyway).
_PASSWORD = "s3cret"

#: What the operator runs, as a superuser, in the database ``tls4d`` after
#: creating the roles and the database: the script of docs/sql-protocol.md.
PROVISIONING = (
    "REVOKE ALL ON DATABASE tls4d FROM PUBLIC",
    "GRANT CONNECT ON DATABASE tls4d TO tls4d_read_write, tls4d_read_only",
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    "GRANT USAGE ON SCHEMA public TO tls4d_read_write, tls4d_read_only",
    "REVOKE EXECUTE ON FUNCTION lo_create(oid), lo_creat(integer), "
    "lo_from_bytea(oid, bytea) FROM PUBLIC",
    "ALTER DEFAULT PRIVILEGES FOR ROLE tls4d_full IN SCHEMA public "
    "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO tls4d_read_write",
    "ALTER DEFAULT PRIVILEGES FOR ROLE tls4d_full IN SCHEMA public "
    "GRANT USAGE, SELECT ON SEQUENCES TO tls4d_read_write",
    "ALTER DEFAULT PRIVILEGES FOR ROLE tls4d_full IN SCHEMA public "
    "GRANT SELECT ON TABLES TO tls4d_read_only",
)


def _postgres_binaries() -> Path | None:
    """
    Returns:
        The folder of the newest installed PostgreSQL's ``initdb`` and
        ``pg_ctl``, or None.
    """
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _skip_reason() -> str | None:
    """
    Returns:
        Why the PostgreSQL tests cannot run here, or None.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install '.[postgresql]')."
    if _postgres_binaries() is None:
        return (
            "PostgreSQL's initdb and pg_ctl are not installed (apt install postgresql)."
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "Running as root needs runuser to start PostgreSQL as another user."
    return None


def _free_port() -> int:
    """
    Returns:
        A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """
    A throwaway PostgreSQL cluster on 127.0.0.1, run as the ``postgres``
    system user when the tests run as root, with the database ``tls4d`` and
    its three roles provisioned as the documentation says.
    """

    def __init__(self) -> None:
        binaries = _postgres_binaries()
        assert binaries is not None
        self.binaries = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="tls4d-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def url(self, role: str, database: str = "tls4d") -> str:
        """
        Returns:
            The URL of ``database`` for ``role``.
        """
        return f"postgresql://{role}:{_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def backend(self) -> PostgresBackend:
        """
        Returns:
            The backend with each level's role.
        """
        return PostgresBackend(
            self.url("tls4d_full"),
            read_write=self.url("tls4d_read_write"),
            read_only=self.url("tls4d_read_only"),
        )

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self.prefix, *command],
            check=True,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
        )

    def start(self) -> None:
        """
        Make the cluster, start it, and provision the database.
        """
        self._run(
            str(self.binaries / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
            "-c fsync=off -c max_connections=40"
        )
        self._run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "-t",
            "30",
            "start",
        )
        self.started = True
        self._watch()
        import psycopg

        with psycopg.connect(self.url("postgres", "postgres"), autocommit=True) as c:
            for role in ("tls4d_full", "tls4d_read_write", "tls4d_read_only"):
                c.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{_PASSWORD}'")
            c.execute("CREATE DATABASE tls4d OWNER tls4d_full")
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            for statement in PROVISIONING:
                c.execute(statement)

    def _watch(self) -> None:
        """
        Start a watchdog that stops the cluster and removes its files once
        the test process is gone, in case it dies without running `stop`
        (checking each second, for at most a day).
        """
        stop = shlex.join(
            [
                *self.prefix,
                str(self.binaries / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "stop",
            ]
        )
        script = (
            'i=0; while kill -0 "$1" 2>/dev/null && [ "$i" -lt 86400 ]; do '
            f"sleep 1; i=$((i + 1)); done; {stop} >/dev/null 2>&1; "
            f"rm -rf {shlex.quote(str(self.folder))}"
        )
        subprocess.Popen(
            ["sh", "-c", script, "sh", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """
        Stop the cluster (waiting at most 30 s) and remove its files.
        """
        try:
            if self.started:
                self.started = False
                self._run(
                    str(self.binaries / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


#: The one cluster the tests of a run share: started by the first test that
#: needs it, stopped when the process exits.
_CLUSTER: Cluster | None = None

#: Why starting the shared cluster failed, so later tests fail at once.
_CLUSTER_FAILURE: BaseException | None = None


def shared_cluster() -> Cluster:
    """
    Returns:
        The run's PostgreSQL cluster, started on first use.

    Raises:
        RuntimeError: The cluster could not be started (now or before).
    """
    global _CLUSTER, _CLUSTER_FAILURE
    if _CLUSTER_FAILURE is not None:
        msg = f"The test PostgreSQL cluster did not start: {_CLUSTER_FAILURE}"
        raise RuntimeError(msg)
    if _CLUSTER is None:
        cluster = Cluster()
        atexit.register(cluster.stop)
        try:
            cluster.start()
        except BaseException as e:
            _CLUSTER_FAILURE = e
            raise
        _CLUSTER = cluster
    return _CLUSTER


class _ClusterCase(unittest.TestCase):
    """
    Tests that run against the shared PostgreSQL cluster, each with an empty
    schema ``public``.
    """

    skip = _skip_reason()
    cluster: Cluster

    def setUp(self) -> None:
        self.cluster = shared_cluster()
        self.reset()

    def reset(self) -> None:
        """
        Empty the database: drop and recreate the schema ``public`` as the
        full role, with the privileges and default privileges the
        provisioning gives.
        """
        import psycopg

        with psycopg.connect(self.cluster.url("tls4d_full"), autocommit=True) as c:
            c.execute("DROP SCHEMA IF EXISTS public CASCADE")
            c.execute("CREATE SCHEMA public")
            c.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            c.execute(
                "GRANT USAGE ON SCHEMA public TO tls4d_read_write, tls4d_read_only"
            )
            for statement in PROVISIONING:
                if statement.startswith("ALTER DEFAULT PRIVILEGES"):
                    c.execute(statement)


def _lines(answer: session.Answer) -> list[Any]:
    """
    Returns:
        The messages of an answer.
    """
    return [json.loads(line) for line in answer.data.splitlines()]


class _BackendTests:
    """
    Session behaviours both backends share; a subclass says how to open a
    session and the name of the binary type.
    """

    blob = "BLOB"

    def open(self, access: str = wire.FULL) -> Any:
        raise NotImplementedError

    def session(self, access: str = wire.FULL) -> Any:
        s = self.open(access)
        self.addCleanup(s.close)  # type: ignore[attr-defined]
        return s

    def test_create_insert_select(self) -> None:
        """
        A table made, filled with parameters of every type (bytes included)
        and read back gives the same values and a typed header.
        """
        s = self.session()
        t: Any = self
        self.assertOk(
            s.execute(
                f"CREATE TABLE t (i BIGINT, r DOUBLE PRECISION, "
                f"s TEXT, n TEXT, b {self.blob})"
            )
        )
        blob = bytes(range(256))
        answer = s.execute(
            "INSERT INTO t VALUES (?, ?, ?, ?, ?)", (2**62, -0.25, "a'?\n", None, blob)
        )
        t.assertEqual(_lines(answer)[-1]["changes"], 1)
        lines = _lines(s.execute("SELECT i, r, s, n, b FROM t"))
        t.assertEqual(lines[0]["columns"], ["i", "r", "s", "n", "b"])
        t.assertEqual(lines[0]["types"][:3], ["integer", "real", "text"])
        t.assertEqual(lines[0]["types"][4], "blob")
        row = tuple(wire.decode_value(c) for c in lines[1])
        t.assertEqual(row, (2**62, -0.25, "a'?\n", None, blob))
        t.assertEqual(lines[-1], {"ok": True, "rows": 1, "in_transaction": False})

    def test_quoted_question_marks(self) -> None:
        """
        A ``?`` inside a string literal or quoted name is not a placeholder.
        """
        s = self.session()
        lines = _lines(s.execute("SELECT '?' AS \"a?\", ? AS b", ("x",)))
        self.assertEqual(lines[0]["columns"], ["a?", "b"])  # type: ignore[attr-defined]
        self.assertEqual(lines[1], ["?", "x"])  # type: ignore[attr-defined]

    def test_parameters_are_not_sql(self) -> None:
        """
        A parameter that looks like SQL (or holds ``%s``) is a value.
        """
        s = self.session()
        value = "x'); DROP TABLE t; -- %s %%"
        lines = _lines(s.execute("SELECT ? AS v, '100%' AS p", (value,)))
        self.assertEqual(lines[1], [value, "100%"])  # type: ignore[attr-defined]

    def test_errors_go_on(self) -> None:
        """
        A failing statement answers an ``sql`` error, and the session goes on;
        so do a wrong parameter count and two statements on one line.
        """
        s = self.session()
        t: Any = self
        for statement, parameters in (
            ("SELECT * FROM nobody", ()),
            ("SELECT ?, ?", (1,)),
            ("SELECT 1; SELECT 2", ()),
        ):
            status = _lines(s.execute(statement, parameters))[-1]
            t.assertEqual(status["ok"], False, statement)
            t.assertEqual(status["error"]["code"], "sql", statement)
        t.assertEqual(_lines(s.execute("SELECT 2 AS two"))[1], [2])

    def test_transaction_across_lines(self) -> None:
        """
        ``BEGIN`` opens a transaction over several statements, another
        session does not see it until ``COMMIT``, and a session closed with a
        transaction open rolls it back.
        """
        t: Any = self
        s, other = self.session(), self.session()
        self.assertOk(s.execute("CREATE TABLE t (a BIGINT)"))
        t.assertEqual(_lines(s.execute("BEGIN"))[-1]["in_transaction"], True)
        s.execute("INSERT INTO t VALUES (1)")
        t.assertEqual(_lines(other.execute("SELECT count(*) FROM t"))[1], [0])
        t.assertEqual(_lines(s.execute("COMMIT"))[-1]["in_transaction"], False)
        t.assertEqual(_lines(other.execute("SELECT count(*) FROM t"))[1], [1])
        s.execute("BEGIN")
        s.execute("INSERT INTO t VALUES (2)")
        t.assertTrue(s.close())
        t.assertEqual(_lines(other.execute("SELECT count(*) FROM t"))[1], [1])

    def test_streaming_in_batches(self) -> None:
        """
        A result larger than a batch comes from ``start`` then ``fetch`` in
        batches of at most `session.BATCH_ROWS` rows, in order.
        """
        t: Any = self
        s = self.session()
        count = session.BATCH_ROWS * 2 + 7
        first = s.start(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < ?) SELECT i FROM n",
            (count,),
        )
        t.assertFalse(first.done)
        parts = [first]
        for _ in range(10):
            if parts[-1].done:
                break
            parts.append(s.fetch())
        t.assertTrue(parts[-1].done)
        t.assertTrue(all(p.rows <= session.BATCH_ROWS for p in parts))
        lines = [m for p in parts for m in _lines(p)]
        t.assertEqual([r[0] for r in lines[1:-1]], list(range(1, count + 1)))
        t.assertEqual(lines[-1]["rows"], count)

    def assertOk(self, answer: session.Answer) -> None:  # noqa: N802
        self.assertTrue(answer.ok, answer.error)  # type: ignore[attr-defined]


class SQLiteBackendTests(_BackendTests, unittest.TestCase):
    """
    The shared session behaviours with SQLite.
    """

    def open(self, access: str = wire.FULL) -> Any:
        folder = support.temporary_folder("tls4d-sql-")
        self.addCleanup(shutil.rmtree, folder, True)
        if not hasattr(self, "database"):
            self.database = folder / "db.sqlite"
        return Session(self.database, access=access)


class PostgresBackendTests(_BackendTests, _ClusterCase):
    """
    The shared session behaviours with PostgreSQL.
    """

    blob = "BYTEA"

    def open(self, access: str = wire.FULL) -> Any:
        return PostgresSession(self.cluster.backend(), access=access, user="bob")

    def test_postgres_types(self) -> None:
        """
        numeric, dates and JSON come as their text; booleans as 1 and 0;
        infinite floats as tagged reals; a column's type comes from
        PostgreSQL even when it holds no rows.
        """
        s = self.session()
        lines = _lines(
            s.execute(
                "SELECT 1.50::numeric AS n, DATE '2024-02-29' AS d, "
                "'{\"a\": 1}'::jsonb AS j, true AS b, 'Infinity'::float8 AS f"
            )
        )
        self.assertEqual(lines[0]["types"], ["text", "text", "text", "integer", "real"])
        self.assertEqual(
            lines[1], ["1.50", "2024-02-29", '{"a": 1}', 1, {"real": "Infinity"}]
        )
        lines = _lines(s.execute("SELECT 1::int AS a WHERE false"))
        self.assertEqual(lines[0], {"columns": ["a"], "types": ["integer"]})

    def test_aborted_transaction(self) -> None:
        """
        An error inside a transaction leaves it failed but open, as
        PostgreSQL does, until ``ROLLBACK``.
        """
        s = self.session()
        s.execute("BEGIN")
        status = _lines(s.execute("SELECT * FROM nobody"))[-1]
        self.assertEqual(status["in_transaction"], True)
        self.assertEqual(status["error"]["sqlstate"], "42P01")
        self.assertEqual(
            _lines(s.execute("SELECT 1"))[-1]["error"]["sqlstate"], "25P02"
        )
        self.assertEqual(_lines(s.execute("ROLLBACK"))[-1]["in_transaction"], False)

    def test_abandon_cancels(self) -> None:
        """
        A session abandoned mid-stream refuses its next batch and closes.
        """
        s = PostgresSession(self.cluster.backend())
        first = s.start("SELECT generate_series(1, 100000)")
        self.assertFalse(first.done)
        s.abandon()
        self.assertEqual(_lines(s.fetch())[-1]["error"]["code"], "shutdown")
        self.assertFalse(s.close())


class PostgresAccessTests(_ClusterCase):
    """
    Each access level, enforced by the role its sessions connect as.
    """

    def setUp(self) -> None:
        super().setUp()
        owner = PostgresSession(self.cluster.backend())
        for statement in (
            "CREATE TABLE t (a BIGINT)",
            "CREATE SEQUENCE q",
            "INSERT INTO t VALUES (1)",
        ):
            self.assertTrue(owner.execute(statement).ok, statement)
        owner.close()

    def count(self) -> int:
        owner = PostgresSession(self.cluster.backend())
        try:
            return int(_lines(owner.execute("SELECT count(*) FROM t"))[1][0])
        finally:
            owner.close()

    def refused(self, access: str, *statements: str) -> None:
        """
        Run ``statements`` in one session of ``access``, and check the last
        one failed for its access.
        """
        s = PostgresSession(self.cluster.backend(), access=access, user="bob")
        try:
            for statement in statements:
                status = _lines(s.execute(statement))[-1]
        finally:
            s.close()
        self.assertEqual(status["ok"], False, statements)
        self.assertEqual(status["error"]["code"], "access", statements)
        self.assertIn(f"'bob' has {access} access", status["error"]["message"])

    def test_read_only(self) -> None:
        """
        A read-only session reads, and no statement or sequence of them it
        can send writes: not plain writes, nor lifting the read-only mode
        first, nor switching roles.
        """
        s = PostgresSession(self.cluster.backend(), access=wire.READ_ONLY, user="bob")
        self.assertEqual(_lines(s.execute("SELECT a FROM t"))[1], [1])
        s.close()
        insert = "INSERT INTO t VALUES (2)"
        for statements in (
            (insert,),
            ("UPDATE t SET a = 3",),
            ("DELETE FROM t",),
            ("TRUNCATE t",),
            ("CREATE TABLE u (a int)",),
            ("CREATE TEMP TABLE u (a int)",),
            ("CREATE SCHEMA s",),
            ("DROP TABLE t",),
            ("SELECT a FROM t FOR UPDATE",),
            ("BEGIN READ WRITE", insert),
            ("SET default_transaction_read_only = off", insert),
            ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", insert),
            (
                "SELECT set_config('default_transaction_read_only', 'off', false)",
                insert,
            ),
            ("SELECT set_config('transaction_read_only', 'off', false)", insert),
            ("RESET ROLE", insert),
            ("SET default_transaction_read_only = off", "RESET ROLE", insert),
            ("SET ROLE tls4d_full",),
            ("SET SESSION AUTHORIZATION tls4d_full",),
            ("SELECT set_config('role', 'tls4d_full', false)",),
            ("SET default_transaction_read_only = off", "SELECT nextval('q')"),
            ("SET default_transaction_read_only = off", "SELECT lo_create(0)"),
            ("SET default_transaction_read_only = off", "CREATE TEMP TABLE u (a int)"),
        ):
            self.refused(wire.READ_ONLY, *statements)
        self.assertEqual(self.count(), 1)

    def test_read_write(self) -> None:
        """
        A read-write session changes rows but not the schema.
        """
        s = PostgresSession(self.cluster.backend(), access=wire.READ_WRITE)
        for statement in (
            "INSERT INTO t VALUES (2)",
            "UPDATE t SET a = a + 1",
            "SELECT nextval('q')",
        ):
            self.assertTrue(s.execute(statement).ok, statement)
        s.close()
        for statement in (
            "CREATE TABLE u (a int)",
            "CREATE TEMP TABLE u (a int)",
            "DROP TABLE t",
            "ALTER TABLE t ADD COLUMN b int",
            "CREATE INDEX i ON t (a)",
            "TRUNCATE t",
            "CREATE SCHEMA s",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "SET ROLE tls4d_full",
        ):
            self.refused(wire.READ_WRITE, statement)
        self.assertEqual(self.count(), 2)

    def test_full(self) -> None:
        """
        A full session changes the schema.
        """
        s = PostgresSession(self.cluster.backend())
        self.assertTrue(s.execute("CREATE TABLE u (a int)").ok)
        self.assertTrue(s.execute("DROP TABLE u").ok)
        s.close()

    def test_role_that_may_do_too_much(self) -> None:
        """
        A read-only or read-write level whose role could write the schema
        (here the full role, which owns the tables) is refused, naming why,
        rather than used; so is a level the operator gave no role.
        """
        full = self.cluster.url("tls4d_full")
        for access, backend in (
            (wire.READ_ONLY, PostgresBackend(full, read_only=full)),
            (wire.READ_WRITE, PostgresBackend(full, read_write=full)),
        ):
            s = PostgresSession(backend, access=access)
            answer = s.execute("SELECT 1")
            s.close()
            status = _lines(answer)[-1]
            self.assertEqual(status["error"]["code"], "access")
            self.assertIn("'tls4d_full'", status["error"]["message"])
            self.assertIsNotNone(answer.notice)
        s = PostgresSession(PostgresBackend(full), access=wire.READ_ONLY)
        status = _lines(s.execute("SELECT 1"))[-1]
        s.close()
        self.assertIn("--sql-database-read-only", status["error"]["message"])


class PostgresProtocolTests(_InMemoryCase):
    """
    The SQL server's protocol in front of PostgreSQL, over in-memory TLS.
    """

    skip = _skip_reason()
    max_line_length = 1024 * 1024

    def setUp(self) -> None:
        self.cluster = shared_cluster()
        super().setUp()
        self.factory.stop()
        self.factory = SQLServerFactory(
            database=self.layout.database,
            clock=self.clock,
            max_line_length=self.max_line_length,
            threadpool=self.threadpool,
            reactor=self.factory._reactor,
            backend=self.cluster.backend(),
        )
        self.factory.start()
        self.addCleanup(self.factory.stop)
        _ClusterCase.reset(self)  # type: ignore[arg-type]

    def test_session(self) -> None:
        """
        A client greeted as its certificate's user creates, fills and reads
        a table, parameters included, and a large result streams whole.
        """
        _, client, pump = self.connect()
        self.assertEqual(client.messages[0]["hello"]["access"], "full")
        self.assertTrue(
            self.ask(client, pump, b"CREATE TABLE p (id int, photo bytea)\n")[-1]["ok"]
        )
        request = wire.statement_request(
            "INSERT INTO p VALUES (?, ?), (?, ?)", [1, b"\x89PNG", 2, None]
        )
        self.assertEqual(self.ask(client, pump, request)[-1]["changes"], 2)
        answer = self.ask(client, pump, b"SELECT id, photo FROM p ORDER BY id\n")
        self.assertEqual(answer[0]["types"], ["integer", "blob"])
        self.assertEqual(answer[1], [1, {"blob": "iVBORw=="}])
        self.assertEqual(answer[2], [2, None])
        count = session.BATCH_ROWS * 3 + 1
        answer = self.ask(
            client,
            pump,
            wire.statement_request("SELECT generate_series(1, ?) AS i", [count]),
        )
        for _ in range(10):
            if isinstance(answer[-1], dict) and "ok" in answer[-1]:
                break
            answer.extend(self.ask(client, pump, b""))
        self.assertEqual([r[0] for r in answer[1:-1]], list(range(1, count + 1)))


class PlaceholderTests(unittest.TestCase):
    """
    The translation of ``?`` placeholders to PostgreSQL's and psycopg's.
    """

    def test_table(self) -> None:
        """
        Placeholders are found outside literals, identifiers, dollar quotes
        and comments, and ``%`` is escaped for psycopg.
        """
        for statement, native, count in (
            ("SELECT ?", "SELECT $1", 1),
            ("SELECT '?', ?", "SELECT '?', $1", 1),
            ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1", 1),
            ("SELECT E'\\' ?', ?", "SELECT E'\\' ?', $1", 1),
            ('SELECT "a?" FROM t WHERE b = ?', 'SELECT "a?" FROM t WHERE b = $1', 1),
            ("SELECT $$ ? $$, $x$?$x$, ?", "SELECT $$ ? $$, $x$?$x$, $1", 1),
            ("SELECT ? -- ?\n, ?", "SELECT $1 -- ?\n, $2", 2),
            ("SELECT /* ? /* ? */ ? */ ?", "SELECT /* ? /* ? */ ? */ $1", 1),
            ("SELECT a$b, ?", "SELECT a$b, $1", 1),
        ):
            self.assertEqual(translate_placeholders(statement)[0], native, statement)
            self.assertEqual(translate_placeholders(statement)[2], count, statement)
        self.assertEqual(translate_placeholders("SELECT '%', ?")[1], "SELECT '%%', %s")


class RedactTests(unittest.TestCase):
    """
    PostgreSQL URLs shown without their passwords.
    """

    def test_redact(self) -> None:
        """
        The password of the URL's credentials or query is replaced.
        """
        self.assertEqual(
            redact_url("postgresql://u:pw@h:5/db?sslmode=require&password=pw"),
            "postgresql://u:***@h:5/db?sslmode=require&password=***",
        )
        self.assertEqual(redact_url("postgresql://u@h/db"), "postgresql://u@h/db")
        self.assertNotIn("pw", PostgresBackend("postgresql://u:pw@h/d").describe())


class SettingsTests(unittest.TestCase):
    """
    The ``sql-database`` options.
    """

    def test_checked_and_redacted(self) -> None:
        """
        The URLs must be PostgreSQL's, a level's needs the full one, and the
        settings' repr hides their passwords.
        """
        folder = support.temporary_folder("tls4d-settings-")
        self.addCleanup(shutil.rmtree, folder, True)
        url = "postgresql://tls4d_full:pw@127.0.0.1/tls4d"
        resolved = settings.resolve(
            {"sql_database": url, "sql_database_read_only": url}, folder
        )
        self.assertEqual(resolved.sql_database, url)
        self.assertNotIn(":pw@", repr(resolved))
        for given in (
            {"sql_database": "mysql://u@h/d"},
            {"sql_database_read_only": url},
            {"sql_database": url, "sql_database_read_write": "/tmp/x.sqlite"},
        ):
            error = self.assertRaises(
                ConfigurationError, settings.resolve, given, folder
            )
            self.assertNotIn(":pw@", str(error))


class TwistdPostgresTests(_ClusterCase):
    """
    The real ``twistd -n tls4d --sql --sql-database ...`` serves a PostgreSQL
    database to the ``tls4d sql`` command.
    """

    def test_end_to_end(self) -> None:
        """Rows sent through the real server land in PostgreSQL; no password logged."""
        from tests.test_e2e import Server, _tls4d

        folder = support.temporary_folder("tls4d-pg-e2e-")
        server = Server(
            folder / "root",
            "--sql",
            "--sql-database",
            self.cluster.url("tls4d_full"),
        )
        self.addCleanup(server.stop)
        port = str(server.port("SQL server"))
        made = _tls4d(
            "client",
            "alice",
            "--root",
            str(folder / "root"),
            "--out",
            str(folder / "a"),
        )
        self.assertEqual(made.returncode, 0, made.stderr)

        def sql(*statements: str) -> Any:
            arguments = [a for s in statements for a in ("-e", s)]
            return _tls4d(
                "sql", "--identity", str(folder / "a"), "--port", port, *arguments
            )

        done = sql(
            "CREATE TABLE t (n integer, s text)",
            "INSERT INTO t VALUES (1, 'one'), (2, 'two')",
            "SELECT version()",
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("PostgreSQL", done.stdout)
        import psycopg

        with psycopg.connect(self.cluster.url("tls4d_full")) as connection:
            rows = connection.execute("SELECT n, s FROM t ORDER BY n").fetchall()
        self.assertEqual(rows, [(1, "one"), (2, "two")])
        self.assertNotIn(_PASSWORD, server.log)
