"""The store: one suite for both backends (SQLite file, real MariaDB), plus the write-behind."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from trio_chat.bridge import open_bridge
from trio_chat.config import DbConfig
from trio_chat.metrics import Metrics
from trio_chat.protocol import Message
from trio_chat.store import (
    SCHEMA_VERSION,
    Backend,
    Ban,
    MysqlBackend,
    NameTaken,
    RoomInfo,
    SqliteBackend,
    Store,
)

from .conftest import mysql_rows


def message(room_id: int, message_id: int, content: str = "hi") -> Message:
    return Message(message_id, room_id, 7, "chat_txt", content, "2022-06-05T12:00:00.000Z",
                   f"2022-06-05T12:00:{message_id % 60:02d}.{message_id % 1000:03d}Z")


@pytest.fixture
async def backend(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Backend]:
    if store_kind == "sqlite":
        sqlite = SqliteBackend(str(tmp_path / "store.db"))
        assert await sqlite.open() == SCHEMA_VERSION
        yield sqlite
        await sqlite.close()
        return
    db: DbConfig = request.getfixturevalue("mysql_db")
    async with open_bridge():
        mysql = MysqlBackend(db)
        assert await mysql.open() == SCHEMA_VERSION
        yield mysql
        await mysql.close()


async def test_round_trip_keeps_every_field(backend: Backend) -> None:
    sent = [message(1, i, f"m{i}") for i in range(1, 6)]
    await backend.insert(sent)
    got = await backend.page(1, before=None, after=None, limit=10, newest_first=False)
    assert got == sent
    assert await backend.last_id(1) == 5
    assert await backend.last_id(2) == 0


@pytest.mark.parametrize("content", [
    "안녕하세요, 반갑습니다", "emoji 😀👍🏽🇰🇷 and \U0001d518\U0001d52b (astral plane)",
    "'; DROP TABLE messages; --",
    "back\\slash %s %% ? :name \" ` \x00 nul", "\u202eRTL\u202c and \r\n newlines\t",
    "x" * 65536])
async def test_content_is_stored_verbatim(backend: Backend, content: str) -> None:
    await backend.insert([message(3, 1, content)])
    [got] = await backend.page(3, before=None, after=None, limit=1, newest_first=True)
    assert got.content == content


async def test_ordering_and_pagination_edges(backend: Backend) -> None:
    await backend.insert([message(9, i) for i in range(1, 21)])
    await backend.insert([message(10, i) for i in range(1, 4)])  # another room stays apart

    async def ids(**kwargs: object) -> list[int]:
        return [m.id for m in await backend.page(9, **kwargs)]  # type: ignore[arg-type]

    assert await ids(before=None, after=None, limit=5, newest_first=True) == [20, 19, 18, 17, 16]
    assert await ids(before=None, after=None, limit=5, newest_first=False) == [1, 2, 3, 4, 5]
    assert await ids(before=16, after=None, limit=5, newest_first=True) == [15, 14, 13, 12, 11]
    assert await ids(before=None, after=15, limit=50, newest_first=False) == [16, 17, 18, 19, 20]
    assert await ids(before=10, after=7, limit=50, newest_first=False) == [8, 9]
    assert await ids(before=8, after=7, limit=50, newest_first=False) == []
    assert await ids(before=1, after=None, limit=50, newest_first=True) == []
    assert await ids(before=None, after=20, limit=50, newest_first=True) == []
    assert await ids(before=None, after=0, limit=1, newest_first=False) == [1]
    assert await ids(before=21, after=None, limit=1, newest_first=True) == [20]


async def test_insert_is_idempotent(backend: Backend) -> None:
    batch = [message(4, i) for i in range(1, 4)]
    await backend.insert(batch)
    await backend.insert([*batch, message(4, 4)])  # a retried batch: no duplicates
    got = await backend.page(4, before=None, after=None, limit=10, newest_first=False)
    assert [m.id for m in got] == [1, 2, 3, 4]


async def test_migrations_are_recorded_and_rerun_safely(store_kind: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    if store_kind == "sqlite":
        for _ in range(2):
            backend = SqliteBackend(str(tmp_path / "m.db"))
            assert await backend.open() == SCHEMA_VERSION
            await backend.close()
        import sqlite3
        with sqlite3.connect(tmp_path / "m.db") as db:
            versions = [r[0] for r in db.execute("SELECT version FROM schema_version")]
    else:
        db_config: DbConfig = request.getfixturevalue("mysql_db")
        async with open_bridge():
            for _ in range(2):
                backend = MysqlBackend(db_config)
                assert await backend.open() == SCHEMA_VERSION
                await backend.close()
        versions = [r[0] for r in mysql_rows(db_config, "SELECT version FROM schema_version")]
        charset = mysql_rows(db_config, "SELECT CCSA.character_set_name FROM "
                             "information_schema.TABLES T JOIN information_schema."
                             "COLLATION_CHARACTER_SET_APPLICABILITY CCSA ON "
                             "CCSA.collation_name = T.table_collation WHERE "
                             "T.table_schema = %s AND T.table_name = 'messages'",
                             (db_config.database,))
        assert charset == [("utf8mb4",)]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


class FlakyBackend:
    """A real SQLite backend whose inserts fail the first ``failures`` times."""

    def __init__(self, path: str, failures: int) -> None:
        self.inner = SqliteBackend(path)
        self.failures = failures
        self.calls = 0

    async def open(self) -> int:
        return await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def insert(self, messages: list[Message]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            await self.inner.insert(messages[: len(messages) // 2])  # half written, then fail
            raise OSError("connection lost")
        await self.inner.insert(messages)

    async def last_id(self, room_id: int) -> int:
        return await self.inner.last_id(room_id)

    async def page(self, room_id: int, **kwargs: object) -> list[Message]:
        return await self.inner.page(room_id, **kwargs)  # type: ignore[arg-type]


async def test_write_behind_retries_until_written_once(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    backend = FlakyBackend(str(tmp_path / "flaky.db"), failures=3)
    metrics = Metrics()
    store = Store(backend, metrics, buffer_limit=1000, batch_size=10)
    await nursery.start(store.run)
    for i in range(1, 26):
        store.append(message(5, i))
    # Buffered messages are visible to reads at once.
    assert [m.id for m in await store.page(5, limit=100, newest_first=False)] == \
        list(range(1, 26))
    assert await store.last_id(5) == 25
    with trio.fail_after(30):
        await store.flush()
    rows = await backend.inner.page(5, before=None, after=None, limit=100, newest_first=False)
    assert [m.id for m in rows] == list(range(1, 26))
    assert metrics.store_errors == 3 and metrics.store_written == 25
    assert store.failing_since is None


async def test_full_buffer_refuses(tmp_path: Path) -> None:
    store = Store(SqliteBackend(str(tmp_path / "x.db")), Metrics(), buffer_limit=2)
    store.append(message(1, 1))
    store.check_capacity()
    store.append(message(1, 2))
    from trio_chat.store import StoreUnavailable
    with pytest.raises(StoreUnavailable):
        store.check_capacity()


STAMP = "2026-01-02T03:04:05.678Z"


async def test_rooms_create_read_update_delete(backend: Backend) -> None:
    # A room the seed's way, by chatting in it: joining it makes sure it exists.
    await backend.ensure_room(5, STAMP)
    await backend.insert([message(5, 1)])
    # Writing messages never creates their room: a deleted room's last ones come late.
    await backend.insert([message(9, 1)])
    assert await backend.room(9) is None
    general = await backend.create_room("general", False, STAMP)
    assert general == RoomInfo(6, "general", False, STAMP), "next id after the highest"
    secret = await backend.create_room("비밀 😀", True, STAMP)
    assert secret.id == 7 and await backend.room(7) == secret
    with pytest.raises(NameTaken):
        await backend.create_room("general", True, STAMP)
    assert [r.id for r in await backend.rooms(None, 10)] == [5, 6, 7]
    assert [r.id for r in await backend.rooms(5, 1)] == [6]
    assert await backend.rooms(7, 10) == []
    assert (await backend.room(5)).name is None

    renamed = await backend.update_room(6, "lobby", None)
    assert renamed == RoomInfo(6, "lobby", False, STAMP)
    assert await backend.update_room(6, None, True) == RoomInfo(6, "lobby", True, STAMP)
    with pytest.raises(NameTaken):
        await backend.update_room(7, "lobby", None)
    assert await backend.update_room(99, "nowhere", None) is None

    await backend.insert([message(6, 1), message(6, 2)])
    assert await backend.delete_room(6, purge=False)
    assert await backend.room(6) is None
    assert await backend.last_id(6) == 2, "history kept"
    assert await backend.delete_room(5, purge=True)
    assert await backend.last_id(5) == 0, "history purged"
    assert not await backend.delete_room(5, purge=True)


async def test_bans_end_when_they_say(backend: Backend) -> None:
    await backend.ban(Ban(1, 7, "2026-01-02T00:00:00.000Z", "spam"))
    await backend.ban(Ban(1, 8, None, "for good"))
    assert await backend.ban_of(1, 7, "2026-01-01T23:59:59.999Z") == Ban(
        1, 7, "2026-01-02T00:00:00.000Z", "spam")
    assert await backend.ban_of(1, 7, "2026-01-02T00:00:00.000Z") is None, "over"
    assert await backend.ban_of(1, 8, "2099-01-01T00:00:00.000Z") == Ban(1, 8, None, "for good")
    assert await backend.ban_of(2, 8, STAMP) is None, "per room"
    await backend.ban(Ban(1, 8, "2026-01-03T00:00:00.000Z", "shortened"))
    assert (await backend.ban_of(1, 8, STAMP)).reason == "shortened"
    await backend.insert([message(1, 1)])
    await backend.delete_room(1, purge=False)
    assert await backend.ban_of(1, 8, STAMP) is None, "a deleted room's bans go with it"


async def test_purge_drops_buffered_messages_too(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "purge.db"))
    store = Store(backend, Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store.append(message(3, 1))
        await store.flush()
        store.append(message(3, 2))
        store.append(message(4, 1))
        assert await store.purge(3)
        await store.flush()
        assert await store.last_id(3) == 0
        assert await store.last_id(4) == 1
        nursery.cancel_scope.cancel()


async def test_sqlite_close_waits_for_a_query_already_in_its_thread(tmp_path: Path) -> None:
    """A query running in the worker thread when shutdown closes the database finishes
    against the open database (it once saw it closed and failed an AssertionError)."""
    backend = SqliteBackend(str(tmp_path / "history.db"))
    await backend.open()
    entered, release = threading.Event(), threading.Event()

    def slow_last_id() -> int:
        entered.set()
        release.wait(10)
        return backend._query("SELECT COUNT(*) FROM messages", ())[0][0]  # type: ignore[no-any-return]

    results: list[int] = []

    async def query() -> None:
        results.append(await backend._call(slow_last_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query)
        await trio.to_thread.run_sync(entered.wait)
        nursery.start_soon(backend.close)
        # close() is queued behind the query; let it get there before the query ends.
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert results == [0]
    with pytest.raises(AssertionError):
        backend._query("SELECT 1", ())
