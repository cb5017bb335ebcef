"""The WebSocket transport on real sockets: writers for full sockets, the heartbeat,
protocol errors and the close handshake. The framing itself is tests/test_framing.py's."""

from __future__ import annotations

import contextlib
import socket
from contextlib import AsyncExitStack

import trio
from wsproto.events import CloseConnection, TextMessage

from trio_chat.server import Server

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
from .wire import handshake_request


def writer_tasks(server: Server) -> list[trio.lowlevel.Task]:
    """The tasks writing to a full socket, under the server's root."""
    found, stack = [], [server.task]
    while stack:
        task = stack.pop()
        if task.name.endswith("WebSocket._write_blocked"):
            found.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


def room_members(server: Server, room: int) -> int:
    return len(server.hub.rooms[room].members) if room in server.hub.rooms else 0


async def test_a_full_socket_gets_a_writer_task_only_until_it_drains(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, write_wait=30.0))
    # A client that does not read: its socket fills and the server's writes block.
    stuck = socket.socket()
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            stuck.connect(("127.0.0.1", server.port))
        await trio.lowlevel.wait_writable(stuck)
        stuck.sendall(handshake_request("/ws/5"))
        await wait_until(lambda: 5 in server.hub.rooms and
                         len(server.hub.rooms[5].members) == 1)
        (member,) = server.hub.rooms[5].members
        async with open_ws(ws_url(server, 5)) as sender:
            await wait_until(lambda: len(server.hub.rooms[5].members) == 2)
            assert not writer_tasks(server), "no socket is full yet"
            for i in range(40):
                await sender.send_message(chat_frame(f"{i}:" + "x" * 4000, room_id=5))
                await recv(sender)
            # The stuck member's writer waits for its socket; nobody else has a writer.
            await wait_until(lambda: member.ws._writing)
            assert len(writer_tasks(server)) == 1
            assert [c for c in server.hub.connections if c.ws._writing] == [member]
            received = b""
            with trio.fail_after(20):
                while received.count(b'"content"') < 40:
                    await trio.lowlevel.wait_readable(stuck)
                    with contextlib.suppress(BlockingIOError):
                        received += stuck.recv(1 << 20)
            # Drained: the writer ends (it clears _writing as its last step).
            await wait_until(lambda: not member.ws._writing)
            assert not writer_tasks(server)
    finally:
        stuck.close()
    await wait_until(lambda: not server.hub.connections)
    assert not writer_tasks(server)


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
