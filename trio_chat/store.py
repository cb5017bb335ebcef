"""Message history: the write-behind buffer and the embedded SQLite backend.

Owns persistence. :class:`Store` is what the rest of the server sees: ``append``
never waits (a full buffer refuses the message instead), one writer task
(:meth:`Store.run`) moves messages to the backend in batches and retries with
backoff when it fails, and reads merge what is still buffered so a message is
visible to history the moment it is accepted. A backend (:class:`SqliteBackend`
here) only knows how to run its queries; it never sits on the fan-out path.
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
from collections import deque
from typing import Protocol

import attrs
import trio

from .metrics import Metrics
from .protocol import Message

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The write-behind buffer is full: persistence cannot keep up or is down."""


class Backend(Protocol):
    """What a history database provides; every method is a trio coroutine."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def insert(self, messages: list[Message]) -> None:
        """Store ``messages``; a message whose (room_id, id) exists already is skipped."""
    async def last_id(self, room_id: int) -> int: ...
    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]: ...


@attrs.define(eq=False)
class Store:
    """The write-behind store in front of a :class:`Backend`."""

    _backend: Backend
    _metrics: Metrics
    buffer_limit: int = 100_000
    batch_size: int = 1000
    _pending: deque[Message] = attrs.field(init=False, factory=deque)
    _inflight: list[Message] = attrs.field(init=False, factory=list)
    _wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)
    failing_since: float | None = attrs.field(init=False, default=None)

    @property
    def lag(self) -> int:
        """Messages accepted but not yet in the backend."""
        return len(self._pending) + len(self._inflight)

    def check_capacity(self) -> None:
        """Raise :class:`StoreUnavailable` if the buffer is full; call before publishing."""
        if len(self._pending) + len(self._inflight) >= self.buffer_limit:
            self._metrics.store_refusals += 1
            raise StoreUnavailable("message history is unavailable; message not accepted")

    def append(self, message: Message) -> None:
        """Queue an accepted ``message`` for writing; never waits, never refuses.

        The gate is :meth:`check_capacity` before publishing, so the buffer can
        exceed its limit only by the publishes in flight at that moment.
        """
        self._pending.append(message)
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the backend, then write batches until cancelled."""
        await self._backend.open()
        try:
            task_status.started()
            delay = 0.05
            while True:
                if not self._pending:
                    self._drained.set()
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    self._drained = trio.Event()
                    continue
                if not self._inflight:
                    n = min(self.batch_size, len(self._pending))
                    self._inflight = [self._pending.popleft() for _ in range(n)]
                try:
                    await self._backend.insert(self._inflight)
                except Exception as exc:
                    self._metrics.store_errors += 1
                    if self.failing_since is None:
                        self.failing_since = trio.current_time()
                        log.warning("store write failed, retrying with backoff: %s", exc)
                    await trio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 5.0)
                    continue
                if self.failing_since is not None:
                    log.warning("store writes recovered after %.1fs",
                                trio.current_time() - self.failing_since)
                    self.failing_since = None
                delay = 0.05
                self._metrics.store_written += len(self._inflight)
                self._inflight = []
        finally:
            with trio.move_on_after(5, shield=True):
                await self._backend.close()

    async def flush(self) -> None:
        """Wait until every accepted message is in the backend (the caller sets a deadline)."""
        while self._pending or self._inflight:
            await self._drained.wait()

    def _buffered(self, room_id: int) -> list[Message]:
        return [m for m in (*self._inflight, *self._pending) if m.room_id == room_id]

    async def last_id(self, room_id: int) -> int:
        stored = await self._backend.last_id(room_id)
        return max([stored, *(m.id for m in self._buffered(room_id))])

    async def page(self, room_id: int, *, before: int | None = None, after: int | None = None,
                   limit: int = 50, newest_first: bool = True) -> list[Message]:
        """Up to ``limit`` messages with ``after < id < before``, buffered ones included."""
        rows = await self._backend.page(room_id, before=before, after=after, limit=limit,
                                        newest_first=newest_first)
        lo = -math.inf if after is None else after
        hi = math.inf if before is None else before
        extra = [m for m in self._buffered(room_id) if lo < m.id < hi]
        if extra:
            # A batch may be committed while we read: keep one copy of each id.
            merged = {m.id: m for m in rows}
            merged.update((m.id, m) for m in extra)
            rows = sorted(merged.values(), key=lambda m: m.id, reverse=newest_first)[:limit]
        return rows

    async def recent(self, room_id: int, limit: int) -> list[Message]:
        """The last ``limit`` messages of a room, oldest first."""
        if limit <= 0:
            return []
        rows = await self.page(room_id, limit=limit, newest_first=True)
        rows.reverse()
        return rows


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room_id INTEGER NOT NULL,
    id INTEGER NOT NULL,
    author_id INTEGER NOT NULL,
    message_type TEXT NOT NULL,
    content TEXT NOT NULL,
    create_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (room_id, id)
) WITHOUT ROWID;
"""

_COLUMNS = "id, room_id, author_id, message_type, content, create_at, received_at"


@attrs.define(eq=False)
class SqliteBackend:
    """SQLite in a file; every query runs in a worker thread, one at a time."""

    path: str
    _db: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _limiter: trio.CapacityLimiter = attrs.field(init=False,
                                                 factory=lambda: trio.CapacityLimiter(1))

    async def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)

    def _insert(self, rows: list[tuple[object, ...]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows)

    async def insert(self, messages: list[Message]) -> None:
        rows = [(m.id, m.room_id, m.author_id, m.message_type, m.content, m.create_at,
                 m.received_at) for m in messages]
        await self._call(self._insert, rows)

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        assert self._db is not None
        return self._db.execute(sql, args).fetchall()

    async def last_id(self, room_id: int) -> int:
        rows = await self._call(self._query, "SELECT MAX(id) FROM messages WHERE room_id = ?",
                                (room_id,))
        return rows[0][0] or 0

    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]:
        sql = f"SELECT {_COLUMNS} FROM messages WHERE room_id = ?"
        args: list[object] = [room_id]
        if before is not None:
            sql += " AND id < ?"
            args.append(before)
        if after is not None:
            sql += " AND id > ?"
            args.append(after)
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(limit)
        rows = await self._call(self._query, sql, tuple(args))
        return [Message(*row) for row in rows]  # type: ignore[arg-type]
