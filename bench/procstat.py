"""
Server CPU time and memory from ``/proc``: the figures the suite divides by
the work done, summed over a server's whole process tree (a master and its
workers, PostgreSQL's postmaster and its backends).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import attrs

#: Clock ticks a second, the unit of the CPU times in ``/proc/PID/stat``.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Bytes a page, the unit of ``/proc/PID/statm``.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class ProcessStat:
    """The fields of one ``/proc/PID/stat`` line the suite uses.

    The CPU times are in clock ticks; ``children_*`` count the children the
    process has waited for, so a backend that ended between two readings is
    still counted, in its parent's.
    """

    pid: int
    command: str
    state: str
    parent: int
    user_ticks: int
    system_ticks: int
    children_user_ticks: int
    children_system_ticks: int
    rss_pages: int

    @property
    def cpu_ticks(self) -> int:
        """The process's own CPU time and its waited-for children's, in ticks."""
        return (
            self.user_ticks
            + self.system_ticks
            + self.children_user_ticks
            + self.children_system_ticks
        )


def parse_stat(line: str) -> ProcessStat:
    """
    Parse one ``/proc/PID/stat`` line (proc(5)).

    The command name sits between parentheses and may itself hold spaces and
    parentheses, so the fields are split after its last ``)``.

    Args:
        line: The whole content of ``/proc/PID/stat``.

    Returns:
        Its fields.

    Raises:
        ValueError: The line is not in the ``stat`` format.
    """
    opening, closing = line.find("("), line.rfind(")")
    if opening < 0 or closing < opening:
        msg = f"{line[:80]!r} is not a /proc/PID/stat line (no '(command)')."
        raise ValueError(msg)
    fields = line[closing + 2 :].split()
    if len(fields) < 22:
        msg = f"{line[:80]!r} has {len(fields) + 2} fields; /proc/PID/stat has 44+."
        raise ValueError(msg)
    # fields[0] is field 3 of proc(5): state, ppid, ..., utime is field 14.
    return ProcessStat(
        pid=int(line[:opening]),
        command=line[opening + 1 : closing],
        state=fields[0],
        parent=int(fields[1]),
        user_ticks=int(fields[11]),
        system_ticks=int(fields[12]),
        children_user_ticks=int(fields[13]),
        children_system_ticks=int(fields[14]),
        rss_pages=int(fields[21]),
    )


def read_all(proc: Path = Path("/proc")) -> dict[int, ProcessStat]:
    """
    Returns:
        The stat of every process readable under ``proc``, by pid; a process
        that ends while they are read is left out.
    """
    found: dict[int, ProcessStat] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            found[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError):
            continue
    return found


def tree(root: int, stats: dict[int, ProcessStat]) -> list[ProcessStat]:
    """
    Args:
        root: The pid at the top of the tree.
        stats: Every process, as `read_all` returns them.

    Returns:
        ``root`` and all its descendants found in ``stats`` (empty if
        ``root`` is not there).
    """
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.parent, []).append(stat.pid)
    if root not in stats:
        return []
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(stats[pid])
        pending.extend(children.get(pid, ()))
    return found


def cpu_seconds(processes: Iterable[ProcessStat]) -> float:
    """
    Returns:
        The CPU time (user and system, with waited-for children) of
        ``processes`` together, in seconds.
    """
    return sum(stat.cpu_ticks for stat in processes) / CLOCK_TICKS


def rss_bytes(processes: Iterable[ProcessStat]) -> int:
    """
    Returns:
        The resident memory of ``processes`` together, in bytes.
    """
    return sum(stat.rss_pages for stat in processes) * PAGE_SIZE


def parse_cpu_lines(text: str) -> dict[int, float]:
    """
    Read the per-core lines of ``/proc/stat`` (proc(5)).

    Args:
        text: The content of ``/proc/stat``.

    Returns:
        For each core, the seconds it spent running processes (user, nice
        and system time) or taken by the hypervisor (steal) since boot.
        Interrupt and softirq time is left out: the kernel's network work
        for a fast server's own packets lands there, uncharged to it.
    """
    busy: dict[int, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(field) for field in rest.split()] + [0] * 8
        user, nice, system, steal = ticks[0], ticks[1], ticks[2], ticks[7]
        busy[int(name[3:])] = (user + nice + system + steal) / CLOCK_TICKS
    return busy


def cores_busy_seconds(cores: Iterable[int], proc: Path = Path("/proc")) -> float:
    """
    Returns:
        The seconds ``cores`` together spent busy since boot, whoever used
        them.
    """
    busy = parse_cpu_lines((proc / "stat").read_text())
    return sum(busy.get(core, 0.0) for core in cores)


def tree_cpu_seconds(root: int) -> float:
    """
    Returns:
        The CPU seconds used so far by ``root``'s process tree.
    """
    return cpu_seconds(tree(root, read_all()))


def tree_rss_bytes(root: int) -> int:
    """
    Returns:
        The resident memory of ``root``'s process tree now, in bytes.
    """
    return rss_bytes(tree(root, read_all()))
