"""
Several processes serving one root (``--workers N``): the twistd process
binds every listening socket and serves them itself, and starts ``N - 1``
worker processes (`twisted_tls4d.worker`) that inherit the same sockets, so
that the kernel hands each new connection to whichever process accepts it
first and every CPU serves.

The twistd process, here called the master, talks to each worker over a
socket pair, its control channel: length-prefixed frames, each a JSON header
and an optional body. Over it the master sends the settings and the
listening sockets' descriptors, reloads, and notifications of the
application server bound for the worker's subscribers; the worker sends its
log events (which the master logs, tagged with the worker's number), its
readiness, and the notifications its own clients publish. When the master
ends, even by SIGKILL, the worker reads the end of the channel and stops.

Only the master bootstraps the root, checks expiry and renews the generated
certificates, reloads on SIGHUP and lists itself in ``ROOT/Run/``; a reload
there reaches every worker. A worker that dies is logged and started again,
at most once a second and with growing delays while it keeps dying young.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, connectionDone
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

import twisted_tls4d
from twisted_tls4d.settings import Settings

_log = Logger()

#: The child's file descriptor of its control channel.
CONTROL_FD = 3

#: The child's file descriptor of the first listening socket; the others
#: follow.
FIRST_LISTENER_FD = 4

#: Seconds the master waits for its workers to stop before it kills them.
STOP_TIMEOUT = 10.0

#: Seconds a reload or a notification may take in a worker before the
#: master stops waiting for its answer.
ANSWER_TIMEOUT = 30.0

#: A worker that ends within this many seconds of its start died young: the
#: next one waits longer before it starts.
STABLE_AFTER = 30.0

#: The longest wait before a worker that keeps dying young is started again.
MAX_RESTART_DELAY = 60.0

#: The largest frame on a control channel: a notification of the largest
#: application frame (``--max-frame-size``, 2**31 - 1 at most), with room
#: for its header.
MAX_CONTROL_FRAME = 2**31 - 1


#: The longest line of a worker's standard output or error held back
#: waiting for its end, in bytes.
_LONGEST_OUTPUT_LINE = 64 * 1024


def settings_to_json(settings: Settings) -> dict[str, Any]:
    """
    Returns:
        ``settings`` as a JSON object, for a worker process.
    """
    return attrs.asdict(
        settings,
        value_serializer=lambda _, __, value: (
            str(value) if isinstance(value, Path) else value
        ),
    )


def settings_from_json(values: Mapping[str, Any]) -> Settings:
    """
    Returns:
        The settings `settings_to_json` encoded.
    """
    return Settings(**{**values, "root": Path(values["root"])})


class ControlChannel(Int32StringReceiver):
    """
    One end of the control channel between the master and a worker.

    A frame is a JSON object (its ``kind`` says what it is), a NUL byte,
    and a body of raw bytes. A message with an ``id`` is a request: the
    other end answers it with a ``reply`` carrying the same id.

    Attributes:
        handler: Called with each message that is not a reply and its body;
            what it returns (or its Deferred fires with), a dict, is the
            reply's content when the message is a request.
        on_lost: Called once the channel is closed.
    """

    MAX_LENGTH = MAX_CONTROL_FRAME

    def __init__(
        self,
        handler: Callable[[dict[str, Any], bytes], Any],
        on_lost: Callable[[Failure], None] | None = None,
        clock: Any = None,
    ) -> None:
        self.handler = handler
        self.on_lost = on_lost
        self.clock = clock
        self.connected_now = False
        self.closed = False
        self._backlog: list[bytes] = []
        self._pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._next_id = 0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Send what was queued before the channel was connected.
        """
        self.connected_now = True
        backlog, self._backlog = self._backlog, []
        for frame in backlog:
            self.sendString(frame)

    def send(self, message: Mapping[str, Any], body: bytes = b"") -> None:
        """
        Send a message, or queue it until the channel is connected; nothing
        once it is closed.
        """
        frame = json.dumps(message, separators=(",", ":")).encode() + b"\0" + body
        if self.connected_now:
            self.sendString(frame)
        elif self.transport is None:
            self._backlog.append(frame)

    def request(
        self,
        message: Mapping[str, Any],
        body: bytes = b"",
        timeout: float | None = None,
    ) -> defer.Deferred[dict[str, Any]]:
        """
        Send a request.

        Returns:
            A Deferred firing with the reply (with an ``error`` if the other
            end could not serve it), or failing if the channel is or gets
            closed (or ``timeout`` seconds pass) first.
        """
        if self.closed:
            return defer.fail(ConnectionDone("The control channel is closed."))
        self._next_id += 1
        request_id = self._next_id
        waiting: defer.Deferred[dict[str, Any]] = defer.Deferred(
            lambda _: self._pending.pop(request_id, None)
        )
        self._pending[request_id] = waiting
        if timeout is not None and self.clock is not None:
            waiting.addTimeout(timeout, self.clock)
        self.send({**message, "id": request_id}, body)
        return waiting

    def stringReceived(self, frame: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Take one frame: settle a pending request with a reply, or hand a
        message to `handler` and answer it if it is a request.
        """
        header, _, body = frame.partition(b"\0")
        message = json.loads(header)
        kind = message.get("kind")
        if kind == "reply":
            waiting = self._pending.pop(message.get("id"), None)
            if waiting is not None:
                waiting.callback(message)
            return
        request_id = message.get("id")

        def failed(failure: Failure) -> dict[str, Any]:
            _log.failure(
                "Cannot serve the control message {kind!r}", failure, kind=kind
            )
            return {"error": failure.getErrorMessage()}

        answer = defer.maybeDeferred(self.handler, message, body).addErrback(failed)
        if request_id is not None:
            answer.addCallback(
                lambda result: self.send(
                    {**(result or {}), "kind": "reply", "id": request_id}
                )
            )

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Fail the requests still waiting for a reply, and tell `on_lost`.
        """
        self.connected_now = False
        self.closed = True
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(reason)
        if self.on_lost is not None:
            self.on_lost(reason)


def adopt_channel(reactor: Any, fd: int, channel: ControlChannel) -> None:
    """
    Run ``channel`` on the connected UNIX socket ``fd``, which this process
    then no longer needs: the reactor holds its own copy.
    """
    reactor.adoptStreamConnection(
        fd, socket.AF_UNIX, Factory.forProtocol(lambda: channel)
    )
    os.close(fd)


def _worker_environment() -> dict[str, str]:
    """
    Returns:
        The environment of a worker: this one, with the folder tls4d was
        imported from first on the Python path, so that the worker runs the
        same code.
    """
    env = dict(os.environ)
    source = str(Path(twisted_tls4d.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [source, *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _system_of(event: Mapping[str, Any]) -> str:
    """
    Returns:
        What twistd's log shows between brackets for ``event``: its system if
        it has one, else its namespace and level.
    """
    system = event.get("log_system")
    if system is not None:
        return str(system)
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{getattr(level, 'name', level)}"


def _describe_end(reason: Failure) -> str:
    """
    Returns:
        How a process ended, in words.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exit status {value.exitCode}"
    return str(value)


class _WorkerProcess(ProcessProtocol):
    """
    One worker process as the master sees it: its standard output and error
    (logged line by line) and its end.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        """
        Log each complete line the worker wrote outside its log (a crash
        before its log was set up, say).
        """
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > _LONGEST_OUTPUT_LINE:
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self.worker.log_output(line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        """
        Log what is left of its output, and tell the pool.
        """
        for rest in self._partial.values():
            if rest:
                self.worker.log_output(rest)
        self._partial.clear()
        self.worker.process_ended(reason)


@attrs.define(eq=False)
class Worker:
    """
    A worker process of the pool, as long as it runs.

    Attributes:
        pool: Its pool.
        index: Its number, 1 to ``N - 1`` (the master is 0).
        process: Its process transport.
        pid: Its process id.
        channel: Its control channel.
        started: When it started, on the pool's clock.
        ready: Whether it serves (its listeners are up).
        ended: Fires once the process has ended and its control channel has
            closed (so that its last log lines are in).
    """

    pool: WorkerPool
    index: int
    process: Any = None
    pid: int | None = None
    channel: ControlChannel | None = None
    started: float = 0.0
    ready: bool = False
    ended: defer.Deferred[None] = attrs.field(factory=defer.Deferred)
    _end_reason: Failure | None = None
    _channel_closed: bool = False

    @property
    def talking(self) -> bool:
        """Whether its control channel is open."""
        return self.channel is not None and self.channel.connected_now

    def request(
        self, message: Mapping[str, Any], body: bytes = b""
    ) -> defer.Deferred[dict[str, Any]]:
        """
        Send the worker a request over its open channel.

        Returns:
            A Deferred of its reply, failing if it gives none within
            `ANSWER_TIMEOUT` seconds or the channel closes.
        """
        assert self.channel is not None
        return self.channel.request(message, body, timeout=ANSWER_TIMEOUT)

    @property
    def system(self) -> str:
        """Its tag in the log."""
        return f"worker {self.index}"

    def end(self) -> None:
        """
        Fire `ended`, unless the pool stopped waiting for it.
        """
        if not self.ended.called:
            self.ended.callback(None)

    def process_ended(self, reason: Failure) -> None:
        """
        The process ended; once its channel has closed too, tell the pool.
        """
        self._end_reason = reason
        if self._channel_closed or self.channel is None:
            self.pool.worker_ended(self, reason)

    def channel_closed(self, reason: Failure) -> None:
        """
        The control channel closed; once the process has ended too, tell the
        pool.
        """
        self.ready = False
        self._channel_closed = True
        if self._end_reason is not None:
            self.pool.worker_ended(self, self._end_reason)

    def log_output(self, line: bytes) -> None:
        """
        Log a line the worker wrote to its standard output or error.
        """
        _log.warn(
            "{output}",
            output=line.decode("utf-8", "replace").rstrip(),
            log_system=self.system,
        )

    def handle(self, message: dict[str, Any], body: bytes) -> Any:
        """
        Serve a message from the worker.
        """
        kind = message.get("kind")
        if kind == "log":
            try:
                event = eventFromJSON(body.decode("utf-8"))
            except ValueError:
                self.log_output(body)
                return None
            event["log_system"] = f"{self.system} {_system_of(event)}"
            globalLogPublisher(event)
            return None
        if kind == "ready":
            self.ready = True
            self.pool.worker_ready(self)
            return None
        if kind == "publish":
            return self.pool.publish_from(self, message["topic"], body).addCallback(
                lambda delivered: {"delivered": delivered}
            )
        _log.warn(
            "{system} sent an unknown control message {kind!r}",
            system=self.system,
            kind=kind,
        )
        return None


class WorkerPool(Service):
    """
    The worker processes of a twistd process: started once its listeners
    are bound, reloaded with it, stopped with it, and started again when one
    dies.

    Attributes:
        top: The master's servers.
        count: How many workers it runs.
        workers: The workers running or starting, by number.
    """

    name = "workers"

    def __init__(
        self,
        top: Any,
        count: int,
        reactor: Any = None,
        executable: str = sys.executable,
    ) -> None:
        """
        Args:
            top: The master's `twisted_tls4d.service.Tls4dService`; the pool
                becomes its ``workers``.
            count: How many worker processes to run, 1 or more.
            reactor: The reactor; the global one if None.
            executable: The Python interpreter of the workers.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.top = top
        self.count = count
        self.reactor = reactor
        self.executable = executable
        self.workers: dict[int, Worker] = {}
        self._stopping = False
        self._announced = False
        self._restarts: dict[int, Any] = {}
        self._young_deaths: dict[int, int] = {}
        top.workers = self

    # Starting and stopping

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Start the workers once the reactor runs, and relay the application
        server's notifications through them.
        """
        super().startService()
        self._stopping = False
        app = self.top.factories.get("app")
        if app is not None:
            app.relay = self
        _log.info(
            "Starting {count} worker process(es) beside this one, sharing its "
            "listening sockets",
            count=self.count,
        )
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self) -> None:
        for index in range(1, self.count + 1):
            if not self._stopping and index not in self.workers:
                self._start(index)

    def _start(self, index: int) -> None:
        """
        Start worker ``index``; if it cannot even be started (no process or
        file descriptor left), log why and try again later.
        """
        try:
            self.spawn(index)
        except Exception:
            _log.failure("Cannot start worker {index}", index=index)
            self._retry(index, self.reactor.seconds())

    def listening_sockets(self) -> dict[str, tuple[int, int]]:
        """
        Returns:
            The master's listening sockets by listener name: their file
            descriptor and address family.
        """
        from twisted_tls4d.service import ListenerService

        sockets = {}
        for child in self.top:
            if isinstance(child, ListenerService) and child.port is not None:
                port: Any = child.port
                sockets[child.name] = (port.fileno(), port.addressFamily)
        return sockets

    def spawn(self, index: int) -> Worker:
        """
        Start worker ``index``: a new interpreter running
        `twisted_tls4d.worker`, given its control channel and the listening
        sockets as inherited file descriptors, then the settings.

        Returns:
            The worker.
        """
        worker = Worker(self, index, started=self.reactor.seconds())
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds[CONTROL_FD] = theirs.fileno()
        listeners = {}
        for number, (name, (fd, family)) in enumerate(
            self.listening_sockets().items(), FIRST_LISTENER_FD
        ):
            child_fds[number] = fd
            listeners[name] = [number, family]
        try:
            worker.process = self.reactor.spawnProcess(
                _WorkerProcess(worker),
                self.executable,
                [
                    self.executable,
                    "-m",
                    "twisted_tls4d.worker",
                    "--index",
                    str(index),
                ],
                env=_worker_environment(),
                childFDs=child_fds,
            )
        finally:
            theirs.close()
        worker.pid = worker.process.pid
        worker.process.closeStdin()
        channel = ControlChannel(worker.handle, worker.channel_closed, self.reactor)
        worker.channel = channel
        adopt_channel(self.reactor, mine.detach(), channel)
        self.workers[index] = worker
        channel.send(
            {
                "kind": "start",
                "index": index,
                "settings": settings_to_json(self.top.settings),
                "listeners": listeners,
            }
        )
        return worker

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        """
        Stop every worker (SIGTERM), and kill those still running after
        `STOP_TIMEOUT` seconds.

        Returns:
            A Deferred firing once every worker has ended, or None if none
            runs.
        """
        super().stopService()
        self._stopping = True
        app = self.top.factories.get("app")
        if app is not None and app.relay is self:
            app.relay = None
        for timer in self._restarts.values():
            if timer.active():
                timer.cancel()
        self._restarts.clear()
        running = list(self.workers.values())
        if not running:
            return None
        for worker in running:
            self._signal(worker, "TERM")

        def kill() -> None:
            for worker in list(self.workers.values()):
                _log.warn(
                    "Worker {index} (pid {pid}) did not stop within {timeout:g} s; "
                    "killing it",
                    index=worker.index,
                    pid=worker.pid,
                    timeout=STOP_TIMEOUT,
                )
                self._signal(worker, "KILL")

        killer = self.reactor.callLater(STOP_TIMEOUT, kill)
        everyone = defer.DeferredList([w.ended for w in running])

        def stopped(result: Any) -> None:
            if killer.active():
                killer.cancel()

        everyone.addBoth(stopped)
        # A process that does not end even when killed must not hold the
        # master's exit forever.
        everyone.addTimeout(STOP_TIMEOUT + 5, self.reactor, lambda *_: None)
        return everyone

    def _signal(self, worker: Worker, name: str) -> None:
        try:
            worker.process.signalProcess(name)
        except Exception:  # noqa: BLE001 (ProcessExitedAlready, or no process)
            pass

    def worker_ready(self, worker: Worker) -> None:
        """
        Note that a worker serves; once all do for the first time, say so.
        """
        _log.info(
            "Worker {index} (pid {pid}) serving", index=worker.index, pid=worker.pid
        )
        if (
            not self._announced
            and len([w for w in self.workers.values() if w.ready]) == self.count
        ):
            self._announced = True
            _log.info(
                "All {processes} processes serving (this one, pid {pid}, and "
                "{count} worker(s))",
                processes=self.count + 1,
                pid=os.getpid(),
                count=self.count,
            )

    def worker_ended(self, worker: Worker, reason: Failure) -> None:
        """
        A worker process ended: if the pool is stopping, note it; else log it
        as a failure and start another after a delay that grows while workers
        keep dying young.
        """
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        worker.ready = False
        how = _describe_end(reason)
        if self._stopping or not self.running:
            _log.info(
                "Worker {index} (pid {pid}) stopped ({how})",
                index=worker.index,
                pid=worker.pid,
                how=how,
            )
            worker.end()
            return
        worker.end()
        delay = self._retry(worker.index, worker.started)
        _log.error(
            "Worker {index} (pid {pid}) ended unexpectedly ({how}) after "
            "{lived:.0f} s; starting another in {delay:g} s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            lived=self.reactor.seconds() - worker.started,
            delay=delay,
        )

    def _retry(self, index: int, started: float) -> float:
        """
        Start worker ``index`` again after a delay: 1 s, doubling up to
        `MAX_RESTART_DELAY` while workers of that number die within
        `STABLE_AFTER` seconds of their start.

        Returns:
            The delay, in seconds.
        """
        if self.reactor.seconds() - started < STABLE_AFTER:
            deaths = self._young_deaths.get(index, 0) + 1
        else:
            deaths = 1
        self._young_deaths[index] = deaths
        delay = min(MAX_RESTART_DELAY, 2.0 ** (deaths - 1))
        self._restarts[index] = self.reactor.callLater(delay, self._restart, index)
        return delay

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self._stopping and self.running and index not in self.workers:
            self._start(index)

    # Reloads

    def serving(self) -> bool:
        """
        Returns:
            Whether any worker runs (or starts) to pass a reload on to.
        """
        return any(w.talking for w in self.workers.values())

    def reload(self) -> defer.Deferred[bool]:
        """
        Have every worker reload its files (after the master did), and log
        "Reload done" once all have, or which failed.

        Returns:
            A Deferred firing with whether every worker took the new files.
        """
        asked = [
            (worker, worker.request({"kind": "reload"}))
            for worker in self.workers.values()
            if worker.talking
        ]

        def done(results: list[tuple[bool, Any]]) -> bool:
            failed = []
            for (worker, _), (answered, reply) in zip(asked, results, strict=True):
                if not answered or not reply.get("ok"):
                    failed.append(worker)
            if failed:
                _log.error(
                    "Reload failed in worker(s) {indexes}: they keep the "
                    "configuration they had; see their log lines",
                    indexes=", ".join(str(w.index) for w in failed),
                )
                return False
            _log.info(
                "Reload done: new connections get the files read now, in all "
                "{processes} processes",
                processes=len(asked) + 1,
            )
            return True

        return defer.DeferredList(
            [d for _, d in asked], consumeErrors=True
        ).addCallback(done)

    # Notifications of the application server

    def publish(self, topic: str, payload: bytes) -> defer.Deferred[int]:
        """
        Deliver a notification published in the master to every worker's
        subscribers (`twisted_tls4d.app.protocol.NotificationRelay`).

        Returns:
            A Deferred firing with how many connections it reached there.
        """
        return self._deliver(topic, payload, None)

    def publish_from(
        self, sender: Worker, topic: str, payload: bytes
    ) -> defer.Deferred[int]:
        """
        Deliver a notification published in a worker to the master's
        subscribers and those of every other worker.

        Returns:
            A Deferred firing with how many connections it reached.
        """
        app = self.top.factories.get("app")
        here = app.deliver(topic, None, payload) if app is not None else 0
        return self._deliver(topic, payload, sender).addCallback(
            lambda there: here + there
        )

    def _deliver(
        self, topic: str, payload: bytes, sender: Worker | None
    ) -> defer.Deferred[int]:
        asked = [
            worker.request({"kind": "deliver", "topic": topic}, payload)
            for worker in self.workers.values()
            if worker is not sender and worker.ready and worker.talking
        ]
        if not asked:
            return defer.succeed(0)

        def total(results: list[tuple[bool, Any]]) -> int:
            return sum(
                int(reply.get("delivered", 0))
                for answered, reply in results
                if answered
            )

        return defer.DeferredList(asked, consumeErrors=True).addCallback(total)
