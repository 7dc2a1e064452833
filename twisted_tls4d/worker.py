"""
A worker process of ``twistd tls4d --workers N``, started by the twistd
process (`twisted_tls4d.workers.WorkerPool`) as
``python -m twisted_tls4d.worker --index I``: it inherits the listening
sockets and its control channel as file descriptors, receives the settings
over the channel, and serves the same listeners with servers of its own
until the twistd process stops it (SIGTERM) or ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, eventAsJSON, globalLogBeginner
from twisted.python.failure import Failure

from twisted_tls4d import workers
from twisted_tls4d.errors import Tls4dError

_log = Logger()


class _ChannelRelay:
    """
    Relays the notifications of this worker's application server through
    the master (`twisted_tls4d.app.protocol.NotificationRelay`).
    """

    def __init__(self, channel: workers.ControlChannel) -> None:
        self.channel = channel

    def publish(self, topic: str, payload: bytes) -> defer.Deferred[int]:
        """
        Returns:
            A Deferred firing with how many connections of the other
            processes the notification reached (0 if the master does not
            answer).
        """
        asked = self.channel.request(
            {"kind": "publish", "topic": topic},
            payload,
            timeout=workers.ANSWER_TIMEOUT,
        )
        return asked.addCallbacks(
            lambda reply: int(reply.get("delivered", 0)), lambda _: 0
        )


class _LogToMaster:
    """
    A log observer sending each event to the master, which logs it tagged
    with this worker's number; events of other threads go through the
    reactor's thread.
    """

    def __init__(self, reactor: Any, channel: workers.ControlChannel) -> None:
        self.reactor = reactor
        self.channel = channel

    def __call__(self, event: dict[str, Any]) -> None:
        body = eventAsJSON(event).encode("utf-8")
        if threading.current_thread() is threading.main_thread():
            self.channel.send({"kind": "log"}, body)
        else:
            self.reactor.callFromThread(self.channel.send, {"kind": "log"}, body)


class WorkerProcess:
    """
    The life of a worker process: started by the master's ``start``
    message, reloaded by ``reload``, delivering ``deliver``ed notifications,
    stopped by SIGTERM or by the end of the control channel.

    Attributes:
        index: Its number.
        service: Its servers, once started.
        exit_code: The process's exit status once the reactor stopped.
    """

    def __init__(self, reactor: Any, index: int) -> None:
        self.reactor = reactor
        self.index = index
        self.service: Any = None
        self.exit_code = 0
        self._stopping = False
        self.channel = workers.ControlChannel(self.handle, self.master_gone, reactor)

    def handle(self, message: dict[str, Any], body: bytes) -> Any:
        """
        Serve a message from the master.
        """
        kind = message.get("kind")
        if kind == "start":
            self.start(message)
            return None
        if kind == "reload":
            return {"ok": self.service is not None and self.service.reload_tls()}
        if kind == "deliver":
            app = self.service.factories.get("app") if self.service else None
            delivered = app.deliver(message["topic"], None, body) if app else 0
            return {"delivered": delivered}
        _log.warn("Unknown control message {kind!r} from the master", kind=kind)
        return None

    def start(self, message: dict[str, Any]) -> None:
        """
        Build the servers from the master's settings on the inherited
        listening sockets, and start serving; on failure, end the process.
        """
        from twisted_tls4d.service import build_service

        settings = workers.settings_from_json(message["settings"])
        inherited = {
            name: (int(fd), int(family))
            for name, (fd, family) in message["listeners"].items()
        }
        try:
            service = build_service(settings, self.reactor, inherited=inherited)
            app = service.factories.get("app")
            if app is not None:
                app.relay = _ChannelRelay(self.channel)
            service.startService()
        except (Tls4dError, OSError) as e:
            _log.critical(
                "Worker {index} cannot start: {error}", index=self.index, error=str(e)
            )
            self.stop(1)
            return
        except Exception:
            _log.failure("Worker {index} cannot start", index=self.index)
            self.stop(1)
            return
        for fd, _ in inherited.values():
            # The listeners serve copies of their own.
            os.close(fd)
        self.service = service
        self.channel.send({"kind": "ready"})

    def master_gone(self, reason: Failure) -> None:
        """
        The control channel closed: the master ended (even by SIGKILL), so
        stop too; or this worker closed it, its last step in stopping.
        """
        if self._stopping:
            self._end()
        else:
            self.stop(1)

    def stop(self, code: int = 0) -> None:
        """
        Stop the servers, send the master the last log lines, and end the
        process with ``code``; if that takes over `workers.STOP_TIMEOUT`
        seconds, end it at once.
        """
        if self._stopping:
            return
        self._stopping = True
        self.exit_code = code
        self.reactor.callLater(workers.STOP_TIMEOUT, os._exit, code or 1)
        stopped = defer.maybeDeferred(
            self.service.stopService if self.service is not None else lambda: None
        )
        stopped.addErrback(lambda failure: _log.failure("Cannot stop", failure))
        stopped.addCallback(lambda _: self._close_channel())

    def _close_channel(self) -> None:
        """
        Close the control channel once what was written to it has left (its
        end then stops the reactor), or stop the reactor if it is closed.
        """
        if self.channel.connected_now:
            self.channel.transport.loseConnection()
        else:
            self._end()

    def _end(self) -> None:
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def sigterm(self, signum: int, frame: Any) -> None:
        """
        SIGTERM from the master: stop cleanly.
        """
        self.reactor.callFromThread(self.stop, 0)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run a worker process.

    Args:
        argv: The command-line arguments (``--index I``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m twisted_tls4d.worker",
        description="A worker process of twistd tls4d; twistd starts it.",
    )
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    worker = WorkerProcess(reactor, args.index)
    globalLogBeginner.beginLoggingTo(
        [_LogToMaster(reactor, worker.channel)], discardBuffer=True
    )
    workers.adopt_channel(reactor, workers.CONTROL_FD, worker.channel)

    def take_signals() -> None:
        # The terminal's Ctrl-C and hang-up reach the whole process group;
        # the master decides for its workers, stopping or reloading them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, worker.sigterm)

    reactor.callWhenRunning(take_signals)
    reactor.run()  # type: ignore[attr-defined]
    return worker.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
