"""
A soak test of tls4d, bounded in time: start a real ``twistd -n tls4d --web
--app --sql`` on 127.0.0.1, keep many clients busy on all three servers at
once for ``--duration`` seconds, count every error, and sample the server's
resident memory (VmRSS of twistd and any child process, from ``/proc``)
every ``--interval`` seconds to tell whether it stays flat after warm-up.

Run it from the repository (or with tls4d installed)::

    PYTHONPATH=. python bench/soak.py --duration 120

The clients all run in this process, on one Twisted reactor:

- HTTPS: Twisted's ``Agent`` fetching a 64 KB page of the root's
  WebFolder; half the clients keep their connection alive, the other half
  make a new TLS handshake for each request;
- application server: the project's client (``twisted_tls4d.app.client``),
  calling ``ping``, ``echo``, ``whoami`` and ``sql`` (a count), on a new
  connection every 100 requests;
- SQL server: the project's client (``twisted_tls4d.sql.client``), inserting
  rows, reading them back, committing two-row transactions and deleting its
  rows now and then, on a new connection every 100 statements.

An error is any request that fails, times out (30 s) or gets an unexpected
answer, and any error, critical or traceback line in the server's log. The
memory verdict compares VmRSS at 25 % of the run with VmRSS at its end:
"flat" when it grew by no more than ``--max-growth`` percent. It also prints
VmRSS at 50 % and the least-squares trend after 25 %, in MB a minute, which
tell a warm-up that slows down from a steady climb.

It prints the memory series and a summary; with ``--json`` the last line is
the summary as JSON. Exit status: 0 without errors and with flat memory,
1 with errors, 2 without errors but with memory grown past ``--max-growth``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)

from twisted_tls4d import identity, root
from twisted_tls4d.app import client as app_client
from twisted_tls4d.sql import client as sql_client

#: Seconds a request may take before it counts as an error.
REQUEST_TIMEOUT = 30.0

#: Seconds the server has to start and to stop.
SERVER_DEADLINE = 60.0

#: Requests each application or SQL client makes on one connection.
REQUESTS_PER_CONNECTION = 100

#: Size of the page the HTTPS clients fetch.
PAGE_SIZE = 64 * 1024

#: The labels the servers log when they listen, by short name.
LISTENERS = {
    "https": "HTTPS web server",
    "app": "Application server",
    "sql": "SQL server",
}

#: Server log lines that count as errors.
_SERVER_ERROR = re.compile(r"#(error|critical)\]|Traceback|Unhandled")

#: Server log lines worth a look, though not errors.
_SERVER_WARNING = re.compile(r"#warn\]")


class _Body(Protocol):
    """Collects a response body; ``done`` fires with it once complete."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class Tally:
    """
    What the clients did: requests answered, connections made and errors,
    by server, with the first few error messages.
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []

    def error(self, server: str, problem: BaseException | str) -> None:
        """Count an error of ``server``, keeping its message if among the first."""
        self.errors[server] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{server}: {problem!r}")


class Soak:
    """
    One soak run: the server process, the clients and the memory samples.
    """

    def __init__(self, options: argparse.Namespace, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.tally = Tally()
        self.stopping = False
        self.samples: list[tuple[float, int]] = []
        self.started = 0.0
        self.folder = Path(
            options.folder or tempfile.mkdtemp(prefix="tls4d-soak-")
        ).resolve()
        self.layout = root.RootLayout(self.folder / "root")
        self.log_path = self.folder / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    # The server.

    def start_server(self) -> None:
        """
        Make the root (and the page and client identity the clients use),
        start twistd on it, and wait until the three servers listen.

        Raises:
            SystemExit: twistd ended or did not listen in time.
        """
        root.bootstrap(self.layout)
        (self.layout.web_folder / "soak.bin").write_bytes(os.urandom(PAGE_SIZE))
        self.client = identity.issue_client_identity(
            self.layout, "soak", self.folder / "soak-client"
        )
        beside = Path(sys.executable).parent / "twistd"
        twistd = str(beside) if beside.exists() else shutil.which("twistd")
        if twistd is None:
            raise SystemExit("soak: twistd is not installed")
        command = [
            twistd,
            "-n",
            "--pidfile=",
            "tls4d",
            "--web",
            "--app",
            "--sql",
            "--root",
            str(self.layout.path),
            "--interface",
            "127.0.0.1",
            *(f"--{name}-port=0" for name in ("https", "http", "app", "sql")),
            *self.options.server_option,
        ]
        # twistd -n logs to standard output; a file of its own, unlike
        # --logfile, is never rotated, so every line of the run stays.
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + SERVER_DEADLINE
        while time.monotonic() < end:
            log = self.server_log()
            for name, label in LISTENERS.items():
                found = re.search(
                    re.escape(label) + r" listening on 127\.0\.0\.1:(\d+)", log
                )
                if found:
                    self.ports[name] = int(found.group(1))
            if len(self.ports) == len(LISTENERS):
                return
            if self.process.poll() is not None:
                raise SystemExit(f"soak: twistd ended at start:\n{log}")
            time.sleep(0.1)
        self.stop_server()
        raise SystemExit(f"soak: twistd did not listen in time:\n{self.server_log()}")

    def server_log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_server(self) -> int | None:
        """
        Stop twistd with SIGTERM (SIGKILL if it lingers).

        Returns:
            Its exit status.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVER_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def rss_kb(self) -> int:
        """
        Returns:
            The resident memory of twistd and its descendants, in KiB.
        """
        assert self.process is not None
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: the fields
            # after its closing parenthesis are state, then the parent's id.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        tree = {self.process.pid}
        grew = True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in tree}
            grew = not more <= tree
            tree |= more
        total = 0
        for pid in tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            if found:
                total += int(found.group(1))
        return total

    def sample(self) -> None:
        """Note the server's resident memory now."""
        if self.process is not None and self.process.poll() is None:
            elapsed = self.reactor.seconds() - self.started
            self.samples.append((elapsed, self.rss_kb()))

    # The clients.

    async def timed(self, what: Awaitable[Any]) -> Any:
        """Wait for a request at most `REQUEST_TIMEOUT` seconds."""
        d = defer.ensureDeferred(what)  # type: ignore[arg-type]
        return await d.addTimeout(REQUEST_TIMEOUT, self.reactor)

    async def keep_going(
        self, server: str, one_round: Callable[[], Awaitable[None]]
    ) -> None:
        """
        Run ``one_round`` until the run ends, counting its errors and
        pausing a little after each one.
        """
        while not self.stopping:
            try:
                await one_round()
            except Exception as e:
                self.tally.error(server, e)
                await task.deferLater(self.reactor, 0.2)

    def https_client(self, persistent: bool) -> Callable[[], Awaitable[None]]:
        """
        Returns:
            A round of 20 GETs of the page, over one kept-alive connection
            if ``persistent``, else each over a new one.
        """
        pool = HTTPConnectionPool(self.reactor, persistent=persistent)
        pool.maxPersistentPerHost = 1
        trust = Certificate.loadPEM(self.layout.ca.read_bytes())
        agent = Agent(
            self.reactor,
            contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
            pool=pool,
        )
        url = f"https://127.0.0.1:{self.ports['https']}/soak.bin".encode("ascii")
        expected = (self.layout.web_folder / "soak.bin").read_bytes()

        async def get() -> None:
            response = await agent.request(b"GET", url)
            collector = _Body()
            response.deliverBody(collector)
            body = await collector.done
            if response.code != 200 or body != expected:
                self.tally.error(
                    "https", f"status {response.code}, {len(body)} bytes of body"
                )
            else:
                self.tally.requests["https"] += 1

        async def one_round() -> None:
            for _ in range(20):
                if self.stopping:
                    break
                await self.timed(get())
                if not persistent:
                    self.tally.connections["https"] += 1

        self.pools.append(pool)
        return one_round

    def app_client(self, number: int) -> Callable[[], Awaitable[None]]:
        """
        Returns:
            A round of `REQUESTS_PER_CONNECTION` requests on a new connection
            to the application server.
        """

        async def one_round() -> None:
            client = await self.timed(
                app_client.connect(
                    self.reactor,
                    "127.0.0.1",
                    self.ports["app"],
                    self.client,
                    agent="tls4d-soak",
                )
            )
            self.tally.connections["app"] += 1
            try:
                for i in range(REQUESTS_PER_CONNECTION):
                    if self.stopping:
                        break
                    kind = i % 4
                    if kind == 0:
                        answer = await self.timed(client.call("ping"))
                        good = answer == "pong"
                    elif kind == 1:
                        payload = {"client": number, "i": i, "text": "x" * 512}
                        answer = await self.timed(client.call("echo", **payload))
                        good = answer == payload
                    elif kind == 2:
                        answer = await self.timed(client.call("whoami"))
                        good = "soak" in json.dumps(answer)
                    else:
                        answer = await self.timed(
                            client.sql("SELECT count(*) FROM soak WHERE client = ?", i)
                        )
                        good = len(answer["rows"]) == 1
                    if good:
                        self.tally.requests["app"] += 1
                    else:
                        self.tally.error("app", f"unexpected answer {answer!r:.200}")
            finally:
                await self.timed(client.close())

        return one_round

    def sql_client(self, number: int) -> Callable[[], Awaitable[None]]:
        """
        Returns:
            A round of `REQUESTS_PER_CONNECTION` statements on a new
            connection to the SQL server.
        """

        async def one_round() -> None:
            client = await self.timed(
                sql_client.connect(
                    self.reactor, "127.0.0.1", self.ports["sql"], self.client
                )
            )
            self.tally.connections["sql"] += 1
            try:
                for i in range(REQUESTS_PER_CONNECTION):
                    if self.stopping:
                        break
                    await self.sql_statement(client, number, i)
            finally:
                await self.timed(client.close())

        return one_round

    async def sql_statement(self, client: Any, number: int, i: int) -> None:
        """Run statement ``i`` of SQL client ``number``'s cycle and check it."""
        kind = i % 10
        text = f"client {number} row {i} " + "y" * 200
        if kind < 5:
            result = await self.timed(
                client.execute(
                    "INSERT INTO soak (client, payload) VALUES (?, ?)", [number, text]
                )
            )
            good = result.changes == 1
        elif kind < 8:
            result = await self.timed(
                client.execute(
                    "SELECT id, payload FROM soak WHERE client = ? "
                    "ORDER BY id DESC LIMIT 20",
                    [number],
                )
            )
            mine = f"client {number} "
            good = all(str(row[1]).startswith(mine) for row in result.rows)
        elif kind == 8:
            await self.timed(client.execute("BEGIN"))
            for _ in range(2):
                await self.timed(
                    client.execute(
                        "INSERT INTO soak (client, payload) VALUES (?, ?)",
                        [number, text],
                    )
                )
            result = await self.timed(client.execute("COMMIT"))
            good = not result.in_transaction
        else:
            result = await self.timed(
                client.execute("DELETE FROM soak WHERE client = ?", [number])
            )
            good = result.changes is not None
        if good:
            self.tally.requests["sql"] += 1
        else:
            self.tally.error("sql", f"unexpected result of statement {i}")

    async def run(self) -> dict[str, Any]:
        """
        Run the clients for the duration while sampling memory.

        Returns:
            The summary.
        """
        options = self.options
        setup = await self.timed(
            sql_client.connect(
                self.reactor, "127.0.0.1", self.ports["sql"], self.client
            )
        )
        await self.timed(
            setup.execute(
                "CREATE TABLE IF NOT EXISTS soak "
                "(id INTEGER PRIMARY KEY, client INTEGER, payload TEXT)"
            )
        )
        await self.timed(setup.close())

        self.pools: list[HTTPConnectionPool] = []
        rounds: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        for n in range(options.clients):
            if "https" in options.servers:
                rounds.append(("https", self.https_client(persistent=n % 2 == 0)))
            if "app" in options.servers:
                rounds.append(("app", self.app_client(n)))
            if "sql" in options.servers:
                rounds.append(("sql", self.sql_client(n)))

        self.started = self.reactor.seconds()
        sampler = task.LoopingCall(self.sample)
        sampler.clock = self.reactor
        sampler.start(options.interval, now=True)
        loops = [
            defer.ensureDeferred(self.keep_going(server, one_round))
            for server, one_round in rounds
        ]
        await task.deferLater(self.reactor, options.duration)
        self.sample()
        self.stopping = True
        sampler.stop()
        stopped = defer.DeferredList(loops)
        try:
            await stopped.addTimeout(2 * REQUEST_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            self.tally.error("soak", "clients did not stop in time")
        for pool in self.pools:
            try:
                await self.timed(pool.closeCachedConnections())
            except Exception as e:
                self.tally.error("https", e)
        return self.summary(self.reactor.seconds() - self.started)

    def summary(self, elapsed: float) -> dict[str, Any]:
        """
        Returns:
            What the run did and found, as `report` prints it.
        """
        log = self.server_log().splitlines()
        server_errors = [line for line in log if _SERVER_ERROR.search(line)]
        server_warnings = [line for line in log if _SERVER_WARNING.search(line)]

        def at(fraction: float) -> tuple[float, int]:
            moment = self.options.duration * fraction
            return min(self.samples, key=lambda s: abs(s[0] - moment))

        quarter, half = at(0.25), at(0.5)
        last = self.samples[-1]
        growth = 100.0 * (last[1] - quarter[1]) / quarter[1]
        return {
            "duration": round(elapsed, 1),
            "clients": {
                server: self.options.clients if server in self.options.servers else 0
                for server in LISTENERS
            },
            "requests": dict(self.tally.requests),
            "connections": dict(self.tally.connections),
            "client_errors": dict(self.tally.errors),
            "server_log_errors": len(server_errors),
            "errors": sum(self.tally.errors.values()) + len(server_errors),
            "error_examples": self.tally.examples + server_errors[:10],
            "server_log_warnings": len(server_warnings),
            "warning_examples": server_warnings[:5],
            "rss_kb": [[round(t, 1), kb] for t, kb in self.samples],
            "rss_quarter_kb": quarter[1],
            "rss_half_kb": half[1],
            "rss_trend_kb_per_minute": round(_slope(self.samples, quarter[0]) * 60),
            "rss_end_kb": last[1],
            "rss_growth_percent": round(growth, 1),
            "memory_flat": growth <= self.options.max_growth,
        }


def _slope(samples: list[tuple[float, int]], after: float) -> float:
    """
    Returns:
        The least-squares slope of the samples taken from ``after`` seconds
        on, in KiB a second (0 with fewer than two).
    """
    points = [(t, kb) for t, kb in samples if t >= after]
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_kb = sum(kb for _, kb in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (kb - mean_kb) for t, kb in points) / spread


def report(summary: dict[str, Any], options: argparse.Namespace) -> None:
    """Print the memory series and the summary."""
    print("   t (s)   RSS (MB)")
    for t, kb in summary["rss_kb"]:
        print(f"{t:8.1f}   {kb / 1024:8.1f}")
    requests = summary["requests"]
    print(
        f"requests in {summary['duration']} s: "
        + ", ".join(
            f"{server} {requests.get(server, 0)} "
            f"({requests.get(server, 0) / summary['duration']:.0f}/s)"
            for server in LISTENERS
        )
    )
    connections = summary["connections"]
    print(
        "new connections: "
        + ", ".join(f"{s} {connections.get(s, 0)}" for s in LISTENERS)
    )
    print(
        f"errors: {summary['errors']} (clients: {summary['client_errors'] or 0}, "
        f"server log: {summary['server_log_errors']})"
    )
    for example in summary["error_examples"]:
        print(f"  {example}")
    print(f"server log warnings: {summary['server_log_warnings']}")
    for example in summary["warning_examples"]:
        print(f"  {example}")
    verdict = (
        "flat" if summary["memory_flat"] else f"GREW past {options.max_growth:g} %"
    )
    print(
        f"memory: RSS {summary['rss_quarter_kb'] / 1024:.1f} MB at 25 % of the run, "
        f"{summary['rss_half_kb'] / 1024:.1f} MB at 50 %, "
        f"{summary['rss_end_kb'] / 1024:.1f} MB at its end: "
        f"{summary['rss_growth_percent']:+.1f} % ({verdict}); trend after 25 %: "
        f"{summary['rss_trend_kb_per_minute'] / 1024:+.2f} MB/min"
    )
    if options.json:
        print(json.dumps(summary))


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line of the soak test."""
    parser = argparse.ArgumentParser(
        description=(
            "Soak tls4d: run many HTTPS, application and SQL clients at once "
            "against a real twistd for a while, count errors and watch memory."
        )
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load (default 60)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=10,
        help="concurrent clients on each of the three servers (default 10)",
    )
    parser.add_argument(
        "--servers",
        default="https,app,sql",
        type=lambda text: set(text.split(",")),
        help="the servers the clients use, of https, app and sql (default: all)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="seconds between memory samples (default 5)",
    )
    parser.add_argument(
        "--max-growth",
        type=float,
        default=5.0,
        help="percent of RSS growth from 25 %% of the run to its end still "
        "called flat (default 5)",
    )
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option added to twistd tls4d's, e.g. --server-option=--min-tls=1.3 "
        "(repeatable)",
    )
    parser.add_argument(
        "--folder",
        help="where the root, the client identity and twistd.log go (kept); "
        "default: a temporary folder, removed at the end",
    )
    parser.add_argument(
        "--json", action="store_true", help="end with the summary as one JSON line"
    )
    options = parser.parse_args(argv)
    if options.duration <= 0 or options.clients < 1 or options.interval <= 0:
        parser.error("--duration, --clients and --interval must be positive")
    if not options.servers or not options.servers <= set(LISTENERS):
        parser.error("--servers takes https, app and sql, separated by commas")
    return options


def main(argv: list[str] | None = None) -> int:
    """
    Run the soak test.

    Returns:
        0 without errors and with flat memory, 1 with errors, 2 with memory
        grown past ``--max-growth``.
    """
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor

    soak = Soak(options, reactor)
    outcome: dict[str, Any] = {}
    try:
        soak.start_server()
        print(
            f"soak: twistd (pid {soak.process.pid if soak.process else '?'}) on "
            f"127.0.0.1, HTTPS :{soak.ports['https']}, application "
            f":{soak.ports['app']}, SQL :{soak.ports['sql']}; {options.clients} "
            f"clients on each for {options.duration:g} s",
            flush=True,
        )

        async def go(_: Any) -> None:
            outcome.update(await soak.run())

        task.react(lambda r: defer.ensureDeferred(go(r)), [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        soak.stop_server()
        if options.folder is None:
            shutil.rmtree(soak.folder, ignore_errors=True)
    if not outcome:
        print("soak: the run did not finish", file=sys.stderr)
        return 1
    report(outcome, options)
    if outcome["errors"]:
        return 1
    return 0 if outcome["memory_flat"] else 2


if __name__ == "__main__":
    sys.exit(main())
