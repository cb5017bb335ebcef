#!/usr/bin/env python3
"""What one wake-up of a Python event loop costs on this machine, with nothing of
trio-chat in it: the floor under trio-chat's cost per message.

Ten socket pairs; a feeder process (on CPU 1) sends 200-byte messages round the
pairs at ``--rates`` per second, one at a time as chatload's senders do; the loop
(on CPU 0) runs one task per socket that reads and counts. Reported per loop and
rate: the loop process's CPU time (user and system, from ``getrusage``) per read.
Each message that arrives alone is one wake-up of the loop: the loop waits in
``epoll_wait``, wakes, runs the reading task, and waits again. A message sent
alone to trio-chat wakes its loop at least this once, for its reader, before any
of trio-chat's own work (the store's commit and the flusher's round are shared by
the messages of a batch).

Usage::

    .venv/bin/python scripts/bench_loop_floor.py
    .venv/bin/python scripts/bench_loop_floor.py --rates 1500 --loops trio --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import sys
import time

import trio

PAIRS = 10
MESSAGE = b"x" * 200


def _feed(socks: list[socket.socket], rate: float, seconds: float) -> None:
    """Send one message at a time, at ``rate`` a second, then close every socket."""
    end = time.monotonic() + seconds
    due = time.monotonic()
    i = 0
    while due < end:
        socks[i % len(socks)].send(MESSAGE)
        i += 1
        due += 1 / rate
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
    for sock in socks:
        sock.close()


async def _trio_loop(socks: list[socket.socket]) -> int:
    count = 0

    async def read(sock: socket.socket) -> None:
        nonlocal count
        tsock = trio.socket.from_stdlib_socket(sock)
        while await tsock.recv(65536):
            count += 1

    async with trio.open_nursery() as nursery:
        for sock in socks:
            nursery.start_soon(read, sock)
    return count


async def _asyncio_loop(socks: list[socket.socket]) -> int:
    count = 0
    loop = asyncio.get_running_loop()

    async def read(sock: socket.socket) -> None:
        nonlocal count
        sock.setblocking(False)
        while await loop.sock_recv(sock, 65536):
            count += 1

    await asyncio.gather(*(read(sock) for sock in socks))
    return count


def measure(loop: str, rate: float, seconds: float) -> tuple[int, float, float]:
    """Reads done, and the loop's user and system CPU per read in microseconds."""
    pairs = [socket.socketpair() for _ in range(PAIRS)]
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})
        for ours, _ in pairs:
            ours.close()
        _feed([theirs for _, theirs in pairs], rate, seconds)
        os._exit(0)
    for _, theirs in pairs:
        theirs.close()
    socks = [ours for ours, _ in pairs]
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        count = trio.run(_trio_loop, socks) if loop == "trio" else \
            asyncio.run(_asyncio_loop(socks))
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for sock in socks:
            sock.close()
        os.waitpid(pid, 0)
    user = (after.ru_utime - before.ru_utime) / max(count, 1) * 1e6
    system = (after.ru_stime - before.ru_stime) / max(count, 1) * 1e6
    return count, user, system


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="300,1500,6000,20000",
                   help="messages a second, comma-separated (300,1500,6000,20000)")
    p.add_argument("--loops", default="trio,asyncio", help="trio, asyncio or both")
    p.add_argument("--seconds", type=float, default=4.0, help="per run (4)")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {0})
    print("| loop | messages/s | reads | user µs/read | system µs/read | total µs/read |")
    print("|---|---:|---:|---:|---:|---:|")
    for loop in args.loops.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            count, user, system = measure(loop, rate, args.seconds)
            print(f"| {loop} | {rate:,.0f} | {count:,} | {user:.1f} | {system:.1f} | "
                  f"{user + system:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
