#!/usr/bin/env python3
"""Fan-out benchmark: one room, many receivers, a few senders at a fixed offered rate.

Starts the server under test as a subprocess (``trio-chat serve`` with a fresh
SQLite file, and for comparison a minimal ``websockets`` broadcast server that
lives in this file), then, for each step, spawns load-generator processes that
connect ``--clients`` WebSocket clients to a fresh room. ``--senders`` of those
clients also send, on an absolute schedule, at a total of R messages/s. Every
client receives every message; each one carries its send time (``time.time_ns``,
a clock all processes share) so the receiver computes the latency.

A step is: connect everything, warm up for 1 s at the step's rate (not
measured), measure for ``--duration`` seconds, then wait up to 3 s for
stragglers. It reports deliveries/s, p50/p99 latency, lost deliveries (per
receiver: measured messages scheduled minus distinct ids received) and ordering
violations (an id not greater than the previous one on that connection). The
search steps the rate up until a step loses a delivery, has p99 over 50 ms, or
fails otherwise, bisects a little between the last pass and the first failure,
and reports the highest passing rate.

The load generator must cost less per delivery than the server it measures,
so it is not asyncio: each process runs a plain epoll loop over non-blocking
sockets, does the HTTP upgrade itself, and reads runs of frames with regex
scans instead of decoding JSON (the id leads every message frame; the send
time leads the content). Frames without an id whose message_type is
chat_enter or chat_exit (presence events) are counted apart, not as messages.
The server and the load generator share the machine's cores: by default the
server is pinned to CPU 0 and the load generator to the others (``--no-pin``
to let the scheduler decide); the CPU each side used during the measured
window is printed with every step, so a step limited by the load generator
shows as such.

Several nodes: ``--nodes N`` starts N trio-chat processes sharing the room
through Redis (a channel name of the run's own, each node its own SQLite
file), all pinned to the server's CPU; client i connects to node i % N and the
senders are spread the same way. Each receiver splits its latency into
messages from a sender on its own node and from one on another node, so the
cost of the hop between nodes shows (with Redis even the sender's own node
gets its messages back from Redis). ``--redis`` runs one node through Redis,
the baseline for that; ``--server-workers N`` runs one ``serve --workers N``
(the kernel spreads the clients over the workers) and pins nothing, so the
workers may use every core. redis-server's CPU is shown apart.

Usage::

    .venv/bin/python scripts/bench_fanout.py --quick
    .venv/bin/python scripts/bench_fanout.py --server trio-chat --rate 2000
    .venv/bin/python scripts/bench_fanout.py --nodes 2 --rate 100
    .venv/bin/python scripts/bench_fanout.py --server-workers 2 --quick
    .venv/bin/python scripts/bench_fanout.py --websockets-server 0   # the comparison server
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # CPU columns are left empty without it.
    psutil = None

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("trio-chat", "websockets")
CREATE_AT = "2022-06-05T12:00:00.000Z"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

WARMUP = 1.0  # seconds of traffic before the measured window, not counted
STRAGGLE = 3.0  # seconds to wait after the last send for late deliveries
P99_LIMIT_MS = 50.0
NOISY_CPU = 25.0  # % of one core used by other work that makes a step suspect
CONNECT_TIMEOUT = 30.0
SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0

FULL_LADDER = (200, 400, 800, 1200, 1600, 2000, 2500, 3000, 3600, 4300, 5000, 6000, 7000,
               8000, 10000, 12000, 15000, 20000)
QUICK_LADDER = (200, 400, 800, 1600, 3200, 6400, 12800, 25600)
MIN_RATE = 5  # msg/s: the search halves a failing rate no lower than this

_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)/")

# --- latency histogram ------------------------------------------------------------------
# 20 us buckets up to 100 ms, then 1 ms buckets up to 60 s; anything later is the last one.
_FINE_US, _FINE_N = 20, 5000
_COARSE_US, _COARSE_N = 1000, 59_900
HIST_SIZE = _FINE_N + _COARSE_N


_BIN_NS = _FINE_US * 1000  # what a receiver counts in; folded into buckets at the end

# Message frames as both servers lay them out: the id first, the content after.
_IDS = re.compile(rb'\x81(?:\x7e..|[\x00-\x7d])\{"id":(\d+),', re.S)
_MEASURED = re.compile(rb'"content":"m(\d+):')
_MEASURED_FROM = re.compile(rb'"content":"m(\d+):s(\d+):')  # send time and sender
# Presence events carry no id; they are counted, not taken for messages.
_EVENT = re.compile(rb'"message_type":"chat_(?:enter|exit)"')
_ASCII = bytes(range(128))


def _bucket(us: int) -> int:
    if us < _FINE_US * _FINE_N:
        return us // _FINE_US if us > 0 else 0
    return min(_FINE_N + (us - _FINE_US * _FINE_N) // _COARSE_US, HIST_SIZE - 1)


def _bucket_ms(b: int) -> float:
    """The middle of bucket ``b``, in milliseconds."""
    if b < _FINE_N:
        return (b * _FINE_US + _FINE_US / 2) / 1000
    return (_FINE_US * _FINE_N + (b - _FINE_N) * _COARSE_US + _COARSE_US / 2) / 1000


def _percentile(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(total * q))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return _bucket_ms(b)
    return _bucket_ms(max(hist))


def _sparse(hist: list[int]) -> dict[int, int]:
    return {b: n for b, n in enumerate(hist) if n}


# --- the load generator's WebSocket client ----------------------------------------------

def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    keystream = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ keystream).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = random.randbytes(4)
    return head + key + _mask(payload, key)


class Tally:
    """What one load-generator process counts across its clients."""

    def __init__(self, expected: int, clients: int) -> None:
        self.expected = expected  # measured messages each client should receive
        self.clients = clients
        self.finished = 0  # clients that got everything or whose connection ended
        self.lat: Counter[int] = Counter()  # latency in _BIN_NS bins
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
                hist[_bucket(b * _BIN_NS // 1000)] += n
        return dict(hist)

    def other(self, payload: bytes) -> None:
        self.other_frames += 1
        if len(self.other_samples) < 5:
            self.other_samples.append(payload[:200].decode("utf-8", "replace"))


class Client:
    """One connection of the load generator: a non-blocking socket driven by :class:`Load`.

    It does the HTTP upgrade itself, parses server frames with a few slices each
    and sends masked frames. Message frames are not JSON-decoded: the id is the
    number after ``{"id":`` (both servers put it first) and the send time is read
    from the content, ``<phase><time_ns>:s<sender>:...``, where phase ``m`` marks
    a measured message. ``same``, with several nodes, holds the senders (their
    numbers as bytes) on this client's node, to split latency by hop.
    """

    def __init__(self, load: Load, path: str, port: int, timed: bool = True,
                 same: frozenset[bytes] | None = None) -> None:
        self.load = load
        self.timed = timed  # whether this client's latencies go into the histogram
        self.same = same
        self.tally = load.tally
        self.expected = load.tally.expected  # measured messages this client should get
        self.key = base64.b64encode(random.randbytes(16))
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                        f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {self.key.decode()}\r\n"
                        f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.fd = self.sock.fileno()
        self.upgraded = False
        self.ended = False
        self.error: str | None = None
        self.buf = b""
        self.out = b""
        self.fragments = bytearray()
        self.counted_done = False
        self.close_sent = False
        self.close_code: int | None = None
        self.close_reason = ""
        # Ordering and loss.
        self.first_id = 0
        self.last_id = 0
        self.frames = 0  # message frames with a new, increasing id
        self.count = 0  # measured messages received
        self.violations = 0
        self.gaps = 0
        self.last_rx_ns = 0

    def connect(self, port: int, timeout: float) -> None:
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.load.register(self)
        self.write(self.request)

    @property
    def alive(self) -> bool:
        return self.upgraded and not self.close_sent and not self.ended

    # reading

    def on_readable(self, now: int) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(f"recv: {exc}")
            return
        if not data:
            self.end(None if self.close_code is not None or self.close_sent
                     else "connection closed without a close frame")
            return
        if self.upgraded:
            self.feed(data, now)
        else:
            self._upgrade(data, now)

    def feed(self, data: bytes, now: int) -> None:
        """Take bytes from the socket: every complete frame is handled, the rest kept."""
        if self.buf:
            data = self.buf + data
        n = len(data)
        # The usual case: only unfragmented text frames with ASCII payloads and
        # two-byte lengths under 0x8000 with no byte over 0x7f. Then every byte
        # over 0x7f is a frame's first byte, 0x81, and only the last frame's
        # header needs reading. The messages are then read with two regex scans
        # over the whole run of frames instead of frame by frame.
        high = data.translate(None, _ASCII)
        frames = len(high)
        pos = -1
        if frames and high == b"\x81" * frames:
            last = data.rfind(b"\x81")
            if n - last < 4:
                pos, frames = last, frames - 1
            elif data[last + 1] == 126:
                end = last + 4 + ((data[last + 2] << 8) | data[last + 3])
                if end == n:
                    pos = n
                elif end > n:
                    pos, frames = last, frames - 1
        if pos < 0:
            pos, frames = self._walk(data)
        if frames < 0:
            pos = self._frames(data, now)
        elif frames and not self._run(data, pos, frames, now):
            self._frames(data[:pos], now)
        self.buf = data[pos:] if pos < n else b""

    @staticmethod
    def _walk(data: bytes) -> tuple[int, int]:
        """Where the complete frames end and how many: -1 frames if not all are text."""
        n = len(data)
        pos = frames = 0
        while n - pos >= 2:
            length = data[pos + 1]
            if data[pos] != 0x81 or length > 126:
                return pos, -1
            if length == 126:
                if n - pos < 4:
                    break
                end = pos + 4 + ((data[pos + 2] << 8) | data[pos + 3])
            else:
                end = pos + 2 + length
            if end > n:
                break
            pos = end
            frames += 1
        return pos, frames

    def _run(self, data: bytes, end: int, frames: int, now: int) -> bool:
        """Handle ``frames`` text frames in ``data[:end]`` if they are consecutive messages.

        Returns False (having done nothing) when anything is unusual; the caller
        then goes frame by frame.
        """
        ids = _IDS.findall(data, 0, end)
        if len(ids) != frames:
            return False
        first = int(ids[0])
        if (self.last_id and first != self.last_id + 1) or (
                frames > 1 and list(map(int, ids)) != list(range(first, first + frames))):
            return False
        if not self.first_id:
            self.first_id = first
        self.last_id = first + frames - 1
        self.frames += frames
        if self.timed and self.same is not None:
            found = _MEASURED_FROM.findall(data, 0, end)
            measured = len(found)
            same, lat_same, lat_cross = self.same, self.tally.lat_same, self.tally.lat_cross
            for t, s in found:
                (lat_same if s in same else lat_cross)[(now - int(t)) // _BIN_NS] += 1
        elif self.timed:
            sent_at = _MEASURED.findall(data, 0, end)
            measured = len(sent_at)
            if measured:
                self.tally.lat.update([(now - t) // _BIN_NS for t in map(int, sent_at)])
        else:
            measured = data.count(b'"content":"m', 0, end)
        if measured:
            self.last_rx_ns = now
            self.count += measured
            if self.count >= self.expected:
                self._finish()
        return True

    def _frames(self, data: bytes, now: int) -> int:
        """Frame by frame: any frame type, any length. Returns the bytes consumed."""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                self.end("masked frame from the server")
                return n
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            if b0 == 0x81:
                self._message(data, start, end, now)
            else:
                self._other(b0, data[start:end], now)
                if self.ended:
                    return n
            pos = end
        return pos

    def _message(self, data: bytes, start: int, end: int, now: int) -> None:
        if not data.startswith(b'{"id":', start, end) and _EVENT.search(data, start, end):
            self.tally.events += 1
            return
        comma = data.find(b",", start + 6, end)
        try:
            if not data.startswith(b'{"id":', start, end) or comma < 0:
                raise ValueError
            message_id = int(data[start + 6:comma])
        except ValueError:
            self.tally.other(data[start:end])
            return
        if message_id <= self.last_id:
            self.violations += 1
            return
        if self.last_id and message_id != self.last_id + 1:
            self.gaps += message_id - self.last_id - 1
        if not self.first_id:
            self.first_id = message_id
        self.last_id = message_id
        self.frames += 1
        at = data.find(b'"content":"', comma, end) + 11
        if at > 10 and data[at] == 0x6D:  # "m": a measured message
            colon = data.find(b":", at + 1, end)
            if self.timed and colon > 0 and data[at + 1:colon].isdigit():
                lat = self.tally.lat
                if self.same is not None:
                    sender = data[colon + 2:data.find(b":", colon + 2, end)]
                    lat = self.tally.lat_same if sender in self.same else self.tally.lat_cross
                lat[(now - int(data[at + 1:colon])) // _BIN_NS] += 1
            self.last_rx_ns = now
            self.count += 1
            if self.count >= self.expected:
                self._finish()

    def _other(self, b0: int, payload: bytes, now: int) -> None:
        opcode = b0 & 0x0F
        if opcode in (0x0, 0x1):  # fragments of a text message
            self.fragments += payload
            if b0 & 0x80:
                whole, self.fragments = bytes(self.fragments), bytearray()
                self._message(whole, 0, len(whole), now)
        elif opcode == 0x8:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.close_code = 1005
            self.close()
            self.end(None)
        elif opcode == 0x9:
            self.tally.pings += 1
            self.write(client_frame(0xA, payload))
        elif opcode != 0xA:
            self.tally.other(payload)

    def _upgrade(self, data: bytes, now: int) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            if len(self.buf) > 16384:
                self.end("oversized handshake response")
            return
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        if len(status) < 2 or status[1] != b"101":
            self.end(f"upgrade refused: {lines[0].decode('latin-1')}")
            return
        if headers.get(b"sec-websocket-accept") != accept:
            self.end("bad Sec-WebSocket-Accept")
            return
        self.upgraded = True
        self.buf = b""
        if rest:
            self.feed(rest, now)

    # writing and closing

    def write(self, data: bytes) -> bool:
        if self.ended:
            return False
        if self.out:
            self.out += data
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.end(f"send: {exc}")
            return False
        if sent < len(data):
            self.out = data[sent:]
            self.load.pending.add(self)
        return True

    def flush(self) -> None:
        data, self.out = self.out, b""
        self.load.pending.discard(self)
        if data:
            self.write(data)

    def send_text(self, text: str) -> bool:
        return self.alive and self.write(client_frame(0x1, text.encode()))

    def close(self, code: int = 1000) -> None:
        if self.upgraded and not self.close_sent and not self.ended:
            self.close_sent = True
            self.write(client_frame(0x8, code.to_bytes(2, "big")))

    def end(self, error: str | None) -> None:
        """Close the socket; ``error`` says why if it was not a clean close."""
        if self.ended:
            return
        self.ended = True
        if error and self.error is None:
            self.error = error
        self.load.unregister(self)
        self.sock.close()
        self._finish()

    def _finish(self) -> None:
        if not self.counted_done:
            self.counted_done = True
            self.tally.finished += 1


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
                lag_hist[_bucket(int((now - due) * 1e6))] += 1
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
            "hist_cross": tally.histogram(tally.lat_cross), "lag_hist": _sparse(lag_hist),
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


# --- the comparison server ---------------------------------------------------------------

def run_websockets_server(port: int, ping_interval: float = 20.0) -> None:
    """A minimal broadcast server on ``websockets``: one set of clients per path.
    It pings every ``ping_interval`` seconds, as trio-chat does every pingPeriod."""
    raise_nofile()
    from websockets.asyncio.server import broadcast, serve

    rooms: dict[str, set[Any]] = {}
    last_ids: dict[str, int] = {}

    def utc_now() -> str:
        now = datetime.now(timezone.utc)
        return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"

    async def handler(websocket: Any) -> None:
        path = websocket.request.path.partition("?")[0]
        members = rooms.setdefault(path, set())
        members.add(websocket)
        try:
            async for text in websocket:
                last_ids[path] = message_id = last_ids.get(path, 0) + 1
                message = {"id": message_id, **json.loads(text), "received_at": utc_now()}
                broadcast(members, json.dumps(message, separators=(",", ":")))
        finally:
            members.discard(websocket)
            if not members:
                del rooms[path]

    async def main() -> None:
        # No permessage-deflate, like trio-chat (the benchmark's clients don't offer it).
        # The listen backlog trio uses (asyncio's default, 100, stalls connection bursts).
        async with serve(handler, HOST, port, compression=None, ping_interval=ping_interval,
                         backlog=socket.SOMAXCONN) as server:
            bound = server.sockets[0].getsockname()[1]
            print(f"websockets {HOST}: listening on http://{HOST}:{bound}/", file=sys.stderr,
                  flush=True)
            await server.serve_forever()

    # SIGINT stops it (asyncio.run turns it into cancellation), even if our parent ignored it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# --- servers under test -----------------------------------------------------------------

class ServerProcess:
    """One server process: a trio-chat node, a ``serve --workers N`` supervisor, or the
    ``websockets`` comparison server. ``tag`` names its log and SQLite files."""

    def __init__(self, name: str, workdir: Path, cpus: set[int] | None,
                 config: str | None = None, *, tag: str | None = None, port: int = 0,
                 workers: int | None = None) -> None:
        self.name = name
        self.tag = tag or name
        self.log_path = workdir / f"{self.tag}.log"
        self.cpus = cpus
        self.workers = workers
        if name == "trio-chat":
            exe = Path(sys.executable).parent / "trio-chat"
            cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trio_chat.cli"]
            db = workdir / ("bench.db" if tag is None else f"{tag}.db")
            self.argv = [*cmd, "serve", *([config] if config else []), "--port", str(port),
                         "--sqlite", str(db),
                         *(["--workers", str(workers)] if workers is not None else [])]
        else:
            self.argv = [sys.executable, str(Path(__file__).resolve()),
                         "--websockets-server", "0"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[Any] = []  # psutil.Process of each worker, with --workers
        self.port = 0
        self.exit_code: int | None = None
        self.killed = False

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        if self.cpus:
            _pin(self.proc.pid, self.cpus)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            # Every worker of a supervisor says it is listening.
            ports = _LISTENING.findall(self.log_path.read_bytes())
            if len(ports) >= (self.workers or 1):
                self.port = int(ports[0])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                   f"before listening:\n{self.log_tail()}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.name} did not listen within {SERVER_START_TIMEOUT:g} "
                               f"s:\n{self.log_tail()}")
        if self.name == "trio-chat":
            status = _http_get_status(self.port, "/healthz")
            if status != 200:
                raise RuntimeError(f"GET /healthz answered {status}")
        if self.cpus:  # again: threads started while it was booting
            _pin(self.proc.pid, self.cpus)
        if self.workers and psutil is not None:
            with contextlib.suppress(psutil.Error):
                self.children = psutil.Process(self.proc.pid).children(recursive=True)

    @property
    def alive(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None
                and all(c.is_running() for c in self.children))

    def pids(self) -> list[int]:
        return ([self.proc.pid] if self.proc else []) + [c.pid for c in self.children]

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                proc.kill()
                proc.wait(5)
        self.exit_code = proc.returncode
        # Workers run in sessions of their own: make sure none outlives its supervisor.
        if self.children:
            _gone, alive = psutil.wait_procs(self.children, timeout=5)
            for child in alive:
                self.killed = True
                with contextlib.suppress(psutil.Error):
                    child.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self, limit: int = 25) -> tuple[Counter[str], list[str]]:
        """Counts of notable log lines, and the first few of them."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return counts, samples
        for line in text.splitlines():
            kind = None
            if "slow consumer" in line or "write blocked" in line:
                kind = "slow consumer"
            elif "Traceback" in line:
                kind = "traceback"
            elif " ERROR " in line or " CRITICAL " in line:
                kind = "error"
            elif " WARNING " in line or "skipped broadcast" in line:
                kind = "warning"
            elif " closed " in line:
                kind = "closed"
            if kind:
                counts[kind] += 1
                if len(samples) < limit:
                    samples.append(line)
        return counts, samples


class Nodes:
    """The server under test: one process, or several trio-chat nodes sharing rooms
    through Redis (each client connects to ``ports[client % len(ports)]``)."""

    def __init__(self, label: str, procs: list[ServerProcess]) -> None:
        self.name = label
        self.procs = procs

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.procs]

    @property
    def alive(self) -> bool:
        return all(p.alive for p in self.procs)

    def pids(self) -> list[int]:
        return [pid for p in self.procs for pid in p.pids()]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def exit_note(self) -> str:
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is not None:
                who = "server" if len(self.procs) == 1 else p.tag
                return f"{who} exited with {p.proc.returncode}"
        return "a worker exited"


def _pin(pid: int, cpus: set[int]) -> None:
    tids = [pid]
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            tids = [t.id for t in psutil.Process(pid).threads()]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def _http_get_status(port: int, path: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            conn.close()


# --- one step ---------------------------------------------------------------------------

class CpuProbe:
    """CPU seconds used by the server, the load generator and redis-server, and system idle."""

    def __init__(self, server_pids: list[int], load_pids: list[int],
                 redis_pid: int | None = None) -> None:
        self.procs: dict[str, list[Any]] = {"server": [], "load": []}
        if redis_pid is not None:
            self.procs["redis"] = []
        if psutil is None:
            return
        for kind, pids in (("server", server_pids), ("load", load_pids),
                           ("redis", [redis_pid] if redis_pid else [])):
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[kind].append(psutil.Process(pid))
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {}
        for kind, procs in self.procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            sample[kind] = total
        cpu = psutil.cpu_times()
        sample["idle"] = cpu.idle
        sample["all"] = sum(cpu)
        sample["wall"] = time.monotonic()
        return sample

    def finish(self) -> dict[str, float | None]:
        """CPU use in % of one core (server, load generator, redis-server if watched,
        everything else), idle in %."""
        if psutil is None:
            return {"server": None, "load": None, "redis": None, "other": None, "idle": None}
        end = self._sample()
        wall = max(end["wall"] - self.start["wall"], 1e-6)
        total = max(end["all"] - self.start["all"], 1e-6)
        idle = end["idle"] - self.start["idle"]
        server = end["server"] - self.start["server"]
        load = end["load"] - self.start["load"]
        rds = end["redis"] - self.start["redis"] if "redis" in end else None
        busy = total - idle
        return {"server": 100 * server / wall, "load": 100 * load / wall,
                "redis": None if rds is None else 100 * rds / wall,
                "other": 100 * max(0.0, busy - server - load - (rds or 0.0)) / wall,
                "idle": 100 * idle / total}


def wait_quiet(max_wait: float, threshold: float = NOISY_CPU) -> float | None:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle between steps.

    Between steps the server idles and the load generator is gone, so any CPU
    busy is other work on the machine. Quiet means two samples of 0.5 s under
    ``threshold`` (in % of one core). Returns the last sample.
    """
    if psutil is None:
        return None
    ncpu = psutil.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    quiet = 0
    while True:
        busy = psutil.cpu_percent(interval=0.5) * ncpu
        quiet = quiet + 1 if busy < threshold else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return busy


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
            message = _recv(pipe, deadline)
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
            message = _recv(pipe, deadline)
            if message is None or message[0] != "result":
                results.append({"error": f"no result from a load generator: {message!r}"})
            else:
                results.append(message[1])
        _aggregate(step, results, measure_start, args)
        if not server.alive:
            step["error"] = server.exit_note()
        return step
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for pipe in pipes:
            pipe.close()


def _recv(pipe: Any, deadline: float) -> Any:
    try:
        if pipe.poll(max(0.0, deadline - time.monotonic())):
            return pipe.recv()
    except (EOFError, OSError):
        return None
    return None


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
        p50=_percentile(hist, 0.50), p99=_percentile(hist, 0.99),
        max=_bucket_ms(max(hist)) if hist else None,
        same_p50=_percentile(hist_same, 0.50), same_p99=_percentile(hist_same, 0.99),
        cross_p50=_percentile(hist_cross, 0.50), cross_p99=_percentile(hist_cross, 0.99),
        events=sum(r["events"] for r in results),
        lag_p99=_percentile(lag, 0.99),
        violations=sum(r["violations"] for r in results),
        gaps=sum(r["gaps"] for r in results), mismatched=mismatched,
        closes=dict(closes), dropped=sum(r["dropped"] for r in results),
        client_errors=[e for r in results for e in r["errors"]][:3],
        other_frames=sum(r["other_frames"] for r in results),
        other_samples=[s for r in results for s in r["other_samples"]][:3],
    )


def verdict(step: dict[str, Any]) -> list[str]:
    """Why a step fails; empty if it passes."""
    if step.get("error"):
        return [f"error: {step['error']}"]
    why = []
    if step["lost"]:
        why.append(f"lost {step['lost']}")
    limit = step.get("p99_limit", P99_LIMIT_MS)
    if step["p99"] is None or step["p99"] > limit:
        why.append(f"p99>{limit:g}ms")
    if step["violations"]:
        why.append("order")
    if step["mismatched"] and not step["lost"]:
        why.append(f"ids differ on {step['mismatched']} clients")
    for close, n in step["closes"].items():
        why.append(f"closed {close} x{n}")
    if step["dropped"]:
        why.append(f"dropped x{step['dropped']} ({step['client_errors'][0]})"
                   if step["client_errors"] else f"dropped x{step['dropped']}")
    if step["other_frames"]:
        why.append(f"{step['other_frames']} other frames")
    if step["sent_measured"] < step["planned"]:
        why.append(f"{step['planned'] - step['sent_measured']} messages not sent")
    # The generator must have offered what we claim: within 5% of the target rate.
    if step["sent_measured"] > 1 and step["sent_rate"] < 0.95 * step["rate"]:
        why.append(f"generator behind ({step['sent_rate']:.0f} msg/s sent)")
    return why


def bound(step: dict[str, Any]) -> str:
    """Which side ran out of CPU during the measured window: "server", "generator", "both"."""
    cpu = step.get("cpu") or {}
    server, load = cpu.get("server"), cpu.get("load")
    if server is None or load is None:
        return ""
    # Pinned: its cores are (nearly) full. Unpinned: each of its event loops (one per
    # process) is, or the machine is and it used a good part.
    full = (cpu.get("idle") or 0) < 10
    cores = step.get("server_cpus")
    loops = step.get("server_loops") or 1
    server_bound = (server >= 90 * cores if cores
                    else server >= 90 * loops or (full and server >= 50))
    cores = step.get("load_cpus")
    load_bound = load >= 90 * cores if cores else full and load >= 50
    if server_bound and load_bound:
        return "both"
    return "server" if server_bound else "generator" if load_bound else ""


# --- output -----------------------------------------------------------------------------

COLUMNS = (("server", 10), ("msg/s", 6), ("offered/s", 9), ("achieved/s", 10),
           ("p50 ms", 7), ("p99 ms", 7), ("max ms", 7), ("lost", 8), ("order", 5),
           ("srv cpu", 7), ("gen cpu", 7), ("other", 5), ("lag99", 6), ("result", 0))
# With several nodes: latency of receivers on the sender's node and on another node.
SPLIT_COLUMNS = (("same50", 7), ("same99", 7), ("cross50", 7), ("cross99", 7))


def columns(split: bool, redis: bool) -> tuple[tuple[str, int], ...]:
    cols = list(COLUMNS)
    if split:
        at = cols.index(("max ms", 7)) + 1
        cols[at:at] = SPLIT_COLUMNS
    if redis:
        cols.insert(cols.index(("gen cpu", 7)) + 1, ("rds cpu", 7))
    return tuple(cols)


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_header(cols: tuple[tuple[str, int], ...] = COLUMNS) -> None:
    print(" ".join(name.rjust(w) if w else name for name, w in cols), flush=True)


def print_row(step: dict[str, Any], note: str = "",
              cols: tuple[tuple[str, int], ...] = COLUMNS) -> None:
    why = verdict(step)
    cpu = step.get("cpu") or {}
    error = bool(step.get("error"))

    def ms(key: str, spec: str = ".2f") -> str:
        return "-" if error else _fmt(step.get(key), spec)

    cells = {"server": step["server"], "msg/s": f"{step['rate']:.0f}",
             "offered/s": f"{step['offered']:.0f}",
             "achieved/s": "-" if error else f"{step['achieved']:.0f}",
             "p50 ms": ms("p50"), "p99 ms": ms("p99"), "max ms": ms("max", ".1f"),
             "same50": ms("same_p50"), "same99": ms("same_p99"),
             "cross50": ms("cross_p50"), "cross99": ms("cross_p99"),
             "lost": "-" if error else str(step["lost"]),
             "order": "-" if error else str(step["violations"]),
             "srv cpu": _fmt(cpu.get("server"), ".0f") + "%",
             "gen cpu": _fmt(cpu.get("load"), ".0f") + "%",
             "rds cpu": _fmt(cpu.get("redis"), ".0f") + "%",
             "other": _fmt(cpu.get("other"), ".0f") + "%",
             "lag99": ms("lag_p99", ".1f"),
             "result": ("pass" if not why else "FAIL " + ", ".join(why)) + _bound_note(step)
             + note}
    print(" ".join(cells[name].rjust(w) if w else cells[name] for name, w in cols),
          flush=True)
    if step.get("other_samples"):
        print(f"    unexpected frames, e.g. {step['other_samples'][0]}", flush=True)


def _bound_note(step: dict[str, Any]) -> str:
    which = bound(step)
    return f" [cpu-bound: {which}]" if which else ""


def _summary_part(name: str, outcome: dict[str, Any], args: argparse.Namespace) -> str:
    if outcome.get("interrupted"):
        name += " (interrupted)"
    if outcome.get("error"):
        return f"{name} error: {outcome['error']}"
    best = outcome.get("best")
    if args.rate is not None:
        step = outcome["steps"][-1] if outcome["steps"] else None
        if step is None or step.get("error"):
            return f"{name} error: {step.get('error') if step else 'no run'}"
        why = verdict(step)
        return (f"{name} {step['rate']:.0f} msg/s: offered {step['offered']:.0f}, achieved "
                f"{step['achieved']:.0f} deliveries/s p50 {_fmt(step['p50'], '.2f')} ms "
                f"p99 {_fmt(step['p99'], '.1f')} ms lost {step['lost']} "
                f"({'pass' if not why else 'FAIL ' + ', '.join(why)}){_hop(step)}")
    if best is None:
        if not outcome["steps"]:
            return f"{name}: no steps"
        first = outcome["steps"][0]
        return (f"{name} max: none passed (at {first['rate']:.0f} msg/s: "
                f"{', '.join(verdict(first))})")
    limit = outcome.get("limit")
    suffix = ""
    if limit:
        suffix = (f", next {limit['rate']:.0f} msg/s: {', '.join(verdict(limit))}"
                  f"{_bound_note(limit)}")
    elif outcome.get("ladder_exhausted"):
        suffix = ", top of the ladder"
    return (f"{name} max {best['offered']:.0f} deliveries/s ({best['rate']:.0f} msg/s) "
            f"p99 {_fmt(best['p99'], '.1f')} ms lost {best['lost']}{_hop(best)}{suffix}")


def _hop(step: dict[str, Any]) -> str:
    """What the cross-node hop adds, when receivers were on several nodes."""
    same, cross = step.get("same_p50"), step.get("cross_p50")
    if same is None or cross is None:
        return ""
    return (f"; same-node p50 {same:.2f} p99 {_fmt(step['same_p99'], '.1f')} ms, "
            f"cross-node p50 {cross:.2f} p99 {_fmt(step['cross_p99'], '.1f')} ms: "
            f"the hop adds {cross - same:+.2f} ms at p50")


# --- the search -------------------------------------------------------------------------

def _cpu_split(args: argparse.Namespace) -> tuple[set[int], set[int]] | None:
    if not args.pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


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
        server = _servers(name, args, Path(tmp), cpu_split[0] if cpu_split else None)
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


def _servers(kind: str, args: argparse.Namespace, workdir: Path, cpus: set[int] | None
             ) -> Nodes:
    """The processes that make up the server under test (not started yet)."""
    if kind != "trio-chat":
        return Nodes(kind, [ServerProcess(kind, workdir, cpus)])
    config = workdir / "bench.json"
    config.write_text(json.dumps(_bench_config(args)))
    if not args.via_redis:
        return Nodes(kind, [ServerProcess(kind, workdir, cpus, config=str(config))])
    if args.server_workers:
        return Nodes(args.label, [ServerProcess(kind, workdir, None, str(config),
                                                port=_free_port(),
                                                workers=args.server_workers)])
    return Nodes(args.label, [
        ServerProcess(kind, workdir, cpus, str(config),
                      tag=f"node{i}" if args.nodes > 1 else None)
        for i in range(1, args.nodes + 1)])


def _bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--config`` (if any); senders here are load generators, not people, so the
    per-connection rate limit is lifted unless that file sets it; with Redis, a redis
    section on a channel of this run's own."""
    config: dict[str, Any] = {}
    if args.config:
        config = json.loads(Path(args.config).read_text())
    config["limits"] = {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                        "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000,
                        "connectionsPerIp": 1_000_000, **config.get("limits", {})}
    if not args.via_redis:
        return config
    config["redis"] = {**config.get("redis", {}), "host": args.redis_host,
                       "port": args.redis_port, "listeningChannelName": args.channel,
                       "publishChannelName": args.channel}
    return config


def _free_port() -> int:
    """A port that is free now, for ``serve --workers``, which refuses port 0."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _redis_client(args: argparse.Namespace) -> Any:
    import redis

    return redis.Redis(host=args.redis_host, port=args.redis_port, socket_timeout=5,
                       socket_connect_timeout=5)


def _redis_cleanup(args: argparse.Namespace) -> None:
    """Delete the keys this run left behind (they would expire in a week anyway)."""
    try:
        client = _redis_client(args)
        keys = list(client.scan_iter(match=f"{args.channel}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:  # the results are printed already; say why and go on
        print(f"# could not delete this run's Redis keys ({args.channel}:*): {exc}",
              file=sys.stderr, flush=True)


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
            client = _redis_client(args)
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
    cpu_split = None if args.server_workers is not None else _cpu_split(args)
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
            _redis_cleanup(args)
    parts = [_summary_part(outcomes[name].get("server", name), outcomes[name], args)
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


if __name__ == "__main__":
    sys.exit(main())
