"""The standard ``process_*`` metrics (the names every Prometheus client library
uses, so stock dashboards work): CPU seconds, resident and virtual memory, open
and allowed descriptors, start time.

Read when ``/metrics`` is scraped, from ``/proc/self`` on Linux; elsewhere what
the standard library can tell (CPU time, the descriptor limit, the start time as
this module's import). Runs no task.
"""

from __future__ import annotations

import os
import time

_PROC = "/proc/self"
_IMPORTED = time.time()


def _start_time() -> float:
    """Seconds since the epoch at which this process started."""
    try:
        with open(f"{_PROC}/stat", "rb") as f:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            fields = f.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


# It never changes; read once.
_STARTED = _start_time()


def _memory() -> tuple[int, int] | None:
    """(virtual, resident) bytes, or None where /proc is not there."""
    try:
        with open(f"{_PROC}/statm", "rb") as f:
            size, resident = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    return int(size) * page, int(resident) * page


def _open_fds() -> int | None:
    for directory in (f"{_PROC}/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return None


def _max_fds() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def process_metrics() -> list[tuple[str, str, str, float]]:
    """``(name, kind, help, value)`` of each process metric this platform can tell."""
    rows: list[tuple[str, str, str, float]] = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent in "
         "seconds.", time.process_time()),
        ("process_start_time_seconds", "gauge", "Start time of the process since the "
         "Unix epoch in seconds.", _STARTED),
    ]
    memory = _memory()
    if memory is not None:
        rows.append(("process_virtual_memory_bytes", "gauge", "Virtual memory size in "
                     "bytes.", memory[0]))
        rows.append(("process_resident_memory_bytes", "gauge", "Resident memory size in "
                     "bytes.", memory[1]))
    if (fds := _open_fds()) is not None:
        rows.append(("process_open_fds", "gauge", "Number of open file descriptors.", fds))
    if (limit := _max_fds()) is not None:
        rows.append(("process_max_fds", "gauge", "Maximum number of open file descriptors "
                     "(the soft limit).", limit))
    return rows
