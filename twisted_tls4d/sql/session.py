"""
One client's session with the SQLite database: its own connection, so its
transactions are its own, used from the SQL server's database threads only.

Every method but `Session.abandon` blocks and belongs in a database thread;
a lock makes the calls of one session run one at a time whichever thread runs
them. Answers are encoded to wire lines here too, so the reactor thread only
writes bytes.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import attrs

from twisted_tls4d.sql import wire

#: Seconds a statement waits for another session's lock before it fails with
#: "database is locked".
DEFAULT_BUSY_TIMEOUT = 5.0

#: Authorizer actions refused to clients: ATTACH (and VACUUM INTO, which
#: attaches its target) would let them read or write any file the server may.
_REFUSED_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


@attrs.frozen
class Answer:
    """
    The server's answer to one statement, ready to send.

    Attributes:
        data: The answer's lines, each with its line end.
        ok: Whether the statement succeeded.
        rows: How many row lines the answer holds.
        error: The error message when it failed.
        notice: Something the server's operator should read, or None.
    """

    data: bytes
    ok: bool
    rows: int = 0
    error: str | None = None
    notice: str | None = None


def _decode_text(raw: bytes) -> str:
    """
    Turn TEXT from SQLite into a string. TEXT that is not valid UTF-8 (put
    there through a BLOB cast, say) gets U+FFFD in place of its bad bytes,
    rather than an error whose message would quote the data.
    """
    return raw.decode("utf-8", "replace")


def _authorize(
    action: int,
    arg1: str | None,
    arg2: str | None,
    database: str | None,
    source: str | None,
) -> int:
    """
    SQLite's authorizer callback: refuse `_REFUSED_ACTIONS`, allow the rest.
    """
    return sqlite3.SQLITE_DENY if action in _REFUSED_ACTIONS else sqlite3.SQLITE_OK


class Session:
    """
    A client's SQLite connection, opened on its first statement and used by
    one database thread at a time.

    SQLite runs in autocommit mode: each statement commits on its own unless
    the client opened a transaction with ``BEGIN``, which lasts until its
    ``COMMIT`` or ``ROLLBACK`` or until `close` rolls it back.
    """

    def __init__(
        self, database: Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> None:
        """
        Args:
            database: The SQLite database file; its folder must exist.
            busy_timeout: Seconds a statement waits for another session's lock.
        """
        self._database = database
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._abandoned = False

    def _connect(self) -> tuple[sqlite3.Connection, str | None]:
        """
        Open the session's connection, in WAL mode so readers and a writer of
        different sessions do not block each other.

        Returns:
            The connection, and a notice for the log if WAL mode could not be
            set.

        Raises:
            sqlite3.Error: The database cannot be opened.
        """
        connection = sqlite3.connect(
            str(self._database),
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.text_factory = _decode_text
            (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            connection.set_authorizer(_authorize)
        except BaseException:
            connection.close()
            raise
        notice = None
        if str(mode).lower() != "wal":
            notice = (
                f"SQLite kept {self._database} in journal mode {mode!r} instead "
                "of WAL; sessions that read will wait for sessions that write."
            )
        return connection, notice

    def execute(self, statement: str) -> Answer:
        """
        Run one statement and encode the answer. Blocks: call it in a
        database thread.

        Args:
            statement: One SQL statement.

        Returns:
            The answer: the columns and every row then a success status, or
            an error status carrying SQLite's message.
        """
        with self._lock:
            if self._closed or self._abandoned:
                return _failed(
                    wire.ERROR_SHUTDOWN, "The session is closed; reconnect to go on."
                )
            notice = None
            try:
                if self._connection is None:
                    self._connection, notice = self._connect()
                return attrs.evolve(_run(self._connection, statement), notice=notice)
            except (sqlite3.Error, ValueError) as e:
                in_transaction = (
                    None
                    if self._connection is None
                    else self._connection.in_transaction
                )
                answer = _failed(
                    wire.ERROR_SQL,
                    str(e),
                    in_transaction,
                    getattr(e, "sqlite_errorcode", None),
                    getattr(e, "sqlite_errorname", None),
                )
                return attrs.evolve(answer, notice=notice)

    def abandon(self) -> None:
        """
        Stop the session's work because its client is gone: the statement now
        running, if any, fails with "interrupted", and statements not yet
        started are not run. Safe to call from any thread, the reactor's
        included; `close` still has to be called.
        """
        self._abandoned = True
        connection = self._connection
        if connection is not None:
            connection.interrupt()

    def close(self) -> bool:
        """
        Roll back any transaction left open and close the connection; later
        statements get a ``shutdown`` error. Blocks: call it in a database
        thread. Closing twice does nothing.

        Returns:
            Whether uncommitted work was rolled back.
        """
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            if connection is None:
                return False
            rolled_back = connection.in_transaction
            try:
                if rolled_back:
                    connection.rollback()
            finally:
                connection.close()
            return rolled_back


def _run(connection: sqlite3.Connection, statement: str) -> Answer:
    """
    Execute ``statement`` and encode its whole answer.

    Raises:
        sqlite3.Error: SQLite refused or failed the statement; no line of the
            answer was produced.
        ValueError: The statement holds a NUL character.
    """
    cursor = connection.cursor()
    try:
        cursor.execute(statement)
        lines = []
        if cursor.description is not None:
            lines.append(
                wire.encode_line(wire.columns([d[0] for d in cursor.description]))
            )
        rows = 0
        for row in cursor:
            lines.append(wire.encode_line([wire.encode_value(v) for v in row]))
            rows += 1
        changes = cursor.rowcount if cursor.rowcount >= 0 else None
    finally:
        cursor.close()
    lines.append(
        wire.encode_line(wire.success(rows, changes, connection.in_transaction))
    )
    return Answer(b"".join(lines), ok=True, rows=rows)


def _failed(
    code: str,
    message: str,
    in_transaction: bool | None = None,
    sqlite_code: int | None = None,
    sqlite_name: str | None = None,
) -> Answer:
    """
    Returns:
        An answer made of one error status.
    """
    status = wire.failure(code, message, in_transaction, sqlite_code, sqlite_name)
    return Answer(wire.encode_line(status), ok=False, error=message)


def error_answer(code: str, message: str) -> Answer:
    """
    Args:
        code: One of the ``wire.ERROR_*`` codes.
        message: What went wrong, as a full sentence.

    Returns:
        An answer made of one error status, for errors found before any
        statement ran (bad encoding, an overlong line).
    """
    return _failed(code, message)
