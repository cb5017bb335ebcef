#!/usr/bin/env python3
"""One big-room run of the Go load generator ``chatload`` against ``trio-chat serve``,
with the server's own account of it: what ``scripts/bench_chatload.py`` measures
from outside (latency, loss, server CPU per delivery from ``/proc``, user and
system apart), plus, read from ``/metrics`` before the server stops, the large
room's flushes (frames per write), the history store's commits (write lag), the
event loop's lag and the delivery latency as the server saw it. For finding where
a tail comes from, one change at a time.

The server runs on CPU 0, chatload on CPU 1 (as in bench_chatload), on a fresh
SQLite file, with the limits meant for people lifted; ``--set KEY=JSON`` sets a
``server`` key of its config (``--set ackAfter='"accepted"'``), ``--env K=V`` an
environment variable of the server process.

Usage::

    bash ../shared/tools/chatload/build.sh /tmp/chatload
    .venv/bin/python scripts/probe_fanout.py --clients 1000 --rate 20 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
LIMITS = {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
          "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000,
          "connectionsPerIp": 1_000_000, "httpConnectionsPerIp": 1_000_000,
          "outboundBytesPerIp": 1 << 40, "outboundBytesTotal": 1 << 40,
          "inboundBytesPerIp": 1 << 40, "inboundBytesTotal": 1 << 40}


def cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) * TICK_S, int(fields[12]) * TICK_S


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def quantile(values: dict[str, float], family: str, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q``."""
    buckets = sorted((float(m.group(1)), v) for k, v in values.items()
                     if (m := re.fullmatch(rf'{family}_bucket\{{le="([^"]+)"\}}', k)))
    if not buckets or not buckets[-1][1]:
        return None
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--rate", type=float, default=20.0, help="messages/s per sender (20)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--chatload", default="/tmp/chatload")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    args = p.parse_args()
    server: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        server[key] = json.loads(value)
    env = {**os.environ, **dict(e.split("=", 1) for e in args.env)}
    exe = Path(sys.executable).parent / "trio-chat"
    with tempfile.TemporaryDirectory(prefix="probe_fanout_") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"server": server, "limits": LIMITS}))
        with open(Path(tmp) / "server.log", "wb") as log:
            proc = subprocess.Popen([str(exe), "serve", str(config), "--port", "0",
                                     "--sqlite", str(Path(tmp) / "chat.db")], stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True,
                                    preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        try:
            deadline = time.monotonic() + 30
            while not (m := re.search(rb"listening on http://127.0.0.1:(\d+)/",
                                      (Path(tmp) / "server.log").read_bytes())):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            port = int(m.group(1))
            base_fds = fds(proc.pid)
            msgs = max(1, round(args.rate * args.seconds))
            load = subprocess.Popen(
                [args.chatload, "-url", f"ws://127.0.0.1:{port}/ws/1", "-clients",
                 str(args.clients), "-senders", str(args.senders), "-rate", f"{args.rate:g}",
                 "-msgs", str(msgs)], stdout=subprocess.PIPE,
                preexec_fn=lambda: os.sched_setaffinity(0, {1}))
            while fds(proc.pid) < base_fds + args.clients:
                time.sleep(0.02)
            before = metrics(port)
            cpu0, t0 = cpu_s(proc.pid), time.monotonic()
            assert load.stdout is not None
            line = load.stdout.readline()
            cpu1, t1 = cpu_s(proc.pid), time.monotonic()
            after = metrics(port)
            load.wait(60)
        finally:
            proc.terminate()
            proc.wait(30)
    result = json.loads(line)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    writes = delta("triochat_room_flush_writes_total")
    received = max(1, result["received"])
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    report: dict[str, object] = {
        "p50_ms": round(result["p50_ms"], 1), "p99_ms": round(result["p99_ms"], 1),
        "max_ms": round(result["max_ms"], 1), "lost": result["lost"],
        "deliveries_per_s": round(result["deliveries_per_s"]),
        "cpu_us_per_delivery": round((user + system) * 1e6 / received, 2),
        # System time is mostly the writes (on loopback, the receiving side's too);
        # user time mostly the event loop's per-message work.
        "user_us_per_delivery": round(user * 1e6 / received, 2),
        "system_us_per_delivery": round(system * 1e6 / received, 2),
        "server_cpu_pct": round(100 * (user + system) / (t1 - t0)),
        "flush_writes": int(writes),
        "frames_per_write": round(delta("triochat_room_flushed_frames_total") /
                                  max(1, writes), 2),
    }
    for family, label in (("triochat_store_write_lag_seconds", "store_lag"),
                          ("triochat_delivery_latency_seconds", "server_delivery"),
                          ("triochat_event_loop_lag_seconds", "loop_lag")):
        for q in (0.5, 0.99):
            value = quantile(after, family, q)
            report[f"{label}_p{int(q * 100)}_ms"] = None if value is None else value * 1000
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
