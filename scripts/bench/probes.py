"""Readings of the machine and of server processes: CPU used by each side during a
measured window, waiting for the machine to be quiet, and a process's RSS, CPU
time, descriptors and /metrics."""

from __future__ import annotations

import contextlib
import http.client
import re
import time
from collections.abc import Callable
from typing import Any

from bench import HOST

try:
    import psutil
except ImportError:  # CPU columns are left empty without it.
    psutil = None

NOISY_CPU = 25.0  # % of one core used by other work that makes a step suspect


class CpuProbe:
    """CPU seconds used by the server, the load generator and redis-server, and system idle."""

    def __init__(self, server_pids: list[int], load_pids: list[int],
                 redis_pid: int | None = None) -> None:
        self.procs: dict[str, list[Any]] = {"server": [], "load": []}
        if redis_pid is not None:
            self.procs["redis"] = []
        if psutil is None:
            return
        for kind, pids in (("server", server_pids), ("load", load_pids),
                           ("redis", [redis_pid] if redis_pid else [])):
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[kind].append(psutil.Process(pid))
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {}
        for kind, procs in self.procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            sample[kind] = total
        cpu = psutil.cpu_times()
        sample["idle"] = cpu.idle
        sample["all"] = sum(cpu)
        sample["wall"] = time.monotonic()
        return sample

    def finish(self) -> dict[str, float | None]:
        """CPU use in % of one core (server, load generator, redis-server if watched,
        everything else), idle in %."""
        if psutil is None:
            return {"server": None, "load": None, "redis": None, "other": None, "idle": None}
        end = self._sample()
        wall = max(end["wall"] - self.start["wall"], 1e-6)
        total = max(end["all"] - self.start["all"], 1e-6)
        idle = end["idle"] - self.start["idle"]
        server = end["server"] - self.start["server"]
        load = end["load"] - self.start["load"]
        rds = end["redis"] - self.start["redis"] if "redis" in end else None
        busy = total - idle
        return {"server": 100 * server / wall, "load": 100 * load / wall,
                "redis": None if rds is None else 100 * rds / wall,
                "other": 100 * max(0.0, busy - server - load - (rds or 0.0)) / wall,
                "idle": 100 * idle / total}


def wait_quiet(max_wait: float, threshold: float = NOISY_CPU) -> float | None:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle between steps.

    Between steps the server idles and the load generator is gone, so any CPU
    busy is other work on the machine. Quiet means two samples of 0.5 s under
    ``threshold`` (in % of one core). Returns the last sample.
    """
    if psutil is None:
        return None
    ncpu = psutil.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    quiet = 0
    while True:
        busy = psutil.cpu_percent(interval=0.5) * ncpu
        quiet = quiet + 1 if busy < threshold else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return busy


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def open_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def metrics(port: int) -> dict[str, float]:
    """trio-chat's /metrics, as name -> value."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


def settle(read: Callable[[], float], *, timeout: float = 10.0, interval: float = 0.5
           ) -> float:
    """Read until two readings in a row agree (or the timeout); the last reading."""
    last = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last
