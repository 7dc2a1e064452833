"""
The programs the suite drives, where they come from (Debian's packages) and
which figures need them: checked at the start of a run, installed with
``apt-get`` when the run may, and each missing one named with the figures
it costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

import attrs

from bench import servers


@attrs.frozen
class Tool:
    """One program: the Debian package that brings it and what it is for."""

    name: str
    package: str
    used_for: str


TOOLS = (
    Tool("taskset", "util-linux", "pinning servers and clients to their cores"),
    Tool(
        "openssl", "openssl", "s_server (handshakes, bulk), s_time (resumed handshakes)"
    ),
    Tool("ab", "apache2-utils", "full handshakes (a new connection per request)"),
    Tool("wrk", "wrk", "HTTPS keep-alive"),
    Tool(
        "nginx",
        "nginx",
        "the nginx reference (handshakes, keep-alive, idle connections)",
    ),
    Tool("h2load", "nghttp2-client", "cross-checks by hand (no figure needs it)"),
    Tool("pgbench", "postgresql", "the PostgreSQL reference of the SQL figures"),
    Tool("postgres", "postgresql", "the PostgreSQL reference of the SQL figures"),
    Tool(
        "runuser", "util-linux", "running PostgreSQL as its own user when run as root"
    ),
)


def find(name: str) -> str | None:
    """
    Returns:
        The path of the program ``name``, or None. PostgreSQL's programs are
        looked for in ``/usr/lib/postgresql/*/bin`` too, where Debian keeps
        them.
    """
    if name in ("pgbench", "postgres"):
        binaries = servers.postgres_binaries()
        if binaries is not None and (binaries / name).exists():
            return str(binaries / name)
    return shutil.which(name)


def missing(names: Iterable[str]) -> list[Tool]:
    """
    Returns:
        The tools among ``names`` that are not installed.
    """
    wanted = set(names)
    return [t for t in TOOLS if t.name in wanted and find(t.name) is None]


def install(tools: Iterable[Tool], say: object = print) -> None:
    """
    Install the Debian packages of ``tools`` with ``apt-get`` (as root), after
    ``apt-get update`` if a first attempt cannot find them. Failures are
    told, not raised: the caller checks again what is there.
    """
    packages = sorted({t.package for t in tools})
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"Not root or no apt-get: install {' '.join(packages)} yourself.")  # type: ignore[operator]
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    say(f"Installing {' '.join(packages)} with apt-get ...")  # type: ignore[operator]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode == 0:
            break
    else:
        say(f"apt-get could not install them: {result.stderr.strip()[-500:]}")  # type: ignore[operator]
