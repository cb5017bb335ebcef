#!/usr/bin/env python3
"""Idle connections: resident memory per connection and the heartbeat's CPU.

For each server (trio-chat on its embedded default, then the minimal ``websockets``
broadcast server of scripts/bench/reference.py), connects ``--connections`` clients that only
listen, ``--room-size`` to a room, from load-generator processes pinned away from
the server. Memory per connection is the growth of the server's RSS from just
before connecting them to once they are all upgraded and the RSS has settled,
divided by their number (a warm-up batch connects and leaves first, so code
paths loaded once do not count). CPU is the server's over ``--window`` seconds
of idling, in % of one core; the clients answer every ping, and the window
covers a whole ping period, so every connection is pinged once in it.

``--quick``: 2,000 connections and a 10 s window with a 5 s ping period (ten
times the default rate of pings: an upper bound for the idle CPU).

Usage::

    .venv/bin/python scripts/bench_conns.py --quick
    .venv/bin/python scripts/bench_conns.py                  # 10,000 connections, 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen, probes, scale, servers

MEMORY_GOAL_KIB = 12.0
CPU_GOAL = 5.0
WARMUP_CONNECTIONS = 200


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    server_cpus, load_cpus = servers.split_cpus(args.pin) or (None, None)
    result: dict[str, Any] = {"server": name}
    with tempfile.TemporaryDirectory(prefix="bench_conns_") as tmp:
        server = servers.start_server(name, Path(tmp), server_cpus,
                                     {"pingPeriod": args.ping_period},
                                     ping_interval=args.ping_period)
        pid = server.proc.pid
        try:
            # Warm up: a batch connects and leaves, so one-off allocations are in the base.
            warm = [10**9 + r for r in range(WARMUP_CONNECTIONS // args.room_size + 1)]
            rooms = [warm[i % len(warm)] for i in range(WARMUP_CONNECTIONS)]
            pipes, procs = loadgen.spawn(scale.idle_worker, [
                scale.client_spec(server.port, rooms, load_cpus)])
            scale.gather(pipes, "connected", 60)
            pipes[0].send(("stop",))
            scale.gather(pipes, "result", 30)
            loadgen.reap(pipes, procs)
            base = probes.settle(lambda: probes.rss(pid))
            base_fds = probes.open_fds(pid)
            n = args.connections
            nrooms = -(-n // args.room_size)
            rooms = [2 * 10**9 + i % nrooms for i in range(n)]
            t0 = time.monotonic()
            specs = [scale.client_spec(server.port, part, load_cpus,
                                        connect_timeout=30 + n / 200)
                     for part in scale.split(rooms, args.workers)]
            pipes, procs = loadgen.spawn(scale.idle_worker, specs)
            try:
                connected = scale.gather(pipes, "connected", 60 + n / 100)
                result["connect_s"] = time.monotonic() - t0
                result["connected"] = sum(m[1] for m in connected if m)
                result["connect_errors"] = [e for m in connected if m for e in m[2]][:3]
                if result["connected"] < n:
                    result["error"] = (f"{result['connected']} of {n} connected: "
                                       f"{result['connect_errors']}")
                    return result
                after = probes.settle(lambda: probes.rss(pid))
                result["fds"] = probes.open_fds(pid) - base_fds
                result["kib_per_conn"] = (after - base) / n / 1024
                result["rss_base_mib"] = base / 2**20
                result["rss_after_mib"] = after / 2**20
                if name == "trio-chat":
                    m = probes.metrics(server.port)
                    result["tasks"] = m.get("triochat_trio_tasks")
                    result["open"] = m.get("triochat_connections_open")
                cpu0, w0 = probes.cpu_seconds(pid), time.monotonic()
                time.sleep(args.window)
                cpu1, w1 = probes.cpu_seconds(pid), time.monotonic()
                result["idle_cpu"] = 100 * (cpu1 - cpu0) / (w1 - w0)
                for pipe in pipes:
                    pipe.send(("stop",))
                finals = scale.gather(pipes, "result", 60)
                result["alive"] = sum(m[1]["alive"] for m in finals if m)
                result["pings"] = sum(m[1]["pings"] for m in finals if m)
                closes: dict[str, int] = {}
                for m in finals:
                    for k, v in (m[1]["closes"] if m else {}).items():
                        closes[k] = closes.get(k, 0) + v
                result["closes"] = closes
                if result["alive"] < n:
                    result["error"] = f"{n - result['alive']} connections lost: {closes}"
            finally:
                for pipe in pipes:
                    with contextlib.suppress(OSError):
                        pipe.send(("stop",))
                loadgen.reap(pipes, procs)
        finally:
            server.stop()
    return result


def line(r: dict[str, Any]) -> str:
    if "kib_per_conn" not in r:
        return f"{r['server']} error: {r.get('error')}"
    text = (f"{r['server']} {r['connected']} connections {r['kib_per_conn']:.1f} KiB/conn, "
            f"idle cpu {r['idle_cpu']:.1f}%")
    if "pings" in r:
        text += f", {r['pings']} pings answered"
    if r.get("error"):
        text += f" ERROR {r['error']}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 connections, 10 s, 5 s pings")
    p.add_argument("--connections", type=int, default=None, help="idle clients (10,000)")
    p.add_argument("--room-size", type=int, default=100, help="clients per room (100)")
    p.add_argument("--window", type=float, default=None,
                   help="seconds of idling measured (60; --quick 10)")
    p.add_argument("--ping-period", type=float, default=None,
                   help="trio-chat's pingPeriod and the websockets server's ping "
                        "interval (54; --quick 5)")
    p.add_argument("--workers", type=int, default=4, help="load-generator processes (4)")
    p.add_argument("--server", choices=(*servers.SERVERS, "both"), default="both")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the server to CPU 0 and the clients to the others")
    args = p.parse_args(argv)
    quick = args.quick
    args.connections = args.connections or (2000 if quick else 10_000)
    args.window = args.window or (10.0 if quick else 60.0)
    args.ping_period = args.ping_period or (5.0 if quick else 54.0)
    loadgen.raise_nofile()
    names = servers.SERVERS if args.server == "both" else (args.server,)
    print(f"# {args.connections} idle connections, {args.room_size} per room; ping every "
          f"{args.ping_period:g} s; CPU over {args.window:g} s; goals: at most "
          f"{MEMORY_GOAL_KIB:g} KiB per connection, under {CPU_GOAL:g}% of a core", flush=True)
    results = []
    for name in names:
        r = measure(name, args)
        results.append(r)
        print(f"# {name}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in r.items() if k != "server"), flush=True)
    print("conns: " + " | ".join(line(r) for r in results)
          + f" | ping every {args.ping_period:g} s, {args.room_size} per room", flush=True)
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
