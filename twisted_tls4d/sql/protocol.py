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
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from twisted_tls4d._peer import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    AuthenticatedPeerMixin,
    common_name,
    peer_label,
)
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.sql import wire
from twisted_tls4d.sql.session import Answer, Session, error_answer
from twisted_tls4d.sql.users import UserStore

if TYPE_CHECKING:
    from twisted_tls4d.sql.postgres import PostgresBackend

#: The longest statement line accepted, in bytes, unless told otherwise.
DEFAULT_MAX_LINE_LENGTH = 1024 * 1024

#: Database threads of a thread pool the factory makes itself.
DEFAULT_DATABASE_THREADS = 10

#: How many characters of a statement's first word the debug log shows.
_VERB_LENGTH = 16

#: Seconds a login from a host waits after that host's first failed login;
#: each further failure in a row doubles it, up to `MAX_LOGIN_DELAY`.
LOGIN_DELAY = 0.5

#: The longest wait before a login is checked, in seconds.
MAX_LOGIN_DELAY = 30.0

#: Seconds after which a host's failed logins are forgotten.
LOGIN_FAILURES_FORGOTTEN = 3600.0

#: How many hosts' failed logins are remembered at most.
MAX_HOSTS_REMEMBERED = 10000


@attrs.frozen
class LoginOutcome:
    """
    What checking a login found.

    Attributes:
        access: The user's access level, or None if the login failed.
        why: Why it failed, for the log.
        message: Why it failed, for the client.
        counts: Whether the failure counts towards slowing the peer down.
    """

    access: str | None
    why: str = ""
    message: str = ""
    counts: bool = False


def peer_host(transport: Any) -> str:
    """
    Returns:
        The address of the connection's peer, without its port.
    """
    try:
        return str(transport.getPeer().host)
    except AttributeError:
        return "unknown"


def loggable_error(answer: Answer) -> str | None:
    """
    Returns:
        The error message of a failed answer as the log may show it: the
        server's own messages whole; a database's (code ``sql``, or not
        known) with the span from its first quote to its last replaced by an
        ellipsis, since SQLite and PostgreSQL quote the part of the
        statement they stumbled on (``near "'s3cret'": syntax error``,
        ``unrecognized token: "'s3cret"``), which may be a value. Names the
        database gives unquoted (``no such table: t``) are kept.
    """
    message = answer.error
    if message is None or answer.code not in (None, wire.ERROR_SQL):
        return message
    quotes = [index for index, char in enumerate(message) if char in "\"'"]
    if not quotes:
        return message
    # A lone quote opens a fragment that runs to the end.
    end = quotes[-1] + 1 if len(quotes) > 1 else len(message)
    return message[: quotes[0]] + "\u2026" + message[end:]


@implementer(IPushProducer)
class _AnswerStream:
    """
    Streams a large answer batch by batch: registered as the transport's
    producer while the answer lasts, so that a client reading slowly pauses
    the reading of rows instead of letting them pile up in memory.
    """

    def __init__(self, protocol: SQLServerProtocol) -> None:
        self.protocol = protocol
        self.paused = False
        self.waiting = False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The transport's buffer is full: read no more rows for now.
        """
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The transport drained: read the next batch if one is waiting.
        """
        self.paused = False
        if self.waiting:
            self.waiting = False
            self.protocol.fetch_next()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The connection is gone; `SQLServerProtocol.connectionLost` ends the
        session.
        """
        self.paused = True
        self.waiting = False


class SQLServerProtocol(AuthenticatedPeerMixin, LineReceiver):
    """
    One client connection: greets the client once the TLS handshake is done,
    then runs each line as a statement (or a login) of the client's session
    and writes the answer, batch by batch for large results.

    A client with a certificate from the root's CA is greeted as the user of
    its certificate's name; one without (only where the TLS context lets it
    in, see `SQLServerFactory`) must log in with a user name and password
    before any statement.
    """

    server_name = "SQL server"
    delimiter = b"\n"
    factory: SQLServerFactory
    #: The TLS transport; typed loosely, as zope interfaces confuse mypy.
    transport: Any

    _session: Any = None
    _lost = False
    _closing = False
    #: The longest line taken, in bytes, its CRLF or LF end not counted
    #: (`SQLServerFactory.buildProtocol` sets it; ``MAX_LENGTH``, which
    #: Twisted checks, is one more, for the CR of a CRLF end).
    max_line_length = DEFAULT_MAX_LINE_LENGTH
    _handshake_done = False
    _user: str | None = None
    _stream: _AnswerStream | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Give the client ``handshake_timeout`` seconds to complete TLS.
        """
        self.start_handshake_timer()

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Learn the client's certificate if it sent one; a client without one
        is let in to log in only if the factory takes passwords.
        """
        self._handshake_done = True
        handle = self.transport.getHandle()
        if handle.get_peer_certificate() is not None or not self.factory.passwords:
            super().handshakeCompleted()
            return
        self.log.info(
            "{server}: {peer} connected without a client certificate; it must log in",
            server=self.server_name,
            peer=peer_label(self.transport),
        )
        self.setTimeout(self.idle_timeout)
        self._greet()

    def peer_authenticated(self) -> None:
        """
        Greet the client as the user its certificate names.
        """
        assert self.peer_certificate is not None
        self._user = common_name(self.peer_certificate)
        self._greet()

    def _greet(self) -> None:
        """
        Open the client's session and greet it.
        """
        if self.factory.stopped:
            self.transport.abortConnection()
            return
        access = None
        if self._user is not None:
            access = self.factory.certificate_access_of(self._user)
        self._session = self.factory.open_session(self, self._user, access)
        client = common_name(self.peer_certificate) if self.peer_certificate else None
        self.transport.write(wire.encode_line(wire.hello(client, self._user, access)))

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin)
        """
        Close a connection that took too long to handshake or went idle.
        """
        if self._handshake_done and self.peer_certificate is None:
            self._timed_out_in = "idle"
            self.log.info(
                "{server}: closing {peer}: idle timeout",
                server=self.server_name,
                peer=peer_label(self.transport),
            )
            self.transport.abortConnection()
            return
        super().timeoutConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Split the bytes into lines once the client is greeted; drop them
        before that, and once the server decided to close the connection
        (a TLS connection goes on delivering what the client sends until
        its close completes, and none of that may run).
        """
        if self._session is None or self._closing:
            return
        self.note_received(len(data))
        self.resetTimeout()
        LineReceiver.dataReceived(self, data)
        self.update_request_deadline(not self.paused and not self._lost)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Run one request, holding back the following lines until its answer
        is written.
        """
        if self._closing:
            return
        self.note_request(len(line) + len(self.delimiter))
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line_length:
            # Twisted allowed one byte more, for a CRLF's CR.
            self.lineLengthExceeded(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self._refuse(
                wire.ERROR_ENCODING,
                f"The line is not valid UTF-8 (byte 0x{line[e.start]:02x} at "
                f"offset {e.start}); send statements in UTF-8.",
            )
            return
        if not text.strip():
            return
        if self.factory.stopped or self._session is None:
            self._refuse(wire.ERROR_SHUTDOWN, "The SQL server is shutting down.")
            self._closing = True
            self.transport.loseConnection()
            return
        try:
            request = wire.parse_request(text)
        except wire.WireFormatError as e:
            self._refuse(wire.ERROR_REQUEST, str(e))
            return
        if request.statement is None:
            self._login(request)
            return
        if self._user is None:
            self._refuse(
                wire.ERROR_LOGIN_REQUIRED,
                "Log in first: this connection has no client certificate, so "
                'send {"login": {"user": NAME, "password": PASSWORD}}.',
            )
            return

        answer_at_once = getattr(self._session, "answer_at_once", None)
        if answer_at_once is not None:
            # A short read is answered here, without a database thread.
            answer = answer_at_once(request.statement, request.parameters)
            if answer is not None:
                self.transport.write(answer.data)
                return
        self.setTimeout(None)
        self.pauseProducing()
        d = self.factory.run_in_thread(
            self._session.start, request.statement, request.parameters
        )
        d.addErrback(self._internal_error)
        d.addCallback(self._answer)

    def _login(self, request: wire.Request) -> None:
        """
        Check a user name and password in a database thread, after a delay
        that grows with the failures of the peer's host, and answer.
        """
        assert request.user is not None and request.password is not None
        self.setTimeout(None)
        self.pauseProducing()
        host = peer_host(self.transport)
        user, password = request.user, request.password

        def check(_: object = None) -> defer.Deferred[Any]:
            return self.factory.run_in_thread(
                self.factory.check_login, self._session, user, password
            )

        delay = self.factory.login_slot(host)
        if delay > 0:
            d = task.deferLater(self.clock, delay, check)
        else:
            d = check()
        d.addCallback(self._logged_in, user, host)
        d.addErrback(self._internal_error)
        d.addCallback(self._answer)

    def _logged_in(self, outcome: LoginOutcome, user: str, host: str) -> Answer:
        """
        Turn the outcome of a login into its answer, and log it.
        """
        peer = peer_label(self.transport)
        if outcome.access is not None:
            self.factory.login_succeeded(host)
            self._user = user
            self.log.info(
                "{server}: {peer} logged in as {user!r} ({access})",
                server=self.server_name,
                peer=peer,
                user=user,
                access=outcome.access,
            )
            return Answer(
                wire.encode_line(wire.logged_in(user, outcome.access)), ok=True
            )
        if outcome.counts:
            failures = self.factory.login_failed(host)
            self.log.warn(
                "{server}: failed login as {user!r} from {peer} ({failures} in a "
                "row from {host}): {why}",
                server=self.server_name,
                peer=peer,
                user=user,
                host=host,
                failures=failures,
                why=outcome.why,
            )
        return error_answer(wire.ERROR_LOGIN, outcome.message)

    def fetch_next(self) -> None:
        """
        Read the next batch of the answer being streamed.
        """
        if self._lost or self._session is None:
            return
        d = self.factory.run_in_thread(self._session.fetch)
        d.addErrback(self._internal_error)
        d.addCallback(self._answer)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Answer a line over the limit with an error and close the connection;
        read nothing more from it.
        """
        if self._closing:
            return
        self.stop_request_deadline()
        self._refuse(
            wire.ERROR_LINE_TOO_LONG,
            f"The line is longer than this server's limit of "
            f"{self.max_line_length} bytes; the connection is closed.",
        )
        self._closing = True
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Log a refused handshake, and end the session: its running statement
        is interrupted, its uncommitted work rolled back, its connection to
        the database closed.
        """
        self._lost = True
        if self._handshake_done and self.peer_certificate is None:
            self.setTimeout(None)
            self.stop_request_deadline()
        else:
            self.log_refusal_if_any(reason)
        if self._session is not None:
            self.factory.end_session(self)

    def _answer(self, answer: Answer) -> None:
        """
        Write an answer, or one batch of it; then read the next batch, or,
        once the answer is complete, the next line.
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
        if not answer.done:
            if self._stream is None:
                self._stream = _AnswerStream(self)
                self.transport.registerProducer(self._stream, True)
            if self._stream.paused:
                self._stream.waiting = True
            else:
                self.clock.callLater(0, self.fetch_next)
            return
        if self._stream is not None:
            self._stream = None
            self.transport.unregisterProducer()
        self.setTimeout(self.idle_timeout)
        self.resumeProducing()

    def _internal_error(self, failure: Failure) -> Answer:
        """
        Log a failure of the server itself and answer it without details.
        """
        self.log.failure(
            "{server}: running a request of {peer} failed",
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
            client=self._user,
            error=loggable_error(answer),
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
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        threadpool: ThreadPool | None = None,
        reactor: IReactorFromThreads | None = None,
        users_file: Path | None = None,
        passwords: bool = False,
        certificate_access: str = wire.FULL,
        backend: PostgresBackend | str | None = None,
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
            request_timeout: Seconds a client has to send the rest of a
                line once its first byte arrived.
            threadpool: The database threads to use, started and stopped by
                its owner; if None, the factory makes its own, which `start`
                starts and `stop` stops.
            reactor: Where answers from the database threads are delivered;
                the global reactor if None.
            users_file: The users and their password hashes and access
                levels (``Settings/sql-users.json``); read at each login, so
                ``tls4d users`` changes apply at once. None: no user can
                log in with a password.
            passwords: Whether clients without a certificate are greeted (to
                log in) rather than refused; the TLS context must then ask
                for a client certificate without requiring one.
            certificate_access: The access level of a client authenticated
                by certificate whose name is not a user of ``users_file``.
            backend: The PostgreSQL database to serve instead of
                ``database``, with each access level's role (a
                ``postgresql://`` URL alone serves ``full`` sessions only);
                None for SQLite.
        """
        self.database = database
        self.clock = clock
        self.max_line_length = max_line_length
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._owns_threadpool = threadpool is None
        self._threadpool = threadpool
        self._reactor = reactor
        self._sessions: dict[SQLServerProtocol, Any] = {}
        self.users_file = users_file
        self.passwords = passwords
        self.certificate_access = certificate_access
        self.backend = backend
        self._login_failures: dict[str, tuple[int, float]] = {}
        self._login_next: dict[str, float] = {}
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
        protocol.request_timeout = self.request_timeout
        protocol.max_line_length = self.max_line_length
        protocol.MAX_LENGTH = self.max_line_length + 1
        return protocol

    def open_session(
        self,
        protocol: SQLServerProtocol,
        user: str | None = None,
        access: str | None = None,
    ) -> Any:
        """
        Args:
            protocol: The connection.
            user: Whom the session runs for; None until a login.
            access: The user's access level; None (read-only until a login,
                which the protocol requires first) if not known.

        Returns:
            A new session for a greeted connection, ended by `end_session` or
            `stop`.
        """
        level = access or wire.READ_ONLY
        session: Any
        if self.backend is not None:
            from twisted_tls4d.sql.postgres import PostgresSession

            session = PostgresSession(self.backend, access=level, user=user)
        else:
            session = Session(self.database, access=level, user=user)
        self._sessions[protocol] = session
        return session

    def _users(self) -> UserStore:
        """
        Returns:
            The users as the users file holds them now; none without one.

        Raises:
            ConfigurationError: The users file is unreadable or invalid.
        """
        if self.users_file is None:
            return UserStore({})
        return UserStore.load(self.users_file)

    def certificate_access_of(self, name: str) -> str:
        """
        Args:
            name: The common name of a client's verified certificate.

        Returns:
            The access level of the user of that name if there is one, else
            `certificate_access`.
        """
        try:
            user = self._users().get(name)
        except ConfigurationError as e:
            self.log.error("SQL server: {error}", error=str(e))
            return wire.READ_ONLY
        return user.access if user is not None else self.certificate_access

    def check_login(self, session: Any, user: str, password: str) -> LoginOutcome:
        """
        Check a password and switch ``session`` to the user. Blocks (the
        password hash takes tens of milliseconds): call it in a database
        thread.

        Returns:
            The outcome: the user's access level, or why not.
        """
        try:
            access = self._users().verify(user, password)
        except ConfigurationError as e:
            return LoginOutcome(None, str(e), "The server cannot check passwords now.")
        if access is None:
            return LoginOutcome(
                None,
                "unknown user or wrong password",
                "Unknown user or wrong password.",
                counts=True,
            )
        try:
            session.set_user(user, access)
        except ValueError as e:
            return LoginOutcome(None, str(e), f"{e} Then log in.")
        return LoginOutcome(access)

    def login_slot(self, host: str) -> float:
        """
        Reserve the next moment a login from ``host`` may be checked: at
        once if its last login did not fail, else spaced after the previous
        attempt by a delay that doubles with each failure in a row.

        Returns:
            Seconds to wait before checking the password.
        """
        now = self.clock.seconds()
        failures, last = self._login_failures.get(host, (0, 0.0))
        if failures == 0 or now - last > LOGIN_FAILURES_FORGOTTEN:
            return 0.0
        backoff = min(LOGIN_DELAY * 2 ** (failures - 1), MAX_LOGIN_DELAY)
        slot = max(now, self._login_next.get(host, now))
        self._login_next[host] = slot + backoff
        return slot + backoff - now

    def login_failed(self, host: str) -> int:
        """
        Count a failed login from ``host``.

        Returns:
            How many logins from it failed in a row.
        """
        now = self.clock.seconds()
        failures, last = self._login_failures.pop(host, (0, 0.0))
        if now - last > LOGIN_FAILURES_FORGOTTEN:
            failures = 0
        if len(self._login_failures) >= MAX_HOSTS_REMEMBERED:
            oldest = min(self._login_failures, key=lambda h: self._login_failures[h][1])
            del self._login_failures[oldest]
            self._login_next.pop(oldest, None)
        self._login_failures[host] = (failures + 1, now)
        return failures + 1

    def login_succeeded(self, host: str) -> None:
        """
        Forget the failed logins of ``host``.
        """
        self._login_failures.pop(host, None)
        self._login_next.pop(host, None)

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
