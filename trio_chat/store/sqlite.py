"""The embedded default backend: :class:`SqliteBackend`, SQLite in one file.

Every query runs in a worker thread, one at a time (a capacity limiter of 1),
so the event loop never waits on the disk. It runs no tasks of its own; a
failing query raises to its caller, and :meth:`SqliteBackend.may_refuse` tells
the store's writer which errors are this message's fault rather than the file's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
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

@attrs.define(eq=False)
class SqliteBackend(SqlRooms):
    """SQLite in a file; every query runs in a worker thread, one at a time."""

    path: str
    # FULL syncs every commit to disk, so a message acked once stored survives the
    # host crashing too; NORMAL survives only the process crashing.
    synchronous: str = "NORMAL"
    _db: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _limiter: trio.CapacityLimiter = attrs.field(init=False,
                                                 factory=lambda: trio.CapacityLimiter(1))
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
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

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
        # In the worker's turn, after any query already running there: one cancelled
        # mid-query at shutdown must still find the database open.
        await self._call(self._close)

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
