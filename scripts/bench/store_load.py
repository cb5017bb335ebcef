"""The history store benchmark's in-process part: trio-chat's write-behind Store fed
at an offered rate (or in one burst) over several rooms, every committed batch
stamped so each message's write lag is known, with the database server's CPU."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql
import trio

from trio_chat.bridge import open_bridge
from trio_chat.config import DbConfig
from trio_chat.metrics import Metrics
from trio_chat.protocol import Message, utc_now
from trio_chat.store import Backend, MysqlBackend, SqliteBackend, Store, StoreUnavailable

try:
    import psutil
except ImportError:  # the database server's CPU column is left empty without it
    psutil = None

DATABASE = "trio_chat_bench"
TICK = 0.010  # seconds between bursts of the generator, and between samples of store.lag
CREATE_AT = "2022-06-05T12:00:00.000Z"
CONTENT_SIZE = 100
FLUSH_TIMEOUT = 120.0  # seconds allowed to drain after the offered window



class Stamped:
    """A backend wrapper that stamps each committed batch.

    The store writes in FIFO order, so a batch is a contiguous run of the
    sequence numbers the generator gave out; only the first and last are kept,
    plus the commit time, which keeps the writer's path as cheap as the
    server's.
    """

    def __init__(self, inner: Backend, rooms: int) -> None:
        self.inner = inner
        self.rooms = rooms
        self.batches: list[tuple[int, int, float]] = []  # (first seq, last seq, commit time)
        self.insert_seconds = 0.0  # wall time spent inside inner.insert, failures included
        self.failures = 0

    def seq(self, m: Message) -> int:
        return (m.id - 1) * self.rooms + (m.room_id - 1)

    async def open(self) -> int:
        return await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def insert(self, messages: list[Message]) -> None:
        t0 = time.perf_counter()
        try:
            await self.inner.insert(messages)
        except BaseException:
            self.failures += 1
            raise
        finally:
            self.insert_seconds += time.perf_counter() - t0
        self.batches.append((self.seq(messages[0]), self.seq(messages[-1]),
                             time.perf_counter()))

    async def last_id(self, room_id: int) -> int:
        return await self.inner.last_id(room_id)

    async def page(self, room_id: int, **kwargs: Any) -> list[Message]:
        return await self.inner.page(room_id, **kwargs)


def make_message(seq: int, rooms: int, received_at: str) -> Message:
    """Message number ``seq``: rooms take turns, ids count up from 1 in each room."""
    head = f"m{seq} "
    return Message(seq // rooms + 1, seq % rooms + 1, 7 + seq % 13, "chat_txt",
                   head + "x" * (CONTENT_SIZE - len(head)), CREATE_AT, received_at)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def expected_id_sum(n: int, rooms: int) -> int:
    return sum(seq // rooms + 1 for seq in range(n))


class Target:
    """One backend to measure: how to make it fresh, and how to count what it holds."""

    def __init__(self, kind: str, args: argparse.Namespace, workdir: Path) -> None:
        self.kind = kind
        self.args = args
        self.workdir = workdir
        self.runs = 0
        self.path = ""
        self.db: DbConfig | None = None

    def fresh(self) -> Backend:
        self.runs += 1
        if self.kind == "mysql":
            self.db = reset_mysql(self.args, DATABASE)
            return MysqlBackend(self.db)
        self.path = str(self.workdir / f"bench{self.runs}.db")
        return SqliteBackend(self.path)

    def count(self) -> tuple[int, int]:
        """(rows, sum of ids) in the messages table."""
        sql = "SELECT COUNT(*), COALESCE(SUM(id), 0) FROM messages"
        if self.kind == "mysql":
            assert self.db is not None
            conn = mysql_connect(self.args, self.db.database)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    n, total = cur.fetchone()
            finally:
                conn.close()
        else:
            conn = sqlite3.connect(self.path)
            try:
                n, total = conn.execute(sql).fetchone()
            finally:
                conn.close()
        return int(n), int(total)

    def cleanup(self) -> None:
        if self.kind == "sqlite" and self.path:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(self.path + suffix)


def mysql_connect(args: argparse.Namespace, database: str | None = None) -> Any:
    return pymysql.connect(host=args.mysql_host, port=args.mysql_port, user=args.mysql_user,
                           password=args.mysql_password, database=database, autocommit=True,
                           connect_timeout=10, read_timeout=60, write_timeout=60)


def reset_mysql(args: argparse.Namespace, database: str) -> DbConfig:
    """Drop ``database``; the backend creates it again when it opens."""
    conn = mysql_connect(args)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
    finally:
        conn.close()
    return DbConfig(id=args.mysql_user, password=args.mysql_password, host=args.mysql_host,
                    port=args.mysql_port, database=database)


def db_server_process() -> Any:
    """The local MariaDB/MySQL server process, to read its CPU time (None if not found)."""
    if psutil is None:
        return None
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("mariadbd", "mysqld"):
            return p
    return None


class CpuClock:
    """CPU seconds of this process and of the database server over a window."""

    def __init__(self, db_proc: Any) -> None:
        self.db_proc = db_proc
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.db = self._db()

    def _db(self) -> float | None:
        if self.db_proc is None:
            return None
        try:
            t = self.db_proc.cpu_times()
        except Exception:
            return None
        return t.user + t.system

    def percent(self) -> tuple[float, float | None]:
        """(% of one core used by this process, by the database server)."""
        wall = max(time.perf_counter() - self.wall, 1e-9)
        own = 100 * (time.process_time() - self.own) / wall
        db_now = self._db()
        db = None if db_now is None or self.db is None else 100 * (db_now - self.db) / wall
        return own, db


async def run_rate(target: Target, rate: float, args: argparse.Namespace,
                   db_proc: Any) -> dict[str, Any]:
    """Offer ``rate`` messages/s for ``args.duration`` seconds; measure commits and lag."""
    rooms = args.rooms
    row: dict[str, Any] = {"store": target.kind, "rate": rate, "error": None}
    backend = target.fresh()
    stamped = Stamped(backend, rooms)
    metrics = Metrics()
    store = Store(stamped, metrics, buffer_limit=args.buffer, batch_size=args.batch)
    bursts: list[tuple[int, int, float, float]] = []  # (first seq, end seq, appended, due)
    backlog: list[int] = []  # store.lag every TICK
    lateness: list[float] = []  # how late each burst went out, s
    refused = 0
    appended = 0
    n_ticks = max(1, round(args.duration / TICK))
    async with open_bridge(needed=target.kind == "mysql"), trio.open_nursery() as nursery:
        await nursery.start(store.run)

        sampler = trio.CancelScope()

        async def sample() -> None:
            with sampler:
                while True:
                    backlog.append(store.lag)
                    await trio.sleep(TICK)

        nursery.start_soon(sample)
        clock = CpuClock(db_proc)
        start = time.perf_counter()
        t_start = trio.current_time()
        for k in range(1, n_ticks + 1):
            # Absolute schedule: at the end of each tick, everything due by then not yet sent.
            await trio.sleep_until(t_start + k * TICK)
            due = start + k * TICK
            n = math.floor(rate * TICK * k + 1e-6) - (appended + refused)
            now = time.perf_counter()
            lateness.append(now - due)
            received_at = utc_now()
            first = appended
            for _ in range(n):
                try:
                    store.check_capacity()
                except StoreUnavailable:
                    refused += 1
                    continue
                store.append(make_message(appended, rooms, received_at))
                appended += 1
            if appended > first:
                bursts.append((first, appended, now, due))
        offered_end = time.perf_counter()
        try:
            with trio.fail_after(FLUSH_TIMEOUT):
                await store.flush()
        except trio.TooSlowError:
            row["error"] = f"not flushed within {FLUSH_TIMEOUT:g} s ({store.lag} waiting)"
        flushed = time.perf_counter()
        own_cpu, db_cpu = clock.percent()
        sampler.cancel()
        nursery.cancel_scope.cancel()

    # Per-message lag: walk the bursts and the committed batches together (both in order).
    lags: list[float] = []
    contiguous = True
    bi = 0
    expect = 0
    for first, last, committed in stamped.batches:
        if first != expect:
            contiguous = False
        expect = last + 1
        while bi < len(bursts) and bursts[bi][0] <= last:
            b_first, b_end, t_append, _ = bursts[bi]
            lo, hi = max(b_first, first), min(b_end, last + 1)
            lags.extend([committed - t_append] * (hi - lo))
            if b_end <= last + 1:
                bi += 1
            else:
                break
    lags.sort()
    written = metrics.store_written
    last_commit = stamped.batches[-1][2] if stamped.batches else start
    rows, id_sum = target.count()
    want_sum = expected_id_sum(appended, rooms)
    lateness.sort()
    row.update(
        offered_per_s=(appended + refused) / (offered_end - start),
        appended=appended, refused=refused, written=written, rows=rows,
        batches=len(stamped.batches), store_errors=metrics.store_errors,
        persisted_per_s=written / (last_commit - start) if last_commit > start else 0.0,
        drain_s=flushed - offered_end,
        lag_p50_ms=percentile(lags, 0.50) * 1000, lag_p99_ms=percentile(lags, 0.99) * 1000,
        lag_max_ms=(lags[-1] * 1000) if lags else math.nan,
        backlog_max=max(backlog, default=0),
        backlog_p99=percentile(sorted(backlog), 0.99),
        backlog_lag_ms=1000 * max(backlog, default=0) / rate,
        late_p99_ms=percentile(lateness, 0.99) * 1000,
        late_max_ms=(lateness[-1] * 1000) if lateness else math.nan,
        cpu=own_cpu, db_cpu=db_cpu,
        insert_busy=100 * stamped.insert_seconds / max(flushed - start, 1e-9),
        mean_batch=written / len(stamped.batches) if stamped.batches else 0.0,
    )
    problems = []
    if row["error"]:
        problems.append(row["error"])
    if refused:
        problems.append(f"{refused} refused")
    if rows != appended or written != appended:
        problems.append(f"rows {rows}, written {written}, appended {appended}")
    elif id_sum != want_sum:
        problems.append(f"sum of ids {id_sum}, expected {want_sum}")
    if not contiguous or len(lags) != appended:
        problems.append("batches out of order")
    row["problems"] = problems
    row["ok"] = not problems
    target.cleanup()
    return row


async def run_burst(target: Target, args: argparse.Namespace,
                    db_proc: Any) -> dict[str, Any]:
    """Append ``args.burst`` prebuilt messages as fast as possible; time until flushed."""
    total = args.burst
    received_at = utc_now()
    messages = [make_message(seq, args.rooms, received_at) for seq in range(total)]
    backend = target.fresh()
    stamped = Stamped(backend, args.rooms)
    metrics = Metrics()
    # The buffer must hold the whole burst: the server's default (100,000) would refuse some.
    store = Store(stamped, metrics, buffer_limit=total + 1, batch_size=args.batch)
    result: dict[str, Any] = {"store": target.kind, "messages": total, "error": None}
    async with open_bridge(needed=target.kind == "mysql"), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        clock = CpuClock(db_proc)
        start = time.perf_counter()
        for i in range(0, total, 1000):
            for m in messages[i:i + 1000]:
                store.check_capacity()
                store.append(m)
            await trio.lowlevel.checkpoint()
        appended = time.perf_counter()
        try:
            with trio.fail_after(FLUSH_TIMEOUT * 2):
                await store.flush()
        except trio.TooSlowError:
            result["error"] = f"not flushed within {FLUSH_TIMEOUT * 2:g} s"
        elapsed = time.perf_counter() - start
        own_cpu, db_cpu = clock.percent()
        nursery.cancel_scope.cancel()
    rows, _ = target.count()
    target.cleanup()
    result.update(per_s=metrics.store_written / elapsed, seconds=elapsed,
                  append_s=appended - start, rows=rows, written=metrics.store_written,
                  batches=len(stamped.batches), cpu=own_cpu, db_cpu=db_cpu,
                  insert_busy=100 * stamped.insert_seconds / elapsed,
                  store_errors=metrics.store_errors)
    result["ok"] = not result["error"] and rows == total == metrics.store_written
    return result


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


STORE_COLUMNS = (("store", 6), ("offered", 7), ("offered/s", 9), ("persisted/s", 11),
                 ("lag p50", 7), ("p99 ms", 7), ("max ms", 7), ("backlog", 7),
                 ("est.lag", 7), ("late ms", 7), ("batch", 6), ("cpu", 5), ("db cpu", 6),
                 ("rows", 8), ("result", 0))


def _line(cells: list[str]) -> str:
    return " ".join(c.rjust(w) if w else c
                    for c, (_, w) in zip(cells, STORE_COLUMNS, strict=True))


def print_store_header() -> None:
    print(_line([name for name, _ in STORE_COLUMNS]), flush=True)


def print_rate_row(r: dict[str, Any]) -> None:
    print(_line([r["store"], f"{r['rate']:.0f}", f"{r['offered_per_s']:.0f}",
                 f"{r['persisted_per_s']:.0f}", fmt(r["lag_p50_ms"]), fmt(r["lag_p99_ms"]),
                 fmt(r["lag_max_ms"]), str(r["backlog_max"]), fmt(r["backlog_lag_ms"]),
                 fmt(r["late_max_ms"]), fmt(r["mean_batch"], ".0f"), fmt(r["cpu"], ".0f") + "%",
                 fmt(r["db_cpu"], ".0f") + "%", str(r["rows"]),
                 "ok" if r["ok"] else "FAIL " + "; ".join(r["problems"])]), flush=True)


def print_burst_row(b: dict[str, Any]) -> None:
    print(f"{b['store']:>6}   burst: {b['messages']} messages appended in "
          f"{b['append_s'] * 1000:.0f} ms, flushed after {b['seconds']:.2f} s -> "
          f"{b['per_s']:.0f} msg/s, {b['batches']} batches, cpu {fmt(b['cpu'], '.0f')}%, "
          f"db cpu {fmt(b['db_cpu'], '.0f')}%, rows {b['rows']} "
          f"{'ok' if b['ok'] else 'FAIL ' + (b['error'] or 'row count')}", flush=True)


async def bench_store(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    db_proc = db_server_process() if "mysql" in args.backends else None
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        for kind in args.backends:
            target = Target(kind, args, Path(tmp))
            rows = []
            for rate in args.rates:
                row = await run_rate(target, rate, args, db_proc)
                print_rate_row(row)
                rows.append(row)
            burst = None
            if args.burst > 0:
                burst = await run_burst(target, args, db_proc)
                print_burst_row(burst)
            results[kind] = {"rates": rows, "burst": burst}
    return results
