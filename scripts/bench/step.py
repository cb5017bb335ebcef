"""One step of the fan-out benchmark: place clients and senders on load-generator
processes and nodes, run them at one rate (warm-up, measured window, stragglers)
and aggregate what they report."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from collections import Counter
from typing import Any

try:
    import psutil
except ImportError:  # CPU columns are left empty without it.
    psutil = None

from bench.loadgen import (
    CONNECT_TIMEOUT,
    STRAGGLE,
    WARMUP,
    load_worker,
    reap,
    recv,
    spawn,
)
from bench.probes import CpuProbe
from bench.report import bucket_ms, percentile
from bench.servers import Nodes


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def _placement(sizes: list[int], senders: int, nodes: int
               ) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[int]]:
    """Which node each client connects to, and which clients send.

    Client i (counted across load-generator processes) goes to node i % nodes;
    sender s is a client of process s % len(sizes) on node s % nodes where there
    is one, so senders are spread over the nodes as evenly as the clients.
    Returns, per process, each client's node and the (sender, client index)
    pairs; and each sender's node.
    """
    nworkers = len(sizes)
    client_nodes, slots, sender_node = [], [], [0] * senders
    first = 0
    for w, size in enumerate(sizes):
        nodes_of = [(first + k) % nodes for k in range(size)]
        free = list(range(size))
        mine = []
        for s in range(w, senders, nworkers):
            k = next((k for k in free if nodes_of[k] == s % nodes), free[0])
            free.remove(k)
            mine.append((s, k))
            sender_node[s] = nodes_of[k]
        client_nodes.append(nodes_of)
        slots.append(mine)
        first += size
    return client_nodes, slots, sender_node


def _room_slots(sizes: list[int], senders: int, rooms: int) -> list[list[tuple[int, int]]]:
    """Which client is sender s with many rooms: one in room s % rooms (client i is in
    room i % rooms), in process s % len(sizes) where it has one, so the sending is
    spread over the load-generator processes. Per process, (sender, client index) pairs."""
    firsts = [sum(sizes[:w]) for w in range(len(sizes))]
    slots: list[list[tuple[int, int]]] = [[] for _ in sizes]
    taken = set()
    for s in range(senders):
        w = s % len(sizes)
        candidates = range(s % rooms, sum(sizes), rooms)
        i = next((i for i in candidates if i not in taken
                  and firsts[w] <= i < firsts[w] + sizes[w]),
                 next(i for i in candidates if i not in taken))
        taken.add(i)
        w = max(v for v in range(len(sizes)) if firsts[v] <= i)
        slots[w].append((s, i - firsts[w]))
    return slots


def run_step(server: Nodes, rate: float, args: argparse.Namespace,
             cpu_split: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    step: dict[str, Any] = {"server": server.name, "rate": rate,
                            "offered": rate * args.clients / args.rooms, "error": None,
                            "p99_limit": args.p99,
                            "load_cpus": len(cpu_split[1]) if cpu_split else None,
                            "server_cpus": len(cpu_split[0]) if cpu_split else None,
                            "server_loops": args.server_workers or args.nodes}
    room = random.randrange(10**9, 2**53)
    nworkers = max(1, min(args.workers, args.clients))
    sizes = [args.clients // nworkers + (i < args.clients % nworkers) for i in range(nworkers)]
    warm_n = round(rate * WARMUP)
    measure_n = round(rate * args.duration)
    firsts = [sum(sizes[:w]) for w in range(nworkers)]
    ports = server.ports
    client_nodes, slots, sender_node = _placement(sizes, args.senders, len(ports))
    # Many rooms: client i is in room i % rooms, and sender s speaks in room s % rooms.
    rooms = [room + r for r in range(args.rooms)]
    client_rooms = [rooms[i % args.rooms] for i in range(args.clients)]
    sender_rooms = {s: rooms[s % args.rooms] for s in range(args.senders)}
    if args.rooms > 1:
        slots = _room_slots(sizes, args.senders, args.rooms)
    # What each client should get: the measured messages of its room's senders.
    per_room = Counter(sender_rooms[g % args.senders] for g in range(warm_n, warm_n + measure_n))
    client_expected = [per_room[r] for r in client_rooms]
    step["client_rooms"], step["client_expected"] = client_rooms, client_expected
    same = None
    if len(ports) > 1:
        same = [[str(s).encode() for s in range(args.senders) if sender_node[s] == n]
                for n in range(len(ports))]
    specs = []
    for w in range(nworkers):
        mine = slice(firsts[w], firsts[w] + sizes[w])
        specs.append({"ports": ports, "client_nodes": client_nodes[w], "same": same,
                      "room": room, "clients": sizes[w],
                      "client_rooms": client_rooms[mine],
                      "client_expected": client_expected[mine],
                      "sender_rooms": sender_rooms,
                      "connect_timeout": CONNECT_TIMEOUT + sizes[w] / 200,
                      "first_client": firsts[w], "latency_every": args.latency_every,
                      "sender_slots": slots[w], "senders": args.senders, "rate": rate,
                      "warm_n": warm_n, "measure_n": measure_n,
                      "content_size": args.content_size,
                      "read_interval": args.read_interval / 1000, "nice": args.nice,
                      "cpus": sorted(cpu_split[1]) if cpu_split else None})
    pipes, procs = [], []
    try:
        pipes, procs = spawn(load_worker, specs)
        # Everyone connected?
        deadline = time.monotonic() + CONNECT_TIMEOUT + max(sizes) / 200 + 15
        problems = []
        for pipe in pipes:
            message = recv(pipe, deadline)
            if message is None or message[0] != "connected":
                problems.append(f"load generator did not connect: {message!r}")
            elif message[2]:
                problems.append(f"connect failures: {message[2]}")
        if problems:
            step["error"] = "; ".join(problems)
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("abort",))
            return step
        t0 = time.time() + 0.2
        for pipe in pipes:
            pipe.send(("go", t0))
        measure_start = t0 + WARMUP
        _sleep_until(measure_start)
        probe = CpuProbe(server.pids(), [os.getpid(), *(p.pid for p in procs)],
                         args.redis_pid)
        _sleep_until(measure_start + args.duration)
        step["cpu"] = probe.finish()
        results = []
        deadline = time.monotonic() + STRAGGLE + 20
        for pipe in pipes:
            message = recv(pipe, deadline)
            if message is None or message[0] != "result":
                results.append({"error": f"no result from a load generator: {message!r}"})
            else:
                results.append(message[1])
        _aggregate(step, results, measure_start, args)
        if not server.alive:
            step["error"] = server.exit_note()
        return step
    finally:
        reap(pipes, procs, grace=5)


def _aggregate(step: dict[str, Any], results: list[dict[str, Any]], measure_start: float,
               args: argparse.Namespace) -> None:
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        step["error"] = errors[0]
        return
    hist: Counter[int] = Counter()
    hist_same: Counter[int] = Counter()
    hist_cross: Counter[int] = Counter()
    lag: Counter[int] = Counter()
    closes: Counter[str] = Counter()
    per_client = []
    for r in results:
        hist.update(r["hist"])
        hist_same.update(r["hist_same"])
        hist_cross.update(r["hist_cross"])
        lag.update(r["lag_hist"])
        closes.update(r["closes"])
        per_client.extend(r["per_client"])
    sent_measured = sum(r["sent_measured"] for r in results)
    received = sum(r["received"] for r in results)
    # Loss counts against the schedule: a message a disconnected sender never sent is lost too.
    planned = round(step["rate"] * args.duration)
    expected = sum(step.pop("client_expected"))
    last_rx = max(r["last_rx"] for r in results)
    first_send = min((r["first_send"] for r in results if r["first_send"]), default=0.0)
    last_send = max(r["last_send"] for r in results)
    # The same ids on every connection: a gapless run from the same first to the same last.
    # (Per room: each room numbers its own messages.)
    client_rooms = step.pop("client_rooms")
    common: dict[int, Counter[tuple[int, int]]] = {}
    for room, (first, last, _, _) in zip(client_rooms, per_client, strict=True):
        common.setdefault(room, Counter())[first, last] += 1
    ref = {room: c.most_common(1)[0][0] for room, c in common.items()}
    mismatched = sum(1 for room, (first, last, frames, _) in zip(client_rooms, per_client,
                                                                   strict=True)
                     if (first, last) != ref[room] or (frames and frames != last - first + 1))
    span = last_rx - measure_start
    step.update(
        sent=sum(r["sent"] for r in results), sent_measured=sent_measured, planned=planned,
        expected=expected, received=received, lost=expected - received,
        achieved=received / span if span > 0 else 0.0,
        sent_rate=(sent_measured / (last_send - first_send)
                   if last_send > first_send else 0.0),
        p50=percentile(hist, 0.50), p99=percentile(hist, 0.99),
        max=bucket_ms(max(hist)) if hist else None,
        same_p50=percentile(hist_same, 0.50), same_p99=percentile(hist_same, 0.99),
        cross_p50=percentile(hist_cross, 0.50), cross_p99=percentile(hist_cross, 0.99),
        events=sum(r["events"] for r in results),
        lag_p99=percentile(lag, 0.99),
        violations=sum(r["violations"] for r in results),
        gaps=sum(r["gaps"] for r in results), mismatched=mismatched,
        closes=dict(closes), dropped=sum(r["dropped"] for r in results),
        client_errors=[e for r in results for e in r["errors"]][:3],
        other_frames=sum(r["other_frames"] for r in results),
        other_samples=[s for r in results for s in r["other_samples"]][:3],
    )
