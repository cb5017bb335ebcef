#!/usr/bin/env python3
"""What one call into a thread costs: the SQLite backend's :class:`QueryThread`
against ``trio.to_thread.run_sync`` with a limiter of one (what the backend used
before), each timed over ``--calls`` empty calls, CPU of the whole process (both
threads) and wall time per call. Under durable acks every group commit is one such
call. Run it pinned to one core as the benchmarks pin the server
(``taskset -c 0``), and unpinned.

Usage::

    taskset -c 0 .venv/bin/python scripts/bench_query_thread.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from trio_chat.store.sqlite import QueryThread


def _nothing() -> None:
    pass


async def _time(call: Callable[[], Awaitable[object]], calls: int) -> tuple[float, float]:
    for _ in range(100):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    return ((time.process_time() - cpu) / calls * 1e6,
            (time.perf_counter() - wall) / calls * 1e6)


async def _main(calls: int, rounds: int) -> None:
    limiter = trio.CapacityLimiter(1)
    worker = QueryThread("bench query thread")
    try:
        for _ in range(rounds):
            for name, call in (
                    ("to_thread.run_sync", lambda: trio.to_thread.run_sync(
                        _nothing, limiter=limiter)),
                    ("QueryThread.call", lambda: worker.call(_nothing))):
                cpu, wall = await _time(call, calls)
                print(f"{name:20} {cpu:6.1f} µs CPU {wall:6.1f} µs wall per call")
    finally:
        worker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    trio.run(_main, args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
