"""What the scale benchmarks (bench_conns, bench_churn) share, on top of bench_fanout's
pieces: the servers under test, load-generator processes that hold idle connections
or churn them, and readings of the server process (RSS, CPU, descriptors, /metrics).

The load generator is bench_fanout's epoll client (:class:`bench_fanout.Load`), run in
separate processes pinned away from the server, so its memory and CPU never count.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_fanout as fan
import psutil

HOST = fan.HOST
KIB = 1024


def start_server(name: str, workdir: Path, cpus: set[int] | None,
                 server_config: dict[str, Any] | None = None,
                 ping_interval: float = 54.0) -> fan.ServerProcess:
    """Start trio-chat (``server_config`` overrides its ``server`` section; the limits
    meant for people are lifted) or the ``websockets`` comparison server, which pings
    every ``ping_interval`` seconds like trio-chat's default pingPeriod."""
    config = None
    if name == "trio-chat":
        path = workdir / "bench.json"
        path.write_text(json.dumps({
            "server": server_config or {},
            "limits": {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                       "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000,
                       "connectionsPerIp": 1_000_000}}))
        config = str(path)
    server = fan.ServerProcess(name, workdir, cpus, config)
    if name != "trio-chat":
        server.argv += ["--ping-interval", str(ping_interval)]
    server.start()
    return server


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """The server's CPUs and the load generator's (None: unpinned)."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def open_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def metrics(port: int) -> dict[str, float]:
    """trio-chat's /metrics, as name -> value."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


def settle(read: Callable[[], float], *, timeout: float = 10.0, interval: float = 0.5
           ) -> float:
    """Read until two readings in a row agree (or the timeout); the last reading."""
    last = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last


def client_spec(port: int, rooms: list[int], cpus: set[int] | None,
                connect_timeout: float = 60.0) -> dict[str, Any]:
    """A bench_fanout load-generator spec for clients that only listen, one per room
    in ``rooms``."""
    return {"ports": [port], "client_nodes": [0] * len(rooms), "same": None,
            "room": rooms[0], "client_rooms": rooms, "clients": len(rooms),
            "first_client": 0, "latency_every": 1, "sender_slots": [], "senders": 0,
            "measure_n": 1, "read_interval": 0.0, "nice": 0,
            "connect_timeout": connect_timeout,
            "cpus": sorted(cpus) if cpus else None}


def _setup(spec: dict[str, Any]) -> None:
    fan.raise_nofile()
    with contextlib.suppress(AttributeError, OSError):
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])


def idle_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Connect, report, then answer pings until told to stop; report what happened."""
    _setup(spec)
    load = fan.Load(spec)
    try:
        errors = load.connect()
        conn.send(("connected", len(load.clients) - len(errors), errors[:3]))
        while not conn.poll(0):
            load.poll(0.2)
        clients = load.clients
        conn.send(("result", {
            "alive": sum(1 for c in clients if c.alive), "pings": load.tally.pings,
            "closes": dict(Counter(f"{c.close_code} {c.close_reason}".strip()
                                   for c in clients if c.close_code is not None)),
            "errors": [c.error for c in clients if c.error][:3]}))
    finally:
        load.shutdown()


def churn_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Open a connection every 1/rate s for ``duration`` s; close each once upgraded.

    A cycle is one connect, upgrade and close handshake, counted when the server
    has closed the TCP connection after answering our close frame.
    """
    _setup(spec)
    load = fan.Load(spec)
    rooms, port, rate = spec["client_rooms"], spec["ports"][0], spec["rate"]
    t0 = time.monotonic() + 0.2
    end = t0 + spec["duration"]
    opened = done = failed = 0
    behind = 0.0
    last_done = t0
    errors: Counter[str] = Counter()
    open_now: list[fan.Client] = []
    conn.send(("connected", 0, []))
    while True:
        now = time.monotonic()
        due = min(int((now - t0) * rate) + 1, int(spec["duration"] * rate)) if now >= t0 else 0
        behind = max(behind, (due - opened) / rate)
        while opened < due and len(open_now) < spec["max_open"]:
            client = fan.Client(load, f"/ws/{rooms[opened % len(rooms)]}", port, False)
            opened += 1
            try:
                client.connect(port, 5.0)
            except OSError as exc:
                client.end(f"connect: {exc}")
            open_now.append(client)
        load.poll(0.001)
        still = []
        for client in open_now:
            if client.ended:
                if client.error:
                    failed += 1
                    errors[client.error] += 1
                else:
                    done += 1
                    last_done = now
            else:
                if client.upgraded and not client.close_sent:
                    client.close()
                still.append(client)
        open_now = still
        if now >= end and (not open_now or now >= end + 10):
            break
    load.shutdown()
    conn.send(("result", {"opened": opened, "done": done, "failed": failed,
                          "span": last_done - t0,
                          "unfinished": len(open_now), "behind": behind,
                          "errors": dict(errors.most_common(3))}))


# One load-generator process per spec (shared with bench_fanout, which owns it).
spawn = fan.spawn


def gather(pipes: list[Any], kind: str, timeout: float) -> list[Any]:
    """The next message of ``kind`` from each pipe (None where none came in time)."""
    deadline = time.monotonic() + timeout
    out = []
    for pipe in pipes:
        message = fan._recv(pipe, deadline)
        out.append(message if message is not None and message[0] == kind else None)
    return out


def reap(pipes: list[Any], procs: list[Any]) -> None:
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
    for pipe in pipes:
        pipe.close()


def split(items: list[int], parts: int) -> list[list[int]]:
    return [items[i::parts] for i in range(parts)]
