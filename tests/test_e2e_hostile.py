"""
End-to-end tests of the guard against slow and hostile peers: the real
``twistd -n tls4d`` on loopback, a thousand connections that never start
TLS from other loopback addresses, and a client that never reads, while
real clients (curl and the project's own) go on being served.
"""

from __future__ import annotations

import json
import re
import resource
import select
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial import unittest

from tests import support
from tests.test_e2e import DEADLINE, Server, _run, _tls4d

#: The loopback addresses the hostile connections come from; the real
#: clients use 127.0.0.1.
HOSTILE_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

#: How many connections that never start TLS are opened, over all listeners.
HOSTILE_CONNECTIONS = 1000

#: The server's default for --max-connections-per-peer.
PER_PEER = 32

#: The listeners, by the label their log lines start with, and how each logs
#: the close of a connection that never handshakes.
LISTENERS = {
    "HTTPS web server": r"HTTPS web server: closing {host}:\d+: no TLS handshake",
    "HTTP web server": r"Timing out client: IPv4Address\(type='TCP', host='{host}'",
    "Application server": (
        r"application server: closing {host}:\d+: TLS handshake timeout"
    ),
    "SQL server": r"SQL server: closing {host}:\d+: TLS handshake timeout",
}

#: Seconds a hostile connection is left open by the TLS listeners, and by
#: plain HTTP (later, so that the HTTPS listener's own idle timer, which
#: runs during the handshake too, does not close them first).
HANDSHAKE_TIMEOUT = 8
WEB_IDLE_TIMEOUT = 10


def _raise_open_files(case: unittest.TestCase, wanted: int) -> None:
    """
    Raise this process's soft limit on open files to ``wanted`` (the server
    started afterwards inherits it), and restore it after the test.

    Raises:
        SkipTest: The hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        msg = f"the hard limit on open files ({hard}) is below {wanted}"
        raise unittest.SkipTest(msg)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    case.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


def _check_sources() -> None:
    for host in HOSTILE_SOURCES:
        try:
            with socket.socket() as probe:
                probe.bind((host, 0))
        except OSError as e:
            msg = f"cannot bind {host} ({e}): loopback is not 127.0.0.0/8 here"
            raise unittest.SkipTest(msg) from e


def _open_hostile(ports: dict[str, int]) -> dict[tuple[str, str], list[socket.socket]]:
    """
    Open `HOSTILE_CONNECTIONS` TCP connections that send nothing, spread over
    the listeners and the hostile source addresses in turn.

    Returns:
        The sockets, by listener label and source address.
    """
    opened: dict[tuple[str, str], list[socket.socket]] = {}
    labels = list(ports)
    for number in range(HOSTILE_CONNECTIONS):
        label = labels[number % len(labels)]
        source = HOSTILE_SOURCES[(number // len(labels)) % len(HOSTILE_SOURCES)]
        connection = socket.socket()
        connection.settimeout(DEADLINE)
        connection.bind((source, 0))
        connection.connect(("127.0.0.1", ports[label]))
        opened.setdefault((label, source), []).append(connection)
    return opened


def _all_closed(sockets: list[socket.socket], deadline: float) -> bool:
    """
    Wait until the server closed every socket (end of file or reset).

    Returns:
        Whether all were closed within ``deadline`` seconds.
    """
    waiting = {connection.fileno(): connection for connection in sockets}
    poll = select.poll()
    for number in waiting:
        poll.register(number, select.POLLIN)
    end = time.monotonic() + deadline
    while waiting and time.monotonic() < end:
        for number, _ in poll.poll(500):
            try:
                data = waiting[number].recv(1024)
            except OSError:
                data = b""
            if not data:
                poll.unregister(number)
                del waiting[number]
    return not waiting


def _in_threads(*calls: Callable[[], object]) -> list[object]:
    """
    Returns:
        What each call returned, the calls run at once in threads.
    """
    results: list[object] = [None] * len(calls)

    def run(index: int, call: Callable[[], object]) -> None:
        try:
            results[index] = call()
        except Exception as e:
            results[index] = e

    threads = [
        threading.Thread(target=run, args=(index, call))
        for index, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE * 2)
    return results


class _ServerCase(unittest.TestCase):
    """
    A twistd running the three servers of a new root, and alice's identity.
    """

    arguments: tuple[str, ...] = ()

    def setUp(self) -> None:
        for tool in ("curl", "openssl"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        _check_sources()
        _raise_open_files(self, HOSTILE_CONNECTIONS + 1024)
        self.folder = support.temporary_folder("tls4d-e2e-hostile-")
        self.root = self.folder / "root"
        self.server = Server(self.root, "--web", "--app", "--sql", *self.arguments)
        self.addCleanup(self.server.stop)
        self.ports = {label: self.server.port(label) for label in LISTENERS}
        made = _tls4d(
            "client", "alice", "--root", str(self.root), "--out", str(self.alice)
        )
        self.assertEqual(made.returncode, 0, made.stderr)

    @property
    def alice(self) -> Path:
        return self.folder / "alice"

    def real_clients(self) -> list[object]:
        """
        Run a real client against each listener at once.

        Returns:
            Each client's completed process (or the exception it raised).
        """
        ca = str(self.root / "Resources" / "ca.pem")
        identity = str(self.alice)
        return _in_threads(
            lambda: _run(
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                str(DEADLINE),
                "--cacert",
                ca,
                f"https://localhost:{self.ports['HTTPS web server']}/",
            ),
            lambda: _run(
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                str(DEADLINE),
                f"http://localhost:{self.ports['HTTP web server']}/",
            ),
            lambda: _tls4d(
                "app",
                "--identity",
                identity,
                "--port",
                str(self.ports["Application server"]),
                "ping",
            ),
            lambda: _tls4d(
                "sql",
                "--identity",
                identity,
                "--port",
                str(self.ports["SQL server"]),
                "-e",
                "SELECT 6 * 7 AS answer",
            ),
        )

    def assert_served(self, results: list[object]) -> None:
        """
        Check that every real client of `real_clients` got its answer.
        """
        https, plain, app, sql = results
        for result in results:
            self.assertNotIsInstance(result, Exception)
            self.assertEqual(result.returncode, 0, result)  # type: ignore[attr-defined]
        self.assertIn("tls4d is serving this root", https.stdout)  # type: ignore[attr-defined]
        self.assertIn("tls4d is serving this root", plain.stdout)  # type: ignore[attr-defined]
        self.assertEqual(json.loads(app.stdout), "pong")  # type: ignore[attr-defined]
        self.assertRegex(sql.stdout, r"answer[\s\S]*42")  # type: ignore[attr-defined]


class HalfOpenTests(_ServerCase):
    """
    A thousand connections that never start TLS, from three addresses, do
    not keep real clients from being served; the per-peer limit refuses most
    of them, logged once per address, and the rest are closed after the
    handshake (or idle) timeout.
    """

    # One process: the limits count in each process (--workers).
    arguments = (
        "--workers",
        "1",
        "--handshake-timeout",
        str(HANDSHAKE_TIMEOUT),
        "--web-idle-timeout",
        str(WEB_IDLE_TIMEOUT),
    )

    def test_thousand_half_open(self) -> None:
        """Real clients are served among 1000 silent connections, which all close."""
        started = time.monotonic()
        hostile = _open_hostile(self.ports)
        self.addCleanup(
            lambda: [c.close() for group in hostile.values() for c in group]
        )
        results = self.real_clients()
        timed_out_early = any(
            re.search(pattern.format(host=re.escape(host)), self.server.log)
            for pattern in LISTENERS.values()
            for host in HOSTILE_SOURCES
        )
        if timed_out_early:
            raise unittest.SkipTest(
                "the real clients took longer than the handshake timeout, so "
                "the silent connections were gone before they were answered"
            )
        self.assert_served(results)

        everything = [c for group in hostile.values() for c in group]
        self.assertTrue(
            _all_closed(everything, WEB_IDLE_TIMEOUT + DEADLINE),
            "the server left silent connections open past the timeouts",
        )
        # The server logs each close as it makes it; the lines may reach
        # the log a moment after the client saw the close.
        patterns = [
            LISTENERS[label].format(host=re.escape(host)) for label, host in hostile
        ]
        give_up = time.monotonic() + DEADLINE
        while time.monotonic() < give_up and any(
            len(re.findall(pattern, self.server.log)) < PER_PEER for pattern in patterns
        ):
            time.sleep(0.2)
        log = self.server.log
        minutes = (time.monotonic() - started) // 60
        for (label, host), group in sorted(hostile.items()):
            self.assertGreater(len(group), PER_PEER)
            pattern = LISTENERS[label].format(host=re.escape(host))
            self.assertEqual(
                len(re.findall(pattern, log)), PER_PEER, (label, host, log[-3000:])
            )
            where = f"{re.escape(label)}: refused"
            first = re.findall(rf"{where} a connection from {re.escape(host)}:", log)
            counted = re.findall(
                rf"{where} \d+ more connection\(s\) from {re.escape(host)} ", log
            )
            self.assertEqual(len(first), 1, (label, host))
            self.assertLessEqual(len(counted), minutes, (label, host))

        # Served afterwards too.
        self.assert_served(self.real_clients())


class NeverReadingTests(_ServerCase):
    """
    A client that sends many requests and never reads the answers is cut
    off once they pile up past --max-unsent, and the server serves others.
    """

    arguments = ("--workers", "1", "--max-unsent", "1000000")

    def test_never_reading_sql_client(self) -> None:
        """An SQL client that never reads is cut off; others are served meanwhile."""
        context = ssl.create_default_context(
            cafile=str(self.root / "Resources" / "ca.pem")
        )
        context.load_cert_chain(self.alice / "cert.pem", self.alice / "key.pem")
        raw = socket.create_connection(
            ("127.0.0.1", self.ports["SQL server"]), timeout=DEADLINE
        )
        connection = context.wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(connection.close)
        request = json.dumps({"sql": "SELECT zeroblob(200000)"}).encode() + b"\n"
        connection.sendall(request * 200)

        self.server.wait_for(
            r"SQL server: cut off 127\.0\.0\.1:\d+: more than 1000000 bytes "
            r"waited unread for it \(--max-unsent sets the limit\)"
        )
        self.assert_served(self.real_clients())
        received = 0
        connection.settimeout(DEADLINE)
        try:
            while chunk := connection.recv(65536):
                received += len(chunk)
        except (OSError, ssl.SSLError):
            pass
        # 200 answers of 267 kB each were asked for; far fewer came.
        self.assertLess(received, 20 * 1000 * 1000)
