"""permessage-deflate (RFC 7692): the negotiation and the codec sans-IO, then on real
sockets with the ``websockets`` client and raw clients that keep every byte the
server sent, in a small room and in one large enough for the flusher's path."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.sync.client import connect

from trio_chat import deflate as deflate_module
from trio_chat.budget import ByteBudget
from trio_chat.deflate import (
    MIN_DEFLATE,
    Deflate,
    Deflaters,
    FrameDeflater,
    deflate_frame,
    negotiate,
    parse_extensions,
)
from trio_chat.flush import Flush
from trio_chat.framing import (
    BINARY,
    FAIL,
    INFLATE_STEP,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    PING,
    PROTOCOL_ERROR,
    TEXT,
    TRY_AGAIN_LATER,
    FrameReader,
    LargeFrames,
    utf8_frame,
)
from trio_chat.metrics import Metrics
from trio_chat.room import WRITE_NOW_MEMBERS
from trio_chat.server import Server

from .conftest import chat_frame, make_config, start_server, wait_until
from .rawws import open_from, read_head
from .wire import client_frame, handshake_request

TAIL = b"\x00\x00\xff\xff"
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
# A chat message of the seed's size.
CONTENT = "hello there, how are you doing today? this is a chat message of seed size"


def compress(data: bytes, bits: int = 15) -> bytes:
    """A message compressed as a client without context takeover sends it."""
    c = zlib.compressobj(6, zlib.DEFLATED, -bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + TAIL)


def rsv1_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """A masked client frame with RSV1 set."""
    frame = bytearray(client_frame(payload, opcode, fin))
    frame[0] |= 0x40
    return bytes(frame)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames, back to back, as (first byte, payload)."""
    frames, pos = [], 0
    while pos < len(data):
        n, head = data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), pos + 4
        elif n == 127:
            n, head = int.from_bytes(data[pos + 2:pos + 10], "big"), pos + 10
        frames.append((data[pos], data[head:head + n]))
        pos = head + n
    assert pos == len(data)
    return frames


# -- negotiation -----------------------------------------------------------------------

@pytest.mark.parametrize(("header", "agreed"), [
    ("permessage-deflate", Deflate()),
    ("permessage-deflate; client_max_window_bits", Deflate()),
    ("Permessage-Deflate; Client_No_Context_Takeover; server_no_context_takeover", Deflate()),
    ("permessage-deflate; client_max_window_bits=10", Deflate()),
    ("permessage-deflate; server_max_window_bits=10", Deflate(10, True)),
    ('permessage-deflate; server_max_window_bits="12"', Deflate(12, True)),
    ("permessage-deflate;server_max_window_bits = 9 ", Deflate(9, True)),
    # The first offer that can be honoured wins; the others are skipped.
    ("permessage-deflate; server_max_window_bits=8, permessage-deflate", Deflate()),
    ("x-webkit-deflate-frame, permessage-deflate; client_no_context_takeover", Deflate()),
    ('foo; bar="a, b;c", permessage-deflate', Deflate()),
    ("permessage-deflate; unknown_param, permessage-deflate; server_max_window_bits=11",
     Deflate(11, True)),
    (", ,permessage-deflate,", Deflate()),
    # Declined: zlib cannot deflate with 8 bits; values out of range, missing, with a
    # leading zero, or where none belongs; unknown and repeated parameters.
    ("permessage-deflate; server_max_window_bits=8", None),
    ("permessage-deflate; server_max_window_bits", None),
    ("permessage-deflate; server_max_window_bits=16", None),
    ("permessage-deflate; server_max_window_bits=09", None),
    ("permessage-deflate; client_max_window_bits=7", None),
    ("permessage-deflate; client_max_window_bits=x", None),
    ("permessage-deflate; server_no_context_takeover=1", None),
    ("permessage-deflate; foo", None),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),
    ("x-webkit-deflate-frame", None),
    # Malformed: the header is ignored, the connection goes on without compression.
    ("permessage-deflate;", None),
    ("permessage-deflate; =3", None),
    ("permessage-deflate garbage", None),
    ('permessage-deflate; a="unterminated', None),
    ("", None),
    (None, None),
])
def test_negotiation(header: str | None, agreed: Deflate | None) -> None:
    assert negotiate(header) == agreed


def test_answer_always_drops_both_contexts() -> None:
    assert Deflate().header == \
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    assert Deflate(10, True).header == ("permessage-deflate; server_no_context_takeover; "
                                        "client_no_context_takeover; server_max_window_bits=10")


def test_parse_extensions_unquotes() -> None:
    assert parse_extensions('a; b="x\\"y", c;d=1') == [("a", [("b", 'x"y')]),
                                                       ("c", [("d", "1")])]
    with pytest.raises(ValueError):
        parse_extensions("a b")


# -- the server's frames ---------------------------------------------------------------

def message(n: int) -> bytes:
    return utf8_frame(json.dumps({"message_type": "chat_txt", "content": "x" * n}).encode())


@pytest.mark.parametrize("size", [MIN_DEFLATE + 10, 300, 5000, 70_000])
def test_deflate_frame_round_trip(size: int) -> None:
    frame = message(size)
    out = deflate_frame(frame)
    first, payload = server_frames(out)[0]
    assert first == 0xC1  # FIN, RSV1, text
    assert inflate(payload) == server_frames(frame)[0][1]
    assert len(out) < len(frame)


def test_deflate_frame_leaves_what_does_not_pay() -> None:
    short = utf8_frame(b"x" * (MIN_DEFLATE - 1))
    assert deflate_frame(short) is short
    noise = utf8_frame(random.Random(1).randbytes(500))  # incompressible
    assert deflate_frame(noise) is noise
    # A payload that needs a larger window than the client allowed stays as it is.
    big = message(5000)
    assert deflate_frame(big, max_bits=9) is big
    assert deflate_frame(message(200), max_bits=9) is not message(200)


def test_flushes_that_share_frames_compress_each_frame_once() -> None:
    metrics = Metrics()
    deflater = Deflaters(metrics).get(15)
    frames = [message(300 + i) for i in range(3)]
    # One round of a large room: [1], then [1, 2, 3] for those not yet visited, then
    # [2, 3] for those visited first.
    joined = [deflater.flush(Flush(part, 0)) for part in
              (frames[:1], frames, frames[1:])]
    assert metrics.deflated_frames == 3
    assert joined[1] == joined[0] + joined[2]
    # Kept within RECENT_BYTES: old frames are let go.
    many = [message(deflate_module.RECENT_BYTES // 300 + i) for i in range(400)]
    deflater.flush(Flush(many, 0))
    assert sum(len(f) for f, _ in deflater._recent.values()) <= deflate_module.RECENT_BYTES


def test_one_compression_per_message_and_flush() -> None:
    metrics = Metrics()
    deflater = Deflaters(metrics).get(15)
    frame = message(300)
    first = deflater.frame(frame)
    for _ in range(WRITE_NOW_MEMBERS):
        assert deflater.frame(frame) is first
    assert metrics.deflated_frames == 1
    assert metrics.deflate_in_bytes == len(frame) and metrics.deflate_out_bytes == len(first)
    # An equal frame that is another object (another message) is compressed again.
    assert deflater.frame(message(300)) == first and metrics.deflated_frames == 2

    short = utf8_frame(b'{"message_type":"typing"}')
    flush = Flush([message(300), short, message(400)], 0)
    joined = deflater.flush(flush)
    for _ in range(100):
        assert deflater.flush(flush) is joined
    assert metrics.deflated_frames == 4
    assert [f for f, _ in server_frames(joined)] == [0xC1, 0x81, 0xC1]
    assert [inflate(p) if f & 0x40 else p for f, p in server_frames(joined)] == \
        [server_frames(f)[0][1] for f in flush.frames]
    # Another window is another encoding of the same flush.
    other = FrameDeflater(10, metrics).flush(flush)
    assert other is not joined


# -- the reader ------------------------------------------------------------------------

def reader(max_message: int = 64 * 1024, **kwargs: Any) -> FrameReader:
    return FrameReader(max_message, inflate=True, **kwargs)


def test_reader_inflates_whole_and_fragmented_messages() -> None:
    text = chat_frame(CONTENT).encode()
    r = reader()
    assert r.feed(rsv1_frame(compress(text))) == [(TEXT, text.decode())]
    # Fragmented: RSV1 on the first frame only; a ping in between; byte by byte.
    body = compress(text * 3)
    data = rsv1_frame(body[:10], fin=False) + client_frame(b"p", 9) + \
        client_frame(body[10:50], 0, fin=False) + client_frame(body[50:], 0)
    events = []
    for i in range(len(data)):
        events += r.feed(data[i:i + 1])
    assert events == [(PING, b"p"), (TEXT, (text * 3).decode())]
    # Uncompressed messages still pass, and binary ones compress too.
    assert r.feed(client_frame(b"plain")) == [(TEXT, "plain")]
    assert r.feed(rsv1_frame(compress(b"\x00" * 200), opcode=2)) == [(BINARY, b"\x00" * 200)]
    r.release_done()
    assert r.reserved == 0


@pytest.mark.parametrize(("frame", "code"), [
    (rsv1_frame(compress(b"{}"), opcode=9), PROTOCOL_ERROR),   # RSV1 on a ping
    (rsv1_frame(b"\x00", opcode=0), PROTOCOL_ERROR),           # on a continuation
    (bytes((0xA1,)) + client_frame(b"x")[1:], PROTOCOL_ERROR),  # RSV2
    (rsv1_frame(b"\xff\xff\xff"), INVALID_PAYLOAD),             # not deflate
])
def test_reader_refuses_bad_compressed_frames(frame: bytes, code: int) -> None:
    kind, (got, _) = reader().feed(frame)[-1]
    assert (kind, got) == (FAIL, code)


def test_rsv1_without_negotiation_is_a_protocol_error() -> None:
    events = FrameReader(64 * 1024).feed(rsv1_frame(compress(b"{}")))
    assert events == [(FAIL, (PROTOCOL_ERROR,
                              "reserved bits set; no extension was negotiated"))]


def test_zip_bomb_is_refused_having_inflated_at_most_the_limit() -> None:
    inbound = ByteBudget(1 << 20, 1 << 20)
    r = reader(64 * 1024, inbound=inbound, key="a")
    bomb = compress(b"\x00" * (50 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    events = r.feed(rsv1_frame(bomb))
    assert events == [(FAIL, (MESSAGE_TOO_BIG, "message over 65536 bytes"))]
    assert r.reserved == 0 and inbound.held() == 0
    # Its compressed size is checked at the header too.
    events = reader(1024).feed(rsv1_frame(b"\x00" * 2000))
    assert events[-1][1][0] == MESSAGE_TOO_BIG


def test_large_compressed_chat_img_in_steps_within_the_budgets() -> None:
    text = chat_frame("data:image/png;base64," + "QUJD" * 100_000, message_type="chat_img")
    large = LargeFrames(1 << 20)
    inbound = ByteBudget(8 << 20, 8 << 20)
    r = reader(64 * 1024, large_message=1 << 20, large=large, inbound=inbound, key="a")
    events = r.feed(rsv1_frame(compress(text.encode())))
    steps = 1
    while r.more:
        assert not events and large.used <= steps * INFLATE_STEP
        events = r.feed(b"")
        steps += 1
    assert steps >= len(text) // INFLATE_STEP
    assert events == [(TEXT, text)]
    assert large.used == len(text)
    r.release_done()
    assert large.used == 0 and r.reserved == 0 and inbound.held() == 0
    # Not a chat_img: refused once it inflates past the limit.
    r = reader(64 * 1024, large_message=1 << 20, large=large, inbound=inbound, key="a")
    events = r.feed(rsv1_frame(compress(chat_frame("x" * 200_000).encode())))
    while r.more:
        events += r.feed(b"")
    assert events[-1][1][0] == MESSAGE_TOO_BIG
    assert large.used == 0 and inbound.held() == 0
    # Over the large budget, or the inbound budget, as it grows.
    r = reader(64 * 1024, large_message=1 << 20, large=LargeFrames(100_000))
    events = r.feed(rsv1_frame(compress(text.encode())))
    assert events[-1][1][0] == MESSAGE_TOO_BIG
    r = reader(64 * 1024, large_message=1 << 20, large=large,
               inbound=ByteBudget(500_000, 500_000), key="a")
    events = r.feed(rsv1_frame(compress(text.encode())))
    while r.more:
        events += r.feed(b"")
    assert events[-1][1][0] == TRY_AGAIN_LATER
    assert large.used == 0


# -- on real sockets -------------------------------------------------------------------

class Member:
    """A raw client that keeps the bytes of every frame the server sends it."""

    def __init__(self, stream: trio.SocketStream, extensions: str, data: bytes) -> None:
        self.stream, self.extensions, self._data = stream, extensions, data

    async def frame(self) -> tuple[bytes, int, bytes]:
        """The next frame: its bytes, its first byte and its payload (inflated)."""
        while True:
            data = self._data
            if len(data) >= 2:
                n, head = data[1] & 0x7F, 2
                if n == 126:
                    n, head = int.from_bytes(data[2:4], "big"), 4
                elif n == 127:
                    n, head = int.from_bytes(data[2:10], "big"), 10
                if len(data) >= max(head, head + n):
                    raw, self._data = data[:head + n], data[head + n:]
                    payload = raw[head:]
                    return raw, raw[0], inflate(payload) if raw[0] & 0x40 else payload
            chunk = await self.stream.receive_some(65536)
            assert chunk, "the server closed the connection"
            self._data += chunk

    async def until(self, content: str) -> tuple[bytes, int, dict[str, Any]]:
        """The frame of the first message with ``content``, skipping the others."""
        while True:
            raw, first, payload = await self.frame()
            if first & 0x0F == 1:
                frame = json.loads(payload)
                if frame.get("content") == content:
                    return raw, first, frame

    async def close_code(self) -> int:
        while True:
            _, first, payload = await self.frame()
            if first & 0x0F == 8:
                return int.from_bytes(payload[:2], "big")


@asynccontextmanager
async def open_member(port: int, path: str, extra: str = OFFER) -> AsyncIterator[Member]:
    stream = await open_from("127.0.0.1", port)
    try:
        await stream.send_all(handshake_request(path, extra=extra))
        head, rest = await read_head(stream)
        extensions = ""
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                extensions = value.strip()
        yield Member(stream, extensions, rest)
    finally:
        await trio.aclose_forcefully(stream)


def websockets_sender(port: int, room: int, content: str) -> tuple[str, dict[str, Any]]:
    """Blocking, in a thread: the ``websockets`` client (deflate on by default) joins,
    sends ``content`` and returns the extension agreed and its message as received."""
    with connect(f"ws://127.0.0.1:{port}/ws/{room}?author_id=7", open_timeout=10,
                 close_timeout=5) as ws:
        ws.send(chat_frame(content, author_id=7, room_id=room))
        while True:
            frame = json.loads(ws.recv(timeout=15))
            if frame.get("content") == content:
                return ws.response.headers["sec-websocket-extensions"], frame


@pytest.mark.parametrize("members", [3, WRITE_NOW_MEMBERS + 6])
async def test_websockets_client_and_raw_members_share_one_compressed_frame(
        server: Server, members: int) -> None:
    room, port = 17, server.port
    plain = 2
    got: dict[int, tuple[bytes, int, dict[str, Any]]] = {}
    sent: list[tuple[str, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:
        entered: list[Member] = []

        async def member(i: int, *, task_status: trio.TaskStatus[None]) -> None:
            async with open_member(port, f"/ws/{room}?author_id={100 + i}",
                                   "" if i < plain else OFFER) as m:
                entered.append(m)
                task_status.started()
                got[i] = await m.until(CONTENT)

        for i in range(members):
            await nursery.start(member, i)
        await wait_until(lambda: room in server.hub.rooms and
                         len(server.hub.rooms[room].members) == members)
        assert server.writers.deflaters.connections == members - plain
        before = server.metrics.deflated_frames
        sent.append(await trio.to_thread.run_sync(websockets_sender, port, room, CONTENT))
    extensions, echoed = sent[0]
    assert extensions.startswith("permessage-deflate; server_no_context_takeover")
    assert echoed["content"] == CONTENT and echoed["author_id"] == 7
    assert [m.extensions for m in entered].count("") == plain
    # Every compressing member got the very same bytes; the others the plain frame.
    compressed = {got[i][0] for i in range(plain, members)}
    assert len(compressed) == 1
    frame = compressed.pop()
    assert frame[0] == 0xC1
    for i in range(plain):
        assert got[i][1] == 0x81 and len(got[i][0]) > len(frame)
    assert all(got[i][2] == echoed for i in range(members))
    # Compressed once for all of them (the message, its ack and the sender's events).
    assert server.metrics.deflated_frames - before <= 4
    await wait_until(lambda: server.writers.deflaters.connections == 0)


async def test_raw_member_sends_compressed_and_fragmented(server: Server) -> None:
    async with open_member(server.port, "/ws/5?author_id=3") as m:
        assert m.extensions == \
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        body = compress(chat_frame(CONTENT, author_id=3, room_id=5).encode())
        await m.stream.send_all(rsv1_frame(body[:7], fin=False) +
                                client_frame(body[7:], 0))
        _, first, frame = await m.until(CONTENT)
        assert first == 0xC1 and frame["id"] == 1


async def test_zip_bomb_gets_1009_and_leaves_nothing_held(server: Server) -> None:
    async with open_member(server.port, "/ws/5?author_id=3") as m:
        await wait_until(lambda: server.writers.inbound.held() == 0)
        await m.stream.send_all(rsv1_frame(compress(b"{" + b" " * (100 << 20))))
        assert await m.close_code() == MESSAGE_TOO_BIG
    await wait_until(lambda: not server.hub.connections)
    assert server.writers.inbound.held() == 0 and server.writers.large.used == 0
    assert server.metrics.oversized_frames == 1


@pytest.mark.parametrize("extra", ["", "Sec-WebSocket-Extensions: x-other\r\n"])
async def test_rsv1_without_negotiation_gets_1002(server: Server, extra: str) -> None:
    async with open_member(server.port, "/ws/5", extra) as m:
        assert m.extensions == ""
        await m.stream.send_all(rsv1_frame(compress(chat_frame().encode())))
        assert await m.close_code() == PROTOCOL_ERROR


async def test_compression_off(nursery: trio.Nursery, db_path: Path) -> None:
    server = await start_server(nursery, make_config(db_path, compression="off"))
    async with open_member(server.port, "/ws/5?author_id=3") as m:
        assert m.extensions == ""
        await m.stream.send_all(client_frame(chat_frame(CONTENT, author_id=3,
                                                        room_id=5).encode()))
        _, first, _ = await m.until(CONTENT)
        assert first == 0x81


async def test_repeated_extension_headers_are_one_list(server: Server) -> None:
    extra = "Sec-WebSocket-Extensions: x-other\r\n" \
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n"
    async with open_member(server.port, "/ws/5", extra) as m:
        assert m.extensions.endswith("server_max_window_bits=10")

