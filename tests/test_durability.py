"""An ack means the message survives a crash: a node killed with SIGKILL right after
its acks were read keeps every acked message, once, on every store configuration."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_chat.config import DbConfig

from .conftest import (
    REDIS_PORT,
    chat_frame,
    listening_port,
    mysql_rows,
    node_config,
    open_ws,
    recv,
    start_server,
    wait_until,
)
from .proxy import Proxy

ROUNDS = 20
FRAMES = 40
ROWS = "SELECT id, client_msg_id FROM messages WHERE room_id = %s"


def _config_file(tmp_path: Path, db: DbConfig | None = None, channel: str | None = None,
                 **server: Any) -> Path:
    # A commit slower than storeWait (2 s) acks "durable": false, which a busy machine
    # can reach; what is tested here is what a durable ack promises, so wait longer.
    config: dict[str, Any] = {"server": {"port": 0, "storeWait": 30, **server},
                              "limits": {"messagesPerSecond": 1_000_000,
                                         "messageBurst": 1_000_000,
                                         "identityMessagesPerSecond": 1_000_000,
                                         "identityMessageBurst": 1_000_000}}
    if db is not None:
        config["db"] = {"host": db.host, "port": db.port, "id": db.id,
                        "password": db.password, "database": db.database}
    if channel is not None:
        config["redis"] = {"host": "127.0.0.1", "port": REDIS_PORT,
                           "listeningChannelName": channel, "publishChannelName": channel}
    path = tmp_path / "node.json"
    path.write_text(json.dumps(config))
    return path


@asynccontextmanager
async def node_process(config: Path, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """A ``trio-chat serve`` process and its port; killed at the end if still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(config), *args],
        stderr=subprocess.PIPE)
    try:
        yield process, await listening_port(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stderr.aclose()


async def acked_then_killed(config: Path, room: int, tag: str, *args: str,
                            before_sending: Callable[[], None] = lambda: None
                            ) -> dict[str, dict]:
    """Start a node, open ``room`` on it, call ``before_sending``, send FRAMES tagged
    frames, read every ack, then SIGKILL the node at once; the acks by client_msg_id,
    each checked to say durable."""
    acks: dict[str, dict] = {}
    async with node_process(config, *args) as (process, port), \
            open_ws(f"ws://127.0.0.1:{port}/ws/{room}") as ws:
        # The room is open on the node before anything fails.
        await ws.send_message(chat_frame("open", room_id=room, client_msg_id=f"{tag}-open"))
        while (await recv(ws))["message_type"] != "ack":
            pass
        before_sending()
        for i in range(FRAMES):
            await ws.send_message(chat_frame(f"{tag}-{i}", room_id=room,
                                             client_msg_id=f"{tag}-{i}"))
        while len(acks) < FRAMES:
            frame = await recv(ws)
            if frame["message_type"] == "ack":
                acks[frame["client_msg_id"]] = frame
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert all(ack["durable"] for ack in acks.values()), [
        ack for ack in acks.values() if not ack["durable"]]
    return acks


def assert_each_once(acks: dict[str, dict], rows: list[tuple[Any, ...]]) -> None:
    """``rows`` are (id, client_msg_id) of the room: every acked message, once."""
    by_id = Counter(row[0] for row in rows)
    by_client_id = Counter(row[1] for row in rows)
    for client_msg_id, ack in acks.items():
        assert by_id[ack["id"]] == 1, f"acked message {ack['id']} stored {by_id[ack['id']]}x"
        assert by_client_id[client_msg_id] == 1, client_msg_id


async def test_sqlite_keeps_every_acked_message_through_sigkill(tmp_path) -> None:
    db = tmp_path / "chat.db"
    config = _config_file(tmp_path)
    for round_ in range(ROUNDS):
        room = 500 + round_
        acks = await acked_then_killed(config, room, f"r{round_}", "--sqlite", str(db))
        with sqlite3.connect(db) as conn:  # what a restart reads
            rows = conn.execute("SELECT id, client_msg_id FROM messages WHERE room_id = ?",
                                (room,)).fetchall()
        conn.close()
        assert_each_once(acks, rows)
    # And through the server itself after the last restart: resends are recognised.
    async with node_process(config, "--sqlite", str(db)) as (_, port), \
            open_ws(f"ws://127.0.0.1:{port}/ws/{room}") as ws:
        await ws.send_message(chat_frame("again", room_id=room,
                                         client_msg_id=f"r{round_}-0"))
        while (frame := await recv(ws))["message_type"] != "ack":
            pass
        assert frame["id"] == acks[f"r{round_}-0"]["id"]


async def test_mariadb_keeps_every_acked_message_through_sigkill(tmp_path, mysql_db) -> None:
    config = _config_file(tmp_path, mysql_db)
    for round_ in range(ROUNDS):
        room = 600 + round_
        acks = await acked_then_killed(config, room, f"r{round_}")
        assert_each_once(acks, mysql_rows(mysql_db, ROWS, (room,)))


@pytest.mark.parametrize("database_cut", [False, True], ids=["database-up", "database-cut"])
async def test_with_redis_another_node_completes_the_write(
        nursery, tmp_path, mysql_db, channel, database_cut) -> None:
    """Node A acks once a message is in Redis's log; killed before (or unable to) write
    to MariaDB, node B finds the messages in the log and writes them, A never restarted."""
    proxy = await nursery.start(Proxy(mysql_db.port).run)
    a_db = attrs.evolve(mysql_db, port=proxy.port)
    config = _config_file(tmp_path, a_db, channel, orphanedAfter=0.5)
    b = await start_server(nursery, attrs.evolve(
        node_config(tmp_path / "b.db", REDIS_PORT, channel, orphaned_after=0.5), db=mysql_db))
    for round_ in range(ROUNDS // 2):
        room = 700 + round_
        try:
            acks = await acked_then_killed(config, room, f"r{round_}",
                                           before_sending=proxy.cut if database_cut
                                           else lambda: None)
        finally:
            proxy.restore()
        wanted = {ack["id"] for ack in acks.values()}
        await wait_until(lambda room=room, wanted=wanted: wanted <= {
            row[0] for row in mysql_rows(mysql_db, ROWS, (room,))}, timeout=30)
        assert_each_once(acks, mysql_rows(mysql_db, ROWS, (room,)))
    assert b.metrics.orphans_written > 0
