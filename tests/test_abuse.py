"""Hostile WebSocket clients against the memory budget: a resume that never reads,
a ping flood, oversized and fragmented frames, an expired token, one identity on
many connections. Each attack runs on real sockets against a real server, with
the bound asserted from the server's own accounting, another client served
meanwhile, and the memory given back once the attacker is gone.

The stored-data bounds (recent history, the store buffer, client_msg_ids, Redis)
are tests/test_abuse_bounds.py's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import socket
import time
from collections.abc import Iterator
from functools import partial

import attrs
import trio
from trio_websocket import ConnectionClosed

from trio_chat.auth import make_token
from trio_chat.budget import ByteBudget
from trio_chat.config import AuthConfig, LimitsConfig
from trio_chat.server import Server

from .conftest import (
    UNLIMITED,
    chat_frame,
    make_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import RawClient, open_from
from .test_images import noisy_png
from .wire import client_frame, handshake_request

ROOM = 31
OTHER_ROOM = 32
SECRET = "s" * 40


def held(server: Server, room_id: int) -> int:
    """What the server holds to send to the members of ``room_id``, counted from the
    queues themselves (not from the counter under test) and held-back frames."""
    total = 0
    for connection in server.hub.connections:
        if connection.room_id == room_id:
            ws = connection.ws
            total += sum(map(len, ws._queue)) + len(getattr(ws, "_pong", b""))
            total += sum(map(len, connection._held or ()))
    return total


async def round_trip(server: Server, room_id: int = OTHER_ROOM, query: str = "",
                     bound: float = 5.0, author_id: int = 77) -> None:
    """Another client joins, sends and gets its message back within ``bound`` seconds."""
    with trio.fail_after(bound):
        async with open_ws(ws_url(server, room_id, query)) as ws:
            await ws.send_message(chat_frame("still here", room_id=room_id, author_id=author_id))
            while (await recv(ws)).get("content") != "still here":
                pass


async def fill(server: Server, room_id: int, count: int, size: int) -> None:
    async with open_ws(ws_url(server, room_id)) as ws:
        # In batches, read as it goes: the tests' queues are small.
        for batch in range(0, count, 16):
            for i in range(batch, min(count, batch + 16)):
                await ws.send_message(chat_frame(f"{i}:".ljust(size, "x"), room_id=room_id))
            for _ in range(batch, min(count, batch + 16)):
                await recv(ws)


@contextlib.contextmanager
def stuck_socket(port: int, path: str) -> Iterator[socket.socket]:
    """An upgraded connection that never reads (a tiny receive buffer): the server's
    writes to it block once the kernel's buffers are full."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        sock.sendall(handshake_request(path))
        yield sock
    finally:
        sock.close()


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(sock)
        with contextlib.suppress(BlockingIOError):
            view = view[sock.send(view):]


async def test_a_resume_that_never_reads_holds_at_most_its_queue(nursery, db_path) -> None:
    queue = 256 * 1024
    server = await start_server(nursery, make_config(db_path, send_queue_bytes=queue,
                                                     write_wait=60.0))
    # 8 MB of history: more than the kernel's buffers take, so a queue built whole shows.
    await fill(server, ROOM, 1000, 8000)
    with stuck_socket(server.port, f"/ws/{ROOM}?since=0"):
        await wait_until(lambda: any(c.room_id == ROOM and c.ws._writing
                                     for c in server.hub.connections))
        (resuming,) = [c for c in server.hub.connections if c.room_id == ROOM]
        # Streamed: a page at a time, held until the socket takes it.
        assert resuming._held is not None, "the replay is still under way"
        assert held(server, ROOM) <= queue + 16 * 1024
        await round_trip(server)
        # Live frames held back behind the replay count too: over the queue, it is closed.
        async with open_ws(ws_url(server, ROOM)) as sender:
            for i in range(60):
                await sender.send_message(chat_frame(f"live {i}".ljust(8000), room_id=ROOM))
                # One at a time, so that only the resuming member falls behind.
                while not (await recv(sender))["content"].startswith(f"live {i}"):
                    pass
                assert held(server, ROOM) <= queue + 16 * 1024
            await wait_until(lambda: server.metrics.slow_consumer_disconnects == 1, 15)
            assert resuming.ws.close_code == 4001
    await wait_until(lambda: not server.hub.connections)


async def test_a_ping_flood_holds_one_pong(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, write_wait=60.0,
                                                     send_queue_bytes=256 * 1024))
    pings = client_frame(b"p" * 125, opcode=0x9) * 100_000  # 13 MB of pongs to answer
    async with open_ws(ws_url(server, ROOM)) as observer:
        with stuck_socket(server.port, f"/ws/{ROOM}") as sock:
            await wait_until(lambda: len(server.hub.connections) == 2)
            async with trio.open_nursery() as attack:
                attack.start_soon(send_all, sock, pings + client_frame(
                    chat_frame("after the pings", room_id=ROOM).encode()))
                await round_trip(server)
            # The flood's last frame arrived: every ping before it was read.
            while (await recv(observer))["content"] != "after the pings":
                pass
            assert held(server, ROOM) <= 64 * 1024
            assert server.metrics.slow_consumer_disconnects == 0
    await wait_until(lambda: not server.hub.connections)


async def test_a_text_frame_over_the_limit_is_refused_at_its_header(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path))
    client = await RawClient.connect(server.port, f"/ws/{ROOM}")
    try:
        # Announces 3 MB of a chat_txt (less than an image's data URL), sends 1 KB of
        # it, and waits.
        payload = chat_frame("x" * 3_000_000, room_id=ROOM).encode()
        frame = client_frame(payload)
        await client.send_raw(frame[:1024])
        with trio.fail_after(5):
            assert await client.wait_closed() == 1009
    finally:
        await client.aclose()
    await wait_until(lambda: not server.hub.connections)
    assert server.metrics.oversized_frames == 1


async def test_unfinished_large_fragments_stay_within_the_budget(nursery, db_path) -> None:
    budget = 2 * 1024 * 1024
    server = await start_server(nursery, make_config(db_path, large_frame_budget=budget))
    start = b'{"message_type": "chat_img", "content": "data:image/png;base64,'
    first = client_frame(start + b"A" * 600_000, fin=False)
    clients = []
    try:
        for _ in range(8):
            client = await RawClient.connect(server.port, f"/ws/{ROOM}")
            clients.append(client)
            await client.send_raw(first)
        # Three fit in the budget; the others are refused at the header.
        refused = 0
        with trio.fail_after(10):
            for client in clients[3:]:
                refused += await client.wait_closed() == 1009
        assert refused == 5
        # Each one's payload, without its header and mask.
        assert server.writers.large.used == 3 * (len(first) - 14)
        assert server.writers.large.used <= budget
        await round_trip(server)
    finally:
        for client in clients:
            await client.aclose()
    # Released with their connections.
    await wait_until(lambda: not server.hub.connections)
    assert server.writers.large.used == 0


async def test_a_data_url_image_still_passes_over_the_text_limit(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, max_frame_bytes=1024))
    png = noisy_png(40)
    assert len(png) > 2048
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    async with open_ws(ws_url(server, ROOM)) as ws:
        await ws.send_message(chat_frame(url, room_id=ROOM, message_type="chat_img"))
        message = await recv(ws)
        assert message["message_type"] == "chat_img" and message["image"]["size"] > 0
        await ws.send_message(chat_frame("t" * 2000, room_id=ROOM))
        with trio.fail_after(10), contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()
        assert ws.closed is not None and ws.closed.code == 1009
    assert server.writers.large.used == 0


async def test_a_connection_closes_when_its_token_expires(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(
        db_path, ping_period=1.0, pong_wait=2.0, auth=AuthConfig(mode="token", secret=SECRET)))
    # exp has a one-second resolution: whole seconds, at least two from now.
    expires = float(math.ceil(time.time()) + 2)
    token = make_token(11, SECRET, ttl=expires - time.time())
    async with open_ws(ws_url(server, ROOM, f"?token={token}")) as ws:
        await ws.send_message(chat_frame("before", room_id=ROOM, author_id=11))
        assert (await recv(ws))["content"] == "before"
        with trio.fail_after(30), contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()
        assert ws.closed is not None and ws.closed.code == 4006
        # Never after the token's exp can it be used: closed at most a heartbeat before.
        assert time.time() >= expires - 1.5


async def test_one_token_on_many_connections_shares_one_rate(nursery, db_path) -> None:
    limits = LimitsConfig(messages_per_second=20, message_burst=40,
                          identity_messages_per_second=5, identity_message_burst=20,
                          flood_limit=1000)
    server = await start_server(nursery, make_config(
        db_path, limits=limits, auth=AuthConfig(mode="token", secret=SECRET)))
    token = make_token(11, SECRET)
    query = f"?token={token}"
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(open_ws(ws_url(server, ROOM, query)))
                   for _ in range(10)]
        started = trio.current_time()
        # Each connection stays within its own burst: 300 frames in all.
        for i in range(30):
            for n, ws in enumerate(sockets):
                await ws.send_message(json.dumps({"message_type": "chat_txt",
                                                  "content": f"{n}.{i}"}))
        metrics = server.metrics
        await wait_until(lambda: metrics.messages_received + metrics.rate_limited == 300)
        elapsed = trio.current_time() - started
        assert metrics.messages_received <= 20 + 5 * elapsed + 1, (
            metrics.messages_received, elapsed)
        # Another identity is not held back by this one.
        await round_trip(server, OTHER_ROOM, f"?token={make_token(12, SECRET)}", author_id=12)
    await wait_until(lambda: not server.hub.connections)
    assert len(server.hub.identity_rates) == 0


async def test_without_tokens_one_address_shares_one_rate(nursery, db_path) -> None:
    limits = LimitsConfig(messages_per_second=20, message_burst=40,
                          identity_messages_per_second=5, identity_message_burst=10,
                          flood_limit=1000)
    server = await start_server(nursery, make_config(db_path, limits=limits))
    async with contextlib.AsyncExitStack() as stack:
        # Five authors, as they claim to be, all from 127.0.0.1.
        sockets = [await stack.enter_async_context(
            open_ws(ws_url(server, ROOM, f"?author_id={n}"))) for n in range(5)]
        started = trio.current_time()
        for i in range(10):
            for ws in sockets:
                await ws.send_message(json.dumps({"message_type": "chat_txt",
                                                  "content": f"{i}"}))
        metrics = server.metrics
        await wait_until(lambda: metrics.messages_received + metrics.rate_limited == 50)
        elapsed = trio.current_time() - started
        assert metrics.messages_received <= 10 + 5 * elapsed + 1
    await wait_until(lambda: not server.hub.connections)
    assert len(server.hub.identity_rates) == 0


async def test_one_address_holds_at_most_its_outbound_budget(nursery, db_path) -> None:
    """Many connections from one address that never read: together they hold at most
    limits.outboundBytesPerIp, the connection that would pass it is closed as a slow
    consumer, a client from another address is served, and the budget returns."""
    budget = 1024 * 1024
    limits = attrs.evolve(UNLIMITED, outbound_bytes_per_ip=budget)
    server = await start_server(nursery, make_config(
        db_path, limits=limits, send_queue_bytes=4 * 1024 * 1024, write_wait=60.0))
    outbound = server.writers.outbound
    peak = 0
    with contextlib.ExitStack() as stack:
        stuck = [stack.enter_context(stuck_socket(server.port, f"/ws/{ROOM}"))
                 for _ in range(8)]
        await wait_until(lambda: ROOM in server.hub.rooms and
                         len(server.hub.rooms[ROOM].members) == len(stuck))
        async with open_ws(ws_url(server, ROOM)) as sender:
            # 8 connections of 4 MiB of queue each would be 32 MiB without the budget.
            for i in range(400):
                await sender.send_message(chat_frame(f"{i}:".ljust(8000, "x"), room_id=ROOM))
                await recv(sender)
                peak = max(peak, outbound.held("127.0.0.1"))
                if server.metrics.slow_consumer_disconnects >= 1:
                    break
            assert server.metrics.slow_consumer_disconnects >= 1
            assert peak <= budget
            # Another address is not held back by this one's budget.
            stream = await open_from("127.0.0.2", server.port)
            async with stream:
                await stream.send_all(handshake_request(f"/ws/{OTHER_ROOM}"))
                with trio.fail_after(10):
                    assert b" 101 " in await stream.receive_some(4096)
    await wait_until(lambda: not server.hub.connections)
    assert outbound.held() == 0


async def hold_partial_frames(server: Server, clients: list[RawClient], count: int,
                              part: bytes) -> None:
    """``count`` more connections from 127.0.0.1, each sending ``part`` of a frame (with
    a 16-bit length) and no more, once the server has read it (or refused it) before the
    next."""
    inbound = server.writers.inbound
    for _ in range(count):
        clients.append(await RawClient.connect(server.port, f"/ws/{ROOM}"))
        target, refusals = inbound.held("127.0.0.1") + held_of(part), inbound.refusals
        await clients[-1].send_raw(part)
        await wait_until(partial(_read_or_refused, inbound, target, refusals))
        if inbound.refusals > refusals:
            return


def held_of(part: bytes) -> int:
    """What the server holds of ``part``: its payload (the header is parsed, not kept)."""
    assert part[1] & 0x7F == 126
    return len(part) - 8


def _read_or_refused(inbound: ByteBudget, target: int, refusals: int) -> bool:
    return inbound.held("127.0.0.1") >= target or inbound.refusals > refusals


async def test_one_address_holds_at_most_its_inbound_budget(nursery, db_path) -> None:
    """Connections from one address each holding an unfinished frame: together they
    hold at most limits.inboundBytesPerIp, the one that would pass it is closed with
    1013, a client from another address is served meanwhile, and the budget returns
    to zero once they are gone."""
    budget = 256 * 1024
    server = await start_server(nursery, make_config(
        db_path, limits=attrs.evolve(UNLIMITED, inbound_bytes_per_ip=budget)))
    inbound = server.writers.inbound
    # 40,000 bytes of a 60 KB frame: six or seven such fit in the budget, not ten.
    part = client_frame(chat_frame("x" * 60_000, room_id=ROOM).encode())[:40_000]
    clients: list[RawClient] = []
    try:
        await hold_partial_frames(server, clients, 10, part)
        assert inbound.refusals == 1 and len(clients) in (6, 7)
        assert len(clients[:-1]) * held_of(part) <= inbound.held("127.0.0.1") <= budget
        with trio.fail_after(10):
            assert await clients[-1].wait_closed() == 1013
        other = await RawClient.connect(server.port, f"/ws/{OTHER_ROOM}", source="127.0.0.2")
        clients.append(other)
        with trio.fail_after(5):
            await other.send_text(chat_frame("from elsewhere", room_id=OTHER_ROOM))
            while (await other.receive_json()).get("content") != "from elsewhere":
                pass
        # The others of the address still hold their frames.
        assert inbound.held("127.0.0.1") >= len(clients[:-2]) * held_of(part)
    finally:
        for client in clients:
            await client.aclose()
    await wait_until(lambda: not server.hub.connections)
    assert inbound.held() == 0
    assert server.metrics.inbound_budget_disconnects == 1


async def test_a_data_url_is_refused_while_its_addresss_inbound_budget_is_full(
        nursery, db_path) -> None:
    budget = 128 * 1024
    server = await start_server(nursery, make_config(
        db_path, max_frame_bytes=16 * 1024,
        limits=attrs.evolve(UNLIMITED, inbound_bytes_per_ip=budget)))
    inbound = server.writers.inbound
    url = "data:image/png;base64," + base64.b64encode(noisy_png(80)).decode()
    image, elsewhere = (client_frame(chat_frame(url, room_id=room, message_type="chat_img")
                                     .encode()) for room in (ROOM, OTHER_ROOM))
    # Alone it fits, three times over; with 60 KB of frames held it does not.
    assert 3 * len(image) + 4096 < budget < 3 * len(image) + 60_000
    clients: list[RawClient] = []
    try:
        await hold_partial_frames(server, clients, 4, client_frame(b"y" * 16_000)[:15_000])
        assert inbound.refusals == 0
        sender = await RawClient.connect(server.port, f"/ws/{ROOM}")
        clients.append(sender)
        await sender.send_raw(image)
        with trio.fail_after(10):
            assert await sender.wait_closed() == 1013
        # The same image from another address is taken.
        other = await RawClient.connect(server.port, f"/ws/{OTHER_ROOM}", source="127.0.0.2")
        clients.append(other)
        with trio.fail_after(10):
            await other.send_raw(elsewhere)
            while (message := await other.receive_json()).get("message_type") != "chat_img":
                pass
        assert message["image"]["size"] > 0
    finally:
        for client in clients:
            await client.aclose()
    await wait_until(lambda: not server.hub.connections)
    assert inbound.held() == 0 and server.writers.large.used == 0
