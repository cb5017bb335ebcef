"""The fan-out benchmark's search and command line (``scripts/bench_fanout.py``
and the presets that call it): step the rate up until a step fails, bisect, and
report the highest passing rate per server."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # CPU columns are left empty without it.
    psutil = None

from bench import HOST
from bench.loadgen import WARMUP
from bench.probes import NOISY_CPU, wait_quiet
from bench.reference import run_websockets_server
from bench.report import (
    P99_LIMIT_MS,
    columns,
    print_header,
    print_row,
    summary_part,
    verdict,
)
from bench.servers import (
    SERVERS,
    Nodes,
    ServerProcess,
    fanout_servers,
    redis_cleanup,
    redis_client,
    split_cpus,
)
from bench.step import run_step

FULL_LADDER = (200, 400, 800, 1200, 1600, 2000, 2500, 3000, 3600, 4300, 5000, 6000, 7000,
               8000, 10000, 12000, 15000, 20000)
QUICK_LADDER = (200, 400, 800, 1600, 3200, 6400, 12800, 25600)
MIN_RATE = 5  # msg/s: the search halves a failing rate no lower than this


def _try(server: Nodes, rate: float, args: argparse.Namespace,
         cpu_split: tuple[set[int], set[int]] | None, outcome: dict[str, Any]) -> bool:
    """Run one step, print it, and record it as the best pass or the lowest failure.

    A step that fails while other work used the CPU is run again (``--retries``).
    """
    for attempt in range(args.retries + 1):
        busy_before = wait_quiet(args.max_wait_quiet)
        step = run_step(server, rate, args, cpu_split)
        step["busy_before"] = busy_before
        other = (step.get("cpu") or {}).get("other")
        step["noisy"] = other is not None and other > NOISY_CPU
        outcome["steps"].append(step)
        passed = not verdict(step)
        retry = (not passed and step["noisy"] and attempt < args.retries and server.alive
                 and not step.get("error"))
        note = ("  (other work on the CPU: run again)" if retry
                else "  (other work on the CPU)" if step["noisy"] else "")
        print_row(step, note, args.columns)
        time.sleep(0.5)
        if not retry:
            break
    key = "best" if passed else "limit"
    current = outcome[key]
    if current is None or (rate > current["rate"]) == passed:
        outcome[key] = step
    return passed and server.alive


def bench_server(name: str, args: argparse.Namespace,
                 cpu_split: tuple[set[int], set[int]] | None,
                 outcome: dict[str, Any]) -> None:
    """Search one server's limit, filling in ``outcome`` as it goes."""
    with tempfile.TemporaryDirectory(prefix="bench_fanout_") as tmp:
        server = fanout_servers(name, args, Path(tmp), cpu_split[0] if cpu_split else None)
        name = server.name
        outcome.update({"server": name, "steps": [], "best": None, "limit": None})
        try:
            for node in server.procs:
                node.start()
                label = name if node.tag == node.name else f"{name} {node.tag}"
                print(f"# {label}: {' '.join(node.argv)} (port {node.port}, pid "
                      f"{node.proc.pid if node.proc else '?'}"
                      f"{', workers ' if node.children else ''}"
                      f"{','.join(str(c.pid) for c in node.children)})", flush=True)
            if args.rate is not None:
                ladder: tuple[float, ...] = (args.rate,)
            else:
                ladder = args.ladder or (QUICK_LADDER if args.quick else FULL_LADDER)
            for rate in ladder:
                if not _try(server, rate, args, cpu_split, outcome):
                    break
            # Nothing passed: halve the rate, down to MIN_RATE, to find a floor.
            while args.rate is None and outcome["best"] is None and server.alive:
                rate = round(outcome["limit"]["rate"] / 2)
                if rate < MIN_RATE or _try(server, rate, args, cpu_split, outcome):
                    break
            # Bisect between the best passing rate and the lowest failing one.
            for _ in range(args.refine if args.rate is None else 0):
                best, limit = outcome["best"], outcome["limit"]
                if best is None or limit is None or not server.alive:
                    break
                mid = round((best["rate"] + limit["rate"]) / 2, -1)
                if not best["rate"] < mid < limit["rate"]:
                    break
                _try(server, mid, args, cpu_split, outcome)
            outcome["ladder_exhausted"] = outcome["limit"] is None and args.rate is None
        except Exception as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            print(f"# {name}: {outcome['error']}", file=sys.stderr, flush=True)
        finally:
            server.stop()
            events = sum(step.get("events") or 0 for step in outcome["steps"])
            if events:
                print(f"# {name}: {events} chat_enter/chat_exit event frames received "
                      "(counted apart from messages)", flush=True)
            for node in server.procs:
                _report_stop(name, node, outcome, args)


def _report_stop(name: str, server: ServerProcess, outcome: dict[str, Any],
                 args: argparse.Namespace) -> None:
    """Print how one server process stopped and what its log says; keep the log if asked."""
    counts, samples = server.log_problems()
    label = name if server.tag == server.name else f"{name} {server.tag}"
    if server.tag == server.name:
        outcome["server_exit"] = server.exit_code
        outcome["server_killed"] = server.killed
        outcome["server_log_counts"] = dict(counts)
    else:
        outcome.setdefault("nodes", {})[server.tag] = {
            "exit": server.exit_code, "killed": server.killed, "log_counts": dict(counts)}
    note = (f"# {label}: stopped with exit code {server.exit_code}"
            f"{' (SIGKILL after 15 s)' if server.killed else ''}; log: "
            + (", ".join(f"{k} x{n}" for k, n in counts.items()) or "nothing notable"))
    print(note, flush=True)
    for line in samples[:10]:
        print(f"#   {line}", flush=True)
    if args.keep_logs:
        kept = Path(args.keep_logs) / f"{server.tag}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            kept.write_bytes(server.log_path.read_bytes())
            print(f"# {label}: log kept in {kept}", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 s per step, a coarser ladder, no refinement")
    p.add_argument("--clients", type=int, default=200, help="clients in the room (200)")
    p.add_argument("--rooms", type=int, default=1,
                   help="rooms the clients are spread over, client i in room i %% ROOMS; "
                        "sender s speaks in room s %% ROOMS (1)")
    p.add_argument("--p99", type=float, default=P99_LIMIT_MS, metavar="MS",
                   help=f"the p99 latency a passing step stays within ({P99_LIMIT_MS:g})")
    p.add_argument("--ladder", type=lambda text: tuple(float(r) for r in text.split(",")),
                   default=None, metavar="R1,R2,...",
                   help="the rates (msg/s) the search steps through")
    p.add_argument("--senders", type=int, default=10,
                   help="how many of the clients also send (10)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per step (5; 2 with --quick)")
    p.add_argument("--rate", type=float, default=None,
                   help="one run at this many messages/s instead of the search")
    p.add_argument("--server", choices=(*SERVERS, "both"), default="both")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes (2)")
    p.add_argument("--content-size", type=int, default=100,
                   help="bytes of message content (100)")
    p.add_argument("--read-interval", type=float, default=1.0, metavar="MS",
                   help="poll each load-generator socket at most every MS ms (1)")
    p.add_argument("--latency-every", type=int, default=4, metavar="K",
                   help="time every message on every K-th client (4: 50 of 200 clients); "
                   "all clients count every message for loss and order")
    p.add_argument("--refine", type=int, default=None,
                   help="bisection steps after the first failure (2; 0 with --quick)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the server to CPU 0 and the load generator to the rest")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the load-generator processes (0)")
    p.add_argument("--retries", type=int, default=1,
                   help="run a failing step again if other work used the CPU meanwhile (1)")
    p.add_argument("--max-wait-quiet", type=float, default=30.0, metavar="S",
                   help="before each step, wait up to S seconds for other work on the "
                   "machine to stop (30)")
    p.add_argument("--config", metavar="PATH",
                   help="config.json for trio-chat (e.g. with a db section for MySQL history)")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="trio-chat as N node processes sharing the room through Redis, "
                   "clients and senders spread round-robin across them, all nodes pinned "
                   "to the server's CPU (1)")
    p.add_argument("--redis", action="store_true",
                   help="trio-chat through Redis even as one node (implied by --nodes > 1 "
                   "and --server-workers)")
    p.add_argument("--server-workers", type=int, default=None, metavar="N",
                   help="trio-chat as one 'serve --workers N' (N processes on one port, "
                   "through Redis); nothing is pinned, so the workers can use every core")
    p.add_argument("--redis-host", default=HOST, help="Redis for --nodes/--redis (127.0.0.1)")
    p.add_argument("--redis-port", type=int, default=6379, help="its port (6379)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the server logs to DIR")
    p.add_argument("--json", action="store_true", help="also print the results as a JSON line")
    p.add_argument("--websockets-server", type=int, metavar="PORT", default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--ping-interval", type=float, default=20.0, metavar="S",
                   help=argparse.SUPPRESS)  # the comparison server's, from the scripts
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.websockets_server is not None:
        run_websockets_server(args.websockets_server, args.ping_interval)
        return 0
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.refine is None:
        args.refine = 0 if args.quick else 2
    if not 1 <= args.rooms <= args.senders and args.rooms > 1:
        print("bench_fanout: --rooms needs a sender in every room (--senders >= --rooms)",
              file=sys.stderr)
        return 2
    if args.rooms > 1 and args.nodes > 1:
        print("bench_fanout: --rooms and --nodes do not go together", file=sys.stderr)
        return 2
    if args.clients < 1 or not 1 <= args.senders <= args.clients:
        print("bench_fanout: need 1 <= --senders <= --clients", file=sys.stderr)
        return 2
    if (args.rate is not None and args.rate <= 0) or args.duration <= 0:
        print("bench_fanout: --rate and --duration must be positive", file=sys.stderr)
        return 2
    if args.latency_every < 1:
        print("bench_fanout: --latency-every must be at least 1", file=sys.stderr)
        return 2
    if args.content_size < 48:
        print("bench_fanout: --content-size must be at least 48", file=sys.stderr)
        return 2
    if args.nodes < 1 or (args.server_workers is not None and args.server_workers < 1):
        print("bench_fanout: --nodes and --server-workers must be at least 1", file=sys.stderr)
        return 2
    if args.nodes > 1 and args.server_workers is not None:
        print("bench_fanout: --nodes and --server-workers do not go together", file=sys.stderr)
        return 2
    args.via_redis = args.redis or args.nodes > 1 or args.server_workers is not None
    if args.via_redis and args.server == "websockets":
        print("bench_fanout: --nodes, --redis and --server-workers are for trio-chat",
              file=sys.stderr)
        return 2
    args.redis_pid = None
    if args.via_redis:
        args.channel = f"bench-fanout-{secrets.token_hex(4)}"
        n = args.server_workers
        args.label = (f"{n} worker{'s' if n > 1 else ''}" if n is not None
                      else f"redis {args.nodes}n")
        try:
            client = redis_client(args)
            args.redis_pid = int(client.info("server")["process_id"])
            client.close()
        except Exception as exc:
            print(f"bench_fanout: Redis at {args.redis_host}:{args.redis_port}: {exc}",
                  file=sys.stderr)
            return 2
    # SIGTERM cleans up like Ctrl-C: the servers run in their own sessions and must be stopped.
    signal.signal(signal.SIGTERM, _terminate)
    # The workers of one supervisor are there to use every core: pinning them together
    # would defeat the test, so with --server-workers nothing is pinned.
    cpu_split = None if args.server_workers is not None else split_cpus(args.pin)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    server_desc = "server"
    if args.server_workers is not None:
        n = args.server_workers
        server_desc = f"trio-chat ({n} worker{'s' if n > 1 else ''})"
    elif args.nodes > 1:
        server_desc = f"the {args.nodes} trio-chat nodes"
    if cpu_split:
        load_cpus = ",".join(map(str, sorted(cpu_split[1])))
        placement = (f"{server_desc} pinned to CPU {min(cpu_split[0])}, load generator "
                     f"({args.workers} processes) to CPU {load_cpus}")
    else:
        placement = f"{server_desc} and load generator ({args.workers} processes) unpinned"
    if args.via_redis:
        placement += f"; redis-server (pid {args.redis_pid}) unpinned"
    where = "one room" if args.rooms == 1 else f"{args.rooms} rooms"
    print(f"# fan-out: {args.clients} clients in {where}, {args.senders} of them sending; "
          f"{args.duration:g} s measured per step after {WARMUP:g} s warm-up; pass = no loss, "
          f"p99 <= {args.p99:g} ms", flush=True)
    print(f"# {ncpu} CPUs shared by the server and the load generator: {placement}", flush=True)
    timed = len(range(0, args.clients, args.latency_every))
    print(f"# latency: every message on 1 client in {args.latency_every} ({timed} of "
          f"{args.clients}); loss and order: every client; the load generator reads each "
          f"socket at most every {args.read_interval:g} ms", flush=True)
    print("# srv/gen/other cpu: % of one core used during the measured window by the server, "
          "the load generator, and everything else on the machine; lag99: p99 of how late "
          "the generator sent, ms", flush=True)
    if psutil is None:
        print("# psutil is not installed: no CPU figures", flush=True)
    if args.via_redis:
        how = (f"one 'serve --workers {args.server_workers}' (the kernel spreads clients "
               "over the workers)" if args.server_workers is not None
               else f"{args.nodes} node{'s' if args.nodes > 1 else ''}, each with its own "
               "SQLite file" + (", clients and senders round-robin" if args.nodes > 1
                                else ""))
        print(f"# trio-chat through Redis {args.redis_host}:{args.redis_port} (channel "
              f"{args.channel}): {how}", flush=True)
        if args.nodes > 1:
            print("# same50/99, cross50/99: latency of receivers on the sender's node and "
                  "on another node, ms", flush=True)
        print("# rds cpu: redis-server, % of one core (included in no other column)",
              flush=True)
    if args.via_redis:
        names: tuple[str, ...] = ("trio-chat",)
    else:
        names = SERVERS if args.server == "both" else (args.server,)
    outcomes: dict[str, dict[str, Any]] = {}
    args.columns = columns(args.nodes > 1, args.via_redis)
    print_header(args.columns)
    try:
        for name in names:
            outcomes[name] = {}
            bench_server(name, args, cpu_split, outcomes[name])
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        if outcomes:
            outcomes[list(outcomes)[-1]]["interrupted"] = True
    finally:
        if args.via_redis:
            redis_cleanup(args)
    parts = [summary_part(outcomes[name].get("server", name), outcomes[name], args)
             for name in names if name in outcomes]
    tail = (f"{args.clients} clients, {args.senders} senders, {ncpu} cores shared with the "
            f"load generator" + (" and redis-server" if args.via_redis else ""))
    if args.rooms > 1:
        tail += f", {args.rooms} rooms"
    print(("fanout: " if args.rooms == 1 else "rooms: ") + " | ".join([*parts, tail]),
          flush=True)
    if args.json:
        setup = ({"nodes": args.nodes, "server_workers": args.server_workers,
                  "redis": f"{args.redis_host}:{args.redis_port}"} if args.via_redis else {})
        print(json.dumps({"clients": args.clients, "senders": args.senders,
                          "duration": args.duration, "cpus": ncpu,
                          "pinned": cpu_split is not None, "workers": args.workers, **setup,
                          "results": outcomes}, default=str), flush=True)
    if any(o.get("interrupted") for o in outcomes.values()):
        return 130
    return 0 if all(not o.get("error") for o in outcomes.values()) else 1

