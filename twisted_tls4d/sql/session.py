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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from twisted_tls4d.sql import wire

#: Seconds a statement waits for another session's lock before it fails with
#: "database is locked".
DEFAULT_BUSY_TIMEOUT = 5.0

#: Rows a batch of a streamed result holds at most.
BATCH_ROWS = 500

#: Bytes of encoded rows after which a batch ends early.
BATCH_BYTES = 256 * 1024

#: Authorizer actions refused to every client: ATTACH (and VACUUM INTO, which
#: attaches its target) would let them read or write any file the server may.
_REFUSED_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})

#: Authorizer actions a read-only user may take: read, and delimit
#: transactions.
#: What a statement answered at once (`Session.answer_at_once`) may do: read.
_AT_ONCE_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_RECURSIVE,
    }
)

#: SQLite virtual-machine steps between two looks at a statement answered at
#: once, and how many looks before it is left to a database thread instead:
#: a bound, well under a millisecond, on the time it holds the reactor.
AT_ONCE_STEPS = 1000
AT_ONCE_LOOKS = 20

#: The page cache of a session's read-only connection, in KiB.
AT_ONCE_CACHE_KIB = 256

_READ_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_TRANSACTION,
        sqlite3.SQLITE_SAVEPOINT,
        sqlite3.SQLITE_RECURSIVE,
    }
)

#: Authorizer actions a read-write user may take beyond reading.
_WRITE_ACTIONS = frozenset(
    {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}
)

#: SQLite's error names that mean a statement was refused for its access.
_ACCESS_ERRORS = frozenset({"SQLITE_AUTH", "SQLITE_READONLY"})

#: What each access level allows, in words, for error messages.
_ALLOWS = {
    wire.READ_ONLY: "reading only",
    wire.READ_WRITE: "reading and changing rows but not the schema",
    wire.FULL: "everything but reaching other files",
}


@attrs.frozen
class Answer:
    """
    The server's answer to one statement, or one batch of it, ready to send.

    Attributes:
        data: The answer's lines, each with its line end.
        ok: Whether the statement succeeded (so far, if not ``done``).
        rows: How many row lines the answer (or batch) holds.
        error: The error message when it failed.
        notice: Something the server's operator should read, or None.
        done: Whether the answer is complete; if not, `Session.fetch` gives
            the next batch.
        code: The error code (one of ``wire.ERROR_*``) when it failed, or
            None if not known; the server logs the database's own messages
            (codes ``sql`` and ``access``, or None) with their quoted
            fragments left out.
    """

    data: bytes
    ok: bool
    rows: int = 0
    error: str | None = None
    notice: str | None = None
    done: bool = True
    code: str | None = None


def _decode_text(raw: bytes) -> str:
    """
    Turn TEXT from SQLite into a string. TEXT that is not valid UTF-8 (put
    there through a BLOB cast, say) gets U+FFFD in place of its bad bytes,
    rather than an error whose message would quote the data.
    """
    return raw.decode("utf-8", "replace")


def whole_answer(first: Answer, fetch: Callable[[], Answer]) -> Answer:
    """
    Gather a statement's answer from its first batch and the batches
    ``fetch`` gives until one is ``done``.

    Args:
        first: What the session's ``start`` returned.
        fetch: The session's ``fetch``.

    Returns:
        One answer holding every batch.
    """
    parts = [first]
    while not parts[-1].done:
        parts.append(fetch())
    last = parts[-1]
    return Answer(
        b"".join(part.data for part in parts),
        ok=last.ok,
        rows=sum(part.rows for part in parts),
        error=last.error,
        notice=first.notice,
        code=last.code,
    )


class Session:
    """
    A client's SQLite connection, opened on its first statement and used by
    one database thread at a time.

    SQLite runs in autocommit mode: each statement commits on its own unless
    the client opened a transaction with ``BEGIN``, which lasts until its
    ``COMMIT`` or ``ROLLBACK`` or until `close` rolls it back. Commits are
    durable (WAL with ``synchronous=FULL``): once a commit is answered it
    survives a crash of the server or the machine.

    A statement's answer comes whole from `execute`, or in batches from
    `start` then `fetch` until one is ``done``, so that a large result never
    sits in memory at once.
    """

    def __init__(
        self,
        database: Path,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        access: str = wire.FULL,
        user: str | None = None,
    ) -> None:
        """
        Args:
            database: The SQLite database file; its folder must exist.
            busy_timeout: Seconds a statement waits for another session's lock.
            access: What the session may do: ``read-only``, ``read-write`` or
                ``full``.
            user: Whom the session runs for, for error messages.

        Raises:
            ValueError: ``access`` is not an access level.
        """
        _check_access(access)
        self._database = database
        self._busy_timeout = busy_timeout
        self._access = access
        self._user = user
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._cursor: sqlite3.Cursor | None = None
        self._rows = 0
        self._denied: str | None = None
        self._closed = False
        self._abandoned = False
        self._reader: sqlite3.Connection | None = None
        self._looks = 0

    @property
    def access(self) -> str:
        """The session's access level."""
        return self._access

    def set_user(self, user: str | None, access: str) -> None:
        """
        Run the session's next statements as ``user`` with ``access``, on a
        new connection. Blocks: call it in a database thread.

        Raises:
            ValueError: ``access`` is not an access level, or a transaction
                is open.
        """
        _check_access(access)
        with self._lock:
            if self._connection is not None and self._connection.in_transaction:
                msg = "Finish the open transaction (COMMIT or ROLLBACK) first."
                raise ValueError(msg)
            self._close_connection()
            self._user, self._access = user, access

    def _authorize(
        self,
        action: int,
        arg1: str | None,
        arg2: str | None,
        database: str | None,
        source: str | None,
    ) -> int:
        """
        SQLite's authorizer callback: refuse what the session's access level
        does not allow, and remember what, for the error message.
        """
        if action in _REFUSED_ACTIONS:
            self._denied = "reaching other database files (ATTACH)"
            return sqlite3.SQLITE_DENY
        if self._access == wire.FULL or action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            if arg2 is None and self._access != wire.READ_ONLY:
                return sqlite3.SQLITE_OK
            if arg2 is None and arg1 not in ("query_only", "writable_schema"):
                return sqlite3.SQLITE_OK
            self._denied = f"PRAGMA {arg1}"
            return sqlite3.SQLITE_DENY
        if self._access == wire.READ_WRITE and action in _WRITE_ACTIONS:
            if arg1 is not None and arg1.startswith("sqlite_"):
                self._denied = f"changing {arg1}"
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action in _WRITE_ACTIONS:
            self._denied = f"changing {arg1}"
        else:
            self._denied = "changing the schema"
        return sqlite3.SQLITE_DENY

    def _connect(self) -> tuple[sqlite3.Connection, str | None]:
        """
        Open the session's connection: WAL mode so readers and a writer of
        different sessions do not block each other, full synchronous commits
        for durability, and the session's access level enforced.

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
            # Prepared once per session; a change of access level opens a
            # new connection, so no statement outlives the authorizer that
            # allowed it.
            cached_statements=128,
        )
        try:
            connection.text_factory = _decode_text
            (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            connection.execute("PRAGMA synchronous=FULL")
            if self._access == wire.READ_ONLY:
                connection.execute("PRAGMA query_only=ON")
            connection.set_authorizer(self._authorize)
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

    def answer_at_once(
        self, statement: str, parameters: Sequence[wire.Value] = ()
    ) -> Answer | None:
        """
        Answer a short read in the calling thread (the reactor's), sparing it
        the trip to a database thread and back. It is tried only outside a
        transaction, on a read-only connection of its own that waits for no
        lock; the statement may only read (SQLite's authorizer refuses
        anything else before it runs), must finish within `AT_ONCE_LOOKS`
        times `AT_ONCE_STEPS` SQLite steps, and its answer must fit in one
        batch. Otherwise nothing was changed and the caller runs it with
        `start` in a database thread as usual.

        Args:
            statement: One SQL statement.
            parameters: The values of its ``?`` placeholders.

        Returns:
            The whole answer, or None to run the statement with `start`.
        """
        connection = self._connection
        if (
            connection is None
            or connection.in_transaction
            or self._closed
            or self._abandoned
            or not self._lock.acquire(blocking=False)
        ):
            return None
        try:
            if self._cursor is not None:
                return None
            if self._reader is None:
                self._reader = self._open_reader()
            self._looks = 0
            cursor = self._reader.execute(statement, tuple(parameters))
            try:
                if cursor.description is None:
                    return None
                rows = cursor.fetchmany(BATCH_ROWS)
                if len(rows) >= BATCH_ROWS:
                    return None
                lines = _encode_rows(cursor.description, rows, header=True)
            finally:
                cursor.close()
            lines.append(wire.encode_line(wire.success(len(rows), None, False)))
            return Answer(b"".join(lines), ok=True, rows=len(rows), done=True)
        except (sqlite3.Error, ValueError, OverflowError):
            # Refused, interrupted, busy or failed: the database thread runs
            # it again and answers whatever it really gives.
            return None
        finally:
            self._lock.release()

    def _open_reader(self) -> sqlite3.Connection:
        """
        Returns:
            A read-only connection to the database that waits for no lock,
            lets statements only read, and interrupts one that runs long.

        Raises:
            sqlite3.Error: The database cannot be opened.
        """
        uri = self._database.resolve().as_uri() + "?mode=ro"
        reader = sqlite3.connect(
            uri,
            uri=True,
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=128,
        )
        reader.text_factory = _decode_text
        # Short reads need few pages; the session's own connection keeps
        # SQLite's default cache.
        reader.execute(f"PRAGMA cache_size=-{AT_ONCE_CACHE_KIB}")
        reader.set_authorizer(_authorize_at_once)
        reader.set_progress_handler(self._look, AT_ONCE_STEPS)
        return reader

    def _look(self) -> int:
        """
        SQLite's progress handler on the reader: a non-zero answer
        interrupts the statement.
        """
        self._looks += 1
        return 1 if self._looks > AT_ONCE_LOOKS else 0

    def execute(self, statement: str, parameters: Sequence[wire.Value] = ()) -> Answer:
        """
        Run one statement and encode its whole answer. Blocks: call it in a
        database thread.

        Args:
            statement: One SQL statement.
            parameters: The values of its ``?`` placeholders.

        Returns:
            The answer: the columns and every row then a success status, or
            an error status carrying SQLite's message.
        """
        return whole_answer(self.start(statement, parameters), self.fetch)

    def start(self, statement: str, parameters: Sequence[wire.Value] = ()) -> Answer:
        """
        Run one statement and encode the first batch of its answer. Blocks:
        call it in a database thread.

        Args:
            statement: One SQL statement.
            parameters: The values of its ``?`` placeholders.

        Returns:
            The header and first rows, with the status too if they are all;
            else `fetch` gives the rest. Or an error status carrying SQLite's
            message.
        """
        with self._lock:
            if self._closed or self._abandoned:
                return _failed(
                    wire.ERROR_SHUTDOWN, "The session is closed; reconnect to go on."
                )
            self._finish_cursor()
            notice = None
            try:
                if self._connection is None:
                    self._connection, notice = self._connect()
                self._denied = None
                self._rows = 0
                cursor = self._connection.cursor()
                self._cursor = cursor
                cursor.execute(statement, tuple(parameters))
                return attrs.evolve(self._batch(first=True), notice=notice)
            except (sqlite3.Error, ValueError, OverflowError) as e:
                self._finish_cursor()
                return attrs.evolve(self._error(e), notice=notice)

    def fetch(self) -> Answer:
        """
        Encode the next batch of the answer `start` began. Blocks: call it in
        a database thread.

        Returns:
            The next rows, with the status if they are the last; or an error
            status if reading failed (the client discards the rows it got).
        """
        with self._lock:
            if self._cursor is None:
                return _failed(wire.ERROR_INTERNAL, "No statement is running.")
            if self._closed or self._abandoned:
                self._finish_cursor()
                return _failed(
                    wire.ERROR_SHUTDOWN, "The session is closed; reconnect to go on."
                )
            try:
                return self._batch(first=False)
            except (sqlite3.Error, ValueError, OverflowError) as e:
                self._finish_cursor()
                return self._error(e)

    def _batch(self, first: bool) -> Answer:
        """
        Read and encode the next rows of the running statement; on the last
        ones, add the status and let the cursor go.

        Raises:
            sqlite3.Error: Reading a row failed.
        """
        cursor = self._cursor
        connection = self._connection
        assert cursor is not None and connection is not None
        rows = cursor.fetchmany(BATCH_ROWS) if cursor.description is not None else []
        lines = (
            _encode_rows(cursor.description, rows, header=first)
            if cursor.description is not None
            else []
        )
        self._rows += len(rows)
        done = cursor.description is None or len(rows) < BATCH_ROWS
        if done:
            changes = cursor.rowcount if cursor.rowcount >= 0 else None
            self._finish_cursor()
            lines.append(
                wire.encode_line(
                    wire.success(self._rows, changes, connection.in_transaction)
                )
            )
        return Answer(b"".join(lines), ok=True, rows=len(rows), done=done)

    def _error(self, error: Exception) -> Answer:
        """
        Returns:
            The error status for an exception of SQLite, naming the access
            level when the authorizer or a read-only connection refused.
        """
        in_transaction = (
            None if self._connection is None else self._connection.in_transaction
        )
        name = getattr(error, "sqlite_errorname", None)
        code = wire.ERROR_SQL
        message = str(error)
        if name in _ACCESS_ERRORS and self._access != wire.FULL or self._denied:
            code = wire.ERROR_ACCESS
            who = f"User {self._user!r}" if self._user else "This session"
            what = f" ({self._denied})" if self._denied else ""
            message = (
                f"{who} has {self._access} access, which allows "
                f"{_ALLOWS[self._access]}; the statement was refused{what}. "
                f"SQLite said: {error}."
            )
        return _failed(
            code,
            message,
            in_transaction,
            getattr(error, "sqlite_errorcode", None),
            name,
        )

    def _finish_cursor(self) -> None:
        """
        Let go of the running statement's cursor, if any.
        """
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            try:
                cursor.close()
            except sqlite3.Error:
                pass

    def _close_connection(self) -> bool:
        """
        Roll back and close the connection, if open.

        Returns:
            Whether uncommitted work was rolled back.
        """
        self._finish_cursor()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
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
            return self._close_connection()


def _encode_rows(
    description: Sequence[Sequence[Any]], rows: list[Any], *, header: bool
) -> list[bytes]:
    """
    Returns:
        The lines of a batch of rows, after the columns' header line if
        ``header`` (the types read from these rows).
    """
    lines = []
    if header:
        names = [d[0] for d in description]
        types = wire.column_types(rows, len(names))
        lines.append(wire.encode_line(wire.columns(names, types)))
    lines.extend(wire.encode_line([wire.encode_value(v) for v in row]) for row in rows)
    return lines


def _authorize_at_once(
    action: int,
    arg1: str | None,
    arg2: str | None,
    database: str | None,
    source: str | None,
) -> int:
    """
    The authorizer of a session's reader: reading only.
    """
    return sqlite3.SQLITE_OK if action in _AT_ONCE_ACTIONS else sqlite3.SQLITE_DENY


def _check_access(access: str) -> None:
    """
    Raises:
        ValueError: ``access`` is not one of `wire.ACCESS_LEVELS`.
    """
    if access not in wire.ACCESS_LEVELS:
        levels = ", ".join(wire.ACCESS_LEVELS)
        msg = f"Access level {access!r} is unknown; use one of {levels}."
        raise ValueError(msg)


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
    return Answer(wire.encode_line(status), ok=False, error=message, code=code)


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
