"""What a durable ack costs: accept-to-ack and send-to-delivery latency, and the highest
message rate whose ack p99 stays within a bound, for each history store and
``server.ackAfter`` ("stored", the default, against "accepted").

Each configuration runs a fresh ``trio-chat serve`` process (pinned to the first CPU
when there are two; the load runs on the other): SQLite (the embedded default), MariaDB
(127.0.0.1:3306, a database of its own, dropped afterwards), and MariaDB with Redis
(127.0.0.1:6379, a channel prefix of its own). Senders send tagged frames
(``client_msg_id``) at a fixed total rate, spread over one room, and time each ack; a
member of the same room times each delivery. Server CPU comes from /proc.

    python scripts/bench_acks.py [--quick] [--rates 100,200,500] [--p99 50]

Prints one line per configuration and rate, then a summary line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pymysql
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
ROOM = 77
SENDERS = 10
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@contextmanager
def mariadb_database() -> Iterator[str]:
    name = f"trio_chat_bench_{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def config_for(store: str, ack_after: str, workdir: Path, database: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"port": 0, "ackAfter": ack_after},
        "sqlite": {"path": str(workdir / f"{store}-{ack_after}.db")},
        "limits": {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                   "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000,
                   "floodLimit": 1_000_000}}
    if store in ("mariadb", "redis+mariadb"):
        config["db"] = {"host": MYSQL["host"], "port": MYSQL["port"], "id": MYSQL["user"],
                        "password": MYSQL["password"], "database": database}
    if store == "redis+mariadb":
        channel = f"bench-acks-{secrets.token_hex(4)}"
        config["redis"] = {"host": "127.0.0.1", "port": 6379,
                           "listeningChannelName": channel, "publishChannelName": channel}
    return config


class Server:
    def __init__(self, config: dict[str, Any], workdir: Path, cpu: int | None) -> None:
        path = workdir / "bench-acks.json"
        path.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trio_chat.cli", "serve", str(path)],
            stderr=subprocess.PIPE, cwd=ROOT)
        if cpu is not None:
            os.sched_setaffinity(self.process.pid, {cpu})
        log = b""
        assert self.process.stderr is not None
        while not (match := re.search(rb"listening on http://127.0.0.1:(\d+)/", log)):
            chunk = self.process.stderr.readline()
            if not chunk:
                raise SystemExit(f"the server did not start:\n{log.decode()}")
            log += chunk
        self.port = int(match.group(1))
        self.ps = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def run_rate(port: int, rate: float, seconds: float) -> dict[str, Any]:
    """Send ``rate`` frames a second for ``seconds``; ack and delivery latencies (ms)."""
    url = f"ws://127.0.0.1:{port}/ws/{ROOM}"
    sent_at: dict[str, float] = {}
    acks: list[float] = []
    deliveries: list[float] = []
    errors = 0
    total = int(rate * seconds)
    done = trio.Event()

    async def member() -> None:
        async with open_websocket_url(url, max_message_size=1 << 24) as ws:
            ready.set()
            while len(deliveries) < total:
                frame = json.loads(await ws.get_message())
                cmid = frame.get("client_msg_id")
                if frame.get("message_type") == "chat_txt" and cmid in sent_at:
                    deliveries.append((time.perf_counter() - sent_at[cmid]) * 1000)
        done.set()

    async def sender(n: int) -> None:
        nonlocal errors
        async with open_websocket_url(url) as ws:
            async def read() -> None:
                nonlocal errors
                while True:
                    frame = json.loads(await ws.get_message())
                    kind = frame.get("message_type")
                    if kind == "ack":
                        acks.append((time.perf_counter() - sent_at[frame["client_msg_id"]])
                                    * 1000)
                    elif kind == "error":
                        errors += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                interval = SENDERS / rate
                start = trio.current_time() + n * interval / SENDERS
                for i in range(n, total, SENDERS):
                    await trio.sleep_until(start + (i // SENDERS) * interval)
                    cmid = f"s{n}-{i}-{secrets.token_hex(2)}"
                    sent_at[cmid] = time.perf_counter()
                    await ws.send_message(json.dumps({
                        "message_type": "chat_txt", "author_id": 100 + n, "room_id": ROOM,
                        "content": "a seed-sized chat message, about this long",
                        "create_at": "2022-06-05T12:00:00.000Z", "client_msg_id": cmid}))
                await done.wait()
                nursery.cancel_scope.cancel()

    ready = trio.Event()
    try:
        with trio.move_on_after(seconds + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member)
                await ready.wait()
                for n in range(SENDERS):
                    nursery.start_soon(sender, n)
    except Exception as exc:
        if not _closed(exc):
            raise
        errors += 1  # a connection dropped (the load generator fell behind): over

    return {"sent": total, "acked": len(acks), "delivered": len(deliveries), "errors": errors,
            "ack_p50": percentile(acks, 50), "ack_p99": percentile(acks, 99),
            "delivery_p50": percentile(deliveries, 50),
            "delivery_p99": percentile(deliveries, 99)}


def _closed(exc: BaseException) -> bool:
    """Whether ``exc`` is, or groups, only connections that closed."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:
        return all(_closed(e) for e in inner)
    return isinstance(exc, ConnectionClosed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short steps, fewer rates")
    parser.add_argument("--rates", default="100,200,500",
                        help="total messages a second to try, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate")
    parser.add_argument("--p99", type=float, default=50.0, help="ack p99 bound in ms")
    parser.add_argument("--stores", default="sqlite,mariadb,redis+mariadb")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    seconds = args.seconds
    if args.quick:
        rates, seconds = rates[:2], 2.0
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu = cpus[0] if len(cpus) >= 2 else None
    if server_cpu is not None:
        os.sched_setaffinity(0, set(cpus[1:]))
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores.split(","):
            for ack_after in ("stored", "accepted"):
                with mariadb_database() as database:
                    config = config_for(store, ack_after, Path(tmp), database)
                    server = Server(config, Path(tmp), server_cpu)
                    best = None
                    try:
                        for rate in rates:
                            cpu0 = server.cpu()
                            result = trio.run(run_rate, server.port, rate, seconds)
                            cpu_us = (server.cpu() - cpu0) / max(1, result["acked"]) * 1e6
                            ok = (result["acked"] == result["sent"] and not result["errors"]
                                  and result["ack_p99"] <= args.p99)
                            print(f"{store:14} ackAfter={ack_after:8} rate={rate:6.0f}/s "
                                  f"acked={result['acked']}/{result['sent']} "
                                  f"errors={result['errors']} "
                                  f"ack p50={result['ack_p50']:.1f} p99={result['ack_p99']:.1f}"
                                  f" ms  delivery p50={result['delivery_p50']:.1f} "
                                  f"p99={result['delivery_p99']:.1f} ms  "
                                  f"server CPU {cpu_us:.0f} us/message (whole process)"
                                  f"{'' if ok else '  (over the bound)'}", flush=True)
                            if ok:
                                best = (rate, result)
                    finally:
                        server.stop()
                if best is None:
                    line = (f"{store} ackAfter={ack_after}: no rate tried kept ack p99 <= "
                            f"{args.p99:g} ms")
                else:
                    rate, r = best
                    line = (f"{store} ackAfter={ack_after}: highest rate with ack p99 <= "
                            f"{args.p99:g} ms: {rate:.0f}/s (ack p50 {r['ack_p50']:.1f} ms, "
                            f"p99 {r['ack_p99']:.1f} ms; delivery p50 {r['delivery_p50']:.1f}"
                            f" ms, p99 {r['delivery_p99']:.1f} ms)")
                summary.append(line)
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
