"""
Tests of ``--workers``: the control channel and the notification relay in
memory, and, end to end, a real ``twistd tls4d --workers 2`` whose two
processes share the listening sockets, reload together, relay
notifications, and stop together.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from tests import support
from tests.test_e2e import DEADLINE, Server, _tls4d
from twisted_tls4d import identity, pki, root, settings, web, workers


class SettingsTransferTests(unittest.TestCase):
    """
    The settings reach a worker as JSON, unchanged.
    """

    def test_round_trip(self) -> None:
        """Every setting, the root path and tuples included, survives the trip."""
        original = settings.Settings(
            root=Path("/srv/root"),
            add_header=("X-A: 1",),
            app_allow=("alice", "bob"),
            https_port=0,
            workers=3,
            sql_database="postgresql://u:p@h/db",
        )
        encoded = json.loads(json.dumps(workers.settings_to_json(original)))
        self.assertEqual(workers.settings_from_json(encoded), original)


def _connected_channels(
    left_handler: Any, right_handler: Any
) -> tuple[workers.ControlChannel, workers.ControlChannel, iosim.IOPump]:
    left = workers.ControlChannel(left_handler, clock=Clock())
    right = workers.ControlChannel(right_handler, clock=Clock())
    pump = iosim.connect(
        left, iosim.makeFakeServer(left), right, iosim.makeFakeClient(right)
    )
    return left, right, pump


class ControlChannelTests(unittest.TestCase):
    """
    The control channel carries messages with bodies, and answers requests.
    """

    def test_request_and_reply(self) -> None:
        """A request's reply carries what the other end's handler returned."""
        seen: list[tuple[dict[str, Any], bytes]] = []

        def handler(message: dict[str, Any], body: bytes) -> dict[str, Any]:
            seen.append((message, body))
            return {"delivered": len(body)}

        left, _, pump = _connected_channels(lambda m, b: None, handler)
        answer = left.request({"kind": "deliver", "topic": "t"}, b"\x00\x01payload")
        pump.flush()
        self.assertEqual(self.successResultOf(answer)["delivered"], 9)
        self.assertEqual(seen[0][0]["topic"], "t")
        self.assertEqual(seen[0][1], b"\x00\x01payload")

    def test_deferred_reply(self) -> None:
        """A handler may answer later, through a Deferred."""
        later: defer.Deferred[dict[str, Any]] = defer.Deferred()
        left, _, pump = _connected_channels(lambda m, b: None, lambda m, b: later)
        answer = left.request({"kind": "publish"})
        pump.flush()
        self.assertNoResult(answer)
        later.callback({"delivered": 2})
        pump.flush()
        self.assertEqual(self.successResultOf(answer)["delivered"], 2)

    def test_lost_fails_pending(self) -> None:
        """A request still unanswered when the channel closes fails."""
        left, _, pump = _connected_channels(
            lambda m, b: None, lambda m, b: defer.Deferred()
        )
        answer = left.request({"kind": "reload"})
        pump.flush()
        left.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.failureResultOf(answer)

    def test_queued_before_connected(self) -> None:
        """What is sent before the channel connects leaves once it does."""
        seen: list[str] = []
        left = workers.ControlChannel(lambda m, b: None)
        left.send({"kind": "log"}, b"early")
        right = workers.ControlChannel(lambda m, b: seen.append(b.decode()))
        pump = iosim.connect(
            left, iosim.makeFakeServer(left), right, iosim.makeFakeClient(right)
        )
        pump.flush()
        self.assertEqual(seen, ["early"])


class _Reactor(Clock):
    """A clock that also runs callWhenRunning at once."""

    def callWhenRunning(self, f: Any, *args: Any) -> None:  # noqa: N802
        f(*args)


class _Pool(workers.WorkerPool):
    """A pool whose workers are records, not processes."""

    def __init__(self, count: int) -> None:
        top = SimpleNamespace(factories={}, settings=settings.Settings())
        super().__init__(top, count, reactor=_Reactor())
        self.spawned: list[int] = []

    def spawn(self, index: int) -> workers.Worker:
        worker = workers.Worker(self, index, started=self.reactor.seconds(), pid=index)
        self.workers[index] = worker
        self.spawned.append(index)
        return worker

    def die(self, index: int, after: float) -> None:
        """Let worker ``index`` live ``after`` seconds, then end with status 1."""
        self.reactor.advance(after)
        self.worker_ended(self.workers[index], Failure(ProcessTerminated(1)))


class RestartTests(unittest.TestCase):
    """
    A worker that dies is started again, later and later while it keeps
    dying young, and never once the pool stops.
    """

    def test_backoff(self) -> None:
        """Young deaths wait 1, 2, 4 s; a death after a long life waits 1 s again."""
        pool = _Pool(1)
        pool.startService()
        self.assertEqual(pool.spawned, [1])
        waits = []
        for lived in (1, 1, 1, workers.STABLE_AFTER + 1):
            with capturedLogs() as events:
                pool.die(1, lived)
            [error] = [e for e in events if e["log_level"] is LogLevel.error]
            waits.append(error["delay"])
            count = len(pool.spawned)
            pool.reactor.advance(error["delay"] - 0.1)
            self.assertEqual(len(pool.spawned), count)
            pool.reactor.advance(0.1)
            self.assertEqual(len(pool.spawned), count + 1)
        self.assertEqual(waits, [1, 2, 4, 1])

    def test_no_restart_once_stopped(self) -> None:
        """A restart due when the pool stops does not happen."""
        pool = _Pool(2)
        pool.startService()
        pool.die(2, 1)
        del pool.workers[1]
        pool.stopService()
        pool.reactor.advance(workers.MAX_RESTART_DELAY)
        self.assertEqual(pool.spawned, [1, 2])


class AccessLogTests(unittest.TestCase):
    """
    Several processes append to one access log, and one of them rotates it.
    """

    def test_two_writers_one_rotation(self) -> None:
        """
        Two writers of one file lose no line; the one that finds it full
        rotates it, and the other follows to the new file.
        """
        folder = support.temporary_folder("tls4d-log-")
        path = folder / "https-access.log"
        now = [0.0]
        first = web.AccessLogFile(path, rotate_length=100, kept=3, clock=lambda: now[0])
        second = web.AccessLogFile(
            path, rotate_length=100, kept=3, clock=lambda: now[0]
        )
        for number in range(6):
            first.write(f"first {number:02} {'x' * 10}\n")
            second.write(f"second {number:02} {'x' * 10}\n")
        now[0] = 5.0
        first.write("first after\n")
        second.write("second after\n")
        first.close()
        second.close()
        rotated = (folder / "https-access.log.1").read_text()
        current = path.read_text()
        self.assertEqual(rotated.count("\n"), 12)
        self.assertEqual(current, "first after\nsecond after\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)


# End to end


def _client_identity(root_path: Path, name: str) -> Path:
    out = support.temporary_folder("tls4d-worker-client-") / name
    identity.issue_client_identity(root.RootLayout(root_path), name, out)
    return out


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds."""
    inodes = set()
    folder = Path(f"/proc/{pid}/fd")
    for entry in folder.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _holder(client_port: int, pids: list[int]) -> int | None:
    """
    Returns:
        Which of ``pids`` holds the server side of the loopback connection
        from ``client_port``, as /proc tells.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == client_port:
                inodes.add(fields[9])
    for pid in pids:
        if inodes & _socket_inodes(pid):
            return pid
    return None


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_until_gone(pid: int) -> bool:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


class _AppSocket:
    """
    A blocking client of the application protocol over Python's ssl module,
    enough to say hello, subscribe and notify.
    """

    def __init__(self, port: int, client: Path) -> None:
        context = ssl.create_default_context(cafile=str(client / "ca.pem"))
        context.load_cert_chain(str(client / "cert.pem"), str(client / "key.pem"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.local_port = raw.getsockname()[1]
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self.call("hello", version=1)

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                msg = "The application server closed the connection."
                raise ConnectionError(msg)
            data += chunk
        return data

    def receive(self) -> dict[str, Any]:
        (length,) = struct.unpack("!I", self._read(4))
        message: dict[str, Any] = json.loads(self._read(length))
        return message

    def call(self, op: str, **args: Any) -> Any:
        self._id += 1
        payload = json.dumps({"id": self._id, "op": op, "args": args}).encode()
        self.sock.sendall(struct.pack("!I", len(payload)) + payload)
        while True:
            message = self.receive()
            if message.get("id") == self._id:
                if "error" in message:
                    raise AssertionError(message["error"])
                return message["result"]
            self.events.append(message)

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        return self.receive()

    def close(self) -> None:
        self.sock.close()


class WorkersEndToEndTests(unittest.TestCase):
    """
    ``twistd tls4d --workers 2``: two processes serve every listener.
    """

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("these tests read /proc")
        self.folder = support.temporary_folder("tls4d-workers-")
        self.root = self.folder / "root"
        self.server = Server(self.root, "--web", "--app", "--sql", "--workers", "2")
        self.addCleanup(self.server.stop)
        self.server.wait_for(r"All 2 processes serving")
        self.master = self.server.process.pid
        self.worker = int(self.server.wait_for(r"Worker 1 \(pid (\d+)\) serving")[1])
        self.pids = [self.master, self.worker]

    def spread(self, connect: Any) -> dict[int, list[Any]]:
        """
        Open connections with ``connect`` (a function of no argument
        returning a connection with a ``local_port``) until each process
        holds one, at most 40.

        Returns:
            The connections, by the process holding each.
        """
        held: dict[int, list[Any]] = {}
        for _ in range(40):
            connection = connect()
            self.addCleanup(connection.close)
            pid = _holder(connection.local_port, self.pids)
            self.assertIsNotNone(pid, "no server process holds the connection")
            assert pid is not None
            held.setdefault(pid, []).append(connection)
            if len(held) == len(self.pids):
                break
        self.assertEqual(sorted(held), sorted(self.pids))
        return held

    def test_both_processes_serve(self) -> None:
        """Application connections land in both processes, and each is served."""
        alice = _client_identity(self.root, "alice")
        port = self.server.port("Application server")
        held = self.spread(lambda: _AppSocket(port, alice))
        for connections in held.values():
            self.assertEqual(connections[0].call("ping"), "pong")
        self.assertRegex(self.server.log, r"\[worker 1 [^\]]*\] .*listening on")

    def test_notify_reaches_every_process(self) -> None:
        """
        A notification reaches the subscribers of both processes, and the
        answer counts them all.
        """
        alice = _client_identity(self.root, "alice")
        port = self.server.port("Application server")

        def subscriber() -> _AppSocket:
            connection = _AppSocket(port, alice)
            connection.call("subscribe", topic="stock")
            return connection

        held = self.spread(subscriber)
        subscribers = [c for connections in held.values() for c in connections]
        sender = _AppSocket(port, alice)
        self.addCleanup(sender.close)
        answer = sender.call("notify", topic="stock", data={"qty": 3})
        self.assertEqual(answer, {"delivered": len(subscribers)})
        for connection in subscribers:
            event = connection.next_event()
            self.assertEqual(event["event"], "notification")
            self.assertEqual(event["data"], {"qty": 3})

    def test_reload_reaches_every_process(self) -> None:
        """After tls4d reload, both processes serve the new certificate."""
        port = self.server.port("HTTPS web server")
        ca = root.load_local_ca(root.RootLayout(self.root))
        key = pki.generate_private_key()
        renewed = pki.issue_certificate(
            ca, key.public_key(), "renewed", server_names=["localhost"]
        )
        pki.write_private_key(self.root / "key.pem", key)
        pki.write_certificates(self.root / "cert.pem", [renewed])
        result = _tls4d("reload", "--root", str(self.root))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"1 server process(es) to reload: {self.master}", result.stdout)
        self.server.wait_for(r"Reload done: .* in all 2 processes")
        context = ssl.create_default_context(
            cafile=str(self.root / "Resources" / "ca.pem")
        )

        class Connection:
            def __init__(self) -> None:
                raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                self.local_port = raw.getsockname()[1]
                self.sock = context.wrap_socket(raw, server_hostname="localhost")

            def close(self) -> None:
                self.sock.close()

        held = self.spread(Connection)
        for connections in held.values():
            certificate = connections[0].sock.getpeercert()
            subject = dict(item[0] for item in certificate["subject"])
            self.assertEqual(subject["commonName"], "renewed")

    def test_concurrent_sql_writers(self) -> None:
        """Clients of both processes write the same SQLite database at once."""
        from twisted_tls4d.sql import dbapi

        alice = _client_identity(self.root, "alice")
        port = self.server.port("SQL server")
        setup = dbapi.connect("localhost", port, identity=alice)
        setup.cursor().execute("CREATE TABLE hits (who TEXT, n INTEGER)")
        setup.commit()
        setup.close()
        errors: list[BaseException] = []

        def writer(number: int) -> None:
            try:
                connection = dbapi.connect("localhost", port, identity=alice)
                cursor = connection.cursor()
                for n in range(25):
                    cursor.execute(
                        "INSERT INTO hits (who, n) VALUES (?, ?)", (f"w{number}", n)
                    )
                    connection.commit()
                connection.close()
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        self.assertEqual(errors, [])
        check = dbapi.connect("localhost", port, identity=alice)
        cursor = check.cursor()
        cursor.execute("SELECT COUNT(*) FROM hits")
        self.assertEqual(cursor.fetchone(), (150,))
        check.close()
        self.assertNotIn("database is locked", self.server.log)

    def test_stop_ends_workers(self) -> None:
        """Stopping twistd stops its worker too, and logs it."""
        self.server.stop()
        self.assertIn("Server Shut Down", self.server.log)
        self.assertTrue(_gone(self.worker))
        self.assertRegex(self.server.log, r"Worker 1 \(pid \d+\) stopped")
        self.assertFalse((self.root / "Run" / str(self.master)).exists())

    def test_master_killed(self) -> None:
        """When twistd is killed with SIGKILL, its worker notices and exits."""
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(DEADLINE)
        self.assertTrue(_wait_until_gone(self.worker))

    def test_dead_worker_restarted(self) -> None:
        """A worker killed from outside is logged and replaced by a new one."""
        os.kill(self.worker, signal.SIGKILL)
        self.server.wait_for(
            rf"Worker 1 \(pid {self.worker}\) ended unexpectedly \(killed by signal 9\)"
        )
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            serving = re.findall(r"Worker 1 \(pid (\d+)\) serving", self.server.log)
            if len(serving) > 1:
                break
            time.sleep(0.05)
        self.assertEqual(len(serving), 2, self.server.log)
        self.assertNotEqual(int(serving[1]), self.worker)
