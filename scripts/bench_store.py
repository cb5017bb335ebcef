#!/usr/bin/env python3
"""History store benchmark: messages persisted per second and the write lag.

Runs trio-chat's write-behind :class:`~trio_chat.store.Store` exactly as the
server does (its writer task, its batches), over MariaDB through the asyncio
bridge and over the embedded SQLite file for comparison. For each offered rate
it appends messages over ``--rooms`` rooms on an absolute schedule (a burst
every 10 ms) for ``--duration`` seconds, records when each batch commits, and
reports persisted messages/s and the lag from append to commit (p50, p99,
max). It then checks the table holds exactly what was offered. A burst run
appends ``--burst`` messages as fast as the buffer takes them and times the
flush: the store's ceiling.

Usage::

    .venv/bin/python scripts/bench_store.py            # 10 s per rate
    .venv/bin/python scripts/bench_store.py --quick    # 3 s per rate
    .venv/bin/python scripts/bench_fanout.py --server trio-chat --rate 2000 --config C

MariaDB at 127.0.0.1:3306 as root with an empty password (``--mysql-*`` to
change); the database ``trio_chat_bench`` is dropped and recreated per run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import pymysql
import trio

from trio_chat.bridge import open_bridge
from trio_chat.config import DbConfig
from trio_chat.metrics import Metrics
from trio_chat.protocol import Message
from trio_chat.store import Backend, MysqlBackend, SqliteBackend, Store

DATABASE = "trio_chat_bench"
CONTENT = "x" * 100


class Timed:
    """A backend wrapper that notes when each message's batch committed."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.committed: dict[tuple[int, int], float] = {}

    async def open(self) -> int:
        return await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def insert(self, messages: list[Message]) -> None:
        await self.inner.insert(messages)
        now = time.perf_counter()
        for m in messages:
            self.committed[(m.room_id, m.id)] = now

    async def last_id(self, room_id: int) -> int:
        return await self.inner.last_id(room_id)

    async def page(self, room_id: int, **kwargs: object) -> list[Message]:
        return await self.inner.page(room_id, **kwargs)  # type: ignore[arg-type]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_rate(backend: Backend, rate: float, duration: float, rooms: int,
                   buffer: int) -> dict[str, float]:
    timed = Timed(backend)
    store = Store(timed, Metrics(), buffer_limit=buffer, batch_size=1000)
    appended: dict[tuple[int, int], float] = {}
    next_id = [0] * rooms
    refused = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        start = time.perf_counter()
        tick = 0.01
        sent = 0
        n_ticks = int(duration / tick)
        for k in range(n_ticks):
            target = int(rate * tick * (k + 1)) - sent
            for _ in range(target):
                room = sent % rooms
                next_id[room] += 1
                message = Message(next_id[room], room + 1, 7, "chat_txt", CONTENT,
                                  "2022-06-05T12:00:00.000Z", "2022-06-05T12:00:00.000Z")
                try:
                    store.check_capacity()
                except Exception:
                    refused += 1
                    next_id[room] -= 1
                    sent += 1
                    continue
                appended[(message.room_id, message.id)] = time.perf_counter()
                store.append(message)
                sent += 1
            await trio.sleep_until(trio.current_time() + max(
                0.0, start + tick * (k + 1) - time.perf_counter()))
        with trio.fail_after(120):
            await store.flush()
        end = max(timed.committed.values(), default=start)
        nursery.cancel_scope.cancel()
    lags = [timed.committed[key] - t for key, t in appended.items()]
    return {"offered": rate, "appended": len(appended), "refused": refused,
            "persisted_per_s": len(timed.committed) / (end - start),
            "lag_p50_ms": percentile(lags, 0.5) * 1000,
            "lag_p99_ms": percentile(lags, 0.99) * 1000,
            "lag_max_ms": max(lags, default=math.nan) * 1000,
            "written": len(timed.committed)}


async def run_burst(backend: Backend, total: int, rooms: int) -> float:
    store = Store(backend, Metrics(), buffer_limit=total + 1, batch_size=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        start = time.perf_counter()
        for i in range(total):
            store.append(Message(i // rooms + 1, i % rooms + 1 + 10_000, 7, "chat_txt",
                                 CONTENT, "2022-06-05T12:00:00.000Z",
                                 "2022-06-05T12:00:00.000Z"))
            if i % 5000 == 0:
                await trio.lowlevel.checkpoint()
        with trio.fail_after(300):
            await store.flush()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return total / elapsed


def reset_mysql(args: argparse.Namespace) -> DbConfig:
    conn = pymysql.connect(host=args.mysql_host, port=args.mysql_port, user=args.mysql_user,
                           password=args.mysql_password, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
    conn.close()
    return DbConfig(id=args.mysql_user, password=args.mysql_password, host=args.mysql_host,
                    port=args.mysql_port, database=DATABASE)


def count_mysql(db: DbConfig) -> int:
    conn = pymysql.connect(host=db.host, port=db.port, user=db.id, password=db.password,
                           database=db.database)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM messages")
        (n,) = cur.fetchone()
    conn.close()
    return int(n)


async def bench(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {}
    async with open_bridge():
        for kind in ("mysql", "sqlite"):
            rows = []
            for rate in args.rates:
                if kind == "mysql":
                    db = reset_mysql(args)
                    backend: Backend = MysqlBackend(db)
                else:
                    tmp = tempfile.mkdtemp(prefix="bench_store_")
                    backend = SqliteBackend(str(Path(tmp) / "bench.db"))
                row = await run_rate(backend, rate, args.duration, args.rooms, args.buffer)
                if kind == "mysql":
                    row["in_table"] = count_mysql(db)
                    row["ok"] = row["in_table"] == row["appended"] and not row["refused"]
                else:
                    row["ok"] = row["written"] == row["appended"] and not row["refused"]
                rows.append(row)
                print(f"{kind:>6} {rate:>8.0f} {row['persisted_per_s']:>12.0f} "
                      f"{row['lag_p50_ms']:>8.1f} {row['lag_p99_ms']:>8.1f} "
                      f"{row['lag_max_ms']:>8.1f} {row['refused']:>8} "
                      f"{'ok' if row['ok'] else 'MISMATCH'}", flush=True)
            if kind == "mysql":
                db = reset_mysql(args)
                burst_backend: Backend = MysqlBackend(db)
            else:
                burst_backend = SqliteBackend(
                    str(Path(tempfile.mkdtemp(prefix="bench_store_")) / "burst.db"))
            burst = await run_burst(burst_backend, args.burst, args.rooms)
            print(f"{kind:>6}    burst {burst:>12.0f} msg/s ({args.burst} messages)",
                  flush=True)
            results[kind] = {"rates": rows, "burst_per_s": burst}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per rate, fewer rates")
    p.add_argument("--duration", type=float, default=None, help="seconds per rate (10)")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="offered messages/s (5000 10000 20000 30000 40000)")
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--buffer", type=int, default=100_000, help="server.storeBuffer")
    p.add_argument("--burst", type=int, default=None, help="messages in the burst (200000)")
    p.add_argument("--mysql-host", default="127.0.0.1")
    p.add_argument("--mysql-port", type=int, default=3306)
    p.add_argument("--mysql-user", default="root")
    p.add_argument("--mysql-password", default="")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.rates = args.rates or ([10_000, 20_000] if args.quick else
                                [5_000, 10_000, 20_000, 30_000, 40_000])
    args.burst = args.burst or (50_000 if args.quick else 200_000)
    print(f"{'store':>6} {'offered':>8} {'persisted/s':>12} {'lag p50':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'refused':>8}", flush=True)
    results = trio.run(bench, args)
    parts = []
    for kind in ("mysql", "sqlite"):
        r = results[kind]
        ok = [row for row in r["rates"] if row["ok"] and row["lag_p99_ms"] < 1000]  # type: ignore[index]
        best = max(ok, key=lambda row: row["offered"]) if ok else None
        parts.append(
            f"{kind} max {best['offered']:.0f} msg/s offered -> "
            f"{best['persisted_per_s']:.0f} persisted/s, lag p99 {best['lag_p99_ms']:.0f} ms "
            f"max {best['lag_max_ms']:.0f} ms, burst {r['burst_per_s']:.0f} msg/s"  # type: ignore[index]
            if best else f"{kind}: no rate met lag < 1 s")
    print("store: " + " | ".join(parts) + f" | {args.rooms} rooms, {args.duration:g} s per rate")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
