"""
``python -m bench`` (or ``bench/run``): measure tls4d against its
references and write the table to ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import figures, servers, tools
from bench.report import render_machine, render_table
from bench.suite import Settings, Suite, client_bound_text

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- profile:begin -->", "<!-- profile:end -->"

DOCUMENT_HEAD = """\
# Performance

How fast tls4d is beside the servers it is measured against, from
`bench/run` (see [bench/README.md](../bench/README.md)). Every figure is
measured on tls4d and its references in the same run, alternately, several
rounds; the server is pinned to its own core and the load generator to
another, and the server's CPU time comes from `/proc/PID/stat` (its whole
process tree). Each value is the median of the rounds, with their range in
parentheses.

"""


def _version(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine() -> dict[str, str]:
    """
    Returns:
        What the figures depend on: cores, CPU, memory, kernel, the OpenSSL
        builds, Python and the libraries, the references' versions, and the
        load average (the machine may be shared).
    """
    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    binaries = servers.postgres_binaries()
    return {
        "cores": str(os.cpu_count()),
        "CPU": model,
        "memory": memory,
        "kernel": platform.release(),
        "OpenSSL of pyOpenSSL/cryptography (tls4d, stock Twisted, the echo)": (
            SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        ),
        "OpenSSL command (s_server, s_time, s_client)": _version(
            ["openssl", "version"]
        ),
        "Python (and its ssl module, the suite's clients)": (
            f"{platform.python_version()} ({__import__('ssl').OPENSSL_VERSION})"
        ),
        "Twisted": twisted.__version__,
        "pyOpenSSL": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
        "ab": _version(["ab", "-V"]),
        "PostgreSQL": _version([str(binaries / "postgres"), "--version"])
        if binaries
        else "not installed",
        "load average at start": Path("/proc/loadavg").read_text().strip(),
    }


def parse(arguments: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure tls4d against nginx, openssl, stock Twisted and "
        "PostgreSQL on loopback, and write docs/performance.md.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure [3]")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement [5]"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of warm-up per server [1]"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated figures among {','.join(figures.FIGURES)} [all]",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=10_000,
        help="idle TLS connections held [10000]",
    )
    parser.add_argument(
        "--tls4d-args",
        default="",
        help="more options for every twistd tls4d started, as one string "
        "(e.g. '--workers 2')",
    )
    parser.add_argument("--server-cpus", default="0", help="taskset list [0]")
    parser.add_argument("--client-cpus", default="1", help="taskset list [1]")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round of 1 s, 500 idle connections",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install missing tools, only say which",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=servers.REPOSITORY / "docs" / "performance.md",
        help="the Markdown file to write [docs/performance.md]",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's temporary folder"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the figures, sample tls4d with py-spy under each load "
        "(--duration seconds each) and write the top functions to the Profile "
        "section of docs/performance.md",
    )
    given = parser.parse_args(arguments)
    unknown = set(filter(None, given.only.split(","))) - set(figures.FIGURES)
    if unknown:
        parser.error(
            f"unknown figures {sorted(unknown)}; choose among {list(figures.FIGURES)}"
        )
    return given


def settings_from(given: argparse.Namespace) -> Settings:
    """The run's settings from the command line."""
    settings = Settings(
        rounds=given.rounds,
        duration=given.duration,
        warmup=given.warmup,
        server_cpus=given.server_cpus,
        client_cpus=given.client_cpus,
        idle_connections=given.idle_connections,
        only=tuple(filter(None, given.only.split(","))),
        tls4d_args=tuple(shlex.split(given.tls4d_args)),
    )
    if given.quick:
        settings.rounds, settings.duration, settings.warmup = 1, 1.0, 0.0
        settings.idle_connections = min(settings.idle_connections, 500)
        settings.probes = 5
    return settings


def check_tools(install: bool, say: object) -> list[str]:
    """
    Check for every tool, install the missing ones if allowed, and tell what
    is still missing and which figures it costs.

    Returns:
        Lines for the report about missing tools.
    """
    wanted = [t.name for t in tools.TOOLS]
    absent = tools.missing(wanted)
    if absent and install:
        tools.install(absent, say)
        absent = tools.missing(wanted)
    lines = [
        f"{t.name} is missing (Debian package {t.package}), needed for {t.used_for}; "
        "those figures or references are not measured."
        for t in absent
    ]
    for line in lines:
        say(line)  # type: ignore[operator]
    return lines


def document(
    suite: Suite,
    facts: dict[str, str],
    command: str,
    started: datetime.datetime,
    seconds: float,
    missing: list[str],
) -> str:
    """The run's section of docs/performance.md."""
    settings = suite.settings
    parts = [
        BEGIN,
        "",
        f"## Latest run ({started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min)",
        "",
        f"`{command}`: {settings.rounds} round(s) of {settings.duration:g} s per "
        f"server and figure after {settings.warmup:g} s of warm-up, server on "
        f"core(s) {settings.server_cpus}, load generators on core(s) "
        f"{settings.client_cpus}.",
        "",
        "### Machine",
        "",
        render_machine(facts),
        "### Figures",
        "",
        "The ratio is tls4d's median over the reference's, whichever way is "
        "better for that figure. " + client_bound_text(),
        "",
        render_table(suite.figures),
    ]
    if suite.negotiated:
        parts += ["### TLS negotiated (openssl s_client, default offer)", ""]
        parts += [f"- {name}: {text}" for name, text in suite.negotiated.items()]
        parts.append("")
    notes = missing + suite.notes
    if notes:
        parts += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    parts += [
        "### Reproduce",
        "",
        f"The whole run: `{command}`; one figure: `bench/run --only NAME` "
        f"({', '.join(figures.FIGURES)}). The loads, with PORT the server's:",
        "",
    ]
    for group, lines in suite.commands.items():
        parts.append(f"- {group}: " + "; ".join(f"`{line}`" for line in lines))
    parts += ["", END, ""]
    return "\n".join(parts)


def write(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """
    Put ``section`` (which starts with ``begin`` and ends with ``end``) into
    ``path`` in place of what stands between those markers, keeping the rest
    of the file (the profile notes), or add it, or make the file.
    """
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            path.write_text(head + section.rstrip("\n") + tail)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOCUMENT_HEAD + section)


def run_profile(suite: Suite, given: argparse.Namespace, command: str) -> int:
    """Profile tls4d under each load and write the lists; return the status."""
    from bench import profile

    try:
        text = profile.profile(suite, suite.folder / "profiles")
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        suite.stop_all()
    started = datetime.datetime.now(datetime.UTC)
    section = "\n".join(
        [
            PROFILE_BEGIN,
            "",
            f"### Sampled ({started:%Y-%m-%d %H:%M} UTC, `{command}`)",
            "",
            "py-spy (`record --format raw --nonblocking`, 250 Hz) on the tls4d "
            "process while each load ran; only samples where the server was "
            "busy count (not those waiting in epoll). Own: the function was the "
            "innermost Python frame (C calls such as OpenSSL's count to the "
            "Python function calling them); cumulative: anywhere on the stack.",
            "",
            text,
            PROFILE_END,
            "",
        ]
    )
    print(section)
    if not given.no_write:
        write(given.out, section, PROFILE_BEGIN, PROFILE_END)
        print(f"Wrote {given.out}")
    return 0


def main(arguments: list[str]) -> int:
    """Run the suite; return the exit status."""
    given = parse(arguments)
    settings = settings_from(given)

    def say(text: str) -> None:
        print(text, flush=True)

    missing = check_tools(not given.no_install, say)
    if tools.missing(["taskset"]):
        settings.server_cpus = settings.client_cpus = ""
    facts = machine()
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="tls4d-bench-"))
    say(f"Working in {folder}")
    suite = Suite(settings, folder, say)
    command = "bench/run " + shlex.join(arguments) if arguments else "bench/run"
    if given.profile:
        try:
            return run_profile(suite, given, command.strip())
        finally:
            if not given.keep:
                subprocess.run(["rm", "-rf", str(folder)], check=False)
    failed = False
    try:
        for name, measure in figures.FIGURES.items():
            if settings.only and name not in settings.only:
                continue
            try:
                measure(suite)
            except Exception as e:  # noqa: BLE001 (the other figures go on)
                failed = True
                traceback.print_exc()
                suite.notes.append(f"The {name} figures failed: {e}".replace("\n", " "))
    finally:
        suite.stop_all()
        if not given.keep:
            subprocess.run(["rm", "-rf", str(folder)], check=False)
    facts["load average at end"] = Path("/proc/loadavg").read_text().strip()
    section = document(
        suite, facts, command.strip(), started_at, time.monotonic() - started, missing
    )
    print()
    print(render_table(suite.figures))
    if not given.no_write:
        write(given.out, section)
        say(f"Wrote {given.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
