#!/usr/bin/env python3
"""Where an idle connection's memory goes: tracemalloc of a server holding N of them.

Runs a trio-chat server in this process (embedded default, SQLite in a
temporary directory) with tracemalloc on, connects ``--connections`` raw
WebSocket clients from a child process (20 rooms, no author, never sending),
and prints the traced Python heap per connection, grouped by the innermost
line of trio-chat's code that led to each allocation (what trio or the
standard library allocated below it counts there). A warm-up batch connects
and leaves first. bench_conns measures resident memory; this says where it
goes.

Usage::

    .venv/bin/python scripts/trace_conns.py                 # 1,000 connections
    .venv/bin/python scripts/trace_conns.py --connections 2000
"""

from __future__ import annotations

import argparse
import collections
import gc
import linecache
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import trio

from trio_chat.config import Config, ServerConfig, SqliteConfig
from trio_chat.server import Server

CLIENT = r"""
import base64, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
key = base64.b64encode(b"0123456789abcdef").decode()
held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"GET /ws/{i % 20} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    held.append(s)
print("connected", flush=True)
sys.stdin.read()
"""


def _where(traceback: tracemalloc.Traceback) -> str:
    for frame in reversed(traceback):
        if f"{Path('trio_chat')}" in frame.filename:
            line = linecache.getline(frame.filename, frame.lineno).strip()
            return f"{Path(frame.filename).name}:{frame.lineno} {line[:70]}"
    frame = traceback[-1]
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno}"


async def measure(connections: int, workdir: Path) -> None:
    config = Config(server=ServerConfig(host="127.0.0.1", port=0),
                    sqlite=SqliteConfig(path=str(workdir / "trace.db")))
    server = Server.build(config)

    async def until(predicate: Callable[[], bool]) -> None:
        # The server's counts have no event to wait on; this polls them.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.1)

    async def clients(n: int) -> trio.Process:
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT, str(server.port), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdout is not None
        await child.stdout.receive_some()
        await until(lambda: len(server.hub.connections) >= n)
        return child

    async def leave(child: trio.Process) -> None:
        assert child.stdin is not None
        await child.stdin.aclose()
        await child.wait()
        await until(lambda: not server.hub.connections)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await leave(await clients(100))
        gc.collect()
        before = tracemalloc.take_snapshot()
        child = await clients(connections)
        # Past the upgrade's time limit, so its timer's entry has left trio's heap.
        await trio.sleep(config.server.handshake_timeout + 1)
        gc.collect()
        after = tracemalloc.take_snapshot()
        await leave(child)
        nursery.cancel_scope.cancel()
    diff = after.compare_to(before, "traceback")
    total = sum(stat.size_diff for stat in diff)
    groups: collections.Counter[str] = collections.Counter()
    for stat in diff:
        groups[_where(stat.traceback)] += stat.size_diff
    print(f"# {connections} idle connections; traced Python heap per connection, by the "
          f"innermost trio-chat line that allocated it")
    for where, size in groups.most_common(20):
        if abs(size) >= connections * 16:
            print(f"{size / connections:8.0f}  {where}")
    print(f"trace: {total / connections:.0f} B of traced heap per idle connection "
          f"({connections} connections)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    args = p.parse_args(argv)
    tracemalloc.start(30)
    with tempfile.TemporaryDirectory(prefix="trace_conns_") as tmp:
        trio.run(measure, args.connections, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
