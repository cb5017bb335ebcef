"""A deliberately primitive WebSocket client for tests that must misbehave on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from .wire import client_frame, handshake_request


async def read_http_response(stream: trio.abc.Stream) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (head and, with content-length, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:] if ":" in line)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


async def read_head(stream: trio.abc.Stream, status: int = 101) -> tuple[bytes, bytes]:
    """Read the head of the server's answer, asserting its status (a 101 to an upgrade
    request by default), and the bytes that came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, "server closed before the head of its answer"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), head
    return head, rest


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
                              "Connection: close\r\n\r\n".encode())
        return await read_http_response(stream)


async def http_call(port: int, method: str, path: str, body: object = None, *,
                    raw: bytes | None = None, headers: dict[str, str] | None = None
                    ) -> tuple[int, Any]:
    """One request; ``body`` is sent as JSON (or ``raw`` as is). Returns the status and
    the decoded JSON answer (which every API answer must be)."""
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += f"Content-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.encode() + b"\r\n" + data)
        status, response_headers, answer = await read_http_response(stream)
    assert response_headers["content-type"] == "application/json", response_headers
    return status, json.loads(answer)


class RawClient:
    """An upgraded connection whose every byte the test controls."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self.proto = Connection(ConnectionType.CLIENT, trailing_data=leftover)
        self.close_code: int | None = None
        self.answer_pings = True

    @classmethod
    async def connect(cls, port: int, path: str, source: str = "127.0.0.1") -> RawClient:
        """An upgraded client from the loopback address ``source``; prefer
        :func:`open_raw`, which also closes it."""
        stream = await open_from(source, port)
        try:
            await stream.send_all(handshake_request(path))
            _, leftover = await read_head(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, leftover)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self.send_raw(client_frame(text.encode()))

    async def next_event(self) -> object:
        """The next data or close event (pings are answered); None at EOF."""
        while True:
            for event in self.proto.events():
                if isinstance(event, Ping):
                    if self.answer_pings:
                        await self.stream.send_all(self.proto.send(event.response()))
                    continue
                if isinstance(event, CloseConnection):
                    self.close_code = event.code
                    return event
                if isinstance(event, (TextMessage, BytesMessage)):
                    return event
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.proto.receive_data(data)

    async def receive_json(self) -> dict:
        event = await self.next_event()
        assert isinstance(event, TextMessage), event
        return json.loads(event.data)

    async def wait_closed(self) -> int | None:
        """Read until the server's close frame or EOF; the close code, if any."""
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return self.close_code

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_raw(port: int, path: str) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` closed on the way out, also when the test fails."""
    client = await RawClient.connect(port, path)
    try:
        yield client
    finally:
        await trio.aclose_forcefully(client.stream)


async def open_from(source: str, port: int) -> trio.SocketStream:
    """A connection to the server from the loopback address ``source``."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
