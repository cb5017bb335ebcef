"""Connection workers for the scale benchmarks (bench_conns, bench_churn): load-generator
processes, pinned away from the server, that hold idle connections or churn them,
built on the fan-out load generator's :class:`~bench.client.Client`."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from typing import Any

from bench.client import Client
from bench.loadgen import Load, raise_nofile, recv


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
    raise_nofile()
    with contextlib.suppress(AttributeError, OSError):
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])


def idle_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Connect, report, then answer pings until told to stop; report what happened."""
    _setup(spec)
    load = Load(spec)
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
    load = Load(spec)
    rooms, port, rate = spec["client_rooms"], spec["ports"][0], spec["rate"]
    t0 = time.monotonic() + 0.2
    end = t0 + spec["duration"]
    opened = done = failed = 0
    behind = 0.0
    last_done = t0
    errors: Counter[str] = Counter()
    open_now: list[Client] = []
    conn.send(("connected", 0, []))
    while True:
        now = time.monotonic()
        due = min(int((now - t0) * rate) + 1, int(spec["duration"] * rate)) if now >= t0 else 0
        behind = max(behind, (due - opened) / rate)
        while opened < due and len(open_now) < spec["max_open"]:
            client = Client(load, f"/ws/{rooms[opened % len(rooms)]}", port, False)
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


def gather(pipes: list[Any], kind: str, timeout: float) -> list[Any]:
    """The next message of ``kind`` from each pipe (None where none came in time)."""
    deadline = time.monotonic() + timeout
    out = []
    for pipe in pipes:
        message = recv(pipe, deadline)
        out.append(message if message is not None and message[0] == kind else None)
    return out


def split(items: list[int], parts: int) -> list[list[int]]:
    return [items[i::parts] for i in range(parts)]
