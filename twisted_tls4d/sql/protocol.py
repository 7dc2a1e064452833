"""
The SQL server: a line protocol over mutual TLS in front of the root's SQLite
database (``Data/tls4d.sqlite``).

Each authenticated connection is a session with its own SQLite connection,
used in the factory's database threads so that the reactor never waits for
SQLite. A session reads its next line only once the previous statement's
answer is written, so its statements run in the order sent.

The factory starts its database threads when its first port starts
listening and, when its last port stops, ends every session and stops them
(Twisted calls `SQLServerFactory.startFactory` and `stopFactory` through the
TLS wrapper). So serving it is::

    factory = SQLServerFactory(database=layout.database, clock=reactor)
    port = reactor.listenTCP(
        settings.sql_port, TLSMemoryBIOFactory(creator, False, factory)
    )
    ...
    await port.stopListening()   # ends the sessions, stops the threads

`SQLServerFactory.start` and `SQLServerFactory.stop` do the same by hand, for
a factory used without a port (tests) or a service that wants it explicit;
both may be called more than once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_tls4d._peer import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    AuthenticatedPeerMixin,
    common_name,
    peer_label,
)
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.session import Answer, Session, error_answer

#: The longest statement line accepted, in bytes, unless told otherwise.
DEFAULT_MAX_LINE_LENGTH = 1024 * 1024

#: Database threads of a thread pool the factory makes itself.
DEFAULT_DATABASE_THREADS = 10

#: How many characters of a statement's first word the debug log shows.
_VERB_LENGTH = 16


def _verb(statement: str) -> str:
    """
    Returns:
        The statement's first word (``SELECT``, ``INSERT``...), cut short: all
        of a statement the log may show, since the rest can hold values.
    """
    words = statement.split(None, 1)
    return words[0][:_VERB_LENGTH].upper() if words else ""


class SQLServerProtocol(AuthenticatedPeerMixin, LineReceiver):
    """
    One client connection: greets the client once its certificate is
    verified, then runs each line as a statement of the client's session and
    writes the answer in one piece.
    """

    server_name = "SQL server"
    delimiter = b"\n"
    factory: SQLServerFactory
    #: The TLS transport; typed loosely, as zope interfaces confuse mypy.
    transport: Any

    _session: Session | None = None
    _lost = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Give the client ``handshake_timeout`` seconds to complete TLS.
        """
        self.start_handshake_timer()

    def peer_authenticated(self) -> None:
        """
        Open the client's session and greet it.
        """
        if self.factory.stopped:
            self.transport.abortConnection()
            return
        self._session = self.factory.open_session(self)
        assert self.peer_certificate is not None
        self.transport.write(
            wire.encode_line(wire.hello(common_name(self.peer_certificate)))
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Split the bytes into lines once the client is authenticated; drop
        them before that.
        """
        if self.peer_certificate is None or self._session is None:
            return
        self.resetTimeout()
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Run one statement, holding back the following lines until its answer
        is written.
        """
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            statement = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self._refuse(
                wire.ERROR_ENCODING,
                f"The line is not valid UTF-8 (byte 0x{line[e.start]:02x} at "
                f"offset {e.start}); send statements in UTF-8.",
            )
            return
        if not statement.strip():
            return
        if self.factory.stopped or self._session is None:
            self._refuse(wire.ERROR_SHUTDOWN, "The SQL server is shutting down.")
            self.transport.loseConnection()
            return

        self.log.debug(
            "{server}: {peer} sent a statement beginning {verb}",
            server=self.server_name,
            peer=peer_label(self.transport),
            verb=_verb(statement),
        )
        self.setTimeout(None)
        self.pauseProducing()
        d = self.factory.run_in_thread(self._session.execute, statement)
        d.addErrback(self._internal_error)
        d.addCallback(self._answer)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Answer a line over the limit with an error and close the connection.
        """
        self._refuse(
            wire.ERROR_LINE_TOO_LONG,
            f"The line is longer than this server's limit of {self.MAX_LENGTH} "
            "bytes; the connection is closed.",
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Log a refused handshake, and end the session: its running statement
        is interrupted, its uncommitted work rolled back, its SQLite
        connection closed.
        """
        self._lost = True
        self.log_refusal_if_any(reason)
        if self._session is not None:
            self.factory.end_session(self)

    def _answer(self, answer: Answer) -> None:
        """
        Write a statement's answer and read the next line.
        """
        if self._lost:
            return
        if answer.notice is not None:
            self.log.warn(
                "{server}: {notice}", server=self.server_name, notice=answer.notice
            )
        if not answer.ok:
            self._log_error(answer)
        self.transport.write(answer.data)
        self.setTimeout(self.idle_timeout)
        self.resumeProducing()

    def _internal_error(self, failure: Failure) -> Answer:
        """
        Log a failure of the server itself and answer it without details.
        """
        self.log.failure(
            "{server}: running a statement of {peer} failed",
            failure,
            server=self.server_name,
            peer=peer_label(self.transport),
        )
        return error_answer(
            wire.ERROR_INTERNAL,
            "The server failed to run the statement; its log says why.",
        )

    def _refuse(self, code: str, message: str) -> None:
        """
        Answer a line that is not run with an error, and log it.
        """
        answer = error_answer(code, message)
        self._log_error(answer)
        self.transport.write(answer.data)

    def _log_error(self, answer: Answer) -> None:
        """
        Log why a line failed, naming the peer but no part of the statement.
        """
        self.log.info(
            "{server}: statement from {peer} ({client!r}) failed: {error}",
            server=self.server_name,
            peer=peer_label(self.transport),
            client=(
                common_name(self.peer_certificate) if self.peer_certificate else None
            ),
            error=answer.error,
        )


class SQLServerFactory(Factory):
    """
    Makes `SQLServerProtocol` connections to one SQLite database, and owns
    their sessions and, unless given one, the thread pool they run in.

    Serve it through ``TLSMemoryBIOFactory(creator, False, factory)`` with a
    creator that requires client certificates. Listening starts it and
    stopping the last port stops it; `start` and `stop` do so by hand.
    """

    protocol = SQLServerProtocol  # type: ignore[assignment]
    log = Logger()
    #: The service logs where the server listens; Factory's own start and
    #: stop lines would only repeat it.
    noisy = False

    def __init__(
        self,
        *,
        database: Path,
        clock: IReactorTime,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        threadpool: ThreadPool | None = None,
        reactor: IReactorFromThreads | None = None,
    ) -> None:
        """
        Args:
            database: The SQLite database file (the root's
                ``Data/tls4d.sqlite``); created on the first statement if
                missing, its folder must exist.
            clock: What schedules the handshake and idle timeouts.
            max_line_length: The longest statement line accepted, in bytes; a
                longer one is answered with an error and the connection closed.
            handshake_timeout: Seconds a client has to complete TLS.
            idle_timeout: Seconds an authenticated client may stay silent.
            threadpool: The database threads to use, started and stopped by
                its owner; if None, the factory makes its own, which `start`
                starts and `stop` stops.
            reactor: Where answers from the database threads are delivered;
                the global reactor if None.
        """
        self.database = database
        self.clock = clock
        self.max_line_length = max_line_length
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._owns_threadpool = threadpool is None
        self._threadpool = threadpool
        self._reactor = reactor
        self._sessions: dict[SQLServerProtocol, Session] = {}
        self.stopped = False

    @property
    def threadpool(self) -> ThreadPool | None:
        """The database threads; None until `start` if the factory owns them."""
        return self._threadpool

    @property
    def sessions(self) -> int:
        """How many authenticated clients have a session open."""
        return len(self._sessions)

    def start(self) -> None:
        """
        Start the factory's own thread pool (a new one after a `stop`). With
        a thread pool given to the constructor it only readies the factory.
        Calling it again while started does nothing.
        """
        self.stopped = False
        if not self._owns_threadpool:
            return
        if self._threadpool is not None and self._threadpool.started:
            return
        self._threadpool = ThreadPool(
            minthreads=0, maxthreads=DEFAULT_DATABASE_THREADS, name="tls4d-sql"
        )
        self._threadpool.start()

    def stop(self) -> None:
        """
        End every open session and stop the factory's own thread pool.

        Each session's running statement is interrupted, its uncommitted work
        rolled back and its SQLite connection closed in a database thread,
        and its client connection aborted. With its own thread pool, this
        blocks until those threads have done so and exited (at most the
        SQLite busy timeout, 5 s, if a session was waiting for a lock); with
        a thread pool given to the constructor, the closing is queued there
        and the pool's owner stops it afterwards. Lines that arrive later are
        refused until `start` is called again.
        """
        self.stopped = True
        sessions, self._sessions = self._sessions, {}
        for protocol, session in sessions.items():
            session.abandon()
            self._call_in_thread(session.close)
            protocol.transport.abortConnection()
        if sessions:
            self.log.info(
                "SQL server: closed {count} open sessions on shutdown",
                count=len(sessions),
            )
        if self._owns_threadpool and self._threadpool is not None:
            if self._threadpool.started:
                self._threadpool.stop()

    def startFactory(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Start when the first port starts listening: see `start`.
        """
        self.start()

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Stop when the last port has stopped listening: see `stop`.
        """
        self.stop()

    def buildProtocol(  # type: ignore[override]  # noqa: N802 (Twisted's name)
        self, addr: Any
    ) -> SQLServerProtocol:
        """
        Returns:
            A protocol with the factory's clock, timeouts and line limit.
        """
        protocol = SQLServerProtocol()
        protocol.factory = self
        protocol.clock = self.clock
        protocol.handshake_timeout = self.handshake_timeout
        protocol.idle_timeout = self.idle_timeout
        protocol.MAX_LENGTH = self.max_line_length
        return protocol

    def open_session(self, protocol: SQLServerProtocol) -> Session:
        """
        Returns:
            A new session for an authenticated connection, ended by
            `end_session` or `stop`.
        """
        session = Session(self.database)
        self._sessions[protocol] = session
        return session

    def end_session(self, protocol: SQLServerProtocol) -> None:
        """
        End the session of a connection that was lost: interrupt its running
        statement and skip any not started, then roll back and close it in a
        database thread.
        """
        session = self._sessions.pop(protocol, None)
        if session is None:
            return
        session.abandon()
        peer = peer_label(protocol.transport)

        def closed(rolled_back: bool) -> None:
            if rolled_back:
                self.log.info(
                    "SQL server: {peer} left with a transaction open; rolled it back",
                    peer=peer,
                )

        def failed(failure: Failure) -> None:
            self.log.failure(
                "SQL server: closing the session of {peer} failed", failure, peer=peer
            )

        self.run_in_thread(session.close).addCallbacks(closed, failed)

    def run_in_thread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        """
        Returns:
            The result of ``function(*args)`` run in a database thread.

        Raises:
            RuntimeError: The factory owns its thread pool and was not started
                (no port listened and `start` was not called).
        """
        if self._threadpool is None:
            msg = (
                "SQLServerFactory has no database threads; serve it from a "
                "listening port or call its start() first."
            )
            raise RuntimeError(msg)
        return deferToThreadPool(self._get_reactor(), self._threadpool, function, *args)

    def _call_in_thread(self, function: Any, *args: Any) -> None:
        """
        Run ``function(*args)`` in a database thread, for its effect only.
        """
        if self._threadpool is not None:
            self._threadpool.callInThread(function, *args)

    def _get_reactor(self) -> IReactorFromThreads:
        """
        Returns:
            The reactor given to the constructor, or the global one.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = cast(IReactorFromThreads, reactor)
        return self._reactor
