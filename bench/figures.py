"""
Each figure of issue 7's table: which servers it compares, the load that
drives them, and what it divides by what.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable

from bench import clients, servers, tools
from bench.report import Target
from bench.suite import Measurement, Suite, last_json, ssl_get


def _needs(
    suite: Suite,
    names: list[str],
    figure: str,
    unit: str,
    target: Target | None = None,
) -> bool:
    """
    Returns:
        Whether the tools ``names`` are all installed; if not, the figure is
        recorded as skipped, naming what is missing.
    """
    absent = tools.missing(names)
    if absent:
        suite.skip(
            figure,
            unit,
            "missing " + ", ".join(f"{t.name} (Debian: {t.package})" for t in absent),
            target,
        )
        return False
    return True


# -- full and resumed handshakes -------------------------------------------


def _ab_parse(outputs: list[str]) -> tuple[float, str]:
    done = failed = 0
    for out in outputs:
        found = re.search(r"Complete requests:\s+(\d+)", out)
        if not found:
            msg = f"ab printed no 'Complete requests': {out[-500:]}"
            raise RuntimeError(msg)
        done += int(found.group(1))
        bad = re.search(r"Failed requests:\s+(\d+)", out)
        failed += int(bad.group(1)) if bad else 0
        non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
        failed += int(non2xx.group(1)) if non2xx else 0
    return done - failed, f"{failed} failed" if failed else ""


def full_handshakes(suite: Suite) -> None:
    """
    Full TLS handshakes (ECDSA P-256, no resumption): ``ab`` without
    keep-alive opens a new connection for each request of the 1 KiB file and
    never resumes a session; tls4d's HTTPS listener against ``openssl
    s_server -WWW``, nginx and stock ``twistd web``, all with tls4d's key.
    """
    name = "full TLS handshakes (ECDSA P-256, new connection each)"
    target = Target("≤ 1.0 ms server CPU each", at_most=1.0)
    if not _needs(suite, ["ab"], name, "server CPU ms each", target):
        return
    tls4d = suite.main_tls4d()
    key, chain = suite.root / "key.pem", suite.root / "cert.pem"
    contenders: dict[str, tuple[object, int]] = {"tls4d": (tls4d, tls4d.port("https"))}
    if not tools.missing(["openssl"]):
        s_server = suite.start(
            servers.OpenSSLServer(key, chain, suite.settings.server_cpus, suite.web)
        )
        contenders["openssl s_server"] = (s_server, s_server.port)
    if not tools.missing(["nginx"]):
        nginx = suite.start(
            servers.Nginx(
                suite.folder / "nginx",
                key,
                chain,
                suite.web,
                suite.settings.server_cpus,
            )
        )
        contenders["nginx"] = (nginx, nginx.port)
    twistd_web = suite.start(
        servers.TwistdWeb(
            suite.folder / "twistd-web",
            key,
            chain,
            suite.web,
            suite.settings.server_cpus,
        )
    )
    contenders["stock twistd web"] = (twistd_web, twistd_web.port)
    for label, (_, port) in contenders.items():
        suite.probe_tls(label, port)

    concurrency = suite.settings.handshake_concurrency

    def ab(server: object, port: int) -> Callable[[float], Measurement]:
        def run(duration: float) -> Measurement:
            command = [
                "ab", "-q", "-r", "-t", f"{duration:g}", "-n", "100000000",
                "-c", str(concurrency), f"https://127.0.0.1:{port}/{servers.STATIC_NAME}",
            ]  # fmt: skip
            return suite.run_tools(server, [command], _ab_parse)

        return run

    suite.command(
        name,
        f"ab -q -r -t {suite.settings.duration:g} -n 100000000 -c {concurrency} "
        f"https://127.0.0.1:PORT/{servers.STATIC_NAME}",
    )
    suite.say(f"{name}:")
    results = suite.rounds({k: ab(*v) for k, v in contenders.items()})
    suite.figure(
        "full handshakes: server CPU each",
        "ms",
        False,
        results,
        lambda m: m.server_cpu_ms_each,
        target,
    )
    suite.figure(
        "full handshakes: rate", "handshakes/s", True, results, lambda m: m.rate
    )
    for server, _ in contenders.values():
        if server is not tls4d:
            suite.stop(server)


def _s_time_parse(outputs: list[str]) -> tuple[float, str]:
    total = resumed = new = 0
    for out in outputs:
        found = re.search(r"(\d+) connections in [\d.]+ real seconds", out)
        if not found:
            msg = f"s_time printed no connection count: {out[-500:]}"
            raise RuntimeError(msg)
        total += int(found.group(1))
        # s_time prints "*" for each new session and "r" for each resumed
        # one, on lines of their own.
        for line in out.splitlines():
            if line and set(line) <= {"*", "r"}:
                resumed += line.count("r")
                new += line.count("*")
    share = resumed / (resumed + new) if resumed + new else 0.0
    return total, "" if share >= 0.95 else f"only {share:.0%} resumed"


def resumed_handshakes(suite: Suite) -> None:
    """
    Resumed handshakes: several ``openssl s_time -reuse`` side by side, each
    resuming its session for every new connection and fetching the 1 KiB
    file over it; tls4d's HTTPS listener against nginx with session tickets
    and a shared session cache.
    """
    name = "resumed TLS handshakes"
    target = Target("≤ 0.5 ms server CPU each", at_most=0.5)
    if not _needs(suite, ["openssl"], name, "server CPU ms each", target):
        return
    tls4d = suite.main_tls4d()
    contenders: dict[str, tuple[object, int]] = {"tls4d": (tls4d, tls4d.port("https"))}
    if not tools.missing(["nginx"]):
        nginx = suite.start(
            servers.Nginx(
                suite.folder / "nginx-resume",
                suite.root / "key.pem",
                suite.root / "cert.pem",
                suite.web,
                suite.settings.server_cpus,
                resumption=True,
            )
        )
        contenders["nginx (tickets, session cache)"] = (nginx, nginx.port)
    count = suite.settings.resumed_clients

    def s_time(server: object, port: int) -> Callable[[float], Measurement]:
        def run(duration: float) -> Measurement:
            command = [
                "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse",
                "-time", str(max(1, round(duration))),
                "-www", f"/{servers.STATIC_NAME}",
            ]  # fmt: skip
            return suite.run_tools(server, [command] * count, _s_time_parse)

        return run

    suite.command(
        name,
        f"{count} × openssl s_time -connect 127.0.0.1:PORT -reuse -time "
        f"{round(suite.settings.duration)} -www /{servers.STATIC_NAME}",
    )
    suite.say(f"{name}:")
    results = suite.rounds({k: s_time(*v) for k, v in contenders.items()})
    suite.figure(
        "resumed handshakes: server CPU each",
        "ms",
        False,
        results,
        lambda m: m.server_cpu_ms_each,
        target,
    )
    suite.figure(
        "resumed handshakes: rate", "handshakes/s", True, results, lambda m: m.rate
    )
    for server, _ in contenders.values():
        if server is not tls4d:
            suite.stop(server)


# -- HTTPS keep-alive ------------------------------------------------------


def _wrk_parse(outputs: list[str]) -> tuple[float, str]:
    out = outputs[0]
    found = re.search(r"(\d+) requests in", out)
    if not found:
        msg = f"wrk printed no request count: {out[-500:]}"
        raise RuntimeError(msg)
    notes = []
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        notes.append(f"{bad.group(1)} non-2xx")
    errors = re.search(r"Socket errors: ([^\n]+)", out)
    if errors:
        notes.append(f"socket errors {errors.group(1)}")
    done = int(found.group(1)) - (int(bad.group(1)) if bad else 0)
    return done, "; ".join(notes)


def keepalive(suite: Suite) -> None:
    """
    HTTPS keep-alive: ``wrk`` with 32 connections asking for the 1 KiB file
    again and again; tls4d against stock ``twistd web`` and nginx.
    """
    name = "HTTPS keep-alive, 1 KiB file, 32 connections"
    target = Target(
        "≥ 1.5× stock twistd web", ratio_at_least=1.5, reference="stock twistd web"
    )
    if not _needs(suite, ["wrk"], name, "requests per server CPU-second", target):
        return
    tls4d = suite.main_tls4d()
    key, chain = suite.root / "key.pem", suite.root / "cert.pem"
    contenders: dict[str, tuple[object, int]] = {"tls4d": (tls4d, tls4d.port("https"))}
    twistd_web = suite.start(
        servers.TwistdWeb(
            suite.folder / "twistd-web-ka",
            key,
            chain,
            suite.web,
            suite.settings.server_cpus,
        )
    )
    contenders["stock twistd web"] = (twistd_web, twistd_web.port)
    if not tools.missing(["nginx"]):
        nginx = suite.start(
            servers.Nginx(
                suite.folder / "nginx-ka",
                key,
                chain,
                suite.web,
                suite.settings.server_cpus,
            )
        )
        contenders["nginx"] = (nginx, nginx.port)
    connections = suite.settings.keepalive_connections

    def wrk(server: object, port: int) -> Callable[[float], Measurement]:
        def run(duration: float) -> Measurement:
            command = [
                "wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s",
                f"https://127.0.0.1:{port}/{servers.STATIC_NAME}",
            ]  # fmt: skip
            return suite.run_tools(server, [command], _wrk_parse)

        return run

    suite.command(
        name,
        f"wrk -t 1 -c {connections} -d {suite.settings.duration:g}s "
        f"https://127.0.0.1:PORT/{servers.STATIC_NAME}",
    )
    suite.say(f"{name}:")
    results = suite.rounds({k: wrk(*v) for k, v in contenders.items()})
    suite.figure(
        "HTTPS keep-alive 1 KiB, 32 connections: requests per server CPU-second",
        "requests/CPU-s",
        True,
        results,
        lambda m: m.per_server_cpu_second,
        target,
    )
    suite.figure(
        "HTTPS keep-alive 1 KiB, 32 connections: rate",
        "requests/s",
        True,
        results,
        lambda m: m.rate,
    )
    for server, _ in contenders.values():
        if server is not tls4d:
            suite.stop(server)


# -- the application protocol ----------------------------------------------


def application(suite: Suite) -> None:
    """
    The application protocol: small ``echo`` requests pipelined (a window of
    32 on each of 2 connections) and one at a time (4 connections), and bulk
    1 MiB frames; tls4d's application server against a bare Twisted
    ``Int32StringReceiver`` echo over the same mutual TLS, and for bulk
    ``openssl s_server`` receiving from ``s_client`` too.
    """
    tls4d = suite.main_tls4d()
    resources = suite.root / "Resources"
    echo = suite.start(
        servers.EchoServer(
            resources / "key.pem",
            resources / "cert.pem",
            resources / "ca.pem",
            suite.settings.server_cpus,
        )
    )
    suite.probe_tls("tls4d application server", tls4d.port("app"), suite.identity)
    suite.probe_tls("Twisted echo", echo.port, suite.identity)
    identity = [
        "--identity", str(suite.identity), "--ca", str(suite.identity / "ca.pem"),
    ]  # fmt: skip
    contenders = {
        "tls4d": (tls4d, tls4d.port("app")),
        "bare Twisted echo": (echo, echo.port),
    }
    settings = suite.settings

    def app(
        kind: str, connections: int, window: int
    ) -> Callable[[object, int], Callable[[float], Measurement]]:
        def make(server: object, port: int) -> Callable[[float], Measurement]:
            def run(duration: float) -> Measurement:
                arguments = [
                    kind,
                    "--port",
                    str(port),
                    "--window",
                    str(window),
                    *identity,
                ]
                return suite.run_clients(server, [arguments] * connections, duration)

            return run

        return make

    cases = [
        (
            "pipelined",
            "small",
            settings.pipelined_connections,
            settings.pipeline_window,
        ),
        ("one at a time", "small", settings.sequential_connections, 1),
    ]
    for label, kind, connections, window in cases:
        name = f"application protocol, small requests {label}"
        suite.command(
            name,
            f"{connections} × python -m bench.clients {kind} --port PORT --window "
            f"{window} --identity DIR --ca DIR/ca.pem --duration {settings.duration:g}",
        )
        suite.say(f"{name}:")
        make = app(kind, connections, window)
        results = suite.rounds({k: make(*v) for k, v in contenders.items()})
        suite.figure(
            f"app protocol, small requests {label}: requests per server CPU-second",
            "requests/CPU-s",
            True,
            results,
            lambda m: m.per_server_cpu_second,
            Target(
                "≥ 0.8× the bare echo",
                ratio_at_least=0.8,
                reference="bare Twisted echo",
            ),
        )
        suite.figure(
            f"app protocol, small requests {label}: rate",
            "requests/s",
            True,
            results,
            lambda m: m.rate,
        )

    # Bulk: 1 MiB frames, eight in flight (with fewer both sides wait on
    # each other); MB counts what the client sent and got back whole (each
    # byte crosses the server's TLS twice); s_server only receives.
    name = "application protocol, bulk 1 MiB frames"
    megabytes = clients.BULK_SIZE / 1e6

    def bulk(server: object, port: int) -> Callable[[float], Measurement]:
        def run(duration: float) -> Measurement:
            arguments = ["bulk", "--port", str(port), "--window", "8", *identity]
            measured = suite.run_clients(server, [arguments], duration)
            return _scaled(measured, megabytes)

        return run

    bulk_contenders = {k: bulk(*v) for k, v in contenders.items()}
    s_server = None
    if not tools.missing(["openssl"]):
        s_server = suite.start(
            servers.OpenSSLServer(
                suite.root / "key.pem",
                suite.root / "cert.pem",
                settings.server_cpus,
                None,
            )
        )
        bulk_contenders["openssl s_server ← s_client"] = _openssl_bulk(suite, s_server)
    suite.command(
        name,
        "python -m bench.clients bulk --port PORT --window 8 --identity DIR --ca "
        "DIR/ca.pem; head -c BYTES /dev/zero | openssl s_client -connect "
        "127.0.0.1:PORT -nocommands (s_server without -WWW, output to /dev/null)",
    )
    suite.say(f"{name}:")
    results = suite.rounds(bulk_contenders)
    suite.figure(
        "app protocol, bulk 1 MiB frames: MB/s sent and echoed (s_server: received)",
        "MB/s",
        True,
        results,
        lambda m: m.rate,
        Target(
            "≥ 0.5× openssl",
            ratio_at_least=0.5,
            reference="openssl s_server ← s_client",
        ),
    )
    suite.figure(
        "app protocol, bulk 1 MiB frames: MB per server CPU-second",
        "MB/CPU-s",
        True,
        results,
        lambda m: m.per_server_cpu_second,
    )
    suite.stop(echo)
    if s_server is not None:
        suite.stop(s_server)


def _scaled(measured: Measurement, factor: float) -> Measurement:
    return Measurement(
        measured.work * factor,
        measured.seconds,
        measured.server_cpu,
        measured.client_cpu,
        measured.client_cores,
        measured.note,
    )


def _openssl_bulk(
    suite: Suite, s_server: servers.OpenSSLServer
) -> Callable[[float], Measurement]:
    # Calibrated on the first (warm-up) run: about `duration` seconds of data.
    rate = {"bytes_per_second": 200e6}

    def run(duration: float) -> Measurement:
        size = int(rate["bytes_per_second"] * duration)
        command = [
            "sh", "-c",
            f"head -c {size} /dev/zero | openssl s_client "
            f"-connect 127.0.0.1:{s_server.port} "
            "-servername localhost -nocommands >/dev/null 2>&1",
        ]  # fmt: skip
        measured = suite.run_tools(
            s_server, [command], lambda _: (size / 1e6, ""), settle=0.3
        )
        rate["bytes_per_second"] = max(10e6, size / max(measured.seconds, 0.05))
        return measured

    return run


# -- SQL -------------------------------------------------------------------


def sql(suite: Suite) -> None:
    """
    SQL point selects, 1 and 8 clients each sending one select at a time:
    tls4d's SQL server (its SQLite database, a table like pgbench's accounts
    at scale 1) against PostgreSQL's ``pgbench -S`` with ``sslmode=require``
    on a throwaway cluster with tls4d's key.
    """
    target = Target(
        "≥ 0.5× PostgreSQL", ratio_at_least=0.5, reference="PostgreSQL pgbench -S"
    )
    tls4d = suite.main_tls4d()
    clients.sql_statement(
        tls4d.port("sql"), suite.identity, suite.identity / "ca.pem", clients.SQL_SETUP
    )
    postgres = None
    if tools.missing(["postgres", "pgbench"]):
        suite.notes.append(
            "PostgreSQL or pgbench is missing: the SQL figures have no reference."
        )
    else:
        try:
            postgres = suite.start(
                servers.Postgres(
                    suite.folder / "postgres",
                    suite.root / "key.pem",
                    suite.root / "cert.pem",
                    suite.settings.server_cpus,
                )
            )
        except RuntimeError as e:
            suite.notes.append(
                f"PostgreSQL could not start, the SQL figures have no reference: {e}"
            )
    identity = [
        "--identity", str(suite.identity), "--ca", str(suite.identity / "ca.pem"),
    ]  # fmt: skip

    for count in suite.settings.sql_clients:
        name = f"SQL point selects, {count} client{'s' if count > 1 else ''}"

        def ours(duration: float, count: int = count) -> Measurement:
            arguments = [
                ["sql", "--port", str(tls4d.port("sql")), "--seed", str(i), *identity]
                for i in range(count)
            ]
            return suite.run_clients(tls4d, arguments, duration)

        contenders: dict[str, Callable[[float], Measurement]] = {"tls4d": ours}
        if postgres is not None:

            def theirs(duration: float, count: int = count) -> Measurement:
                command = [
                    str(postgres.binaries / "pgbench"), "-S", "-n", "-c", str(count),
                    "-j", str(count), "-T", str(max(1, round(duration))),
                    postgres.dsn(),
                ]  # fmt: skip
                return suite.run_tools(postgres, [command], _pgbench_parse)

            contenders["PostgreSQL pgbench -S"] = theirs
        suite.command(
            name,
            f"{count} × python -m bench.clients sql --port PORT --identity DIR --ca "
            f"DIR/ca.pem; pgbench -S -n -c {count} -j {count} -T "
            f"{round(suite.settings.duration)} 'host=127.0.0.1 port=PORT user=postgres "
            "dbname=postgres sslmode=require'",
        )
        suite.say(f"{name}:")
        results = suite.rounds(contenders)
        suite.figure(
            f"{name}: rate", "selects/s", True, results, lambda m: m.rate, target
        )
        suite.figure(
            f"{name}: selects per server CPU-second",
            "selects/CPU-s",
            True,
            results,
            lambda m: m.per_server_cpu_second,
        )
    if postgres is not None:
        suite.stop(postgres)


def _pgbench_parse(outputs: list[str]) -> tuple[float, str]:
    found = re.search(r"number of transactions actually processed: (\d+)", outputs[0])
    if not found:
        msg = f"pgbench printed no transaction count: {outputs[0][-500:]}"
        raise RuntimeError(msg)
    failed = re.search(r"number of failed transactions: (\d+)", outputs[0])
    note = f"{failed.group(1)} failed" if failed and failed.group(1) != "0" else ""
    return int(found.group(1)), note


# -- cold start ------------------------------------------------------------


def cold_start(suite: Suite) -> None:
    """
    Cold start: from an empty root to the first HTTPS answer, ``twistd -n
    tls4d --web`` started anew each round (a new CA, keys, certificates, DH
    parameters and start page every time).
    """
    name = "cold start: empty root to first HTTPS answer"
    suite.say(f"{name}:")
    measured: list[Measurement] = []
    for index in range(suite.settings.rounds):
        root = suite.folder / f"cold-{index}" / "root"
        root.parent.mkdir(parents=True)
        started = time.monotonic()
        server = suite.start(
            servers.Tls4d(
                root,
                suite.settings.server_cpus,
                "--web",
                "--no-http",
                *suite.settings.tls4d_args,
            )
        )
        port = server.port("https")
        answer = b""
        deadline = started + 60
        while time.monotonic() < deadline:
            try:
                answer = ssl_get(port)
                if answer.startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                time.sleep(0.01)
        seconds = time.monotonic() - started
        cpu = server.cpu_seconds()
        suite.stop(server)
        if not answer.startswith(b"HTTP/1.1 200"):
            msg = f"tls4d on a new root did not answer within 60 s: {answer[:200]!r}"
            raise RuntimeError(msg)
        suite.say(f"  round {index + 1}: {seconds:.2f} s (server CPU {cpu:.2f} s)")
        measured.append(Measurement(1, seconds, cpu, 0, 1))
    suite.command(
        name,
        "twistd -n tls4d --web --no-http --root NEW --https-port 0, "
        "then GET / until 200",
    )
    suite.figure(
        "cold start: empty root to first HTTPS answer",
        "s",
        False,
        {"tls4d": measured},
        lambda m: m.seconds,
        Target("≤ 2 s (4D: several minutes for DH parameters alone)", at_most=2.0),
    )


# -- idle connections ------------------------------------------------------


def idle_connections(suite: Suite) -> None:
    """
    Idle TLS connections held by one process: a client holds N handshaken,
    silent connections (from several 127.0.0.x source addresses); the
    server's resident memory grows by so much per connection, and a new
    client's HTTPS answer takes so long while they are held. tls4d's web
    server (its connection limit and idle timeout raised) against nginx with
    one worker.
    """
    count = suite.settings.idle_connections
    name = f"idle TLS connections, {count:,} held"
    suite.say(f"{name}:")
    folder = suite.folder / "idle"
    folder.mkdir()
    tls4d = suite.start(
        servers.Tls4d(
            folder / "root",
            suite.settings.server_cpus,
            "--web",
            "--no-http",
            "--max-connections",
            str(count + 1000),
            "--web-idle-timeout",
            "3600",
            *suite.settings.tls4d_args,
        )
    )
    port = tls4d.port("https")
    servers.write_static(folder / "root" / "WebFolder")
    contenders: dict[str, tuple[object, int]] = {"tls4d": (tls4d, port)}
    if not tools.missing(["nginx"]):
        nginx = suite.start(
            servers.Nginx(
                folder / "nginx",
                folder / "root" / "key.pem",
                folder / "root" / "cert.pem",
                suite.web,
                suite.settings.server_cpus,
            )
        )
        contenders["nginx"] = (nginx, nginx.port)
    memory: dict[str, list[Measurement]] = {k: [] for k in contenders}
    latency: dict[str, list[Measurement]] = {k: [] for k in contenders}
    for index in range(suite.settings.idle_rounds):
        for label, (server, server_port) in contenders.items():
            kib, worst, median, held = _hold(suite, server, server_port, count)
            suite.say(
                f"  round {index + 1} {label}: {held:,} held, {kib:.1f} KiB each, "
                f"new client answered in {median:.1f} ms (worst {worst:.1f} ms)"
            )
            note = f"{held:,} held" if held < count else ""
            memory[label].append(Measurement(kib, 1, 0, 0, 1, note))
            latency[label].append(
                Measurement(worst, 1, 0, 0, 1, f"median {median:.1f} ms")
            )
    suite.command(
        name,
        f"python -m bench.clients hold --count {count} --port PORT; python -m "
        f"bench.clients probe --count {suite.settings.probes} --port PORT",
    )
    suite.figure(
        f"idle TLS connections: resident memory each, {count:,} held",
        "KiB",
        False,
        memory,
        lambda m: m.work,
        Target("≤ 40 KiB each", at_most=40),
    )
    suite.figure(
        "idle TLS connections: new client's HTTPS answer, worst of "
        f"{suite.settings.probes}, "
        f"{count:,} held",
        "ms",
        False,
        latency,
        lambda m: m.work,
        Target("≤ 100 ms", at_most=100),
    )
    for server, _ in contenders.values():
        suite.stop(server)


def _probe(suite: Suite, port: int, count: int) -> list[float]:
    result = subprocess.run(
        [
            *servers.pinned(suite.settings.client_cpus),
            sys.executable,
            "-m",
            "bench.clients",
            "probe",
            "--port",
            str(port),
            "--count",
            str(count),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        env=servers.environment(),
    )
    if result.returncode != 0:
        msg = f"The probe failed: {result.stderr[-800:]}"
        raise RuntimeError(msg)
    return list(last_json(result.stdout)["milliseconds"])


def _hold(
    suite: Suite, server: object, port: int, count: int
) -> tuple[float, float, float, int]:
    _probe(suite, port, 5)
    time.sleep(1)
    before = server.rss_bytes()  # type: ignore[attr-defined]
    holder = subprocess.Popen(
        [
            *servers.pinned(suite.settings.client_cpus),
            sys.executable,
            "-m",
            "bench.clients",
            "hold",
            "--count",
            str(count),
            "--port",
            str(port),
        ],  # fmt: skip
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=servers.environment(),
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line:
            said = holder.stderr.read()[-800:] if holder.stderr else ""
            msg = f"The idle-connection holder ended: {said}"
            raise RuntimeError(msg)
        report = json.loads(line)
        held = int(report["held"])
        if report.get("failed"):
            suite.notes.append(
                f"Idle connections: {report['failed']} of {count} failed "
                f"({report.get('first_error')})."
            )
        time.sleep(2)
        after = server.rss_bytes()  # type: ignore[attr-defined]
        times = _probe(suite, port, suite.settings.probes)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(120)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    kib = (after - before) / max(held, 1) / 1024
    times.sort()
    return kib, times[-1], times[len(times) // 2], held


#: Every figure, by the name ``--only`` takes, in the order a run measures them.
FIGURES: dict[str, Callable[[Suite], None]] = {
    "handshake": full_handshakes,
    "resumed": resumed_handshakes,
    "keepalive": keepalive,
    "app": application,
    "sql": sql,
    "cold": cold_start,
    "idle": idle_connections,
}
