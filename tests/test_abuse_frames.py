"""Hostile WebSocket clients sending large frames: the event loop keeps serving others
while many connections read large fragmented messages at once. Real sockets, a real
server; the loop's lag is measured with tests/hostile.py.

The budgets those messages count in are tests/test_abuse.py's.
"""

from __future__ import annotations

import attrs
import trio
from wsproto.events import Pong

from .conftest import UNLIMITED, make_config, start_server, wait_until
from .hostile import LAG_BOUND, served_meanwhile
from .rawws import RawClient
from .wire import client_frame

ROOM = 41
MIB = 1024 * 1024


async def until_pong(client: RawClient) -> None:
    """Read until the answer to the client's ping: the server has read all sent before it."""
    while True:
        if any(isinstance(event, Pong) for event in client.proto.events()):
            return
        data = await client.stream.receive_some(65536)
        assert data, "closed before the pong"
        client.proto.receive_data(data)


async def test_forty_large_fragmented_messages_never_stall_the_loop(nursery, db_path) -> None:
    """Forty connections each send a 2 MiB first fragment and a 1 MiB continuation of a
    chat_img data URL they never finish, all at once, so every reader is in the middle
    of a large frame in the same loop iterations. Budgets with room for all of them, so
    all are read: no loop iteration does a frame's worth of work, another client is
    served meanwhile, and the budgets are given back once they are gone."""
    count = 40
    start = b'{"message_type": "chat_img", "content": "data:image/png;base64,'
    # One buffer for all forty: the attack's own copies would show in the loop's lag.
    wire = client_frame(start + b"A" * (3 * MIB - len(start)), fin=False) + \
        client_frame(b"A" * MIB, opcode=0, fin=False) + client_frame(b"read?", opcode=0x9)
    room = count * 4 * MIB
    server = await start_server(nursery, make_config(
        db_path, large_frame_budget=room, limits=attrs.evolve(
            UNLIMITED, connections_per_ip=2 * count, inbound_bytes_per_ip=4 * room,
            inbound_bytes_total=4 * room)))
    clients: list[RawClient] = []
    try:
        for _ in range(count):
            clients.append(await RawClient.connect(server.port, f"/ws/{ROOM}"))

        async def one(client: RawClient) -> None:
            await client.send_raw(wire)
            await until_pong(client)

        async def attack() -> None:
            async with trio.open_nursery() as senders:
                for client in clients:
                    senders.start_soon(one, client)

        lag = await served_meanwhile(server, attack)
        # Every message was admitted and read, none refused.
        assert server.writers.large.used == room
        assert lag.worst_cpu < LAG_BOUND, lag
    finally:
        for client in clients:
            await client.aclose()
    await wait_until(lambda: not server.hub.connections)
    assert server.writers.large.used == 0 and server.writers.inbound.held() == 0
