"""A raw client on trio for bench_abuse: connections from a chosen loopback address,
the WebSocket upgrade, masked frames out and unmasked server frames in, a socket
that never reads, one-shot HTTP requests, and reading what the server answered an
attacker once the attack is over."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import trio

from bench import HOST
from tests.wire import client_frame, handshake_request

HEAD_LIMIT = 64 * 1024  # an HTTP answer's head larger than this is not the server's


async def connect_from(port: int, source: str = HOST, rcvbuf: int | None = None
                       ) -> trio.SocketStream:
    """A TCP connection to the server from loopback address ``source``; a small
    ``rcvbuf`` makes a socket that never reads fill up at once."""
    sock = trio.socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((source, 0))
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def parse_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one unmasked server frame (opcode, payload) off the front of ``buf``."""
    if len(buf) < 2:
        return None
    opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, at = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, at = int.from_bytes(buf[2:10], "big"), 10
    if len(buf) < at + n:
        return None
    payload = bytes(buf[at:at + n])
    del buf[:at + n]
    return opcode, payload


class RawWs:
    """An upgraded connection: frames as the test builds them go out, server frames
    come in; pings are answered while :meth:`frames` runs."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(leftover)

    @classmethod
    async def connect(cls, port: int, path: str, source: str = HOST) -> RawWs:
        stream = await connect_from(port, source)
        try:
            await stream.send_all(handshake_request(path, host=f"{HOST}:{port}"))
            head = await read_head(stream)
            if not head[0].startswith(b"HTTP/1.1 101"):
                raise ConnectionError(f"upgrade refused: {head[0][:80]!r}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, head[1])

    async def send(self, payload: bytes) -> None:
        await self.stream.send_all(client_frame(payload))

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Data and close frames until the connection ends."""
        while True:
            while (frame := parse_frame(self.buf)) is not None:
                if frame[0] == 0x9:
                    await self.stream.send_all(client_frame(frame[1], opcode=0xA))
                elif frame[0] != 0xA:
                    yield frame
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                return
            self.buf += data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """An HTTP answer's head, and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > HEAD_LIMIT:
            raise ConnectionError(f"no answer head (got {data[:80]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def http_status(port: int, request: bytes, source: str = HOST) -> int:
    """Send one request on a new connection and read the whole answer; its status."""
    stream = await connect_from(port, source)
    async with stream:
        await stream.send_all(request)
        head, rest = await read_head(stream)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            rest += chunk
        return int(head.split()[1])


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


async def stuck_ws(port: int, path: str, source: str = HOST) -> trio.SocketStream:
    """An upgrade request on a socket that never reads (a 4 KiB receive buffer)."""
    stream = await connect_from(port, source, rcvbuf=4096)
    await stream.send_all(handshake_request(path, host=f"{HOST}:{port}"))
    return stream


async def what_came(stream: trio.SocketStream, seconds: float = 2.0,
                    cap: int = 64 * 1024 * 1024, upgraded: bytes | None = None) -> str:
    """Read what the server sent an attacker (at most ``cap`` bytes, for ``seconds``):
    an HTTP answer's status, else the close code the WebSocket ended with, ``EOF`` or
    ``reset`` without one, or ``open``. ``upgraded``: the upgrade was read already,
    and these bytes came after it."""
    with contextlib.suppress(OSError):  # read out a never-reading socket quickly
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    buf = bytearray(upgraded or b"")
    total = 0
    with trio.move_on_after(seconds):
        try:
            while total < cap:
                if upgraded is None and b"\r\n\r\n" in buf:
                    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 101"):
                        return head[9:12].decode()
                    upgraded, buf = rest, bytearray(rest)
                while upgraded is not None and (frame := parse_frame(buf)) is not None:
                    if frame[0] == 0x8:
                        code = int.from_bytes(frame[1][:2], "big") if frame[1] else 1005
                        return str(code)
                data = await stream.receive_some(1024 * 1024)
                if not data:
                    return "EOF"
                total += len(data)
                buf += data
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "reset"
    return "open"
