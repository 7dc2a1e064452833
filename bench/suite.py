"""
The figures of issue 7, each measured on tls4d and its references in the
same run: alternating, several rounds, servers pinned to the server cores
and load generators to the client cores, server CPU time read from
``/proc`` over each measurement.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench import procstat, servers
from bench.report import Figure, Samples, Target

#: A client core busier than this over a measurement makes its figure
#: client-bound: the server could have done more.
CLIENT_BOUND = 0.9

#: Other work taking more than this share of the server's cores over a
#: measurement makes its figure noisy.
NOISY = 0.15


@attrs.define
class Settings:
    """What a run measures and how hard (the command line's options)."""

    rounds: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    server_cpus: str = "0"
    client_cpus: str = "1"
    handshake_concurrency: int = 16
    resumed_clients: int = 4
    keepalive_connections: int = 32
    pipelined_connections: int = 2
    pipeline_window: int = 32
    sequential_connections: int = 4
    sql_clients: tuple[int, ...] = (1, 8)
    idle_connections: int = 10_000
    idle_rounds: int = 1
    probes: int = 20
    only: tuple[str, ...] = ()
    tls4d_args: tuple[str, ...] = ()


def cpu_count(cpus: str) -> int:
    """
    Returns:
        How many cores a ``taskset -c`` list names (``"0"``, ``"0-3"``,
        ``"0,2"``); at least 1.
    """
    count = 0
    for part in filter(None, cpus.split(",")):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return max(count, 1)


@attrs.frozen
class Measurement:
    """One load run against one server.

    ``work`` counts what the figure counts (handshakes, requests, bytes);
    the CPU times are over the same ``seconds`` of wall-clock time.
    """

    work: float
    seconds: float
    server_cpu: float
    client_cpu: float
    client_cores: int
    note: str = ""
    other_cpu: float = 0.0

    @property
    def rate(self) -> float:
        """Work per wall-clock second."""
        return self.work / self.seconds if self.seconds else 0.0

    @property
    def per_server_cpu_second(self) -> float:
        """Work per second of server CPU time."""
        return self.work / self.server_cpu if self.server_cpu else 0.0

    @property
    def server_cpu_ms_each(self) -> float:
        """Server CPU milliseconds per unit of work."""
        return self.server_cpu * 1000 / self.work if self.work else float("inf")

    def server_busy(self, cores: int) -> float:
        """The share of ``cores`` server cores the server used."""
        return self.server_cpu / (self.seconds * cores) if self.seconds else 0.0

    def others_busy(self, cores: int) -> float:
        """The share of ``cores`` server cores other work (processes or
        the hypervisor) took meanwhile."""
        return self.other_cpu / (self.seconds * cores) if self.seconds else 0.0

    @property
    def client_busy(self) -> float:
        """The share of the client cores the load generator used."""
        if not self.seconds:
            return 0.0
        return self.client_cpu / (self.seconds * self.client_cores)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _raise_file_limit() -> None:
    """Let this process and its children hold tens of thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (262_144, 65_536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
            return
        except (ValueError, OSError):
            continue
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def last_json(text: str) -> dict[str, Any]:
    """
    Returns:
        The last line of ``text`` that is a JSON object, parsed.

    Raises:
        RuntimeError: There is none.
    """
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    msg = f"No JSON report in {text[-500:]!r}."
    raise RuntimeError(msg)


class Suite:
    """
    One run: its folder, the servers it started, the figures measured and
    the commands that reproduce each.
    """

    def __init__(
        self, settings: Settings, folder: Path, say: Callable[[str], None]
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.say = say
        self.figures: list[Figure] = []
        self.commands: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.negotiated: dict[str, str] = {}
        self.started: list[Any] = []
        self.tls4d: servers.Tls4d | None = None
        self.client_cores = cpu_count(settings.client_cpus)
        self.server_cores = cpu_count(settings.server_cpus)
        self.server_core_set = _cpu_set(settings.server_cpus) or set(
            range(os.cpu_count() or 1)
        )
        _raise_file_limit()
        # The harness itself runs beside the load generators, off the
        # server cores.
        if settings.client_cpus:
            os.sched_setaffinity(0, _cpu_set(settings.client_cpus))

    # -- the servers -------------------------------------------------------

    def start(self, server: Any) -> Any:
        """Remember ``server`` so that `stop_all` stops it; return it."""
        self.started.append(server)
        return server

    def stop(self, server: Any) -> None:
        """Stop one server started with `start`."""
        if server in self.started:
            self.started.remove(server)
        server.stop()

    def stop_all(self) -> None:
        """Stop every server still running."""
        while self.started:
            server = self.started.pop()
            try:
                server.stop()
            except Exception as e:  # noqa: BLE001 (stop the others anyway)
                self.say(f"Stopping {getattr(server, 'name', server)} failed: {e}")

    def main_tls4d(self) -> servers.Tls4d:
        """
        The tls4d of the throughput figures (web, application and SQL servers
        of one root, plain HTTP off), started on first use with a client
        identity ``bench`` and the static file in its WebFolder.
        """
        if self.tls4d is None:
            root = self.folder / "tls4d-root"
            self.tls4d = self.start(
                servers.Tls4d(
                    root,
                    self.settings.server_cpus,
                    "--web",
                    "--app",
                    "--sql",
                    "--no-http",
                    *self.settings.tls4d_args,
                )
            )
            for which in ("https", "app", "sql"):
                self.tls4d.port(which)
            servers.write_static(root / "WebFolder")
            servers.issue_client(root, "bench", self.folder / "bench-client")
        return self.tls4d

    @property
    def root(self) -> Path:
        """The main tls4d's root."""
        return self.main_tls4d().root

    @property
    def identity(self) -> Path:
        """The client identity folder (``key.pem``, ``cert.pem``, ``ca.pem``)."""
        self.main_tls4d()
        return self.folder / "bench-client"

    @property
    def web(self) -> Path:
        """The references' web folder, holding the same 1 KiB file."""
        folder = self.folder / "web"
        if not (folder / servers.STATIC_NAME).exists():
            servers.write_static(folder)
        return folder

    # -- measuring ---------------------------------------------------------

    def run_tools(
        self,
        server: Any,
        commands: Sequence[Sequence[str]],
        parse: Callable[[list[str]], tuple[float, str]],
        settle: float = 0.0,
    ) -> Measurement:
        """
        Run load programs side by side on the client cores, to their end.

        Args:
            server: What to read the CPU time of (``cpu_seconds()``).
            commands: One command a load process.
            parse: Their outputs to the work done and a note.
            settle: Seconds to wait after they end before reading the server's
                CPU time (a server still consuming what they sent).

        Returns:
            The measurement over the programs' run.
        """
        client = servers.pinned(self.settings.client_cpus)
        limit = self.settings.duration * 4 + 120
        before_server, before_client = server.cpu_seconds(), _children_cpu()
        before_cores = procstat.cores_busy_seconds(self.server_core_set)
        started = time.monotonic()
        running = [
            subprocess.Popen(
                [*client, *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
            for command in commands
        ]
        outputs = []
        for process in running:
            out, err = process.communicate(timeout=limit)
            if process.returncode != 0:
                msg = f"{shlex.join(process.args)} failed: {(err or out)[-800:]}"  # type: ignore[arg-type]
                raise RuntimeError(msg)
            outputs.append(out)
        seconds = time.monotonic() - started
        if settle:
            time.sleep(settle)
        server_cpu = server.cpu_seconds() - before_server
        cores = procstat.cores_busy_seconds(self.server_core_set) - before_cores
        work, note = parse(outputs)
        return Measurement(
            work,
            seconds,
            server_cpu,
            _children_cpu() - before_client,
            self.client_cores,
            note,
            max(0.0, cores - server_cpu),
        )

    def run_clients(
        self, server: Any, arguments: Sequence[Sequence[str]], duration: float
    ) -> Measurement:
        """
        Run the suite's own clients (`bench.clients`) side by side on the
        client cores; each connects, waits for a common start, and counts the
        work of ``duration`` seconds, over which the CPU times are read.

        Returns:
            The measurement over that window.
        """
        client = servers.pinned(self.settings.client_cpus)
        running = [
            subprocess.Popen(
                [
                    *client,
                    sys.executable,
                    "-m",
                    "bench.clients",
                    *argument,
                    "--duration",
                    repr(duration),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                env=servers.environment(),
            )
            for argument in arguments
        ]
        pids = [p.pid for p in running]

        def client_cpu() -> float:
            every = procstat.read_all()
            return sum(procstat.cpu_seconds(procstat.tree(p, every)) for p in pids)

        for process in running:
            assert process.stdout is not None and process.stdin is not None
            said = process.stdout.readline()
            if said.strip() != "ready":
                process.kill()
                _, err = process.communicate()
                msg = f"A bench.clients process did not get ready: {said}{err[-800:]}"
                raise RuntimeError(msg)
        start_at = time.time() + 0.2
        for process in running:
            # communicate() closes it after: the client reads one line only.
            process.stdin.write(f"{start_at!r}\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        time.sleep(max(0.0, start_at - time.time()))
        before_server, before_client = server.cpu_seconds(), client_cpu()
        before_cores = procstat.cores_busy_seconds(self.server_core_set)
        started = time.monotonic()
        time.sleep(duration)
        seconds = time.monotonic() - started
        server_cpu = server.cpu_seconds() - before_server
        cores = procstat.cores_busy_seconds(self.server_core_set) - before_cores
        used = client_cpu() - before_client
        reports = []
        for process in running:
            out, err = process.communicate(timeout=duration + 120)
            if process.returncode != 0:
                msg = (
                    f"bench.clients {' '.join(process.args[-8:])} failed: {err[-800:]}"  # type: ignore[index]
                )
                raise RuntimeError(msg)
            reports.append(last_json(out))
        late = sum(1 for r in reports if r.get("late"))
        note = f"{late} client(s) started late" if late else ""
        work = sum(float(r.get("requests", 0)) for r in reports)
        return Measurement(
            work,
            seconds,
            server_cpu,
            used,
            self.client_cores,
            note,
            max(0.0, cores - server_cpu),
        )

    def rounds(
        self, contenders: dict[str, Callable[[float], Measurement]]
    ) -> dict[str, list[Measurement]]:
        """
        Warm each contender up, then measure them alternately: each round
        runs them all, every other round in reverse order.

        Returns:
            Each contender's measurements, one a round.
        """
        names = list(contenders)
        if self.settings.warmup > 0:
            for name in names:
                contenders[name](self.settings.warmup)
        results: dict[str, list[Measurement]] = {name: [] for name in names}
        for index in range(self.settings.rounds):
            order = names if index % 2 == 0 else names[::-1]
            for name in order:
                measured = contenders[name](self.settings.duration)
                results[name].append(measured)
                self.say(
                    f"  round {index + 1} {name}: {measured.work:,.0f} in "
                    f"{measured.seconds:.2f} s, server CPU {measured.server_cpu:.2f} s "
                    f"({measured.server_busy(self.server_cores):.0%} of its cores, "
                    f"{measured.others_busy(self.server_cores):.0%} taken by other "
                    "work), "
                    f"client cores {measured.client_busy:.0%} busy"
                    + (f" ({measured.note})" if measured.note else "")
                )
        return results

    def figure(
        self,
        name: str,
        unit: str,
        higher_is_better: bool,
        results: dict[str, list[Measurement]],
        metric: Callable[[Measurement], float],
        target: Target | None = None,
        mine: str = "tls4d",
    ) -> Figure:
        """
        Make a figure of ``results`` (tls4d's under ``mine``, the others'
        as references) and add it to the run.
        """

        def samples(measured: list[Measurement]) -> Samples:
            notes = sorted({m.note for m in measured if m.note})
            bound = [m for m in measured if m.client_busy >= CLIENT_BOUND]
            if bound:
                notes.append(f"client-bound in {len(bound)}/{len(measured)} rounds")
            others = max(
                (m.others_busy(self.server_cores) for m in measured), default=0.0
            )
            if others > NOISY:
                notes.append(f"noisy: other work took up to {others:.0%} of its core")
            return Samples(tuple(metric(m) for m in measured), "; ".join(notes))

        made = Figure(
            name=name,
            unit=unit,
            higher_is_better=higher_is_better,
            tls4d=samples(results.get(mine, [])),
            references={k: samples(v) for k, v in results.items() if k != mine},
            target=target,
        )
        self.figures.append(made)
        return made

    def skip(
        self, name: str, unit: str, why: str, target: Target | None = None
    ) -> None:
        """Record a figure that could not be measured, and why."""
        self.say(f"Skipping {name}: {why}")
        self.figures.append(
            Figure(name, unit, True, Samples(), target=target, skipped=why)
        )

    def command(self, group: str, text: str) -> None:
        """Remember a command line that reproduces part of ``group``."""
        self.commands.setdefault(group, []).append(text)

    def probe_tls(self, name: str, port: int, identity: Path | None = None) -> None:
        """Record the TLS version, suite and group a server negotiates."""
        command = [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
        ]
        if identity is not None:
            command += [
                "-cert",
                str(identity / "cert.pem"),
                "-key",
                str(identity / "key.pem"),
            ]
        try:
            result = subprocess.run(
                command, input="", capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            self.negotiated[name] = f"not probed ({e})"
            return
        found = []
        for pattern in (
            r"New, (TLSv[\d.]+), Cipher is (\S+)",
            r"(?:Server|Peer) Temp Key: ([^\n]+)",
        ):
            match = re.search(pattern, result.stdout)
            if match:
                found.append(" ".join(match.groups()))
        self.negotiated[name] = ", ".join(found) or "not negotiated"


def _cpu_set(cpus: str) -> set[int]:
    chosen: set[int] = set()
    for part in filter(None, cpus.split(",")):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return chosen


def client_bound_text() -> str:
    """The notes' meaning, for the report."""
    return (
        f"[client-bound]: the load generator's cores were {CLIENT_BOUND:.0%} or more "
        "busy, so the rate is the client's limit; the server's CPU time per unit "
        "of work is still its own. [noisy]: other processes or the "
        f"hypervisor took more than {NOISY:.0%} of the server's core (from "
        "/proc/stat) in some round, so its rates are low; CPU time per unit of "
        "work suffers less (shared caches)."
    )


def ssl_get(port: int, path: str = "/", timeout: float = 5.0) -> bytes:
    """
    Returns:
        The answer of one HTTPS GET on 127.0.0.1:``port``, certificate not
        checked (the first answer of a root whose CA is not made yet).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close"
            tls.sendall(request.encode() + b"\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    return answer
