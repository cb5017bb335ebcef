"""The load generator: processes (multiprocessing, spawn) each running a plain
epoll loop over many :class:`~bench.client.Client` connections, sending on an
absolute schedule and tallying what arrives."""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import select
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.client import Client
from bench.report import BIN_NS, HIST_SIZE, bucket, sparse

CREATE_AT = "2022-06-05T12:00:00.000Z"
CONNECT_TIMEOUT = 30.0
WARMUP = 1.0  # seconds of traffic before the measured window, not counted
STRAGGLE = 3.0  # seconds to wait after the last send for late deliveries


class Tally:
    """What one load-generator process counts across its clients."""

    def __init__(self, expected: int, clients: int) -> None:
        self.expected = expected  # measured messages each client should receive
        self.clients = clients
        self.finished = 0  # clients that got everything or whose connection ended
        self.lat: Counter[int] = Counter()  # latency in BIN_NS bins
        # With several nodes: receivers on the sender's node, and on another node.
        self.lat_same: Counter[int] = Counter()
        self.lat_cross: Counter[int] = Counter()
        self.events = 0  # chat_enter / chat_exit frames
        self.pings = 0  # pings answered (the server's heartbeat)
        self.other_frames = 0
        self.other_samples: list[str] = []

    @property
    def done(self) -> bool:
        return self.finished >= self.clients

    @staticmethod
    def histogram(*bins: Counter[int]) -> dict[int, int]:
        hist: Counter[int] = Counter()
        for counter in bins:
            for b, n in counter.items():
                hist[bucket(b * BIN_NS // 1000)] += n
        return dict(hist)

    def other(self, payload: bytes) -> None:
        self.other_frames += 1
        if len(self.other_samples) < 5:
            self.other_samples.append(payload[:200].decode("utf-8", "replace"))


class Load:
    """One load-generator process: its clients, an epoll loop, and its senders' schedule.

    No asyncio: a plain epoll loop costs less per delivery, and the load
    generator must cost less than the server it measures.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.tally = Tally(spec["measure_n"], spec["clients"])
        self.ep = select.epoll()
        self.by_fd: dict[int, Client] = {}
        self.pending: set[Client] = set()
        self.clients: list[Client] = []

    def register(self, client: Client) -> None:
        self.by_fd[client.fd] = client
        self.ep.register(client.fd, select.EPOLLIN)

    def unregister(self, client: Client) -> None:
        if self.by_fd.pop(client.fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(client.fd)
        self.pending.discard(client)

    def poll(self, timeout: float) -> None:
        events = self.ep.poll(timeout)
        if events:
            now = time.time_ns()
            by_fd = self.by_fd
            for fd, _ in events:
                client = by_fd.get(fd)
                if client is not None:
                    client.on_readable(now)
        for client in list(self.pending):
            client.flush()

    def connect(self) -> list[str]:
        """Connect and upgrade every client; returns the errors."""
        spec = self.spec
        # One room for every client, or (many-rooms benchmarks) a room per client.
        rooms = spec.get("client_rooms") or [spec["room"]] * spec["clients"]
        deadline = time.monotonic() + spec.get("connect_timeout", CONNECT_TIMEOUT)
        errors = []
        same = spec["same"]
        # A sender says who it is on the upgrade, so its first message is not also the
        # moment the server learns its author (ban check, presence) inside the window.
        authors = {k: f"?author_id={1000 + s}" for s, k in spec["sender_slots"]}
        for k in range(spec["clients"]):
            timed = (spec["first_client"] + k) % spec["latency_every"] == 0
            node = spec["client_nodes"][k]
            port = spec["ports"][node]
            client = Client(self, f"/ws/{rooms[k]}{authors.get(k, '')}", port, timed,
                            None if same is None else frozenset(same[node]))
            if spec.get("client_expected"):
                client.expected = spec["client_expected"][k]
            self.clients.append(client)
            try:
                client.connect(port, max(0.1, deadline - time.monotonic()))
            except OSError as exc:
                client.end(f"connect: {exc}")
        while time.monotonic() < deadline:
            if all(c.upgraded or c.ended for c in self.clients):
                break
            self.poll(0.05)
        for c in self.clients:
            if not c.upgraded:
                errors.append(c.error or "no upgrade within the connect timeout")
        return errors

    def run(self, t0: float) -> dict[str, Any]:
        """Send on schedule from ``t0`` (monotonic) and receive until done or the deadline.

        Message g (of all senders) is due at t0 + g/R and sent by sender g % senders.
        """
        spec = self.spec
        rate, nsend = spec["rate"], spec["senders"]
        warm_n, total = spec["warm_n"], spec["warm_n"] + spec["measure_n"]
        size = spec["content_size"]
        sender_rooms = spec.get("sender_rooms") or {s: spec["room"] for s in range(nsend)}
        senders = {s: self.clients[k] for s, k in spec["sender_slots"]}
        due_list = [g for g in range(total) if g % nsend in senders]
        lag_hist = [0] * HIST_SIZE
        sent = sent_measured = 0
        first_send = last_send = 0.0
        deadline = t0 + total / rate + STRAGGLE
        tally = self.tally
        batch = spec["read_interval"]
        last_poll = 0.0
        i, n = 0, len(due_list)
        while True:
            now = time.monotonic()
            while i < n:
                g = due_list[i]
                due = t0 + g / rate
                if due > now:
                    break
                i += 1
                lag_hist[bucket(int((now - due) * 1e6))] += 1
                sender = g % nsend
                measured = g >= warm_n
                text = json.dumps({
                    "message_type": "chat_txt", "author_id": 1000 + sender,
                    "room_id": sender_rooms[sender],
                    "content": _content("m" if measured else "w", sender, g // nsend, size),
                    "create_at": CREATE_AT}, separators=(",", ":"))
                if senders[sender].send_text(text):
                    sent += 1
                    if measured:
                        sent_measured += 1
                        last_send = time.time()
                        first_send = first_send or last_send
            if i < n and not any(c.alive for c in senders.values()):
                i = n  # every sender of this process is gone
            if (i >= n and tally.done) or now >= deadline:
                break
            wake = min(t0 + due_list[i] / rate, deadline) if i < n else deadline
            if batch and now < last_poll + batch:
                # Let frames pile up a little: fewer, larger reads.
                time.sleep(min(last_poll + batch, wake) - now)
                continue
            last_poll = now
            self.poll(min(max(0.0, wake - now), 0.001 if self.pending else 1.0))
        clients = self.clients
        return {
            "sent": sent, "sent_measured": sent_measured, "first_send": first_send,
            "last_send": last_send,
            "hist": tally.histogram(tally.lat, tally.lat_same, tally.lat_cross),
            "hist_same": tally.histogram(tally.lat_same),
            "hist_cross": tally.histogram(tally.lat_cross), "lag_hist": sparse(lag_hist),
            "events": tally.events,
            "other_frames": tally.other_frames, "other_samples": tally.other_samples,
            "per_client": [(c.first_id, c.last_id, c.frames, c.count) for c in clients],
            "received": sum(c.count for c in clients),
            "violations": sum(c.violations for c in clients),
            "gaps": sum(c.gaps for c in clients),
            "last_rx": max((c.last_rx_ns for c in clients), default=0) / 1e9,
            "closes": dict(Counter(f"{c.close_code} {c.close_reason}".strip()
                                   for c in clients if c.close_code is not None)),
            "dropped": sum(1 for c in clients if c.ended and c.close_code is None),
            "errors": [c.error for c in clients if c.error][:3],
        }

    def shutdown(self) -> None:
        """Close every connection politely, then for good."""
        for c in self.clients:
            c.close()
        deadline = time.monotonic() + 3
        while self.by_fd and time.monotonic() < deadline:
            self.poll(0.05)
        for c in self.clients:
            c.end(None)
        self.ep.close()


def _content(phase: str, sender: int, seq: int, size: int) -> str:
    head = f"{phase}{time.time_ns()}:s{sender}:{seq}:"
    return head + "x" * (size - len(head))


def load_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a load-generator process (multiprocessing, spawn)."""
    raise_nofile()
    with contextlib.suppress(AttributeError, OSError):
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])
        if spec["nice"]:
            os.nice(spec["nice"])
    load = None
    try:
        load = Load(spec)
        errors = load.connect()
        conn.send(("connected", len(load.clients) - len(errors), errors[:3]))
        if errors:
            result: dict[str, Any] = {"error": f"{len(errors)} connects failed: {errors[0]}"}
        elif not conn.poll(60) or (message := conn.recv())[0] != "go":
            result = {"error": "no go signal"}
        else:
            t0 = time.monotonic() + (message[1] - time.time())
            gc.disable()
            try:
                result = load.run(t0)
            finally:
                gc.enable()
    except BaseException as exc:  # report anything, including KeyboardInterrupt
        result = {"error": f"load generator failed: {exc!r}"}
    finally:
        if load is not None:
            with contextlib.suppress(Exception):
                load.shutdown()
    with contextlib.suppress(OSError, ValueError):
        conn.send(("result", result))
        conn.close()


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (each client is a
    descriptor); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def spawn(target: Callable[[Any, dict[str, Any]], None], specs: list[dict[str, Any]]
          ) -> tuple[list[Any], list[Any]]:
    """One load-generator process per spec; returns their pipes and processes."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i, spec in enumerate(specs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, spec), daemon=True,
                           name=f"bench-load-{i}")
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    return pipes, procs


def recv(pipe: Any, deadline: float) -> Any:
    try:
        if pipe.poll(max(0.0, deadline - time.monotonic())):
            return pipe.recv()
    except (EOFError, OSError):
        return None
    return None


def reap(pipes: list[Any], procs: list[Any], grace: float = 10.0) -> None:
    """Give each load-generator process ``grace`` s to end, then terminate it, then
    kill it; close the pipes."""
    for proc in procs:
        proc.join(grace)
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
    for pipe in pipes:
        pipe.close()
