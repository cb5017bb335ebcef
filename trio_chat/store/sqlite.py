"""The embedded default backend: :class:`SqliteBackend`, SQLite in one file.

Every query runs in the backend's own thread (:class:`QueryThread`), one at a
time and in the order asked, so the event loop never waits on the disk. It runs
no tasks of its own; a failing query raises to its caller, and
:meth:`SqliteBackend.may_refuse` tells the store's writer which errors are this
message's fault rather than the file's.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import attrs
import outcome
import trio

from ..protocol import Message
from .backend import SqlRooms
from .schema import (
    COLUMNS,
    MARKS,
    MIGRATIONS,
    change_sql,
    changes_in,
    message_row,
    page_sql,
    row_message,
)

T = TypeVar("T")
_Job = tuple[Callable[[], object], Callable[[outcome.Outcome[object]], object]]


class QueryThread:
    """One thread running blocking calls in the order asked, each awaited by a trio task.

    Under durable acks every group commit is one call, a thousand a second at
    chat rates: a thread that stays put costs the two threads 21 to 26 µs of CPU
    a call on one core, where ``trio.to_thread.run_sync`` costs 42 to 44 (its
    thread cache and limiter; ``scripts/bench_query_thread.py``). Like that
    function, a caller cancelled while its call runs waits for the call to end,
    gets its result and is cancelled at its next checkpoint: the query is never
    abandoned halfway. Call from trio only;
    :meth:`stop` lets the thread end after the calls already asked.

    Failure boundary: a call that raises raises to its caller; the thread goes on.
    """

    def __init__(self, name: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        # Bounded by its callers: each task waits for its one call before asking again.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # A daemon: a call stuck on a hung disk must not hold the process's exit.
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, deliver = job
            result = outcome.capture(fn)
            try:
                self._token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                return

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._jobs.put((partial(fn, *args), partial(trio.lowlevel.reschedule, task)))
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: trio.lowlevel.Abort.FAILED)

    def serves_this_run(self) -> bool:
        """Whether it hands results to the running trio loop (a backend that was not
        closed may be used again by a later ``trio.run``)."""
        return self._token is trio.lowlevel.current_trio_token()

    def stop(self) -> None:
        self._jobs.put(None)


@attrs.define(eq=False)
class SqliteBackend(SqlRooms):
    """SQLite in a file; every query runs in a worker thread, one at a time."""

    path: str
    # FULL syncs every commit to disk, so a message acked once stored survives the
    # host crashing too; NORMAL survives only the process crashing.
    synchronous: str = "NORMAL"
    _db: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _thread: QueryThread | None = attrs.field(init=False, default=None)
    _mark = "?"

    def _execute(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        assert self._db is not None
        cursor = self._db.execute(sql, args)
        return cursor.fetchall(), cursor.rowcount

    async def _sql(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        return await self._call(self._execute, sql, args)

    def _is_name_clash(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "rooms.name" in str(exc)

    async def ensure_room(self, room_id: int, created_at: str) -> None:
        await self._sql("INSERT OR IGNORE INTO rooms (id, created_at) VALUES (?, ?)",
                        (room_id, created_at))

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def may_refuse(self, exc: Exception) -> bool:
        # OperationalError is the file: locked, read-only, full, unreadable.
        return isinstance(exc, sqlite3.DatabaseError) and \
            not isinstance(exc, sqlite3.OperationalError)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._thread is None or not self._thread.serves_this_run():
            if self._thread is not None:
                self._thread.stop()  # it waits for work from a loop that is gone
            self._thread = QueryThread("trio-chat sqlite")
        return await self._thread.call(fn, *args)

    def _open(self) -> int:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, _, statements in MIGRATIONS:
                if version <= current:
                    continue
                with db:
                    db.execute("BEGIN")
                    for statement in statements["sqlite"]:
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
        except BaseException:
            db.close()
            raise
        self._db = db
        return current

    async def open(self) -> int:
        """Open the file and migrate it; returns the schema version."""
        return await self._call(self._open)

    async def close(self) -> None:
        # In the thread's turn, after any query already asked: one cancelled mid-query
        # at shutdown must still find the database open.
        try:
            await self._call(self._close)
        finally:
            if self._thread is not None:
                self._thread.stop()
                self._thread = None

    def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _insert(self, rows: list[tuple[object, ...]],
                changes: list[tuple[str, tuple[object, ...]]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"INSERT OR IGNORE INTO messages ({COLUMNS}) "
                f"VALUES ({', '.join('?' * MARKS)})", rows)
            for sql, args in changes:
                self._db.execute(sql, args)

    async def insert(self, messages: list[Message]) -> None:
        rows = [message_row(m, m.received_at) for m in messages]
        changes = [change_sql("?", m) for m in changes_in(messages)]
        await self._call(self._insert, rows, changes)

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        assert self._db is not None
        return self._db.execute(sql, args).fetchall()

    async def last_id(self, room_id: int) -> int:
        rows = await self._call(self._query, "SELECT MAX(id) FROM messages WHERE room_id = ?",
                                (room_id,))
        return rows[0][0] or 0

    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]:
        sql, args = page_sql("?", before=before, after=after, limit=limit,
                              newest_first=newest_first, room_id=room_id)
        rows = await self._call(self._query, sql, tuple(args))
        return [row_message(row, row[6]) for row in rows]
