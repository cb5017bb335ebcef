"""Redis's own cost of a trio-chat message: ``redis-benchmark`` calls trio-chat's
publish script (``publish.lua``, with the keys and arguments a node sends and a
message body of the size bench_chatload's messages have) while K connections here
hold the room's shard channel, for each K asked; one per subscribed worker in a
deployment. Reported: messages/s and redis-server's CPU per message (INFO), from
which what one Redis core carries follows.

The subscribers are read and discarded by a thread of their own (big reads, nothing
parsed) so that Redis never holds their output; if Redis drops one (its output
buffer limit), the row says so rather than report a cheaper Redis than was there.
"""

from __future__ import annotations

import re
import secrets
import selectors
import shutil
import socket
import subprocess
import threading
from typing import Any

import attrs

from bench import ROOT

PUBLISH_LUA = ROOT / "trio_chat" / "broker" / "publish.lua"
# A chatload message as a node publishes it, after its id: about 230 bytes in all.
BODY = ('"message_type":"chat_txt","author_id":3,"room_id":1,"content":"mk1764817200123456789'
        'x2000017x' + "a" * 64 + '","create_at":"2026-12-04T03:40:00.123456789Z",'
        '"received_at":"2026-12-04T03:40:00.124Z"}')


@attrs.define
class _Subscribers:
    """``count`` connections subscribed to ``channel``, drained by a thread."""

    host: str
    port: int
    channel: str
    count: int
    received: int = 0
    dropped: int = 0
    _socks: list[socket.socket] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> _Subscribers:
        command = f"SSUBSCRIBE {self.channel}\r\n".encode()
        try:
            for _ in range(self.count):
                sock = socket.create_connection((self.host, self.port), timeout=10)
                self._socks.append(sock)
                sock.sendall(command)
                reply = b""
                while not reply.endswith(b":1\r\n"):  # [ssubscribe, channel, 1]
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("Redis closed a subscription")
                    reply += chunk
                sock.setblocking(False)
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        buffer = bytearray(1 << 20)
        with selectors.DefaultSelector() as sel:
            for sock in self._socks:
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        n = sock.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        self.dropped += 1
                        sel.unregister(sock)
                    self.received += n

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._close()

    def _close(self) -> None:
        for sock in self._socks:
            sock.close()


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(client: Any, host: str, port: int, subscribers: int, messages: int,
            connections: int = 20) -> dict[str, Any]:
    """One redis-benchmark run of the publish script with ``subscribers`` listening."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark is not installed (Debian's redis-tools)")
    sha = client.script_load(PUBLISH_LUA.read_text())
    prefix = f"bench-publish-{secrets.token_hex(4)}:{{1}}"
    keys = [f"{prefix}:seq", f"{prefix}:recent", f"{prefix}:log"]
    # ARGV as a node sends it: channel, id floor, body, recent size, key expiry,
    # idempotency window, no edit (two empty strings), log it, recent list's expiry.
    argv = [binary, "-h", host, "-p", str(port), "-c", str(connections), "-n",
            str(messages), "--csv", "EVALSHA", sha, "3", *keys, prefix, "0", BODY, "100",
            str(7 * 24 * 3600), "600", "", "", "1", "86400"]
    try:
        with _Subscribers(host, port, prefix, subscribers) as subs:
            cpu0 = _redis_cpu(client)
            run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            cpu1 = _redis_cpu(client)
    finally:
        client.delete(*keys)
    if run.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited with {run.returncode}: {run.stderr}")
    # The CSV's test name is the command, quotes unescaped: read the last line's seven
    # numbers (rps, then six latencies) from its end.
    numbers = re.findall(r'"([0-9.]+)"', run.stdout.strip().splitlines()[-1])
    rps = float(numbers[-7])
    return {"subscribers": subscribers, "messages": messages, "per_s": rps,
            "redis_us_per_msg": (cpu1 - cpu0) * 1e6 / messages,
            "payload_bytes": len(BODY) + len('{"id":123456,'),
            "bytes_to_subscribers": subs.received, "subscribers_dropped": subs.dropped}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| subscribers | messages/s (redis-benchmark, 20 connections) | "
             "Redis CPU µs/msg | one Redis core at 100%: messages/s | "
             "bytes received per message and subscriber | subscribers dropped |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        capacity = 1e6 / r["redis_us_per_msg"] if r["redis_us_per_msg"] > 0 else 0.0
        pushes = r["messages"] * r["subscribers"]
        per_push = f"{r['bytes_to_subscribers'] / pushes:,.0f}" if pushes else "-"
        lines.append(f"| {r['subscribers']} | {r['per_s']:,.0f} | "
                     f"{r['redis_us_per_msg']:.2f} | {capacity:,.0f} | {per_push} | "
                     f"{r['subscribers_dropped']} |")
    return "\n".join(lines)
