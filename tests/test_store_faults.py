"""The store writer's failure boundary: a database that refuses one message, that is
down, or that hangs never stops chat, and never both acks and loses a message."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_chat.config import DbConfig
from trio_chat.metrics import Metrics
from trio_chat.protocol import Message
from trio_chat.store import Outcome, SqliteBackend, Store

from .conftest import (
    chat_frame,
    make_config,
    mysql_rows,
    open_ws,
    recv,
    start_server,
    wait_until,
)
from .proxy import Proxy
from .rawws import http_get
from .test_messages import history


def message(i: int, content: str = "hello") -> Message:
    return Message(i, 5, 1, "chat_txt", content, "2022-06-05T12:00:00.000Z",
                   "2022-06-05T12:00:01.000Z", client_msg_id=f"c{i}")


class RefusingBackend(SqliteBackend):
    """Real SQLite that refuses any batch holding a "poison" message; ``hold`` makes
    inserts wait (a database that stopped answering)."""

    hold: trio.Event | None = None
    inserts = 0

    async def insert(self, messages: list[Message]) -> None:
        self.inserts += 1
        if self.hold is not None:
            await self.hold.wait()
        if any(m.content == "poison" for m in messages):
            raise sqlite3.IntegrityError("poison refused")
        await super().insert(messages)


async def test_a_refused_message_is_set_aside_and_every_other_is_written(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = RefusingBackend(str(tmp_path / "s.db"))
    metrics = Metrics()
    store = Store(backend, metrics, batch_size=16)
    await nursery.start(store.run)
    outcomes: list[tuple[int, Outcome]] = []
    backend.hold = trio.Event()  # so the first batches hold many messages
    for i in range(1, 41):
        store.append(message(i, "poison" if i == 17 else f"m{i}"),
                     lambda outcome, i=i: outcomes.append((i, outcome)))
    backend.hold.set()
    backend.hold = None
    with trio.fail_after(30):
        await store.flush()
    assert [i for i, _ in outcomes] == list(range(1, 41)), "settled in acceptance order"
    assert dict(outcomes)[17] is Outcome.REFUSED
    assert all(o is Outcome.STORED for i, o in outcomes if i != 17)
    rows = await backend.page(5, before=None, after=None, limit=100, newest_first=False)
    assert [m.id for m in rows] == [i for i in range(1, 41) if i != 17]
    letters = await backend.dead_letters(10)
    assert [(d.message.id, d.message.content) for d in letters] == [(17, "poison")]
    assert "poison refused" in letters[0].error
    assert metrics.store_dead_letters == 1 and store.failing_since is None


async def test_a_slow_commit_settles_as_buffered_then_waits_again(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = RefusingBackend(str(tmp_path / "s.db"))
    store = Store(backend, Metrics(), wait=0.05)
    await nursery.start(store.run)
    backend.hold = trio.Event()
    told = trio.Event()
    outcomes: list[Outcome] = []

    def settle(outcome: Outcome) -> None:
        outcomes.append(outcome)
        told.set()

    store.append(message(1), settle)
    with trio.fail_after(10):
        await told.wait()  # the watchdog, not the commit
    assert outcomes == [Outcome.BUFFERED]
    store.append(message(2), outcomes.append)  # still behind: told at once
    assert outcomes == [Outcome.BUFFERED] * 2
    backend.hold.set()
    backend.hold = None
    with trio.fail_after(10):
        await store.flush()
    store.append(message(3), outcomes.append)  # caught up: waits for its commit
    assert len(outcomes) == 2
    with trio.fail_after(10):
        await store.flush()
    assert outcomes[2:] == [Outcome.STORED]
    assert [m.id for m in await store.page(5, newest_first=False)] == [1, 2, 3]


def _add_poison_trigger(kind: str, config: Any) -> None:
    if kind == "sqlite":
        with sqlite3.connect(config.sqlite.path) as conn:
            conn.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON messages "
                         "WHEN NEW.content = 'poison' BEGIN "
                         "SELECT RAISE(ABORT, 'poison refused'); END")
        conn.close()
    else:
        mysql_rows(config.db, "CREATE TRIGGER refuse_poison BEFORE INSERT ON messages "
                              "FOR EACH ROW BEGIN IF NEW.content = 'poison' THEN "
                              "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poison refused'; "
                              "END IF; END")


def _drop_poison_trigger(kind: str, config: Any) -> None:
    if kind == "sqlite":
        with sqlite3.connect(config.sqlite.path) as conn:
            conn.execute("DROP TRIGGER refuse_poison")
        conn.close()
    else:
        mysql_rows(config.db, "DROP TRIGGER refuse_poison")


async def _reply(ws: Any, client_msg_id: str) -> dict[str, Any]:
    """The ack or error frame for ``client_msg_id``, passing over broadcasts."""
    while True:
        frame = await recv(ws)
        if frame["message_type"] in ("ack", "error") and \
                frame.get("client_msg_id") == client_msg_id:
            return frame


async def test_a_message_the_database_refuses_does_not_block_the_others(
        nursery, any_config, store_kind, tmp_path) -> None:
    config = any_config()
    server = await start_server(nursery, config)
    _add_poison_trigger(store_kind, config)
    async with open_ws(f"ws://127.0.0.1:{server.port}/ws/41") as sender, \
            open_ws(f"ws://127.0.0.1:{server.port}/ws/41") as member:
        for cmid, content in (("a", "before"), ("p", "poison"), ("b", "after")):
            await sender.send_message(chat_frame(content, room_id=41, client_msg_id=cmid))
        assert (await _reply(sender, "a"))["durable"] is True
        refused = await _reply(sender, "p")
        assert refused["message_type"] == "error" and refused["code"] == "persistence_refused"
        assert (await _reply(sender, "b"))["durable"] is True
        # Members saw only what is stored.
        seen = [(await recv(member))["content"] for _ in range(2)]
        assert seen == ["before", "after"]
        # The refusal is final for that frame: sent again, it is refused again.
        await sender.send_message(chat_frame("poison", room_id=41, client_msg_id="p"))
        assert (await _reply(sender, "p"))["code"] == "persistence_refused"
    assert server.metrics.store_dead_letters == 2
    assert [m["content"] for m in await history(server, 41)] == ["before", "after"]
    # An operator fixes the cause and writes them again.
    _drop_poison_trigger(store_kind, config)
    config_file = tmp_path / "config.json"
    db = config.db
    config_file.write_text(json.dumps(
        {"db": {"host": db.host, "port": db.port, "id": db.id, "password": db.password,
                "database": db.database}} if db else {"sqlite": {"path": config.sqlite.path}}))
    command = [sys.executable, "-m", "trio_chat.cli", "dead-letters", str(config_file)]
    listed = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    assert b"2 dead letters" in listed.stdout, listed
    replayed = await trio.run_process([*command, "--replay"], capture_stdout=True,
                                      capture_stderr=True)
    assert b"2 written, 0 still refused" in replayed.stdout, replayed
    contents = [m["content"] for m in await history(server, 41)]
    assert contents == ["before", "poison", "after", "poison"]


@pytest.fixture
async def proxied(nursery, mysql_db) -> tuple[Proxy, DbConfig]:
    """MariaDB behind a proxy the test can cut or stall."""
    proxy = await nursery.start(Proxy(mysql_db.port).run)
    return proxy, attrs.evolve(mysql_db, port=proxy.port)


async def test_a_database_outage_keeps_chat_running(nursery, tmp_path, proxied,
                                                    mysql_db) -> None:
    proxy, db = proxied
    server = await start_server(nursery, make_config(tmp_path / "x.db", db=db))
    await server.broker.loaded.wait()
    url = f"ws://127.0.0.1:{server.port}/ws/42"
    async with open_ws(url) as sender, open_ws(url) as member:
        await sender.send_message(chat_frame("up", room_id=42, client_msg_id="u"))
        assert (await _reply(sender, "u"))["durable"] is True
        proxy.cut()
        for i in range(5):
            await sender.send_message(chat_frame(f"down-{i}", room_id=42,
                                                 client_msg_id=f"d{i}"))
            ack = await _reply(sender, f"d{i}")
            assert ack["message_type"] == "ack" and ack["durable"] is False
        # A resend while the database is down is recognised from memory.
        await sender.send_message(chat_frame("down-0", room_id=42, client_msg_id="d0"))
        again = await _reply(sender, "d0")
        assert again["message_type"] == "ack" and again["id"] == ack["id"] - 4
        seen = [(await recv(member))["content"] for _ in range(6)]
        assert seen == ["up", *(f"down-{i}" for i in range(5))]
        await wait_until(lambda: server.store.failing_since is not None)
        proxy.restore()
        await wait_until(lambda: server.store.lag == 0, timeout=60)
        # Written once each; with the database back, acks are durable again.
        await sender.send_message(chat_frame("back", room_id=42, client_msg_id="b"))
        assert (await _reply(sender, "b"))["durable"] is True
    rows = mysql_rows(mysql_db, "SELECT client_msg_id FROM messages WHERE room_id = 42 "
                                "ORDER BY id")
    assert [r[0] for r in rows] == ["u", "d0", "d1", "d2", "d3", "d4", "b"]


async def test_a_database_outage_can_refuse_instead(nursery, tmp_path, proxied,
                                                   mysql_db) -> None:
    proxy, db = proxied
    server = await start_server(nursery, make_config(tmp_path / "x.db", db=db,
                                                     store_outage="refuse"))
    url = f"ws://127.0.0.1:{server.port}/ws/43"
    async with open_ws(url) as sender:
        await sender.send_message(chat_frame("up", room_id=43, client_msg_id="u"))
        assert (await _reply(sender, "u"))["durable"] is True
        proxy.cut()
        # The first message after the cut finds out (acked not durable); then refusals.
        await sender.send_message(chat_frame("first", room_id=43, client_msg_id="f"))
        assert (await _reply(sender, "f"))["durable"] is False
        await sender.send_message(chat_frame("later", room_id=43, client_msg_id="l"))
        refused = await _reply(sender, "l")
        assert refused["message_type"] == "error"
        assert refused["code"] == "persistence_unavailable"
        proxy.restore()
        await wait_until(lambda: server.store.failing_since is None, timeout=60)
        await sender.send_message(chat_frame("later", room_id=43, client_msg_id="l"))
        assert (await _reply(sender, "l"))["durable"] is True
    rows = mysql_rows(mysql_db, "SELECT client_msg_id FROM messages WHERE room_id = 43 "
                                "ORDER BY id")
    assert [r[0] for r in rows] == ["u", "f", "l"]


async def test_a_hung_database_is_an_outage_not_a_hang(nursery, tmp_path, proxied,
                                                       mysql_db) -> None:
    proxy, db = proxied
    server = await start_server(nursery, make_config(tmp_path / "x.db", db=db,
                                                     store_wait=0.5))
    url = f"ws://127.0.0.1:{server.port}/ws/44"
    async with open_ws(url) as sender, open_ws(url) as member:
        await sender.send_message(chat_frame("up", room_id=44, client_msg_id="u"))
        assert (await _reply(sender, "u"))["durable"] is True
        proxy.stall()
        await sender.send_message(chat_frame("stalled", room_id=44, client_msg_id="s"))
        ack = await _reply(sender, "s")
        assert ack["message_type"] == "ack" and ack["durable"] is False
        assert [(await recv(member))["content"] for _ in range(2)] == ["up", "stalled"]
        proxy.restore()
        await wait_until(lambda: server.store.lag == 0, timeout=60)
    rows = mysql_rows(mysql_db, "SELECT client_msg_id FROM messages WHERE room_id = 44 "
                                "ORDER BY id")
    assert [r[0] for r in rows] == ["u", "s"]


async def test_history_reads_fail_with_a_clear_error(nursery, tmp_path, proxied) -> None:
    proxy, db = proxied
    server = await start_server(nursery, make_config(tmp_path / "x.db", db=db))
    proxy.cut()
    status, _, body = await http_get(server.port, "/rooms/45/messages")
    assert status == 503
    assert json.loads(body)["error"] == "persistence_unavailable"


@pytest.mark.parametrize(("fault", "heal"), [
    ("PRAGMA query_only = ON", "PRAGMA query_only = OFF"),
    ("PRAGMA max_page_count = 1", "PRAGMA max_page_count = 1073741823"),
], ids=["read-only", "full"])
async def test_a_sqlite_file_that_cannot_be_written_keeps_chat_running(
        nursery, db_path, fault, heal) -> None:
    server = await start_server(nursery, make_config(db_path))
    backend = server.store.backend
    url = f"ws://127.0.0.1:{server.port}/ws/46"

    async def pragma(sql: str) -> None:
        # On the server's own connection: the file turns read-only, or full.
        if sql == "PRAGMA max_page_count = 1":
            rows, _ = await backend._sql("PRAGMA page_count", ())
            sql = f"PRAGMA max_page_count = {rows[0][0]}"
        await backend._sql(sql, ())

    async with open_ws(url) as sender, open_ws(url) as member:
        await sender.send_message(chat_frame("before", room_id=46, client_msg_id="a"))
        assert (await _reply(sender, "a"))["durable"] is True
        await pragma(fault)
        for i in range(30):  # enough to need a page the file cannot have
            await sender.send_message(chat_frame(f"during-{i}" + "z" * 500, room_id=46,
                                                 client_msg_id=f"d{i}"))
            assert (await _reply(sender, f"d{i}"))["message_type"] == "ack"
        await wait_until(lambda: server.store.failing_since is not None)
        # The newest is surely not written: its resend is acked again, not durable.
        await sender.send_message(chat_frame("during-29", room_id=46, client_msg_id="d29"))
        again = await _reply(sender, "d29")
        assert again["message_type"] == "ack" and again["durable"] is False
        contents = [(await recv(member))["content"].rstrip("z") for _ in range(31)]
        assert contents == ["before", *(f"during-{i}" for i in range(30))]
        await pragma(heal)
        await wait_until(lambda: server.store.lag == 0, timeout=60)
        await sender.send_message(chat_frame("after", room_id=46, client_msg_id="b"))
        assert (await _reply(sender, "b"))["durable"] is True
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT client_msg_id FROM messages WHERE room_id = 46 "
                            "ORDER BY id").fetchall()
    conn.close()
    assert [r[0] for r in rows] == ["a", *(f"d{i}" for i in range(30)), "b"]
    assert server.metrics.store_dead_letters == 0


async def test_a_resume_the_store_cannot_serve_resets_and_keeps_the_connection(
        nursery, tmp_path, proxied) -> None:
    proxy, db = proxied
    server = await start_server(nursery, make_config(tmp_path / "x.db", db=db,
                                                     history_on_join=2))
    url = f"ws://127.0.0.1:{server.port}/ws/47"
    async with open_ws(url) as sender:
        for i in range(10):
            await sender.send_message(chat_frame(f"m{i}", room_id=47, client_msg_id=f"m{i}"))
            await _reply(sender, f"m{i}")
        proxy.cut()
        # Message 3 is older than the room's memory: only the store has 4 to 8.
        async with open_ws(url + "?since=3") as resumer:
            reset = await recv(resumer)
            assert reset["message_type"] == "history_reset" and reset["since"] == 3
            assert "unavailable" in reset["detail"]
            assert [(await recv(resumer))["content"] for _ in range(2)] == ["m8", "m9"]
            # Still a member: live messages keep coming.
            await sender.send_message(chat_frame("live", room_id=47, client_msg_id="l"))
            assert (await recv(resumer))["content"] == "live"
