"""MariaDB going away under load: local chat goes on, nothing accepted is lost or doubled."""

from __future__ import annotations

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed

from .conftest import (
    MYSQL,
    chat_frame,
    make_config,
    mysql_rows,
    open_ws,
    recv,
    recv_text,
    start_server,
    wait_until,
    ws_url,
)
from .proxy import Proxy


async def test_outage_under_load_loses_nothing(nursery, db_path, mysql_db) -> None:
    proxy = await nursery.start(Proxy(MYSQL["port"]).run)
    db = attrs.evolve(mysql_db, port=proxy.port)
    server = await start_server(nursery, make_config(db_path, db=db))
    total = 300
    async with open_ws(ws_url(server, 40)) as sender, open_ws(ws_url(server, 40)) as watcher:
        received: list[int] = []

        async def watch() -> None:
            while len(received) < total:
                received.append((await recv(watcher))["id"])

        async def drain() -> None:
            for _ in range(total):
                await recv_text(sender)

        with trio.fail_after(60):
            async with trio.open_nursery() as work:
                work.start_soon(watch)
                work.start_soon(drain)
                for i in range(total):
                    if i == 100:
                        proxy.cut()
                    if i == 250:
                        await wait_until(lambda: server.store.failing_since is not None)
                        assert server.metrics.store_errors > 0
                        proxy.restore()
                    await sender.send_message(chat_frame(f"m{i}", room_id=40))
                    await trio.sleep(0.002)
    # Delivery never stopped: the watcher saw all 300 in order.
    assert received == list(range(1, total + 1))
    await wait_until(lambda: server.store.lag == 0, timeout=30)
    assert server.store.failing_since is None
    rows = mysql_rows(mysql_db, "SELECT id, content FROM messages WHERE room_id = 40 ORDER BY id")
    assert rows == [(i + 1, f"m{i}") for i in range(total)]


async def test_full_buffer_refuses_with_an_error_never_silently(nursery, db_path,
                                                                mysql_db) -> None:
    proxy = await nursery.start(Proxy(MYSQL["port"]).run)
    db = attrs.evolve(mysql_db, port=proxy.port)
    server = await start_server(nursery, make_config(db_path, db=db, store_buffer=20))
    async with open_ws(ws_url(server, 41)) as ws:
        await wait_until(lambda: 41 in server.hub.rooms and server.hub.rooms[41].ready.is_set())
        proxy.cut()
        # A room that is not open yet cannot learn its last id: 1013, try again later.
        async with open_ws(ws_url(server, 42)) as other:
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(30):
                await recv_text(other)
            assert info.value.reason.code == 1013
        outcomes = []
        for i in range(50):
            await ws.send_message(chat_frame(f"n{i}", room_id=41))
            frame = (await recv(ws))
            outcomes.append(frame.get("code") or frame["content"])
        accepted = [o for o in outcomes if o.startswith("n")]
        refused = [o for o in outcomes if o == "persistence_unavailable"]
        assert len(accepted) == 20 and len(refused) == 30
        assert server.metrics.store_refusals == 30
        status_lines = server.metrics.render()
        assert "triochat_store_lag_messages 20" in status_lines
        proxy.restore()
        await wait_until(lambda: server.store.lag == 0, timeout=30)
        # Accepting again once the store has caught up.
        await ws.send_message(chat_frame("after", room_id=41))
        assert (await recv(ws))["id"] == 21
    await wait_until(lambda: server.store.lag == 0, timeout=30)
    rows = mysql_rows(mysql_db, "SELECT content FROM messages WHERE room_id = 41 ORDER BY id")
    assert [r[0] for r in rows] == [f"n{i}" for i in range(20)] + ["after"]


async def test_mysql_store_closes_every_connection_and_task(db_path, mysql_db) -> None:
    def sessions() -> int:
        rows = mysql_rows(mysql_db, "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                    "WHERE DB = %s", (mysql_db.database,))
        return int(rows[0][0]) - 1  # less the query's own

    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, make_config(db_path, db=mysql_db))
        for room in range(5):
            async with open_ws(ws_url(server, room)) as ws:
                await ws.send_message(chat_frame(f"r{room}", room_id=room))
                await recv_text(ws)
        assert sessions() >= 1
        server.shutdown()
    assert server.task is not None and not server.task.child_nurseries
    assert sessions() == 0, "the pool and the asyncio loop are closed"
    rows = mysql_rows(mysql_db, "SELECT COUNT(*) FROM messages")
    assert rows == [(5,)]
