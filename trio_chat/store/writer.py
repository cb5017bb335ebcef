"""The write-behind :class:`Store`: what the rest of the server sees of persistence.

Owns the buffer of accepted messages not yet committed and who waits for which
(:class:`Outcome`). ``append`` never waits; one writer task,
:meth:`Store.run`, moves messages to the backend in batches, and reads merge
what is still buffered. Rooms, bans and media go straight through to the
backend, in :class:`~.repository.Repository`.

Failure boundary: the writer. A backend that is down is retried with backoff;
a message it refuses while it answers becomes a dead letter, so every other
message is written (see :class:`Store`).
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from ..metrics import Metrics
from ..protocol import Message, apply_change, utc_now
from .backend import Backend, StoreUnavailable
from .schema import changes_in

T = TypeVar("T")

log = logging.getLogger(__name__)


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
    # message.held_bytes, counted in Store.lag_bytes while the entry is buffered.
    size: int = 0
    # Called once, in acceptance order, when the message's fate is known.
    settle: Settle | None = None
    deadline: float = 0.0
    done: bool = False
    # When it was accepted here (time.monotonic), for the write lag histogram; None for
    # another node's orphans, whose lag this node does not know.
    appended: float | None = None


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
    # The buffer's bound in bytes (Message.held_bytes), besides buffer_limit's count.
    buffer_bytes: int = 64 * 1024 * 1024
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
    _lag_bytes: int = attrs.field(init=False, default=0)

    @property
    def backend(self) -> Backend:
        """Rooms and bans are read and written straight through."""
        return self._backend

    @property
    def lag(self) -> int:
        """Messages accepted but not yet in the backend."""
        return len(self._pending) + len(self._inflight)

    @property
    def lag_bytes(self) -> int:
        """What the messages not yet in the backend hold in memory, about."""
        return self._lag_bytes

    @property
    def outage_seconds(self) -> float:
        """How long writes have been failing (0 while they succeed)."""
        if self.failing_since is None:
            return 0.0
        return trio.current_time() - self.failing_since

    def check_capacity(self) -> None:
        """Raise :class:`StoreUnavailable` if the buffer is full, or while writes fail
        and the outage policy refuses; call before publishing."""
        if self.lag >= self.buffer_limit or self._lag_bytes >= self.buffer_bytes or \
                (self.refuse_when_failing and self._settle_now):
            self._metrics.store_refusals += 1
            raise StoreUnavailable("message history is unavailable; message not accepted")

    def append(self, message: Message, settle: Settle | None = None) -> None:
        """Queue an accepted ``message`` for writing; never waits, never refuses.

        ``settle`` is called once with the message's :class:`Outcome`, in the
        order messages were appended. The gate is :meth:`check_capacity` before
        publishing, so the buffer can exceed its limit only by the publishes in
        flight at that moment.
        """
        entry = _Entry(message, message.held_bytes, appended=time.monotonic())
        self._lag_bytes += entry.size
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
                self._lag_bytes -= sum(e.size for e in self._inflight if e.done)
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
            self._lag_bytes -= sum(e.size for e in written)
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
        now = time.monotonic()
        for entry in entries:
            entry.done = True
            if entry.appended is not None:
                self._metrics.store_write_lag.observe(now - entry.appended)
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
        changes = changes_in(buffered)
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
        self._lag_bytes -= sum(e.size for e in dropped)
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
