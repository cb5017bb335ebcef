"""What clients make the server keep, bounded in bytes: each live room's recent
history, the store's buffer during an outage, the client_msg_id memory, and the
Redis recent lists' lifetime. Each test fills the thing with large messages,
checks the bound on the server's own accounting, that chat goes on, and that
the memory is given back."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import attrs
import redis

from trio_chat.broker import LocalBroker

from .conftest import (
    REDIS_PORT,
    chat_frame,
    make_config,
    node_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .test_abuse import fill, round_trip

ROOM = 41


async def test_a_rooms_recent_history_is_bounded_in_bytes(nursery, db_path) -> None:
    bound = 64 * 1024
    server = await start_server(nursery, make_config(db_path, history_bytes=bound))
    # The keeper keeps the room alive (it never reads: its queue holds what it is sent).
    async with open_ws(ws_url(server, ROOM)):
        await fill(server, ROOM, 30, 8000)
        room = server.hub.rooms[ROOM]
        assert room._recent_bytes <= bound and len(room._recent) < 30
        async with open_ws(ws_url(server, ROOM)) as joiner:
            await joiner.send_message(chat_frame("live", room_id=ROOM))
            history = []
            while (frame := await recv(joiner))["content"] != "live":
                history.append(frame["content"])
    # The newest that fit, oldest first, then live.
    assert 1 <= len(history) <= bound // 8000
    assert history[-1].startswith("29:")
    await wait_until(lambda: ROOM not in server.hub.rooms)


async def test_the_store_buffer_is_bounded_in_bytes_during_an_outage(nursery, db_path,
                                                                     monkeypatch) -> None:
    bound = 256 * 1024
    server = await start_server(nursery, make_config(db_path, store_buffer_bytes=bound))
    backend_class = type(server.store.backend)
    insert = backend_class.insert

    async def failing(self: Any, messages: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(backend_class, "insert", failing)
    acked, refused = 0, 0
    async with open_ws(ws_url(server, ROOM)) as ws:
        for i in range(40):
            await ws.send_message(json.dumps({
                "message_type": "chat_txt", "author_id": 5, "content": "y" * 32_000,
                "client_msg_id": f"m{i}"}))
            while True:
                answer = await recv(ws)
                if answer["message_type"] in ("ack", "error"):
                    break
            if answer["message_type"] == "ack":
                assert answer["durable"] is False
                acked += 1
            else:
                assert answer["code"] == "persistence_unavailable"
                refused += 1
            assert server.store.lag_bytes <= bound + 34_000
        assert 1 <= acked <= bound // 32_000 and refused == 40 - acked
        # Other rooms are refused too while it is full, but the server serves them.
        monkeypatch.setattr(backend_class, "insert", insert)
        await wait_until(lambda: server.store.lag == 0)
        assert server.store.lag_bytes == 0
        await round_trip(server)


async def test_the_client_msg_id_memory_is_bounded_in_bytes(nursery, db_path) -> None:
    bound = 64 * 1024
    server = await start_server(nursery, make_config(db_path, idempotency_memory_bytes=bound))
    broker = server.broker
    assert isinstance(broker, LocalBroker)
    ids = []
    async with open_ws(ws_url(server, ROOM)) as ws:
        for i in range(20):
            await ws.send_message(json.dumps({
                "message_type": "chat_txt", "author_id": 5, "content": "z" * 16_000,
                "client_msg_id": f"c{i}"}))
            while (answer := await recv(ws))["message_type"] != "ack":
                pass
            ids.append(answer["id"])
            assert broker.sent_bytes <= bound
        # The first was forgotten in memory; the store still knows it.
        await ws.send_message(json.dumps({
            "message_type": "chat_txt", "author_id": 5, "content": "again",
            "client_msg_id": "c0"}))
        while (answer := await recv(ws))["message_type"] != "ack":
            pass
        assert answer["id"] == ids[0]
    assert server.metrics.messages_received == 20


async def test_redis_recent_lists_expire_sooner_than_counters(nursery, tmp_path,
                                                              channel) -> None:
    config = node_config(tmp_path / "n.db", REDIS_PORT, channel)
    config = attrs.evolve(config, server=attrs.evolve(config.server, recent_ttl=120.0))
    server = await start_server(nursery, config)
    async with open_ws(ws_url(server, ROOM)) as ws:
        await ws.send_message(chat_frame("one", room_id=ROOM))
        assert (await recv(ws))["content"] == "one"
    client = redis.Redis(port=REDIS_PORT)
    try:
        recent = client.ttl(f"{channel}:{{{ROOM}}}:recent")
        assert 0 < recent <= 120
        counters = [key for key in client.keys(f"{channel}:{{{ROOM}}}*")
                    if client.type(key) == b"string"]
        assert counters and all(client.ttl(key) > 86400 for key in counters)
    finally:
        client.delete(*client.keys(f"{channel}*"))
        client.close()
