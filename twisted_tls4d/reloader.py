"""
How ``tls4d reload --root ROOT`` reaches the servers of a root: each server
process started by twistd lists itself in ``ROOT/Run/`` (a file named after its
process id) and reloads on SIGHUP; the command sends SIGHUP to each process
listed there that is still a tls4d server.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

from twisted_tls4d import root
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.settings import add_root_option


def _run_folder(layout: root.RootLayout) -> Path:
    return layout.path / "Run"


def register(layout: root.RootLayout, pid: int | None = None) -> Path:
    """
    List a server process in the root's ``Run/`` folder.

    Args:
        layout: The root it serves.
        pid: Its process id; this process's if None.

    Returns:
        The file that lists it.
    """
    folder = _run_folder(layout)
    folder.mkdir(mode=0o755, exist_ok=True)
    entry = folder / str(pid or os.getpid())
    entry.write_text("tls4d\n")
    return entry


def unregister(layout: root.RootLayout, pid: int | None = None) -> None:
    """
    Remove a server process from the root's ``Run/`` folder.
    """
    (_run_folder(layout) / str(pid or os.getpid())).unlink(missing_ok=True)


def _is_tls4d(pid: int) -> bool:
    """
    Whether process ``pid`` runs and is a tls4d server, as far as this system
    tells (its command line names tls4d where ``/proc`` exists).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"tls4d" in command


def signal_servers(layout: root.RootLayout) -> list[int]:
    """
    Ask every running server of a root to reload, and forget stale entries.

    Args:
        layout: The root.

    Returns:
        The process ids signalled.
    """
    signalled = []
    folder = _run_folder(layout)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not _is_tls4d(pid):
            entry.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGHUP)
        signalled.append(pid)
    return signalled


def add_parser(commands: Any) -> None:
    """
    Add the ``reload`` subcommand to the ``tls4d`` command.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "reload",
        help="make the running servers of a root read their keys and "
        "certificates again",
        description=(
            "Ask every running server of ROOT to read its keys, certificate "
            "chains, dhparams.pem and Resources/ca.pem again, as SIGHUP does. "
            "New connections get the new files; established ones keep theirs. "
            "If a file is broken, a server keeps what it has and logs why."
        ),
    )
    add_root_option(parser)
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    layout = root.RootLayout(args.root)
    signalled = signal_servers(layout)
    if not signalled:
        msg = (
            f"No running tls4d server lists itself in {_run_folder(layout)}; "
            "start one with twistd -n tls4d --root "
            f"{args.root}, or check --root."
        )
        raise ConfigurationError(msg)
    pids = ", ".join(str(pid) for pid in signalled)
    print(
        f"Asked {len(signalled)} server process(es) to reload: {pids}. "
        "Their logs say what each loaded."
    )
    return 0
