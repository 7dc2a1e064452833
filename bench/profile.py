"""
Where tls4d's time goes: ``bench/run --profile`` drives tls4d with each
figure's load and samples the server with py-spy meanwhile, then lists the
functions that dominate, by own time and by cumulative time.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import clients, servers
from bench.suite import Suite

#: How many functions each list shows.
TOP = 15


def py_spy() -> str | None:
    """
    Returns:
        The ``py-spy`` beside this Python or on the path, or None.
    """
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """
    ``"render (twisted/web/static.py:630)"`` becomes ``"twisted/web/static.py:
    render"``: the function, without its line, with its path from the
    package on.
    """
    found = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not found:
        return frame
    function, path = found.groups()
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    for local in ("twisted_tls4d/", "bench/"):
        if local in path:
            path = local + path.split(local, 1)[1]
    return f"{path}: {function}"


#: Innermost frames of a thread that waits (the reactor in epoll, a
#: database thread for work): py-spy does not always see such a thread as
#: idle, so these samples are set apart.
IDLE = re.compile(
    r"(epollreactor\.py: EPollReactor\.doPoll|threading\.py: Condition\.wait|"
    r"threading\.py: Event\.wait|queue\.py: Queue\.get)$"
)

#: Where a busy sample's time goes: the innermost frame of its stack that
#: matches one of these patterns (the first that matches it) gives the
#: sample to that category, so the shares add up to 100 %.
CATEGORIES = (
    ("TLS handshake in OpenSSL", r"SSL\.py: Connection\.do_handshake"),
    (
        "a TLS connection object per connection",
        r"SSL\.py: Connection\.__init__|serverConnectionForTLS|set_app_data",
    ),
    (
        "hand-off to and from the database threads",
        r"threadpool\.py|queue\.py|threading\.py|_threads/|deferToThreadPool|"
        r"callFromThread|[Ww]aker|internet/threads\.py",
    ),
    ("SQLite (in a database thread)", r"sql/session\.py|sqlite3"),
    (
        "JSON encoding",
        r"json/encoder|json/__init__\.py: dumps|encode_payload|encode_line",
    ),
    (
        "JSON decoding",
        r"json/decoder|json/__init__\.py: loads|decode_payload|wire\.py: "
        r"parse_request|_refuse_constant|_finite_float",
    ),
    (
        "application protocol: request checks, dispatch, answers",
        r"twisted_tls4d/app/|inspect\.py|peer_label|attrs generated",
    ),
    (
        "static file: lookup, stat, symlink check, body producer",
        r"Cooperator|CooperativeTask|_PullToPush|web/static\.py|filepath\.py|"
        r"posixpath|genericpath|WebFolder|_inside|mimetypes",
    ),
    (
        "access log",
        r"combinedLogFormatter|access_log_line|logfile\.py|_LoggedRequest|"
        r"http\.py: _escape|datetimeToLogString",
    ),
    (
        "protocol wrappers (policies.py: the connection guard's ProtocolWrapper)",
        r"protocols/policies\.py",
    ),
    ("HTTP parsing, headers, request objects", r"twisted/web/"),
    (
        "twisted.logger events",
        r"twisted/logger/|twisted/python/log\.py: (msg|LogPublisher)",
    ),
    (
        "timers (timeouts set and reset)",
        r"TimeoutMixin|resetTimeout|setTimeout|callLater|DelayedCall|"
        r"runUntilCurrent|ReactorBase\.timeout",
    ),
    (
        "closing connections",
        r"connectionLost|_closeSocket|loseConnection|_disconnectSelectable|"
        r"abortConnection",
    ),
    ("accepting connections", r"tcp\.py: Port\.doRead|socket\.py: socket\.accept"),
    ("length-prefix and line framing", r"protocols/basic\.py"),
    ("TLS records (pyOpenSSL recv/send, memory BIOs)", r"SSL\.py|protocols/tls\.py"),
)


def _category(frames: list[str], patterns: list[tuple[str, re.Pattern[str]]]) -> str:
    for frame in reversed(frames):
        for label, pattern in patterns:
            if pattern.search(frame):
                return label
    return "other: the reactor loop, socket reads and writes"


def summarize(
    raw: str,
) -> tuple[
    int, int, list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]
]:
    """
    Read py-spy's raw (collapsed stacks) output.

    Args:
        raw: Lines of ``frame;frame;...;leaf COUNT``.

    Returns:
        The busy samples, the idle ones (`IDLE`), the functions with their
        busy samples as the innermost frame (own time) and anywhere on the
        stack (cumulative), most first, and the busy samples of each of
        `CATEGORIES` (and "other: the reactor, sockets").
    """
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    shares: collections.Counter[str] = collections.Counter()
    patterns = [(label, re.compile(pattern)) for label, pattern in CATEGORIES]
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        # py-spy puts the thread's name first: not a function.
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if not frames:
            continue
        if IDLE.search(frames[-1]):
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            cumulative[name] += count
        shares[_category(frames, patterns)] += count
    return (
        total,
        idle,
        own.most_common(),
        cumulative.most_common(),
        shares.most_common(),
    )


#: Frames every stack goes through (twistd, the reactor's loop and its
#: logging context, the thread pool's workers), left out of the cumulative
#: list: they say nothing about where the work is.
PLUMBING = re.compile(
    r"^(twistd|twisted/(application|scripts)/|(stdlib/)?threading\.py: Thread\.|"
    r"twisted/_threads/|twisted/internet/base\.py: ReactorBase\.(run|mainLoop)|"
    r"twisted/python/(log|context)\.py: .*callWith|"
    r"twisted/internet/posixbase\.py: _PollLikeMixin\._doReadOrWrite|"
    r"twisted/internet/epollreactor\.py: EPollReactor\.doPoll$)"
)


def _table(title: str, rows: list[tuple[str, int]], total: int) -> list[str]:
    lines = [f"| {title} | % of samples |", "|---|---|"]
    lines += [f"| `{name}` | {100 * count / total:.1f} |" for name, count in rows]
    return [*lines, ""]


def render(phase: str, raw: str) -> str:
    """
    Returns:
        One phase's top functions as Markdown: by own time, by cumulative
        time (plumbing left out), and tls4d's own functions by cumulative
        time.
    """
    total, idle, own, cumulative, shares = summarize(raw)
    if not total:
        return f"#### {phase}\n\nNo samples.\n"
    useful = [(n, c) for n, c in cumulative if not PLUMBING.match(n)]
    ours = [(n, c) for n, c in cumulative if n.startswith("twisted_tls4d/")]
    lines = [
        f"#### {phase}",
        "",
        f"{total:,} busy samples ({idle:,} more waiting in epoll or for work "
        "left out).",
        "",
    ]
    lines += _table("where the time goes", shares, total)
    lines += _table("own time", own[:TOP], total)
    lines += _table("cumulative time", useful[:TOP], total)
    lines += _table("tls4d's code, cumulative", ours[:TOP], total)
    return "\n".join(lines)


def _background(
    suite: Suite, commands: list[list[str]], python: bool = False
) -> list[subprocess.Popen[str]]:
    prefix = servers.pinned(suite.settings.client_cpus)
    if python:
        commands = [[sys.executable, "-m", "bench.clients", *c] for c in commands]
    return [
        subprocess.Popen(
            [*prefix, *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=servers.environment(),
        )
        for command in commands
    ]


def phases(suite: Suite) -> dict[str, Callable[[float], list[subprocess.Popen[str]]]]:
    """
    Returns:
        Each profiled load, by name: a function starting it against the
        main tls4d for about the given seconds.
    """
    tls4d = suite.main_tls4d()
    https, app, sql = tls4d.port("https"), tls4d.port("app"), tls4d.port("sql")
    url = f"https://127.0.0.1:{https}/{servers.STATIC_NAME}"
    identity = [
        "--identity", str(suite.identity), "--ca", str(suite.identity / "ca.pem"),
    ]  # fmt: skip
    clients.sql_statement(
        sql, suite.identity, suite.identity / "ca.pem", clients.SQL_SETUP
    )
    www = f"/{servers.STATIC_NAME}"

    def timed(seconds: float) -> list[str]:
        return ["--start-at", repr(time.time() + 1), "--duration", repr(seconds)]

    return {
        "full handshakes (ab, new connection per request)": lambda s: _background(
            suite,
            [["ab", "-q", "-r", "-t", f"{s:g}", "-n", "100000000", "-c", "16", url]],
        ),
        "resumed handshakes (4 × openssl s_time -reuse)": lambda s: _background(
            suite,
            [
                [
                    "openssl",
                    "s_time",
                    "-connect",
                    f"127.0.0.1:{https}",
                    "-reuse",
                    "-time",
                    str(round(s)),
                    "-www",
                    www,
                ]
            ]
            * 4,
        ),  # fmt: skip
        "HTTPS keep-alive (wrk, 32 connections)": lambda s: _background(
            suite, [["wrk", "-t", "1", "-c", "32", "-d", f"{s:g}s", url]]
        ),
        "app protocol, small requests pipelined (2 × window 32)": lambda s: _background(
            suite,
            [["small", "--port", str(app), "--window", "32", *identity, *timed(s)]] * 2,
            python=True,
        ),
        "app protocol, small requests one at a time (4 connections)": lambda s: (
            _background(
                suite,
                [["small", "--port", str(app), "--window", "1", *identity, *timed(s)]]
                * 4,
                python=True,
            )
        ),
        "app protocol, bulk 1 MiB frames": lambda s: _background(
            suite,
            [["bulk", "--port", str(app), "--window", "8", *identity, *timed(s)]],
            python=True,
        ),
        "SQL point selects (8 clients)": lambda s: _background(
            suite,
            [
                ["sql", "--port", str(sql), "--seed", str(i), *identity, *timed(s)]
                for i in range(8)
            ],
            python=True,
        ),
    }


def profile(suite: Suite, out: Path) -> str:
    """
    Sample tls4d under each load with py-spy, save each raw profile in
    ``out``, and list the top functions.

    Returns:
        The lists, as Markdown.

    Raises:
        RuntimeError: py-spy is not installed, or cannot read the server.
    """
    spy = py_spy()
    if spy is None:
        msg = (
            "py-spy is not installed: pip install py-spy (the 'bench' extra) into "
            f"the Python that runs the suite ({sys.executable})."
        )
        raise RuntimeError(msg)
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(suite.settings.duration, 2.0)
    tls4d = suite.main_tls4d()
    sections = []
    for index, (phase, start) in enumerate(phases(suite).items()):
        suite.say(f"Profiling: {phase}")
        loads = start(seconds + 3)
        time.sleep(1.5)
        raw = out / f"{index}-{re.sub(r'[^a-z0-9]+', '-', phase.lower())[:40]}.txt"
        # py-spy now and then fails to find the interpreter at once ("No
        # python processes found"); the load runs on, so try again, twice.
        for _attempt in range(3):
            result = _record(spy, tls4d.pid, seconds, raw)
            if result.returncode == 0 and raw.exists():
                break
        for load in loads:
            try:
                load.wait(seconds + 120)
            except subprocess.TimeoutExpired:
                load.kill()
                load.wait()
        if result.returncode != 0 or not raw.exists():
            msg = f"py-spy could not sample tls4d: {result.stderr.strip()[-500:]}"
            raise RuntimeError(msg)
        sections.append(render(phase, raw.read_text()))
    return "\n".join(sections)


def _record(
    spy: str, pid: int, seconds: float, raw: Path
) -> subprocess.CompletedProcess[str]:
    """
    Returns:
        How one py-spy run sampling ``pid`` for ``seconds`` into ``raw`` ended.
    """
    return subprocess.run(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(round(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--subprocesses",
            "--output",
            str(raw),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
