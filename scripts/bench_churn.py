#!/usr/bin/env python3
"""Connection churn: connects plus disconnects per second, then a leak check.

For each server (trio-chat on its embedded default, then the minimal ``websockets``
broadcast server of scripts/bench/reference.py), load-generator processes pinned away from
the server open ``--rate`` connections a second for ``--duration`` seconds over
``--rooms`` rooms. Each connection does the HTTP upgrade, then closes with 1000
at once; a cycle counts when the server has answered the close and hung up.

The leak check is an assertion, read once the server has settled and compared
with the same readings taken before the churn (after a warm-up churn, so
one-off allocations are in the baseline): the server's open descriptors must
be back, and for trio-chat ``/metrics`` must show the same number of trio tasks,
no open connection and no live room. Any leak, failed cycle, or a rate achieved
below 98% of the offered one fails the run (exit 1).

Usage::

    .venv/bin/python scripts/bench_churn.py --quick            # 5 s
    .venv/bin/python scripts/bench_churn.py                    # 1,000/s for 30 s
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen, probes, scale, servers

WARMUP_SECONDS = 1.0
WARMUP_RATE = 100.0
MAX_OPEN = 2000  # per load generator: if the server falls further behind, it shows


def _readings(server: servers.ServerProcess) -> dict[str, float]:
    out: dict[str, float] = {"fds": probes.open_fds(server.proc.pid)}
    if server.name == "trio-chat":
        m = probes.metrics(server.port)
        out.update(tasks=m["triochat_trio_tasks"], open=m["triochat_connections_open"],
                   rooms=m["triochat_rooms_live"])
    return out


def _churn(server: servers.ServerProcess, rate: float, duration: float, rooms: list[int],
           workers: int, cpus: set[int] | None) -> dict[str, Any]:
    specs = []
    for part in scale.split(rooms, workers):
        spec = scale.client_spec(server.port, part, cpus)
        spec.update(rate=rate / workers, duration=duration, max_open=MAX_OPEN)
        specs.append(spec)
    pipes, procs = loadgen.spawn(scale.churn_worker, specs)
    try:
        scale.gather(pipes, "connected", 60)
        cpu0, t0 = probes.cpu_seconds(server.proc.pid), time.monotonic()
        finals = scale.gather(pipes, "result", duration + 60)
        wall = time.monotonic() - t0
        cpu = 100 * (probes.cpu_seconds(server.proc.pid) - cpu0) / wall
    finally:
        loadgen.reap(pipes, procs)
    if any(m is None for m in finals):
        return {"error": "a load generator gave no result"}
    results = [m[1] for m in finals]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    done = sum(r["done"] for r in results)
    # Sustained: from the first due connect to the last completed cycle, not the schedule.
    span = max(duration, *(r["span"] for r in results))
    return {"opened": sum(r["opened"] for r in results), "done": done,
            "failed": sum(r["failed"] for r in results),
            "unfinished": sum(r["unfinished"] for r in results),
            "behind_s": max(r["behind"] for r in results), "errors": errors,
            "achieved": done / span, "span": span, "server_cpu": cpu}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    server_cpus, load_cpus = servers.split_cpus(args.pin) or (None, None)
    rooms = [3 * 10**9 + i for i in range(args.rooms)]
    with tempfile.TemporaryDirectory(prefix="bench_churn_") as tmp:
        server = servers.start_server(name, Path(tmp), server_cpus)
        try:
            _churn(server, WARMUP_RATE, WARMUP_SECONDS, rooms, 1, load_cpus)
            before = probes.settle(lambda: tuple(_readings(server).values()))
            result = _churn(server, args.rate, args.duration, rooms, args.workers, load_cpus)
            after = probes.settle(lambda: tuple(_readings(server).values()), timeout=30)
            keys = list(_readings(server))
            result["before"] = dict(zip(keys, before, strict=True))
            result["after"] = dict(zip(keys, after, strict=True))
            leaks = [f"{k} {b:g} -> {a:g}" for k, b, a in zip(keys, before, after, strict=True)
                     if (a > b if k == "fds" else a != b)]
            result["leaks"] = leaks
            if not server.alive:
                result["error"] = "server exited"
        finally:
            server.stop()
    result["server"] = name
    return result


def verdict(r: dict[str, Any], rate: float) -> list[str]:
    if r.get("error"):
        return [r["error"]]
    why = [f"leak: {leak}" for leak in r["leaks"]]
    if r["failed"] or r["unfinished"]:
        why.append(f"{r['failed']} failed, {r['unfinished']} unfinished: {r['errors']}")
    if r["achieved"] < 0.98 * rate:
        why.append(f"achieved {r['achieved']:.0f}/s of {rate:g}/s")
    return why


def line(r: dict[str, Any], rate: float) -> str:
    if r.get("error"):
        return f"{r['server']} error: {r['error']}"
    why = verdict(r, rate)
    keys = ", ".join(f"{k} {r['before'][k]:g}->{r['after'][k]:g}" for k in r["before"])
    return (f"{r['server']} {r['achieved']:.0f} cycles/s of {rate:g} offered, "
            f"{r['done']} done, {r['failed']} failed, server cpu {r['server_cpu']:.0f}%, "
            f"{keys}: " + ("pass" if not why else "FAIL " + "; ".join(why)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 s instead of 30 s")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="connections opened (and closed) per second (1000)")
    p.add_argument("--duration", type=float, default=None, help="seconds (30; --quick 5)")
    p.add_argument("--rooms", type=int, default=100, help="rooms the clients spread over")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes (2)")
    p.add_argument("--server", choices=(*servers.SERVERS, "both"), default="both")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the server to CPU 0 and the clients to the others")
    args = p.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 30.0)
    loadgen.raise_nofile()
    names = servers.SERVERS if args.server == "both" else (args.server,)
    print(f"# churn: {args.rate:g} connections/s, each upgraded then closed with 1000, for "
          f"{args.duration:g} s over {args.rooms} rooms; then the leak check", flush=True)
    results = []
    for name in names:
        r = measure(name, args)
        results.append(r)
        print(f"# {name}: {r}", flush=True)
    print("churn: " + " | ".join(line(r, args.rate) for r in results)
          + f" | {args.duration:g} s", flush=True)
    return 0 if all(not verdict(r, args.rate) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
