"""
Short reads answered at once, on the reactor's thread: the same answer as a
database thread gives, and never for anything that could change data, wait
for a lock, run long or see a transaction.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests import support
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.session import BATCH_ROWS, Session


def _count(session: Session, table: str) -> int:
    answer = session.execute(f"SELECT count(*) FROM {table}")
    return int(json.loads(answer.data.splitlines()[1])[0])


class AnswerAtOnceTests(SynchronousTestCase):
    """
    `Session.answer_at_once` answers short reads and declines the rest,
    changing nothing when it declines.
    """

    def setUp(self) -> None:
        folder = support.temporary_folder("sql-at-once-")
        self.session = Session(folder / "data.sqlite")
        self.addCleanup(self.session.close)
        self.session.execute("CREATE TABLE t (n INTEGER, s TEXT)")
        self.session.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")

    def test_same_answer_as_a_thread(self) -> None:
        """A short read gives the very bytes `execute` gives."""
        statement, parameters = "SELECT n, s FROM t WHERE n >= ? ORDER BY n", [1]
        at_once = self.session.answer_at_once(statement, parameters)
        assert at_once is not None
        self.assertEqual(at_once.data, self.session.execute(statement, parameters).data)
        self.assertTrue(at_once.done)

    def test_not_before_the_first_statement(self) -> None:
        """A session that has not run a statement yet declines."""
        fresh = Session(support.temporary_folder("sql-at-once-") / "d.sqlite")
        self.addCleanup(fresh.close)
        self.assertIsNone(fresh.answer_at_once("SELECT 1"))

    def test_writes_declined_unchanged(self) -> None:
        """Statements that write are declined before they change anything."""
        for statement in (
            "INSERT INTO t VALUES (3, 'three')",
            "DELETE FROM t",
            "UPDATE t SET n = 0",
            "DROP TABLE t",
            "CREATE TABLE u (x)",
            "BEGIN",
            "PRAGMA user_version = 7",
            "ATTACH DATABASE ':memory:' AS other",
        ):
            self.assertIsNone(self.session.answer_at_once(statement), statement)
        self.assertEqual(_count(self.session, "t"), 2)
        answer = self.session.execute("PRAGMA user_version")
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [0])

    def test_inside_a_transaction(self) -> None:
        """Inside a transaction reads go to the session's own connection."""
        self.session.execute("BEGIN")
        self.session.execute("INSERT INTO t VALUES (3, 'three')")
        self.assertIsNone(self.session.answer_at_once("SELECT count(*) FROM t"))
        self.assertEqual(_count(self.session, "t"), 3)
        self.session.execute("COMMIT")
        answer = self.session.answer_at_once("SELECT count(*) FROM t")
        assert answer is not None
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [3])

    def test_long_read_declined(self) -> None:
        """A read that runs long is interrupted and declined, then runs whole."""
        statement = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 300000) SELECT count(*) FROM c"
        )
        self.assertIsNone(self.session.answer_at_once(statement))
        answer = self.session.execute(statement)
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [300000])

    def test_large_answer_declined(self) -> None:
        """An answer of a whole batch or more is left to a database thread."""
        statement = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            f"WHERE x < {BATCH_ROWS}) SELECT x FROM c"
        )
        self.assertIsNone(self.session.answer_at_once(statement))

    def test_temporary_table_and_errors(self) -> None:
        """What only the session's connection can answer, or fails, is declined."""
        self.session.execute("CREATE TEMP TABLE mine (x)")
        self.assertIsNone(self.session.answer_at_once("SELECT * FROM mine"))
        self.assertIsNone(self.session.answer_at_once("SELECT * FROM nowhere"))
        self.assertIsNone(self.session.answer_at_once("SELEKT 1"))
        answer = self.session.execute("SELECT * FROM nowhere")
        self.assertIn(b'"ok":false', answer.data)

    def test_sees_other_sessions_commits(self) -> None:
        """A read answered at once sees what another session committed."""
        other = Session(self.session._database)
        self.addCleanup(other.close)
        other.execute("INSERT INTO t VALUES (9, 'nine')")
        answer = self.session.answer_at_once("SELECT max(n) FROM t")
        assert answer is not None
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [9])

    def test_read_only_user(self) -> None:
        """A read-only session's reads are answered at once too."""
        reader = Session(self.session._database, access=wire.READ_ONLY)
        self.addCleanup(reader.close)
        reader.execute("SELECT 1")
        answer = reader.answer_at_once("SELECT count(*) FROM t")
        assert answer is not None
        self.assertEqual(json.loads(answer.data.splitlines()[1]), [2])
