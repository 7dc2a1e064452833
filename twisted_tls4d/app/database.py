"""
The application server's way to the SQL server's database, for the ``sql``
op and for handlers (`twisted_tls4d.app.ops.Request.sql`).

This module is the only one of the application server that knows the SQL
server: it runs statements in sessions of `twisted_tls4d.sql.session`
(their ``start``, ``fetch``, ``abandon`` and ``close``, whose answers are
lines of ``docs/sql-protocol.md``) in database threads, and turns each
answer into the ``sql`` op's result. Pointing the op at another backend means
giving `SQLDatabase` another ``open_session``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_tls4d.app.wire import (
    INTERNAL_ERROR,
    INVALID_ARGS,
    RESULT_TOO_LARGE,
    SQL_ERROR,
    UNAVAILABLE,
    AppError,
    json_kind,
)
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.sql import wire as sql_wire
from twisted_tls4d.sql.session import Session
from twisted_tls4d.sql.users import UserStore

if TYPE_CHECKING:
    from twisted_tls4d.sql.postgres import PostgresBackend

_log = Logger()

#: Database threads of the pool `SQLDatabase` makes itself.
DEFAULT_DATABASE_THREADS = 10

#: Bytes the result object adds to its rows, at most, beyond the header.
_RESULT_OVERHEAD = 256


class SessionAnswer(Protocol):
    """
    What `SQLDatabase` reads of an answer of the SQL server's session
    (`twisted_tls4d.sql.session.Answer`).
    """

    @property
    def data(self) -> bytes:
        """The answer's lines, each with its line end."""

    @property
    def done(self) -> bool:
        """Whether the answer is complete."""


class StatementSession(Protocol):
    """
    What `SQLDatabase` needs of a session of the SQL server
    (`twisted_tls4d.sql.session.Session`). Every method but ``abandon``
    blocks and runs in a database thread.
    """

    def start(self, statement: str, parameters: Sequence[Any]) -> SessionAnswer:
        """Run a statement; answer its header, first rows, and status if done."""

    def fetch(self) -> SessionAnswer:
        """Answer the next rows of the running statement."""

    def abandon(self) -> None:
        """Interrupt the running statement; refuse later ones."""

    def close(self) -> bool:
        """Roll back what is uncommitted and close; say if anything was."""


#: Runs a blocking function in a database thread: ``run(function, *args)``
#: returns a Deferred of its result.
Runner = Callable[..., Deferred[Any]]


def sql_server_sessions(
    database: Path,
    users_file: Path | None,
    certificate_access: str,
    postgres: PostgresBackend | None = None,
) -> Callable[[str], StatementSession]:
    """
    Open sessions as the SQL server does for a client authenticated by
    certificate, so that the ``sql`` op allows a client no more than the SQL
    server would.

    Args:
        database: The SQLite database (the root's ``Data/tls4d.sqlite``).
        users_file: The SQL server's users (``Settings/sql-users.json``); a
            client whose certificate's common name is a user's name gets that
            user's access level. None for no users.
        certificate_access: The access level of the other clients
            (``--sql-certificate-access``).
        postgres: The PostgreSQL database to use instead of ``database``
            (``--sql-database``), or None.

    Returns:
        What opens a session for a certificate's common name; it blocks
        (it reads the users file) and runs in a database thread.
    """

    def open_session(name: str) -> StatementSession:
        access = certificate_access
        if users_file is not None:
            try:
                user = UserStore.load(users_file).get(name)
            except ConfigurationError as e:
                _log.error("application server: {error}", error=str(e))
                user, access = None, sql_wire.READ_ONLY
            if user is not None:
                access = user.access
        if postgres is not None:
            from twisted_tls4d.sql.postgres import PostgresSession

            return PostgresSession(postgres, access=access, user=name)
        return Session(database, access=access, user=name)

    return open_session


def decode_parameters(parameters: object) -> list[Any]:
    """
    Read the ``params`` of an ``sql`` request.

    Args:
        parameters: A JSON array of values as ``docs/sql-protocol.md`` writes
            them: null, numbers, strings, ``{"blob": BASE64}``,
            ``{"real": "NaN" | "Infinity" | "-Infinity"}``.

    Returns:
        The Python values.

    Raises:
        AppError: ``invalid_args``: not an array, or a value of none of
            those forms.
    """
    if not isinstance(parameters, list | tuple):
        what = json_kind(parameters)
        msg = (
            f'"params" is {what}; send an array of the values of the '
            "statement's ? placeholders, in order."
        )
        raise AppError(INVALID_ARGS, msg)
    values = []
    for number, value in enumerate(parameters, 1):
        if isinstance(value, bytes):
            # From a handler's Request.sql: no JSON on the way.
            values.append(value)
            continue
        try:
            values.append(sql_wire.decode_value(value))
        except sql_wire.WireFormatError as e:
            msg = (
                f"Parameter {number} is {json_kind(value)} of no form a "
                'parameter takes: null, a number, a string, {"blob": BASE64} '
                'or {"real": "NaN"}.'
            )
            raise AppError(INVALID_ARGS, msg) from e
    return values


def _run_statement(
    session: StatementSession,
    statement: str,
    parameters: list[Any],
    max_bytes: int,
) -> dict[str, Any]:
    """
    Run one statement in ``session`` and read its whole answer, in a
    database thread.

    Returns:
        The ``sql`` op's result.

    Raises:
        AppError: The statement failed, or its rows are over ``max_bytes``.
    """
    header: dict[str, Any] = {}
    rows: list[list[Any]] = []
    size = _RESULT_OVERHEAD
    answer = session.start(statement, parameters)
    while True:
        status = None
        for line in answer.data.splitlines():
            message = sql_wire.decode_line(line)
            if isinstance(message, list):
                size += len(line) + 1
                rows.append(message)
            elif "ok" in message:
                status = message
            else:
                header = message
                size += len(line)
        if size > max_bytes:
            # The rows left unread stay with the session until its next
            # statement or its end, which let go of the running one.
            msg = (
                f"The statement's result is over {max_bytes} bytes, this "
                "server's frame size limit; ask for fewer rows (LIMIT, OFFSET) "
                "or have the server's operator raise --max-frame-size."
            )
            raise AppError(RESULT_TOO_LARGE, msg, {"rows_read": len(rows)})
        if status is not None or answer.done:
            break
        answer = session.fetch()
    if status is None:
        msg = "The database session ended an answer without its status."
        raise AppError(INTERNAL_ERROR, msg)
    if not status.get("ok"):
        raise _status_error(status)
    result: dict[str, Any] = {"columns": header.get("columns", [])}
    if "types" in header:
        result["types"] = header["types"]
    result["rows"] = rows
    result["changes"] = status.get("changes")
    result["in_transaction"] = bool(status.get("in_transaction"))
    return result


def _status_error(status: dict[str, Any]) -> AppError:
    """
    Returns:
        The error answer for a failed status of the SQL server's session.
    """
    error = status.get("error")
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or "The statement failed.")
    sql_code = error.get("code")
    if sql_code == sql_wire.ERROR_SHUTDOWN:
        return AppError(UNAVAILABLE, message)
    if sql_code == sql_wire.ERROR_INTERNAL:
        return AppError(INTERNAL_ERROR, message)
    details = {key: value for key, value in error.items() if key != "message"}
    details["sql_code"] = details.pop("code", None)
    if "in_transaction" in status:
        details["in_transaction"] = status["in_transaction"]
    return AppError(SQL_ERROR, message, details)


class SQLConnection:
    """
    One application connection's session with the database: its statements
    run one at a time, in the order given, in a session of their own, so a
    transaction (``BEGIN`` ... ``COMMIT``) spans calls. The session opens in
    a database thread with the first statement.
    """

    def __init__(self, database: SQLDatabase, user: str) -> None:
        self._database = database
        self._user = user
        self._session: StatementSession | None = None
        self._turn = DeferredLock()
        self._closed = False

    def execute(
        self, statement: str, parameters: object, max_bytes: int
    ) -> Deferred[dict[str, Any]]:
        """
        Run one statement after those given before it.

        Args:
            statement: One SQL statement, with ``?`` placeholders.
            parameters: Their values, as `decode_parameters` reads them.
            max_bytes: The largest result accepted, in bytes of JSON.

        Returns:
            A Deferred firing with ``{"columns", "rows", "changes",
            "in_transaction"}`` (and ``types`` when the backend knows them),
            or failing with `AppError`: ``invalid_args``, ``sql_error``,
            ``result_too_large``, ``unavailable`` or ``internal_error``.
        """
        try:
            values = decode_parameters(parameters)
        except AppError as e:
            return defer.fail(e)
        if self._closed or self._database.stopped:
            return defer.fail(_unavailable())

        def run(_: object) -> Deferred[dict[str, Any]]:
            if self._closed:
                return defer.fail(_unavailable())
            return self._database.run(self._run, statement, values, max_bytes)

        return self._turn.run(run, None)

    def _run(self, statement: str, values: list[Any], max_bytes: int) -> dict[str, Any]:
        """
        Open the session if need be and run a statement, in a database thread.
        """
        if self._session is None:
            self._session = self._database.open_session(self._user)
        return _run_statement(self._session, statement, values, max_bytes)

    def _close_session(self) -> bool:
        """
        Close the session, in a database thread.

        Returns:
            Whether uncommitted work was rolled back.
        """
        session, self._session = self._session, None
        return session.close() if session is not None else False

    def close(self) -> None:
        """
        End the session: interrupt its running statement, skip those not
        started, then roll back what is uncommitted and close it.
        """
        if self._closed:
            return
        self._closed = True
        session = self._session
        if session is not None:
            session.abandon()
        user = self._user

        def closed(rolled_back: bool) -> None:
            if rolled_back:
                _log.info(
                    "application server: {user} left with a transaction open; "
                    "rolled it back",
                    user=user,
                )

        def failed(failure: Failure) -> None:
            if failure.check(AppError):
                return
            _log.failure(
                "application server: closing the database session of {user} failed",
                failure,
                user=user,
            )

        closing = self._turn.run(
            lambda _: self._database.run(self._close_session), None
        )
        closing.addCallbacks(closed, failed)


def _unavailable() -> AppError:
    return AppError(
        UNAVAILABLE, "The database is shut down on this server; try again later."
    )


class SQLDatabase:
    """
    The database of the ``sql`` op: opens a session of the SQL server for
    each application connection that runs a statement, and runs statements
    in database threads.

    `start` it before use and `stop` it after (the application server's
    factory does both as it starts and stops listening).
    """

    def __init__(
        self,
        open_session: Callable[[str], StatementSession],
        *,
        reactor: IReactorFromThreads | None = None,
        run: Runner | None = None,
        threads: int = DEFAULT_DATABASE_THREADS,
    ) -> None:
        """
        Args:
            open_session: Opens a session for the common name of a client's
                certificate, in a database thread: `sql_server_sessions`, or
                e.g. ``lambda name: Session(path, user=name)``.
            reactor: Where results from the database threads are delivered;
                the global reactor if None.
            run: Runs a blocking function and returns a Deferred of its
                result; if None, the database's own pool of ``threads``
                threads does. Tests pass one that runs at once.
            threads: The most database threads of the database's own pool.
        """
        self.open_session = open_session
        self._reactor = reactor
        self._run = run
        self._threads = threads
        self._pool: ThreadPool | None = None
        self._connections: set[SQLConnection] = set()
        self.stopped = False

    def start(self) -> None:
        """
        Start the database threads (again after a `stop`).
        """
        self.stopped = False
        if self._run is not None or (self._pool is not None and self._pool.started):
            return
        self._pool = ThreadPool(
            minthreads=0, maxthreads=self._threads, name="tls4d-app-sql"
        )
        self._pool.start()

    def stop(self) -> None:
        """
        End every session and stop the database threads, waiting for them
        (at most the SQLite busy timeout if a session waits for a lock).
        """
        self.stopped = True
        connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()
        if self._pool is not None and self._pool.started:
            self._pool.stop()

    def open(self, user: str) -> SQLConnection:
        """
        Args:
            user: The common name of the client's certificate.

        Returns:
            A new connection to the database; its session opens with its
            first statement. Close it when the client leaves.
        """
        connection = SQLConnection(self, user)
        self._connections.add(connection)
        return connection

    def forget(self, connection: SQLConnection) -> None:
        """
        Close ``connection`` and let go of it.
        """
        self._connections.discard(connection)
        connection.close()

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Returns:
            A Deferred of ``function(*args)``, run in a database thread.
        """
        if self._run is not None:
            return self._run(function, *args)
        if self._pool is None or not self._pool.started:
            return defer.fail(_unavailable())
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = cast(IReactorFromThreads, reactor)
        running: Any = self._reactor
        return deferToThreadPool(running, self._pool, function, *args)
