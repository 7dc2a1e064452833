"""
Durability across ``kill -9``: the real twistd with the SQL and application
servers is killed with SIGKILL at several points of a load; after a restart
the database is intact, every row whose commit was answered is there, no row
of a transaction left open is, and the servers serve.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Awaitable, Callable
from contextlib import closing
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests import support
from tests.test_e2e import DEADLINE, Server
from twisted_tls4d.app import client as app_client
from twisted_tls4d.errors import ClientConnectionError
from twisted_tls4d.sql import dbapi

#: Rows a load must have had answered before the server is killed.
ANSWERED_BEFORE_KILL = 200

#: Rows of the large multi-row statement, and the first row's number.
LARGE_ROWS = 1_000_000
LARGE_FIRST = 1_000_000

#: Bytes the write-ahead log must grow by before the large statement is
#: killed: SQLite has begun writing its pages, and is far from done.
LARGE_WAL_GROWTH = 4 * 1024 * 1024

Load = Callable[[Server], Awaitable[None]]


class KillNineTests(unittest.TestCase):
    """
    Rows whose commit was answered survive ``kill -9`` of the server at each
    kill point; uncommitted rows do not; the database passes SQLite's
    integrity check afterwards and the restarted server takes writes.
    """

    timeout = 120

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.addCleanup(shutil.rmtree, self.layout.path.parent, True)
        identity = support.make_client_identity(self.layout)
        self.identity = identity
        self.addCleanup(shutil.rmtree, identity.key.parent.parent, True)
        self.killed = threading.Event()
        self.loads: list[defer.Deferred[Any]] = []
        self.load_failures: list[Failure] = []

    def start(self) -> Server:
        """
        Returns:
            A twistd running the SQL and application servers of the root,
            both listening.
        """
        server = Server(self.layout.path, "--sql", "--app")
        self.addCleanup(server.stop)
        server.port("SQL server")
        server.port("Application server")
        return server

    def connect(self, server: Server, autocommit: bool = True) -> dbapi.Connection:
        """
        Returns:
            A DB-API connection to the server's SQL server as the client.
        """
        connection = dbapi.connect(
            "127.0.0.1",
            server.port("SQL server"),
            identity=self.identity.key.parent,
            timeout=DEADLINE,
        )
        connection.autocommit = autocommit
        return connection

    def background(self, work: Callable[..., Any], *args: Any) -> None:
        """
        Run a blocking load in a thread; a failure before the kill fails the
        test, the lost connection after it ends the load.
        """
        load = threads.deferToThread(work, *args)
        self.loads.append(load.addErrback(self.load_failures.append))

    def run_coroutine(self, work: Awaitable[Any]) -> None:
        """Run a load on the reactor, as `background` runs one in a thread."""
        load = defer.ensureDeferred(work)  # type: ignore[arg-type]
        self.loads.append(load.addErrback(self.load_failures.append))

    def lost(self, error: Exception) -> None:
        """
        Re-raise ``error`` (a lost connection) unless the server was killed.
        """
        if not self.killed.is_set():
            raise error

    def kill(self, server: Server) -> None:
        """SIGKILL the server, from any thread; the loads then see lost connections."""
        self.killed.set()
        os.kill(server.process.pid, signal.SIGKILL)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """
        Wait for ``condition``, failing if a load failed or it took too long.
        """
        for _ in range(DEADLINE * 20):
            if self.load_failures:
                self.load_failures[0].raiseException()
            if condition():
                return
            await deferLater(reactor, 0.05)
        self.fail(f"{what} did not happen within {DEADLINE} s")

    async def kill_during(self, load: Load) -> dict[int, bytes | None]:
        """
        Start the server, make the table ``load``, run ``load`` until it is
        time to kill, SIGKILL the server, restart it, and read back.

        Returns:
            The rows of ``load`` after the restart: ``i`` to ``pad``.
        """
        server = self.start()
        with closing(self.connect(server)) as connection:
            connection.cursor().execute(
                "CREATE TABLE load (i INTEGER PRIMARY KEY, pad BLOB)"
            )
        try:
            await load(server)
        finally:
            self.kill(server)
            await threads.deferToThread(server.process.wait, DEADLINE)
            await defer.DeferredList(self.loads)
        self.assertEqual(server.process.returncode, -signal.SIGKILL)
        self.assertEqual(self.load_failures, [])
        restarted = self.start()
        rows = await threads.deferToThread(self.read_back, restarted)
        restarted.stop()
        return rows

    def read_back(self, server: Server) -> dict[int, bytes | None]:
        """
        Check the restarted server's database and that it takes writes.

        Returns:
            The rows of ``load`` before the check's own write.
        """
        with closing(self.connect(server)) as connection:
            cursor = connection.cursor()
            cursor.execute("PRAGMA integrity_check")
            self.assertEqual(cursor.fetchall(), [("ok",)])
            cursor.execute("SELECT i, pad FROM load")
            rows = {row[0]: row[1] for row in cursor}
            cursor.execute("INSERT INTO load (i) VALUES (-1)")
            cursor.execute("SELECT count(*) FROM load WHERE i = -1")
            self.assertEqual(cursor.fetchall(), [(1,)])
        return rows  # type: ignore[return-value]

    def insert_one_by_one(
        self,
        server: Server,
        answered: list[int],
        autocommit: bool,
        start: int = 1,
    ) -> None:
        """
        Insert rows ``start``, ``start + 1``... until the kill, each in its
        own transaction (autocommit, or BEGIN/INSERT/COMMIT), noting each
        row whose commit was answered.
        """
        try:
            with closing(self.connect(server, autocommit)) as connection:
                cursor = connection.cursor()
                i = start
                while not self.killed.is_set():
                    cursor.execute("INSERT INTO load (i) VALUES (?)", (i,))
                    connection.commit()
                    answered.append(i)
                    i += 1
        except dbapi.Error as e:
            self.lost(e)

    def assert_answered_present(
        self, rows: dict[int, Any], answered: list[int], in_flight: int = 1
    ) -> None:
        """
        Every answered row is there, and at most ``in_flight`` rows more (a
        commit the server made but could not answer before it died).
        """
        self.assertGreater(len(answered), 0)
        self.assertEqual(set(answered) - set(rows), set())
        self.assertLessEqual(len(rows) - len(answered), in_flight)

    async def test_autocommit_inserts(self) -> None:
        """Killed during autocommit inserts, every answered insert survives."""
        answered: list[int] = []

        async def load(server: Server) -> None:
            self.background(self.insert_one_by_one, server, answered, True)
            await self.until(
                lambda: len(answered) >= ANSWERED_BEFORE_KILL, "the inserts"
            )

        rows = await self.kill_during(load)
        self.assert_answered_present(rows, answered)

    async def test_open_transaction(self) -> None:
        """
        Killed while a transaction is open, its rows are absent, though the
        server answered each INSERT and wrote pages of it to the log; the
        rows committed before it survive.
        """
        committed = list(range(1, 101))
        uncommitted = list(range(1001, 1601))
        ready = threading.Event()

        def transaction(server: Server) -> None:
            try:
                with closing(self.connect(server, autocommit=False)) as connection:
                    cursor = connection.cursor()
                    for i in committed:
                        cursor.execute("INSERT INTO load (i) VALUES (?)", (i,))
                        connection.commit()
                    # 600 rows of 8 KB: more than SQLite's page cache, so some
                    # of the open transaction's pages reach the log on disk.
                    for i in uncommitted:
                        cursor.execute(
                            "INSERT INTO load VALUES (?, randomblob(8192))", (i,)
                        )
                    ready.set()
                    self.killed.wait(DEADLINE)
                    cursor.execute("SELECT 1")
            except dbapi.Error as e:
                self.lost(e)

        async def load(server: Server) -> None:
            self.background(transaction, server)
            await self.until(ready.is_set, "the open transaction")

        rows = await self.kill_during(load)
        self.assertEqual(sorted(rows), committed)

    async def test_right_after_commit(self) -> None:
        """
        Killed the moment the answer to a COMMIT arrives, every row of every
        answered transaction is there.
        """
        transactions, size = 5, 100

        def commit_then_kill(server: Server) -> None:
            with closing(self.connect(server, autocommit=False)) as connection:
                cursor = connection.cursor()
                for t in range(transactions):
                    cursor.executemany(
                        "INSERT INTO load VALUES (?, randomblob(100))",
                        [(t * size + n,) for n in range(1, size + 1)],
                    )
                    connection.commit()
                self.kill(server)

        async def load(server: Server) -> None:
            self.background(commit_then_kill, server)
            await self.until(self.killed.is_set, "the commits")

        rows = await self.kill_during(load)
        self.assertEqual(sorted(rows), list(range(1, transactions * size + 1)))
        self.assertTrue(all(isinstance(pad, bytes) for pad in rows.values()))

    async def test_large_statement(self) -> None:
        """
        Killed in the middle of one INSERT of a million rows, none of them
        is there, and the rows committed before it are.
        """
        committed = list(range(1, 51))
        answered: list[bool] = []
        wal = self.layout.database.with_name(self.layout.database.name + "-wal")

        def wal_size() -> int:
            return wal.stat().st_size if wal.exists() else 0

        def large(server: Server) -> None:
            try:
                with closing(self.connect(server)) as connection:
                    connection.cursor().execute(
                        "INSERT INTO load (i, pad) WITH RECURSIVE c(x) AS "
                        "(VALUES (?) UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                        "SELECT x, randomblob(64) FROM c",
                        (LARGE_FIRST, LARGE_FIRST + LARGE_ROWS - 1),
                    )
                    answered.append(True)
            except dbapi.Error as e:
                self.lost(e)

        async def load(server: Server) -> None:
            def commit_first() -> None:
                with closing(self.connect(server)) as connection:
                    for i in committed:
                        connection.cursor().execute(
                            "INSERT INTO load (i) VALUES (?)", (i,)
                        )

            await threads.deferToThread(commit_first)
            before = wal_size()
            self.background(large, server)
            await self.until(
                lambda: answered or wal_size() > before + LARGE_WAL_GROWTH,
                "the large statement's writes",
            )

        rows = await self.kill_during(load)
        large_rows = len(rows) - len(committed)
        self.assertEqual(sorted(rows)[: len(committed)], committed)
        self.assertIn(large_rows, (0, LARGE_ROWS))
        if not answered:
            # It was killed before it could have committed: all or nothing
            # means nothing here.
            self.assertEqual(large_rows, 0)

    async def test_concurrent_reads(self) -> None:
        """
        Killed while readers scan the table beside a writer committing row
        by row, every answered row survives.
        """
        answered: list[int] = []
        reads: list[int] = []

        def reader(server: Server) -> None:
            try:
                with closing(self.connect(server)) as connection:
                    cursor = connection.cursor()
                    while not self.killed.is_set():
                        cursor.execute("SELECT i, pad FROM load")
                        reads.append(len(cursor.fetchall()))
                        cursor.execute("SELECT count(*), max(i) FROM load")
                        cursor.fetchall()
            except dbapi.Error as e:
                self.lost(e)

        async def load(server: Server) -> None:
            self.background(self.insert_one_by_one, server, answered, False)
            for _ in range(3):
                self.background(reader, server)
            await self.until(
                lambda: len(answered) >= ANSWERED_BEFORE_KILL and len(reads) >= 30,
                "the reads and writes",
            )

        rows = await self.kill_during(load)
        self.assert_answered_present(rows, answered)

    async def test_application_sql_op(self) -> None:
        """
        Killed while a client inserts through the application server's
        ``sql`` op, every insert it got an answer for survives.
        """
        answered: list[int] = []

        async def insert(port: int) -> None:
            client = await app_client.connect(
                reactor, "127.0.0.1", port, self.identity, timeout=DEADLINE
            )
            i = 1
            try:
                while not self.killed.is_set():
                    await client.sql("INSERT INTO load (i) VALUES (?)", i)
                    answered.append(i)
                    i += 1
            except ClientConnectionError as e:
                self.lost(e)
            finally:
                await client.close()

        async def load(server: Server) -> None:
            self.run_coroutine(insert(server.port("Application server")))
            await self.until(
                lambda: len(answered) >= ANSWERED_BEFORE_KILL, "the sql op inserts"
            )

        rows = await self.kill_during(load)
        self.assert_answered_present(rows, answered)
