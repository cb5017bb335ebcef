"""Persistence: message history (write-behind), rooms and bans, on SQLite or MySQL/MariaDB.

Owns persistence. Rooms and bans are small and rare: they are read and written
straight through to the backend. :class:`Store` is what the rest of the server sees: ``append``
never waits (a full buffer refuses the message instead), one writer task
(:meth:`Store.run`) moves messages to the backend in batches and retries with
backoff when it fails, and reads merge what is still buffered so a message is
visible to history the moment it is accepted. A backend only knows how to run
its queries and migrate its schema: :class:`SqliteBackend` (the embedded
default, in a worker thread) or :class:`MysqlBackend` (aiomysql over the
asyncio bridge). Neither ever sits on the fan-out path.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import math
import random
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import aiomysql
import attrs
import pymysql
import trio

from . import bridge
from .config import Config, DbConfig
from .metrics import Metrics
from .protocol import CHANGE_TYPES, Message, apply_change, message_from_wire, utc_now

T = TypeVar("T")

DUPLICATE_KEY = 1062  # MySQL's ER_DUP_ENTRY
# MySQL error codes from here up are the client's (lost connection, cannot connect).
CLIENT_ERRORS = 2000
# Server errors that pass: too many connections, shutting down, lock wait timeout,
# deadlock, read-only (a failover), connection killed.
TRANSIENT_ERRORS = frozenset({1040, 1053, 1205, 1213, 1290, 1836, 1927})

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The write-behind buffer is full: persistence cannot keep up or is down."""


class NameTaken(Exception):
    """Another room has this name."""


class NoRoomId(Exception):
    """Every id a created room may get is taken."""


# Rooms created through the API take ids below this; rooms joined by id (any int64)
# above it cannot push them to the end of the range.
CREATED_ROOM_IDS = 2**62


@attrs.frozen
class RoomInfo:
    id: int
    name: str | None
    private: bool
    created_at: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "private": self.private,
                "created_at": self.created_at}


@attrs.frozen
class Ban:
    room_id: int
    author_id: int
    until: str | None  # ISO UTC like received_at; None bans for good
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"room_id": self.room_id, "author_id": self.author_id, "until": self.until,
                "reason": self.reason}


@attrs.frozen
class MediaInfo:
    """A stored image: what a chat_img message says about it."""

    id: str
    room_id: int
    author_id: int
    content_type: str
    size: int
    width: int
    height: int
    thumbnail_type: str
    thumbnail_width: int
    thumbnail_height: int
    created_at: str

    @property
    def url(self) -> str:
        return f"/media/{self.id}"

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "thumbnail_url": f"{self.url}/thumbnail",
                "content_type": self.content_type, "size": self.size, "width": self.width,
                "height": self.height, "thumbnail_width": self.thumbnail_width,
                "thumbnail_height": self.thumbnail_height}


@attrs.frozen
class StoredMedia:
    info: MediaInfo
    data: bytes = attrs.field(repr=False)
    thumbnail: bytes = attrs.field(repr=False)


class Backend(Protocol):
    """What a history database provides; every method is a trio coroutine."""

    async def open(self) -> int:
        """Connect and migrate the schema; returns the schema version."""
    async def close(self) -> None: ...
    async def insert(self, messages: list[Message]) -> None:
        """Store ``messages``; a message whose (room_id, id) exists already is skipped."""
    async def last_id(self, room_id: int) -> int: ...
    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]: ...
    async def create_room(self, name: str, private: bool, created_at: str) -> RoomInfo:
        """A new room with the next free id; :class:`NameTaken` if the name is in use."""
    async def room(self, room_id: int) -> RoomInfo | None: ...
    async def rooms(self, after: int | None, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with ``id > after``, by id."""
    async def update_room(self, room_id: int, name: str | None, private: bool | None
                          ) -> RoomInfo | None:
        """Rename and/or change privacy (``None``: keep); :class:`NameTaken` on a clash."""
    async def delete_room(self, room_id: int, purge: bool) -> bool:
        """Forget the room (and its bans); with ``purge`` its messages and images too."""
    async def ensure_room(self, room_id: int, created_at: str) -> None:
        """Create ``room_id`` (unnamed, public) unless it exists."""
    async def ban(self, ban: Ban) -> None: ...
    async def save_media(self, media: StoredMedia) -> None: ...
    async def media_info(self, media_id: str) -> MediaInfo | None: ...
    async def media_bytes(self, media_id: str, thumbnail: bool) -> tuple[str, bytes] | None:
        """The content type and bytes of an image (or of its thumbnail), if stored."""
    async def client_message(self, room_id: int, author_id: int, client_msg_id: str,
                             since: str) -> Message | None: ...
    async def ban_of(self, room_id: int, author_id: int, now: str) -> Ban | None:
        """The ban of ``author_id`` in ``room_id`` still in force at ``now``, if any."""
    async def ping(self) -> None:
        """Raise unless the database answers."""
    def may_refuse(self, exc: Exception) -> bool:
        """Whether ``exc`` may be the database refusing what was written (a constraint,
        bad data, a trigger), rather than the database being unreachable or busy."""
    async def sent_since(self, since: str, limit: int) -> list[Message]:
        """The newest ``limit`` messages with a client_msg_id received at or after
        ``since``, oldest first."""
    async def dead_letter(self, message: Message, error: str, failed_at: str) -> None:
        """Set aside ``message``, which :meth:`insert` refused with ``error``."""
    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
    async def remove_dead_letter(self, seq: int) -> None: ...


@attrs.frozen
class DeadLetter:
    seq: int
    message: Message
    error: str
    failed_at: str


class Outcome(enum.Enum):
    """What became of an accepted message, told to whoever waits for it."""

    # Committed to the history store.
    STORED = "stored"
    # Accepted, but only in memory: the store is failing or too slow.
    BUFFERED = "buffered"
    # The database refused this one message; it was set aside as a dead letter.
    REFUSED = "refused"


Settle = Callable[[Outcome], None]


@attrs.define(eq=False, slots=True)
class _Entry:
    message: Message
    # Called once, in acceptance order, when the message's fate is known.
    settle: Settle | None = None
    deadline: float = 0.0
    done: bool = False


@attrs.define(eq=False)
class Store:
    """The write-behind store in front of a :class:`Backend`.

    ``append`` never waits. One writer task moves messages to the backend in
    batches, each one commit, so every message that arrived while a commit ran
    goes in the next (group commit). Whoever appended with a ``settle``
    callback is told, in acceptance order, when its message is stored, and
    told at once instead (:attr:`Outcome.BUFFERED`) while the backend is failing
    or has not committed within ``wait`` seconds.

    Failure boundary: the writer. A backend that is down (it does not answer a
    ping) is retried with backoff; a batch it refuses while it answers is split
    until the refusing message is found, and that one goes to the backend's
    dead letters, counted, so every other message is written.
    """

    _backend: Backend
    _metrics: Metrics
    buffer_limit: int = 100_000
    batch_size: int = 1000
    # Seconds a settle callback waits for the commit (server.storeWait).
    wait: float = 2.0
    # Refuse new messages while writes fail, instead of buffering them.
    refuse_when_failing: bool = False
    # Called with each batch once it is written (the Redis log drops its copies).
    after_write: Callable[[list[Message]], Awaitable[None]] | None = None
    _pending: deque[_Entry] = attrs.field(init=False, factory=deque)
    _inflight: list[_Entry] = attrs.field(init=False, factory=list)
    # Entries with a settle callback, in order; settled ones are dropped from the left.
    _unsettled: deque[_Entry] = attrs.field(init=False, factory=deque)
    # While set, a new message is settled BUFFERED at once (the store is failing or slow).
    _settle_now: bool = attrs.field(init=False, default=False)
    _wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)
    _batch_written: trio.Event = attrs.field(init=False, factory=trio.Event)
    failing_since: float | None = attrs.field(init=False, default=None)

    @property
    def backend(self) -> Backend:
        """Rooms and bans are read and written straight through."""
        return self._backend

    @property
    def lag(self) -> int:
        """Messages accepted but not yet in the backend."""
        return len(self._pending) + len(self._inflight)

    @property
    def outage_seconds(self) -> float:
        """How long writes have been failing (0 while they succeed)."""
        if self.failing_since is None:
            return 0.0
        return trio.current_time() - self.failing_since

    def check_capacity(self) -> None:
        """Raise :class:`StoreUnavailable` if the buffer is full, or while writes fail
        and the outage policy refuses; call before publishing."""
        if self.lag >= self.buffer_limit or (self.refuse_when_failing and self._settle_now):
            self._metrics.store_refusals += 1
            raise StoreUnavailable("message history is unavailable; message not accepted")

    def append(self, message: Message, settle: Settle | None = None) -> None:
        """Queue an accepted ``message`` for writing; never waits, never refuses.

        ``settle`` is called once with the message's :class:`Outcome`, in the
        order messages were appended. The gate is :meth:`check_capacity` before
        publishing, so the buffer can exceed its limit only by the publishes in
        flight at that moment.
        """
        entry = _Entry(message)
        self._pending.append(entry)
        self._wakeup.set()
        if settle is None:
            return
        if self._settle_now:
            settle(Outcome.BUFFERED)
            return
        entry.settle = settle
        entry.deadline = trio.current_time() + self.wait
        self._unsettled.append(entry)

    def when_settled(self, message: Message, settle: Settle) -> None:
        """Call ``settle`` with what becomes of ``message``, appended before (a resend
        of it): when the first copy is settled, or at once if it was."""
        for entry in self._unsettled:
            first = entry.settle
            if first is not None and entry.message is message:
                def both(outcome: Outcome, first: Settle = first) -> None:
                    first(outcome)
                    settle(outcome)

                entry.settle = both
                return
        waiting = any(e.message is message for e in (*self._inflight, *self._pending))
        settle(Outcome.BUFFERED if waiting else Outcome.STORED)

    def _settle(self, entry: _Entry, outcome: Outcome) -> None:
        settle, entry.settle = entry.settle, None
        if settle is not None:
            try:
                settle(outcome)
            except Exception:
                # A waiter's bug is its own; the writer and the other waiters go on.
                self._metrics.unexpected("settle_failures", log, "settling message %d of "
                                         "room %d failed", entry.message.id,
                                         entry.message.room_id)

    def _settle_all_buffered(self) -> None:
        """The store cannot say when: tell every waiter that its message is in memory."""
        self._settle_now = True
        while self._unsettled:
            self._settle(self._unsettled.popleft(), Outcome.BUFFERED)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the backend, then write batches until cancelled; a second task,
        the watchdog, settles waiters whose commit is overdue."""
        await self._backend.open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch)
                task_status.started()
                await self._write_forever()
        finally:
            with trio.move_on_after(5, shield=True):
                await self._backend.close()

    async def _watch(self) -> None:
        while True:
            while self._unsettled and self._unsettled[0].settle is None:
                self._unsettled.popleft()
            if not self._unsettled:
                await trio.sleep(self.wait / 2)
                continue
            first = self._unsettled[0]
            await trio.sleep_until(first.deadline)
            if first.settle is not None:
                log.warning("no commit within %gs; acknowledging as not yet durable until "
                            "the store catches up", self.wait)
                self._settle_all_buffered()

    async def _write_forever(self) -> None:
        delay = 0.05
        while True:
            if not self._pending and not self._inflight:
                self._drained.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._drained = trio.Event()
                continue
            if not self._inflight:
                n = min(self.batch_size, len(self._pending))
                self._inflight = [self._pending.popleft() for _ in range(n)]
            try:
                await self._write(self._inflight)
            except Exception as exc:
                self._metrics.store_errors += 1
                self._settle_all_buffered()
                if self.failing_since is None:
                    self.failing_since = trio.current_time()
                    log.warning("store write failed, retrying with backoff: %s", exc)
                self._inflight = [e for e in self._inflight if not e.done]
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            if self.failing_since is not None:
                log.warning("store writes recovered after %.1fs; %d messages waiting",
                            self.outage_seconds, self.lag)
                self.failing_since = None
            if not self._pending:
                # Caught up: new messages wait for their commit again.
                self._settle_now = False
            delay = 0.05
            written, self._inflight = self._inflight, []
            self._batch_written.set()
            self._batch_written = trio.Event()
            if self.after_write is not None:
                await self._after_write([e.message for e in written])

    async def _write(self, entries: list[_Entry]) -> None:
        """Write ``entries`` in one commit, or, if the backend refuses them while it
        answers, in halves down to the one it refuses (a dead letter)."""
        try:
            await self._backend.insert([e.message for e in entries])
        except Exception as exc:
            if not (self._backend.may_refuse(exc) and await self._answers()):
                raise  # down, not refusing: the caller retries with backoff
            if len(entries) > 1:
                half = len(entries) // 2
                await self._write(entries[:half])
                await self._write(entries[half:])
                return
            await self._dead_letter(entries[0], exc)
            return
        for entry in entries:
            entry.done = True
            self._settle(entry, Outcome.STORED)
        self._metrics.store_written += len(entries)

    async def _answers(self) -> bool:
        try:
            await self._backend.ping()
        except Exception:
            return False
        return True

    async def _dead_letter(self, entry: _Entry, exc: Exception) -> None:
        message = entry.message
        # If this fails too, the backend is not answering after all: retried as an outage.
        await self._backend.dead_letter(message, repr(exc)[:2000], utc_now())
        entry.done = True
        self._metrics.store_dead_letters += 1
        log.error("the store refused message %d of room %d; set aside as a dead letter "
                  "(trio-chat dead-letters --replay): %r", message.id, message.room_id, exc)
        self._settle(entry, Outcome.REFUSED)

    async def _after_write(self, messages: list[Message]) -> None:
        assert self.after_write is not None
        try:
            await self.after_write(messages)
        except Exception as exc:
            # What it cleans up is cleaned up later (and writing again changes nothing).
            log.warning("after writing %d messages: %r", len(messages), exc)

    async def flush(self) -> None:
        """Wait until every accepted message is in the backend (the caller sets a deadline)."""
        while self._pending or self._inflight:
            await self._drained.wait()

    def _buffered(self, room_id: int) -> list[Message]:
        return [e.message for e in (*self._inflight, *self._pending)
                if e.message.room_id == room_id]

    async def _read(self, read: Awaitable[T]) -> T:
        try:
            return await read
        except Exception as exc:
            raise StoreUnavailable(f"message history is unavailable: {exc!r}") from exc

    async def last_id(self, room_id: int) -> int:
        stored = await self._read(self._backend.last_id(room_id))
        return max([stored, *(m.id for m in self._buffered(room_id))])

    async def page(self, room_id: int, *, before: int | None = None, after: int | None = None,
                   limit: int = 50, newest_first: bool = True) -> list[Message]:
        """Up to ``limit`` messages with ``after < id < before``, buffered ones included.

        :class:`StoreUnavailable` if the backend cannot be read."""
        rows = await self._read(self._backend.page(room_id, before=before, after=after,
                                                   limit=limit, newest_first=newest_first))
        lo = -math.inf if after is None else after
        hi = math.inf if before is None else before
        buffered = self._buffered(room_id)
        extra = [m for m in buffered if lo < m.id < hi]
        if extra:
            # A batch may be committed while we read: keep one copy of each id.
            merged = {m.id: m for m in rows}
            merged.update((m.id, m) for m in extra)
            rows = sorted(merged.values(), key=lambda m: m.id, reverse=newest_first)[:limit]
        changes = _changes(buffered)
        if changes:
            # Edits and deletes not written yet: show their result already (applying
            # one that was written meanwhile again changes nothing).
            where = {m.id: i for i, m in enumerate(rows)}
            for change in changes:
                i = where.get(change.target_id)  # type: ignore[arg-type]
                if i is not None:
                    rows[i] = apply_change(rows[i], change)
        return rows

    async def client_message(self, room_id: int, author_id: int, client_msg_id: str,
                             since: str) -> Message | None:
        """The message ``author_id`` sent with ``client_msg_id`` in ``room_id`` at or after
        ``since``, if one was accepted."""
        for m in self._buffered(room_id):
            if m.author_id == author_id and m.client_msg_id == client_msg_id:
                return m
        return await self._read(
            self._backend.client_message(room_id, author_id, client_msg_id, since))

    async def sent_since(self, since: str, limit: int) -> list[Message]:
        """The newest ``limit`` messages with a client_msg_id received at or after ``since``
        (what the idempotency window needs after a restart), oldest first."""
        return await self._read(self._backend.sent_since(since, limit))

    async def write_now(self, messages: list[Message]) -> None:
        """Write ``messages`` straight to the backend, past the buffer (another node's
        orphans, already durable elsewhere); a refused one becomes a dead letter."""
        await self._write([_Entry(m) for m in messages])

    async def purge(self, room_id: int) -> bool:
        """Delete the room with its messages, including those still waiting to be written."""
        dropped = [e for e in self._pending if e.message.room_id == room_id]
        self._pending = deque(e for e in self._pending if e.message.room_id != room_id)
        for entry in dropped:
            self._settle(entry, Outcome.STORED)  # stored, then deleted with the room
        # A batch being written may hold some: let it land first, then delete them.
        while any(e.message.room_id == room_id for e in self._inflight):
            await self._batch_written.wait()
        return await self._backend.delete_room(room_id, purge=True)

    async def recent(self, room_id: int, limit: int) -> list[Message]:
        """The last ``limit`` messages of a room, oldest first."""
        if limit <= 0:
            return []
        rows = await self.page(room_id, limit=limit, newest_first=True)
        rows.reverse()
        return rows


# Columns migration 3 adds to messages; older rows have none of them.
_CHANGE_COLUMNS = [("client_msg_id", "VARCHAR(64)"), ("target_id", "BIGINT"),
                   ("image", "TEXT"), ("edited_at", "VARCHAR(32)"),
                   ("deleted_at", "VARCHAR(32)")]
# Schema migrations, applied in order at start-up and by `trio-chat migrate`.
# Each is (version, what it does, statements per dialect); never edit a shipped one.
MIGRATIONS: list[tuple[int, str, dict[str, list[str]]]] = [
    (1, "rooms and messages", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS rooms (
                id INTEGER PRIMARY KEY,
                name TEXT UNIQUE,
                private INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS messages (
                room_id INTEGER NOT NULL,
                id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                message_type TEXT NOT NULL,
                content TEXT NOT NULL,
                create_at TEXT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (room_id, id)
            ) WITHOUT ROWID""",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS rooms (
                id BIGINT NOT NULL PRIMARY KEY,
                name VARCHAR(50) NULL UNIQUE,
                private BOOLEAN NOT NULL DEFAULT FALSE,
                created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
            """CREATE TABLE IF NOT EXISTS messages (
                room_id BIGINT NOT NULL,
                id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                message_type VARCHAR(32) NOT NULL,
                content MEDIUMTEXT NOT NULL,
                create_at VARCHAR(64) NOT NULL,
                received_at DATETIME(3) NOT NULL,
                PRIMARY KEY (room_id, id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (2, "bans", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS bans (
                room_id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                ends_at TEXT NULL,
                reason TEXT NOT NULL,
                PRIMARY KEY (room_id, author_id)
            ) WITHOUT ROWID""",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS bans (
                room_id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                ends_at DATETIME(3) NULL,
                reason VARCHAR(500) NOT NULL,
                PRIMARY KEY (room_id, author_id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (3, "client message ids, edits, deletes and images", {
        "sqlite": [
            *(f"ALTER TABLE messages ADD COLUMN {name} {kind} NULL"
              for name, kind in _CHANGE_COLUMNS),
            "ALTER TABLE messages ADD COLUMN moderated INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX messages_client_msg_id ON messages (room_id, author_id, client_msg_id)",
        ],
        "mysql": [
            "ALTER TABLE messages " + ", ".join(f"ADD COLUMN {name} {kind} NULL"
                                                for name, kind in _CHANGE_COLUMNS) +
            ", ADD COLUMN moderated BOOLEAN NOT NULL DEFAULT FALSE",
            "CREATE INDEX messages_client_msg_id ON messages (room_id, author_id, client_msg_id)",
        ],
    }),
    (4, "images", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS media (
                id TEXT PRIMARY KEY,
                room_id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                content_type TEXT NOT NULL,
                size INTEGER NOT NULL,
                width INTEGER NOT NULL,
                height INTEGER NOT NULL,
                thumbnail_type TEXT NOT NULL,
                thumbnail_width INTEGER NOT NULL,
                thumbnail_height INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                data BLOB NOT NULL,
                thumbnail BLOB NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX media_room ON media (room_id)",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS media (
                id VARCHAR(64) NOT NULL PRIMARY KEY,
                room_id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                content_type VARCHAR(32) NOT NULL,
                size INT NOT NULL,
                width INT NOT NULL,
                height INT NOT NULL,
                thumbnail_type VARCHAR(32) NOT NULL,
                thumbnail_width INT NOT NULL,
                thumbnail_height INT NOT NULL,
                created_at DATETIME(3) NOT NULL,
                data LONGBLOB NOT NULL,
                thumbnail MEDIUMBLOB NOT NULL,
                INDEX media_room (room_id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (5, "dead letters; messages by receive time (the idempotency window after a restart)", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS dead_letters (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                room_id INTEGER NOT NULL,
                message_id INTEGER NOT NULL,
                message TEXT NOT NULL,
                error TEXT NOT NULL,
                failed_at TEXT NOT NULL
            )""",
            "CREATE INDEX messages_received_at ON messages (received_at)",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS dead_letters (
                seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                room_id BIGINT NOT NULL,
                message_id BIGINT NOT NULL,
                message MEDIUMTEXT NOT NULL,
                error TEXT NOT NULL,
                failed_at DATETIME(3) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
            "CREATE INDEX messages_received_at ON messages (received_at)",
        ],
    }),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_MEDIA_COLUMNS = ("id, room_id, author_id, content_type, size, width, height, "
                  "thumbnail_type, thumbnail_width, thumbnail_height, created_at")

_COLUMNS = ("id, room_id, author_id, message_type, content, create_at, received_at, "
            "client_msg_id, target_id, image, edited_at, deleted_at, moderated")
_MARKS = len(_COLUMNS.split(","))


def _message_row(m: Message, received_at: object) -> tuple[object, ...]:
    return (m.id, m.room_id, m.author_id, m.message_type, m.content, m.create_at,
            received_at, m.client_msg_id, m.target_id,
            None if m.image is None else json.dumps(m.image, separators=(",", ":")),
            m.edited_at, m.deleted_at, m.moderated)


def _row_message(row: tuple[Any, ...], received_at: str) -> Message:
    return Message(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5],
                   received_at, row[7], None if row[8] is None else int(row[8]),
                   None if row[9] is None else json.loads(row[9]), row[10], row[11],
                   bool(row[12]))


def _change_sql(mark: str, change: Message) -> tuple[str, tuple[object, ...]]:
    """The UPDATE that makes a stored message show ``change`` (see protocol.apply_change)."""
    where = f" WHERE room_id = {mark} AND id = {mark} AND deleted_at IS NULL"
    if change.message_type == "chat_edit":
        return (f"UPDATE messages SET content = {mark}, edited_at = {mark}" + where,
                (change.content, change.received_at, change.room_id, change.target_id))
    return (f"UPDATE messages SET content = '', image = NULL, deleted_at = {mark}" + where,
            (change.received_at, change.room_id, change.target_id))


def _changes(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.message_type in CHANGE_TYPES]


def _page_sql(mark: str, *, before: int | None, after: int | None, limit: int,
              newest_first: bool, room_id: int) -> tuple[str, list[object]]:
    sql = f"SELECT {_COLUMNS} FROM messages WHERE room_id = {mark}"
    args: list[object] = [room_id]
    if before is not None:
        sql += f" AND id < {mark}"
        args.append(before)
    if after is not None:
        sql += f" AND id > {mark}"
        args.append(after)
    sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT {mark}"
    args.append(limit)
    return sql, args


class _Rooms:
    """Rooms, bans and lookups by client message id, in SQL both dialects understand; a
    backend supplies :meth:`_sql`."""

    _mark: str

    async def _sql(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement: (rows, rows affected)."""
        raise NotImplementedError

    def _stamp_in(self, stamp: str) -> object:
        return stamp

    def _stamp_out(self, value: Any) -> str:
        return str(value)

    _blob_mark = "?"

    def _blob_in(self, data: bytes) -> object:
        return data

    def _is_name_clash(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _is_duplicate(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _room_of(self, row: tuple[Any, ...]) -> RoomInfo:
        return RoomInfo(int(row[0]), row[1], bool(row[2]), self._stamp_out(row[3]))

    async def create_room(self, name: str, private: bool, created_at: str) -> RoomInfo:
        m = self._mark
        for _ in range(10):
            rows, _ = await self._sql(f"SELECT MAX(id) FROM rooms WHERE id < {m}",
                                      (CREATED_ROOM_IDS,))
            room = RoomInfo(max(int(rows[0][0] or 0), 0) + 1, name, private, created_at)
            if room.id >= CREATED_ROOM_IDS:
                raise NoRoomId(f"every room id below {CREATED_ROOM_IDS} is taken")
            try:
                await self._sql(f"INSERT INTO rooms (id, name, private, created_at) "
                                f"VALUES ({m}, {m}, {m}, {m})",
                                (room.id, name, private, self._stamp_in(created_at)))
            except Exception as exc:
                if self._is_name_clash(exc):
                    raise NameTaken(name) from None
                if self._is_duplicate(exc):
                    continue  # another node took this id first
                raise
            return room
        raise NoRoomId("could not find a free room id")

    async def room(self, room_id: int) -> RoomInfo | None:
        rows, _ = await self._sql(f"SELECT id, name, private, created_at FROM rooms "
                                  f"WHERE id = {self._mark}", (room_id,))
        return self._room_of(rows[0]) if rows else None

    async def rooms(self, after: int | None, limit: int) -> list[RoomInfo]:
        m = self._mark
        where, args = (f"WHERE id > {m} ", (after,)) if after is not None else ("", ())
        rows, _ = await self._sql(f"SELECT id, name, private, created_at FROM rooms {where}"
                                  f"ORDER BY id LIMIT {m}", (*args, limit))
        return [self._room_of(row) for row in rows]

    async def update_room(self, room_id: int, name: str | None, private: bool | None
                          ) -> RoomInfo | None:
        m = self._mark
        sets, args = [], []
        if name is not None:
            sets.append(f"name = {m}")
            args.append(name)
        if private is not None:
            sets.append(f"private = {m}")
            args.append(private)
        if sets:
            try:
                await self._sql(f"UPDATE rooms SET {', '.join(sets)} WHERE id = {m}",
                                (*args, room_id))
            except Exception as exc:
                if self._is_name_clash(exc):
                    raise NameTaken(name) from None
                raise
        return await self.room(room_id)

    async def delete_room(self, room_id: int, purge: bool) -> bool:
        m = self._mark
        _, deleted = await self._sql(f"DELETE FROM rooms WHERE id = {m}", (room_id,))
        await self._sql(f"DELETE FROM bans WHERE room_id = {m}", (room_id,))
        if purge:
            _, messages = await self._sql(f"DELETE FROM messages WHERE room_id = {m}",
                                          (room_id,))
            await self._sql(f"DELETE FROM media WHERE room_id = {m}", (room_id,))
            deleted += messages
        return deleted > 0

    async def save_media(self, media: StoredMedia) -> None:
        i = media.info
        blob = self._blob_mark
        await self._sql(f"INSERT INTO media ({_MEDIA_COLUMNS}, data, thumbnail) "
                        f"VALUES ({', '.join([self._mark] * 11)}, {blob}, {blob})",
                        (i.id, i.room_id, i.author_id, i.content_type, i.size, i.width,
                         i.height, i.thumbnail_type, i.thumbnail_width, i.thumbnail_height,
                         self._stamp_in(i.created_at), self._blob_in(media.data),
                         self._blob_in(media.thumbnail)))

    async def media_info(self, media_id: str) -> MediaInfo | None:
        rows, _ = await self._sql(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE id = {self._mark}",
                                  (media_id,))
        if not rows:
            return None
        row = rows[0]
        return MediaInfo(row[0], int(row[1]), int(row[2]), row[3], int(row[4]), int(row[5]),
                         int(row[6]), row[7], int(row[8]), int(row[9]),
                         self._stamp_out(row[10]))

    async def media_bytes(self, media_id: str, thumbnail: bool) -> tuple[str, bytes] | None:
        columns = "thumbnail_type, thumbnail" if thumbnail else "content_type, data"
        rows, _ = await self._sql(f"SELECT {columns} FROM media WHERE id = {self._mark}",
                                  (media_id,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    async def ban(self, ban: Ban) -> None:
        m = self._mark
        args = (ban.room_id, ban.author_id)
        await self._sql(f"DELETE FROM bans WHERE room_id = {m} AND author_id = {m}", args)
        await self._sql(f"INSERT INTO bans (room_id, author_id, ends_at, reason) "
                        f"VALUES ({m}, {m}, {m}, {m})",
                        (*args, None if ban.until is None else self._stamp_in(ban.until),
                         ban.reason))

    async def client_message(self, room_id: int, author_id: int, client_msg_id: str,
                             since: str) -> Message | None:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT {_COLUMNS} FROM messages WHERE room_id = {m} AND author_id = {m} "
            f"AND client_msg_id = {m} AND received_at >= {m} ORDER BY id LIMIT 1",
            (room_id, author_id, client_msg_id, self._stamp_in(since)))
        return _row_message(rows[0], self._stamp_out(rows[0][6])) if rows else None

    async def ping(self) -> None:
        await self._sql("SELECT 1", ())

    async def sent_since(self, since: str, limit: int) -> list[Message]:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT {_COLUMNS} FROM messages WHERE received_at >= {m} AND "
            f"client_msg_id IS NOT NULL ORDER BY received_at DESC LIMIT {m}",
            (self._stamp_in(since), limit))
        return [_row_message(row, self._stamp_out(row[6])) for row in reversed(rows)]

    async def dead_letter(self, message: Message, error: str, failed_at: str) -> None:
        m = self._mark
        await self._sql(f"INSERT INTO dead_letters (room_id, message_id, message, error, "
                        f"failed_at) VALUES ({m}, {m}, {m}, {m}, {m})",
                        (message.room_id, message.id,
                         json.dumps(message.to_wire(), ensure_ascii=False), error,
                         self._stamp_in(failed_at)))

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows, _ = await self._sql(f"SELECT seq, message, error, failed_at FROM dead_letters "
                                  f"ORDER BY seq LIMIT {self._mark}", (limit,))
        return [DeadLetter(int(row[0]), message_from_wire(json.loads(row[1])), row[2],
                           self._stamp_out(row[3])) for row in rows]

    async def remove_dead_letter(self, seq: int) -> None:
        await self._sql(f"DELETE FROM dead_letters WHERE seq = {self._mark}", (seq,))

    async def ban_of(self, room_id: int, author_id: int, now: str) -> Ban | None:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT ends_at, reason FROM bans WHERE room_id = {m} AND author_id = {m} "
            f"AND (ends_at IS NULL OR ends_at > {m})",
            (room_id, author_id, self._stamp_in(now)))
        if not rows:
            return None
        until = None if rows[0][0] is None else self._stamp_out(rows[0][0])
        return Ban(room_id, author_id, until, rows[0][1])


@attrs.define(eq=False)
class SqliteBackend(_Rooms):
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

    async def _call(self, fn, *args):  # type: ignore[no-untyped-def]
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
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)

    def _insert(self, rows: list[tuple[object, ...]],
                changes: list[tuple[str, tuple[object, ...]]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"INSERT OR IGNORE INTO messages ({_COLUMNS}) "
                f"VALUES ({', '.join('?' * _MARKS)})", rows)
            for sql, args in changes:
                self._db.execute(sql, args)

    async def insert(self, messages: list[Message]) -> None:
        rows = [_message_row(m, m.received_at) for m in messages]
        changes = [_change_sql("?", m) for m in _changes(messages)]
        await self._call(self._insert, rows, changes)

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        assert self._db is not None
        return self._db.execute(sql, args).fetchall()

    async def last_id(self, room_id: int) -> int:
        rows = await self._call(self._query, "SELECT MAX(id) FROM messages WHERE room_id = ?",
                                (room_id,))
        return rows[0][0] or 0

    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]:
        sql, args = _page_sql("?", before=before, after=after, limit=limit,
                              newest_first=newest_first, room_id=room_id)
        rows = await self._call(self._query, sql, tuple(args))
        return [_row_message(row, row[6]) for row in rows]


def _to_datetime(stamp: str) -> datetime:
    # Every stamp is utc_now()'s shape; fromisoformat is ~30x faster than strptime,
    # which was a third of the MySQL write path's CPU.
    return datetime.fromisoformat(stamp.removesuffix("Z"))


def _from_datetime(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@attrs.define(eq=False)
class MysqlBackend(_Rooms):
    """MySQL or MariaDB through aiomysql, over the asyncio bridge.

    Every method is trio-flavoured; the asyncio work is in the ``_aio_*``
    helpers, which only :func:`trio_chat.bridge.call` runs.
    """

    config: DbConfig
    timeout: float = 10.0
    _pool: Any = attrs.field(init=False, default=None)
    _mark = "%s"

    async def _sql(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        async def work(cur: Any) -> tuple[list[tuple[Any, ...]], int]:
            """Asyncio flavour."""
            count = await cur.execute(sql, args)
            return list(await cur.fetchall()), count

        return await self._run(work)

    def _stamp_in(self, stamp: str) -> object:
        return _to_datetime(stamp)

    def _stamp_out(self, value: Any) -> str:
        return _from_datetime(value)

    # aiomysql cannot escape bytes with the PyMySQL it runs on: send base64 text.
    _blob_mark = "FROM_BASE64(%s)"

    def _blob_in(self, data: bytes) -> object:
        return base64.b64encode(data).decode("ascii")

    def _is_name_clash(self, exc: Exception) -> bool:
        return (isinstance(exc, pymysql.IntegrityError) and exc.args[0] == DUPLICATE_KEY
                and "'name'" in str(exc))

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, pymysql.IntegrityError) and exc.args[0] == DUPLICATE_KEY

    def may_refuse(self, exc: Exception) -> bool:
        code = exc.args[0] if isinstance(exc, pymysql.MySQLError) and exc.args else None
        return isinstance(code, int) and code < CLIENT_ERRORS and code not in TRANSIENT_ERRORS

    async def ensure_room(self, room_id: int, created_at: str) -> None:
        await self._sql("INSERT INTO rooms (id, created_at) VALUES (%s, %s) "
                        "ON DUPLICATE KEY UPDATE id = id", (room_id, _to_datetime(created_at)))

    async def _aio_connect(self) -> Any:
        """Asyncio flavour. Create the database if needed, then a connection pool."""
        c = self.config
        conn = await aiomysql.connect(host=c.host, port=c.port, user=c.id, password=c.password,
                                      charset="utf8mb4", autocommit=True,
                                      connect_timeout=self.timeout)
        try:
            async with conn.cursor() as cur:
                # Look first: "IF NOT EXISTS" on an existing database is a warning.
                await cur.execute("SELECT 1 FROM information_schema.SCHEMATA "
                                  "WHERE SCHEMA_NAME = %s", (c.database,))
                if not await cur.fetchall():
                    await cur.execute(f"CREATE DATABASE `{c.database}` "
                                      "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        finally:
            conn.close()
        return await aiomysql.create_pool(host=c.host, port=c.port, user=c.id,
                                          password=c.password, db=c.database,
                                          charset="utf8mb4", autocommit=True, minsize=1,
                                          maxsize=4, connect_timeout=self.timeout,
                                          pool_recycle=3600)

    async def _aio_run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Asyncio flavour. Run ``work(cursor)`` on a pooled connection.

        A connection that failed is closed before it goes back, so the pool
        replaces it: that is how the backend reconnects after an outage.
        """
        async with self._pool.acquire() as conn:
            try:
                async with conn.cursor() as cur:
                    return await work(cur)
            except BaseException:
                conn.close()
                raise

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        # A database that stops answering must fail like one that is gone.
        with trio.fail_after(self.timeout):
            if self._pool is None:
                self._pool = await bridge.call(self._aio_connect)
            return await bridge.call(self._aio_run, work)

    async def _migrate(self, cur: Any) -> int:
        """Asyncio flavour."""
        await cur.execute("SELECT GET_LOCK('trio_chat_migrate', 30)")
        try:
            await cur.execute("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
                              "DATABASE() AND TABLE_NAME = 'schema_version'")
            if not await cur.fetchall():
                await cur.execute("CREATE TABLE schema_version (version INT NOT NULL)")
            await cur.execute("SELECT MAX(version) FROM schema_version")
            current = (await cur.fetchone())[0] or 0
            for version, _, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements["mysql"]:
                    await cur.execute(statement)
                await cur.execute("INSERT INTO schema_version (version) VALUES (%s)",
                                  (version,))
                current = version
            return current
        finally:
            await cur.execute("SELECT RELEASE_LOCK('trio_chat_migrate')")

    async def open(self) -> int:
        """Connect, create the database if needed and migrate; returns the schema version."""
        return await self._run(self._migrate)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            await bridge.call(pool.wait_closed)

    async def insert(self, messages: list[Message]) -> None:
        rows = [_message_row(m, _to_datetime(m.received_at)) for m in messages]
        changes = [_change_sql("%s", m) for m in _changes(messages)]

        async def work(cur: Any) -> None:
            """Asyncio flavour."""
            await cur.execute("BEGIN")
            # Not INSERT IGNORE: it turns duplicates into warnings (and hides real errors).
            await cur.executemany(
                f"INSERT INTO messages ({_COLUMNS}) VALUES ({', '.join(['%s'] * _MARKS)}) "
                "ON DUPLICATE KEY UPDATE id = id", rows)
            for sql, args in changes:
                await cur.execute(sql, args)
            await cur.execute("COMMIT")

        await self._run(work)

    async def _fetch(self, sql: str, args: list[object]) -> list[tuple[Any, ...]]:
        async def work(cur: Any) -> list[tuple[Any, ...]]:
            """Asyncio flavour."""
            await cur.execute(sql, args)
            return list(await cur.fetchall())

        return await self._run(work)

    async def last_id(self, room_id: int) -> int:
        rows = await self._fetch("SELECT MAX(id) FROM messages WHERE room_id = %s", [room_id])
        return int(rows[0][0] or 0)

    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]:
        sql, args = _page_sql("%s", before=before, after=after, limit=limit,
                              newest_first=newest_first, room_id=room_id)
        rows = await self._fetch(sql, args)
        return [_row_message(row, _from_datetime(row[6])) for row in rows]


def make_backend(config: Config) -> Backend:
    """The configured backend: MySQL when a ``db`` section names a host, else SQLite."""
    if config.db is not None:
        return MysqlBackend(config.db)
    return SqliteBackend(config.sqlite.path, "FULL" if config.server.ack_after == "stored"
                         else "NORMAL")
