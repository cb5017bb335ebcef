"""What a process tree costs, read straight from ``/proc``: CPU time (utime + stime
of ``/proc/PID/stat``), resident memory and open descriptors, summed over a server
process and every process under it (``serve --workers N``'s workers), and the
machine's busy time from ``/proc/stat``. The parsers are pure, for the tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import attrs

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class ProcStat:
    """One process's line of ``/proc/PID/stat``, the fields the benchmarks use."""

    pid: int
    ppid: int
    utime_ticks: int
    stime_ticks: int
    rss_pages: int

    @property
    def cpu_s(self) -> float:
        return (self.utime_ticks + self.stime_ticks) * TICK_S

    @property
    def rss_bytes(self) -> int:
        return self.rss_pages * PAGE_BYTES


def parse_stat(text: str) -> ProcStat:
    """``/proc/PID/stat``. The command name (field 2) may hold spaces and parentheses,
    so the fields are counted from its last ``)``: state is field 3, ppid 4, utime
    14, stime 15, rss 24 (proc(5))."""
    head, _, tail = text.rpartition(")")
    if not head:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    pid = int(head.partition("(")[0])
    fields = tail.split()
    # fields[0] is field 3 (state): field n is fields[n - 3].
    return ProcStat(pid=pid, ppid=int(fields[1]), utime_ticks=int(fields[11]),
                    stime_ticks=int(fields[12]), rss_pages=int(fields[21]))


def descendants(parents: Mapping[int, int], root: int) -> list[int]:
    """``root`` and every process under it, given each process's parent, level by
    level (a supervisor, then its workers)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree = [root]
    for pid in tree:  # grows as it goes
        tree.extend(sorted(children.get(pid, ())))
    return tree


@attrs.frozen
class TreeSample:
    """A process tree's CPU seconds and resident bytes, summed, and per process."""

    cpu_s: float
    rss_bytes: int
    per_pid: Mapping[int, ProcStat]


def sum_stats(stats: Iterable[ProcStat]) -> TreeSample:
    by_pid = {s.pid: s for s in stats}
    return TreeSample(cpu_s=sum(s.cpu_s for s in by_pid.values()),
                      rss_bytes=sum(s.rss_bytes for s in by_pid.values()), per_pid=by_pid)


def read_stat(pid: int) -> ProcStat | None:
    """None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants now (reads every process's stat once)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := read_stat(int(name))) is not None:
            parents[stat.pid] = stat.ppid
    return descendants(parents, root) if root in parents else []


def sample_tree(pids: Iterable[int]) -> TreeSample:
    """The processes of ``pids`` still alive, summed."""
    return sum_stats(s for pid in pids if (s := read_stat(pid)) is not None)


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def parse_machine(text: str) -> tuple[float, float]:
    """``/proc/stat``'s first line: (busy, total) CPU seconds over all CPUs. Busy is
    everything but idle and iowait; guest time is already inside user and nice."""
    fields = text.split("\n", 1)[0].split()
    if fields[0] != "cpu":
        raise ValueError(f"not /proc/stat: {text[:80]!r}")
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) * TICK_S, total * TICK_S


def read_machine() -> tuple[float, float]:
    with open("/proc/stat") as f:
        return parse_machine(f.read())
