"""The WebSocket transport: the frame reader without sockets, then writers and heartbeat
on real ones."""

from __future__ import annotations

import random
import socket
from contextlib import AsyncExitStack

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from trio_chat.server import Server
from trio_chat.websocket import (
    BINARY,
    CLOSE,
    FAIL,
    PING,
    PONG,
    TEXT,
    FrameReader,
    close_frame,
)

from .conftest import (
    chat_frame,
    make_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import open_raw
from .wire import client_frame, handshake_request


def feed_all(reader: FrameReader, data: bytes, chunk: int | None = None) -> list:
    if chunk is None:
        return reader.feed(data)
    events = []
    for i in range(0, len(data), chunk):
        events += reader.feed(data[i:i + chunk])
    return events


def test_a_text_frame_in_one_piece_and_byte_by_byte() -> None:
    frame = client_frame("héllo".encode())
    assert FrameReader(1000).feed(frame) == [(TEXT, "héllo")]
    assert feed_all(FrameReader(1000), frame * 3, chunk=1) == [(TEXT, "héllo")] * 3


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_every_length_encoding(size: int) -> None:
    payload = bytes(random.Random(size).randrange(256) for _ in range(size))
    events = feed_all(FrameReader(10**6), client_frame(payload, opcode=0x2), chunk=7000)
    assert events == [(BINARY, payload)]


def test_fragments_with_a_ping_between_them_and_utf8_split_across_them() -> None:
    text = "añb€c".encode()
    data = (client_frame(text[:2], fin=False) + client_frame(b"hi", opcode=0x9) +
            client_frame(text[2:5], opcode=0x0, fin=False) +
            client_frame(text[5:], opcode=0x0))
    assert FrameReader(100).feed(data) == [(PING, b"hi"), (TEXT, "añb€c")]


def test_pong_and_close_events() -> None:
    reader = FrameReader(100)
    assert reader.feed(client_frame(b"x", opcode=0xA)) == [(PONG, b"x")]
    close = client_frame((1001).to_bytes(2, "big") + "bye ✓".encode(), opcode=0x8)
    assert reader.feed(close + client_frame(b"after")) == [(CLOSE, (1001, "bye ✓"))]
    assert reader.feed(client_frame(b"more")) == [], "nothing is read after a close"
    assert FrameReader(100).feed(client_frame(b"", opcode=0x8)) == [(CLOSE, (1005, ""))]


def masked_head(first: int, length: int) -> bytes:
    return bytes((first, 0x80 | length)) + b"\0\0\0\0"


@pytest.mark.parametrize(("data", "code", "detail"), [
    (bytes((0x81, 0x02)) + b"hi", 1002, "must be masked"),
    (client_frame(b"hi")[:1].replace(b"\x81", b"\xc1") + client_frame(b"hi")[1:], 1002,
     "reserved bits"),
    (client_frame(b"x", opcode=0x3), 1002, "unknown opcode 3"),
    (client_frame(b"x", opcode=0xB), 1002, "unknown opcode 11"),
    (client_frame(b"x" * 126, opcode=0x9), 1002, "control frame over 125"),
    (client_frame(b"x", opcode=0x9, fin=False), 1002, "fragmented control"),
    (client_frame(b"x", opcode=0x0), 1002, "continuation frame with no message"),
    (client_frame(b"a", fin=False) + client_frame(b"b"), 1002, "before the last one"),
    (client_frame(b"\xff\xfe"), 1007, "invalid UTF-8"),
    (client_frame(b"\xe2\x82", fin=False) + client_frame(b"", opcode=0), 1007, "UTF-8"),
    (client_frame(b"\x03", opcode=0x8), 1002, "one-byte"),
    (client_frame((1005).to_bytes(2, "big"), opcode=0x8), 1002, "close code 1005"),
    (client_frame((999).to_bytes(2, "big"), opcode=0x8), 1002, "close code 999"),
    (client_frame((2000).to_bytes(2, "big"), opcode=0x8), 1002, "close code 2000"),
    (client_frame((1000).to_bytes(2, "big") + b"\xff", opcode=0x8), 1007, "close reason"),
    (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"\0\0\0\0", 1002, "2**63"),
])
def test_protocol_errors_name_their_close_code(data: bytes, code: int, detail: str) -> None:
    reader = FrameReader(1000)
    events = reader.feed(client_frame(b"first") + data)
    assert events[0] == (TEXT, "first"), "what came before the error is kept"
    kind, (got_code, reason) = events[-1]
    assert (kind, got_code) == (FAIL, code)
    assert detail in reason
    assert reader.feed(client_frame(b"later")) == []


def test_a_3000_close_code_is_allowed() -> None:
    assert FrameReader(10).feed(client_frame((3000).to_bytes(2, "big"), opcode=0x8)) == [
        (CLOSE, (3000, ""))]


def test_an_oversized_message_fails_on_its_header_before_the_payload_arrives() -> None:
    reader = FrameReader(1000)
    frame = client_frame(b"x" * 5000)
    assert reader.feed(frame[:20]) == [(FAIL, (1009, "message over 1000 bytes"))]
    fragmented = client_frame(b"x" * 600, fin=False) + client_frame(b"x" * 600, opcode=0)
    assert FrameReader(1000).feed(fragmented) == [(FAIL, (1009, "message over 1000 bytes"))]
    exact = client_frame(b"x" * 500, fin=False) + client_frame(b"x" * 500, opcode=0)
    assert FrameReader(1000).feed(exact) == [(TEXT, "x" * 1000)]


def test_agrees_with_wsproto_on_random_traffic() -> None:
    rng = random.Random(8)
    client = Connection(ConnectionType.CLIENT)
    wire, expected = b"", []
    for _ in range(300):
        roll = rng.random()
        if roll < 0.1:
            payload = rng.randbytes(rng.randrange(126))
            wire += client.send(Ping(payload))
            expected.append((PING, payload))
            continue
        size = rng.choice([0, 1, 100, 125, 126, 4000, 70000])
        if roll < 0.5:
            data: str | bytes = rng.randbytes(size)
            event: Message = BytesMessage(data=data)
            expected.append((BINARY, data))
        else:
            data = "".join(rng.choice("aé€😀 ") for _ in range(size // 2))
            event = TextMessage(data=data)
            expected.append((TEXT, data))
        wire += client.send(event)
    wire += client.send(CloseConnection(code=1000, reason="done"))
    expected.append((CLOSE, (1000, "done")))
    for chunk in (None, 1, 4096, 65536):
        assert feed_all(FrameReader(10**6), wire, chunk) == expected


def test_close_frame_cuts_a_long_reason_on_a_character() -> None:
    frame = close_frame(4001, "é" * 100)
    assert frame[0] == 0x88 and frame[1] == len(frame) - 2 <= 125
    assert frame[2:4] == (4001).to_bytes(2, "big")
    assert frame[4:].decode() == "é" * 61
    assert close_frame(1005) == b"\x88\x00"


def writer_tasks(server: Server) -> int:
    """The writer tasks of blocked sockets: the writers' nursery holds them and the flusher."""
    return len(server.writers._nursery.child_tasks) - 1


def room_members(server: Server, room: int) -> int:
    return len(server.hub.rooms[room].members) if room in server.hub.rooms else 0


async def test_a_full_socket_gets_a_writer_task_only_until_it_drains(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, write_wait=30.0))
    # A client that does not read: its socket fills and the server's writes block.
    with trio.socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stuck.connect(("127.0.0.1", server.port))
        await stuck.send(handshake_request("/ws/5"))
        await wait_until(lambda: room_members(server, 5) == 1)
        (member,) = server.hub.rooms[5].members
        async with open_ws(ws_url(server, 5)) as sender:
            await wait_until(lambda: room_members(server, 5) == 2)
            assert writer_tasks(server) == 0
            for i in range(40):
                await sender.send_message(chat_frame(f"{i}:" + "x" * 4000, room_id=5))
                await recv(sender)
            # The stuck member's writer waits for its socket; nothing else has a writer.
            await wait_until(lambda: member.ws._writing)
            assert writer_tasks(server) == 1
            received = b""
            with trio.fail_after(20):
                while received.count(b'"content"') < 40:
                    received += await stuck.recv(1 << 20)
            await wait_until(lambda: not member.ws._writing)
            assert writer_tasks(server) == 0
    await wait_until(lambda: not server.hub.connections and not server.hub.rooms)
    assert writer_tasks(server) == 0


async def test_heartbeat_pings_each_connection_once_a_period(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, ping_period=0.5, pong_wait=2.0))
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_raw(server.port, "/ws/9"))
                   for _ in range(3)]
        pings = [0, 0, 0]

        async def count_pings(i: int) -> None:
            while True:
                await clients[i].next_event()

        # RawClient answers pings itself; count them at the transport.
        for i, client in enumerate(clients):
            original = client.proto.receive_data

            def receive_data(data: bytes | None, i: int = i, original=original) -> None:
                pings[i] += data.count(b"\x89\x00") if data else 0
                original(data)

            client.proto.receive_data = receive_data  # type: ignore[method-assign]
        started = trio.current_time()
        async with trio.open_nursery() as readers:
            for i in range(3):
                readers.start_soon(count_pings, i)
            await wait_until(lambda: min(pings) >= 3)
            readers.cancel_scope.cancel()
        # Every connection is pinged, and not more often than once a period.
        periods = (trio.current_time() - started) / 0.5
        assert all(n <= periods + 1 for n in pings), (pings, periods)
        assert len(server.hub.connections) == 3, "answered pings keep connections open"


async def test_protocol_errors_on_a_real_socket_close_with_their_code(server) -> None:
    async with open_raw(server.port, "/ws/4") as unmasked:
        await unmasked.send_raw(bytes((0x81, 0x02)) + b"hi")
        with trio.fail_after(10):
            assert await unmasked.wait_closed() == 1002
    # A header announcing 100 MB: refused at once, before any of it is sent.
    async with open_raw(server.port, "/ws/4") as huge:
        await huge.send_raw(bytes((0x81, 0xFF)) + (100 << 20).to_bytes(8, "big") + b"\0\0\0\0")
        with trio.fail_after(10):
            assert await huge.wait_closed() == 1009
    await wait_until(lambda: not server.hub.connections)


async def test_a_close_after_a_half_written_frame_keeps_the_stream_whole(
        nursery, db_path) -> None:
    """A close frame waits for the rest of a frame the socket took only part of
    (it once went out in the middle of one: the peer saw invalid UTF-8)."""
    server = await start_server(nursery, make_config(db_path, write_wait=30.0))
    async with open_raw(server.port, "/ws/6") as client:
        client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with open_ws(ws_url(server, 6)) as sender:
            await wait_until(lambda: room_members(server, 6) == 2)
            # Frames until the client's socket is full and one is only half written.
            member = None
            for i in range(200):
                await sender.send_message(chat_frame(f"{i}:" + "y" * 3000, room_id=6))
                await recv(sender)
                member = next((m for m in server.hub.connections
                               if m.room_id == 6 and m.ws._queue), None)
                if member is not None:
                    break
            assert member is not None, "the client's socket never filled"
            member.close(4004, "kicked")
        texts = 0
        with trio.fail_after(30):
            while not isinstance(event := await client.next_event(), CloseConnection):
                assert isinstance(event, TextMessage), event
                texts += 1
        assert event.code == 4004 and texts >= 1
