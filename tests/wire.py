"""The client side of the WebSocket wire and loopback ports, for the tests and the
benchmark scripts (which import it from here): masked client frames, the upgrade
request and its expected accept key, and free ports. Standard library only, so a
benchmark's load-generator processes need nothing else."""

from __future__ import annotations

import base64
import hashlib
import random
import socket

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"0123456789abcdef").decode()


def accept_key(key: str | bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer to ``key``."""
    raw = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw + GUID).digest())


def handshake_request(path: str, *, key: str = KEY, version: str = "13", extra: str = "",
                      host: str = "127.0.0.1") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


def mask(payload: bytes, key: bytes) -> bytes:
    # One big-integer XOR: a per-byte loop costs the load generator more than the
    # server it measures.
    n = len(payload)
    keystream = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ keystream).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked client frame with any payload, valid UTF-8 or not."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    key = random.randbytes(4)
    return head + key + mask(payload, key)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all held at once while
    picked, so none repeats)."""
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    """A loopback port that was free a moment ago, for what refuses port 0."""
    return free_ports(1)[0]
