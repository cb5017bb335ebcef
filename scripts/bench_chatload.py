#!/usr/bin/env python3
"""Big rooms side by side: the Go load generator ``chatload`` against each server in
turn, under the same load, in one sitting.

Servers (``--servers``, in this order in each scenario):

- ``trio-chat``: the embedded default (in-process broker, SQLite history), the
  limits meant for people lifted as every benchmark here lifts them;
- ``workers:N``: ``trio-chat serve CONFIG --workers N --port P`` with Redis at
  ``--redis-host``:``--redis-port`` (a channel of the run's own, its keys deleted
  after); the kernel spreads the room's members over the workers (SO_REUSEPORT);
- ``websockets``: the minimal asyncio broadcast server (``bench/reference.py``);
- ``gorilla``: the gorilla/websocket chat example, a Go binary built elsewhere
  (``--gorilla PATH``), run as ``PATH -addr 127.0.0.1:PORT``; one hub at ``/ws``.

Each run starts the server afresh, waits for the machine to be quiet, runs
``chatload -url ... -clients C -senders S -rate R -msgs M -wait W`` and samples
``/proc`` every 0.1 s (``bench/chatload_run.py``). Reported per run: achieved
deliveries/s (offered = C * S * R), loss, p50/p99/max latency (chatload's), the
server's CPU (utime + stime of every process of its tree) per delivery and in % of
one core over the message phase, chatload's and everything else's CPU, the server's
RSS gained per member once the clients are connected, and for Redis setups the
members each worker got, redis-server's CPU per message (INFO), its bytes in and
out per message and the pushes per message to the room's channel (out bytes less
the publish script's reply, over the size of one push): one per worker.

Pinning (``--no-pin`` to leave it to the scheduler): a single-process server
(``trio-chat``, ``websockets``, ``gorilla``: pinned before it starts, so Go's
runtime sizes GOMAXPROCS to it) runs on the first CPU and chatload on the others;
``workers:N`` pins nothing, chatload included, since the workers are there to use
every core; redis-server is never pinned.

Without ``--clients``, the sitting of issue 17: a 1,000-client room at 200,000
deliveries/s offered (where the ``workers:N`` setups run too), a 200-client room
at 300,000/s, a 10,000-client room at 100,000/s and at 200,000/s; each scenario's
servers are interleaved, ``--repeat`` times. The markdown tables go to stdout,
progress to stderr.

Usage::

    bash ../shared/tools/chatload/build.sh /tmp/chatload
    .venv/bin/python scripts/bench_chatload.py --gorilla /tmp/gorilla-chat --json out.json
    .venv/bin/python scripts/bench_chatload.py --servers trio-chat,workers:2 \\
        --clients 1000 --senders 10 --rate 20 --msgs 100 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from bench import ROOT, redis_publish
from bench.chatload_report import figures, scenario_title, table
from bench.chatload_run import Load, Options, Setup, parse_setup, run_case
from bench.loadgen import raise_nofile
from bench.probes import wait_quiet
from bench.servers import redis_client, split_cpus

# (clients, senders, msg/s per sender, whether the workers:N setups run too)
SITTING = ((1000, 10, 20.0, True), (200, 10, 150.0, False), (10000, 10, 1.0, False),
           (10000, 10, 2.0, False))
DEFAULT_SERVERS = "gorilla,websockets,trio-chat,workers:1,workers:2"
FD_MARGIN = 200  # descriptors a process needs besides one per client


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help=f"comma-separated: trio-chat, workers:N, websockets, gorilla "
                        f"({DEFAULT_SERVERS}); in the sitting, workers:N only in the "
                        "1,000-client room")
    p.add_argument("--clients", type=int, help="one scenario instead of the sitting")
    p.add_argument("--senders", type=int, default=10, help="with --clients (10)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="messages/s per sender, with --clients (20)")
    p.add_argument("--msgs", type=int, default=None,
                   help="messages per sender (default: --seconds of sending)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="seconds of sending per run when --msgs is not given (10)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each server (2)")
    p.add_argument("--wait", type=float, default=10.0,
                   help="chatload's -wait: seconds a client waits for its next message "
                        "once sending is done (10)")
    p.add_argument("--chatload", default="/tmp/chatload", help="chatload (/tmp/chatload)")
    p.add_argument("--gorilla", metavar="PATH", help="the gorilla chat example's binary")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="pin nothing (default: a single-process server on CPU 0, chatload "
                        "on the rest)")
    p.add_argument("--redis-host", default="127.0.0.1", help="for workers:N (127.0.0.1)")
    p.add_argument("--redis-port", type=int, default=6379, help="(6379)")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each run, wait up to S s for other work to stop (20)")
    p.add_argument("--redis-publish", metavar="K1,K2,...",
                   type=lambda text: [int(k) for k in text.split(",")],
                   help="also measure Redis's own cost of trio-chat's publish script with "
                        "K subscribers on the room's channel, for each K (bench/redis_publish.py)")
    p.add_argument("--redis-publish-msgs", type=int, default=100_000, metavar="N",
                   help="messages per --redis-publish run (100000)")
    p.add_argument("--json", metavar="OUT", help="write every run's record and figures here")
    p.add_argument("--keep-logs", metavar="DIR", help="copy each server's log to DIR")
    return p


@attrs.frozen
class Scenario:
    load: Load
    setups: tuple[Setup, ...]


def _scenarios(args: argparse.Namespace, setups: list[Setup]) -> list[Scenario]:
    def load(clients: int, senders: int, rate: float) -> Load:
        msgs = args.msgs or max(1, round(rate * args.seconds))
        return Load(clients, senders, rate, msgs, args.wait)

    if args.clients is not None:
        return [Scenario(load(args.clients, args.senders, args.rate), tuple(setups))]
    return [Scenario(load(c, s, r), tuple(x for x in setups if workers or not x.redis))
            for c, s, r, workers in SITTING]


def _check(args: argparse.Namespace, setups: list[Setup], scenarios: list[Scenario]
           ) -> str | None:
    """Why the sitting cannot run, or None."""
    if not os.access(args.chatload, os.X_OK):
        return (f"no chatload at {args.chatload}: build it with "
                f"bash ../shared/tools/chatload/build.sh {args.chatload}")
    if any(s.kind == "gorilla" for s in setups) and not (
            args.gorilla and os.access(args.gorilla, os.X_OK)):
        return "gorilla needs --gorilla PATH, the chat example's binary"
    most = max(s.load.clients for s in scenarios)
    if (soft := raise_nofile()) < most + FD_MARGIN:
        return f"the open-file limit is {soft}: {most} clients need {most + FD_MARGIN}"
    if args.repeat < 1 or any(s.load.rate <= 0 or s.load.senders < 1 or
                              s.load.senders > s.load.clients for s in scenarios):
        return "need --repeat >= 1, --rate > 0 and 1 <= --senders <= --clients"
    if args.redis_publish or any(s.redis for s in setups):
        import redis

        try:
            redis.Redis(host=args.redis_host, port=args.redis_port, socket_timeout=5).ping()
        except redis.RedisError as exc:
            return f"Redis at {args.redis_host}:{args.redis_port}: {exc}"
    return None


def _header(argv: list[str], cpus: tuple[set[int], set[int]] | None, started: float
            ) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    ncpu = len(os.sched_getaffinity(0))
    placement = ("nothing pinned" if cpus is None else
                 f"single-process servers pinned to CPU {min(cpus[0])}, chatload to CPU "
                 f"{','.join(map(str, sorted(cpus[1])))}; workers:N and chatload unpinned")
    return [f"Command: `.venv/bin/python scripts/bench_chatload.py {' '.join(argv)}`",
            f"trio-chat commit {commit}; {ncpu} CPUs; {placement}; redis-server unpinned; "
            f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}.",
            "CPU µs/delivery: server CPU (utime + stime of its processes) over the message "
            "phase ÷ deliveries received; server, chatload and other CPU in % of one core "
            "over that phase; KiB/member: server RSS gained while the clients connected ÷ "
            "clients. Latencies are chatload's, send to receive."]


def _progress(index: int, total: int, record: dict[str, Any]) -> None:
    f = figures(record)
    if "error" in f:
        line = f"error: {f['error']}"
    else:
        line = (f"achieved {f['achieved']:,.0f}/s of {f['offered']:,.0f}, lost {f['lost']}, "
                f"p50 {f['p50_ms']:.1f} p99 {f['p99_ms']:.1f} max {f['max_ms']:.1f} ms, "
                f"{f['cpu_us_per_delivery'] or 0:.2f} µs/delivery, server {f['server_pct']:.0f}%"
                f" chatload {f['load_pct']:.0f}% other {f['other_pct']:.0f}%, "
                f"{f['rss_per_member'] / 1024:.1f} KiB/member")
        if "redis_us_per_msg" in f:
            line += (f", members {f.get('members_per_process')}, Redis "
                     f"{f['redis_us_per_msg']:.1f} µs/msg, "
                     f"{f.get('redis_pushes_per_msg') or 0:.2f} pushes/msg")
    print(f"# [{index}/{total}] {record['server']}, {record['clients']} clients: {line}",
          file=sys.stderr, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        setups = [parse_setup(s.strip()) for s in args.servers.split(",") if s.strip()]
    except ValueError as exc:
        print(f"bench_chatload: {exc}", file=sys.stderr)
        return 2
    scenarios = _scenarios(args, setups)
    if problem := _check(args, setups, scenarios):
        print(f"bench_chatload: {problem}", file=sys.stderr)
        return 2
    cpus = split_cpus(args.pin)
    single = Options(args.chatload, args.gorilla, cpus[0] if cpus else None,
                     cpus[1] if cpus else None, args.redis_host, args.redis_port,
                     args.quiet_wait, Path(args.keep_logs) if args.keep_logs else None)
    unpinned = attrs.evolve(single, server_cpus=None, load_cpus=None)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    runs = [(sc, setup) for sc in scenarios for _ in range(args.repeat) for setup in sc.setups]
    done: list[tuple[Scenario, dict[str, Any]]] = []
    interrupted = False
    publish: list[dict[str, Any]] = []
    try:
        for i, (sc, setup) in enumerate(runs, 1):
            record = run_case(setup, sc.load, unpinned if setup.redis else single)
            done.append((sc, record))
            _progress(i, len(runs), record)
        for k in args.redis_publish or ():
            wait_quiet(args.quiet_wait)
            client = redis_client(args)
            try:
                publish.append(redis_publish.measure(client, args.redis_host,
                                                     args.redis_port, k,
                                                     args.redis_publish_msgs))
            finally:
                client.close()
            print(f"# Redis publish: {publish[-1]}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("# interrupted", file=sys.stderr)
    lines = _header(argv, cpus, started)
    for sc in scenarios:
        records = [r for s, r in done if s is sc]
        if records:
            load = sc.load
            title = scenario_title(load.clients, load.senders, load.rate, load.msgs)
            lines += ["", f"**{title}**", "", table(records)]
    if publish:
        lines += ["", "**Redis's own cost per message: trio-chat's publish script "
                  "(redis-benchmark), K subscribers on the room's channel**", "",
                  redis_publish.table(publish)]
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"argv": argv, "header": lines[:2],
             "runs": [{**r, "figures": figures(r)} for _, r in done],
             "redis_publish": publish}, indent=1,
            default=str))
    if interrupted:
        return 130
    return 1 if any(r.get("error") for _, r in done) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
