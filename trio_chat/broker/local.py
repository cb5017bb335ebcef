"""The embedded, single-node broker: :class:`LocalBroker`.

The id is a counter per live room, seeded from the store, and delivery is a
direct call. Its one task, :meth:`LocalBroker.run`, is short: it loads the
client_msg_ids sent within the idempotency window before this start, retrying
(with backoff) while the store cannot be read, and returns.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any

import attrs
import trio

from ..outbound import presence_event
from ..protocol import Draft, Message, accept, utc_after, utc_now
from ..store import Store, StoreUnavailable
from .base import Subscriber, sent_to_store

log = logging.getLogger(__name__)


def _epoch_seconds(stamp: str) -> float:
    """Seconds since the epoch of a :func:`utc_now` stamp."""
    return datetime.fromisoformat(stamp.removesuffix("Z")).replace(
        tzinfo=timezone.utc).timestamp()



@attrs.define(eq=False)
class _LocalRoom:
    last_id: int
    subscribers: list[Subscriber]


@attrs.define(eq=False)
class LocalBroker:
    _store: Store
    # Seconds a client_msg_id is remembered (server.idempotencyWindow).
    idempotency_window: float = 600.0
    durable_on_publish = False
    _rooms: dict[int, _LocalRoom] = attrs.field(init=False, factory=dict)
    _online: dict[int, set[int]] = attrs.field(init=False, factory=dict)
    _sent: dict[tuple[int, int, str], Message] = attrs.field(init=False, factory=dict)
    _sent_order: deque[tuple[float, tuple[int, int, str]]] = attrs.field(init=False,
                                                                         factory=deque)
    # At most this many ids, and messages of this many bytes (Message.held_bytes), are
    # held in memory; older ones within the window are looked up in the store.
    sent_limit: int = 100_000
    sent_bytes_limit: int = 32 * 1024 * 1024
    _sent_bytes: int = attrs.field(init=False, default=0)
    # Set once the ids sent within the window before this process started are in
    # memory (run() reads them from the store); until then the store is asked.
    loaded: trio.Event = attrs.field(init=False, factory=trio.Event)
    # Until then, an id not in memory may have been dropped for sent_limit.
    _evicted_until: float = attrs.field(init=False, default=-math.inf)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Read the ids sent within the idempotency window before this start into memory,
        in the background, retrying while the store cannot be read; then return.

        So after a restart a resend is recognised without asking the store per frame,
        and keeps being recognised while the store is down."""
        task_status.started()
        delay = 0.1
        while True:
            try:
                sent = await self._store.sent_since(utc_after(-self.idempotency_window),
                                                    self.sent_limit)
                break
            except StoreUnavailable as exc:
                log.warning("cannot load recent client_msg_ids yet: %s", exc)
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        now, wall = time.monotonic(), time.time()
        loaded = []
        for message in sent:
            key = (message.room_id, message.author_id, message.client_msg_id or "")
            if key not in self._sent:
                age = wall - _epoch_seconds(message.received_at)
                loaded.append((now + self.idempotency_window - age, key, message))
        # Older than anything remembered since the start: they go first in expiry order.
        for expires, key, message in sorted(loaded, key=lambda item: item[0], reverse=True):
            self._sent[key] = message
            self._sent_bytes += message.held_bytes
            self._sent_order.appendleft((expires, key))
        if len(sent) >= self.sent_limit:
            self._evicted_until = time.monotonic() + self.idempotency_window
        self._trim_sent()
        self.loaded.set()
        log.debug("loaded %d client_msg_ids of the last %gs", len(loaded),
                  self.idempotency_window)

    async def sent_before(self, draft: Draft) -> Message | None:
        now = time.monotonic()
        while self._sent_order and self._sent_order[0][0] <= now:
            self._drop_sent(self._sent_order.popleft()[1])
        assert draft.author_id is not None and draft.client_msg_id is not None
        key = (draft.room_id, draft.author_id, draft.client_msg_id)
        sent = self._sent.get(key)
        if sent is None and (not self.loaded.is_set() or now < self._evicted_until):
            # Sent before this process started and not loaded yet, or dropped from
            # memory: only the store knows (StoreUnavailable if it cannot say).
            sent = await sent_to_store(self._store, draft, self.idempotency_window)
        return sent

    def _remember_sent(self, message: Message) -> None:
        assert message.client_msg_id is not None
        key = (message.room_id, message.author_id, message.client_msg_id)
        self._drop_sent(key)
        self._sent[key] = message
        self._sent_bytes += message.held_bytes
        self._sent_order.append((time.monotonic() + self.idempotency_window, key))
        self._trim_sent()

    def _drop_sent(self, key: tuple[int, int, str]) -> None:
        message = self._sent.pop(key, None)
        if message is not None:
            self._sent_bytes -= message.held_bytes

    def _trim_sent(self) -> None:
        while self._sent_order and (len(self._sent_order) > self.sent_limit or
                                    self._sent_bytes > self.sent_bytes_limit):
            expires, dropped = self._sent_order.popleft()
            self._drop_sent(dropped)
            self._evicted_until = max(self._evicted_until, expires)

    @property
    def sent_bytes(self) -> int:
        """What the remembered client_msg_ids' messages hold, about."""
        return self._sent_bytes

    def forget_sent(self, message: Message) -> None:
        if message.client_msg_id is not None:
            key = (message.room_id, message.author_id, message.client_msg_id)
            if self._sent.get(key) is message:
                self._drop_sent(key)

    async def subscribe(self, room_id: int, subscriber: Subscriber) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            last_id = await self._store.last_id(room_id)
            # Another subscriber may have arrived while we read the store.
            room = self._rooms.setdefault(room_id, _LocalRoom(last_id, []))
        room.subscribers.append(subscriber)

    async def unsubscribe(self, room_id: int, subscriber: Subscriber) -> None:
        room = self._rooms.get(room_id)
        if room is not None:
            room.subscribers.remove(subscriber)
            if not room.subscribers:
                del self._rooms[room_id]

    async def tail(self, room_id: int, limit: int) -> tuple[list[Message], int]:
        return await self._store.recent(room_id, limit), self._rooms[room_id].last_id

    async def history(self, room_id: int, after: int, before: int) -> list[Message]:
        return await self._store.page(room_id, after=after, before=before,
                                      limit=max(0, before - after - 1), newest_first=False)

    async def publish(self, draft: Draft, target: Message | None = None, *,
                      deliver: bool = True) -> tuple[Message, bool]:
        if draft.client_msg_id is not None:
            sent = await self.sent_before(draft)
            if sent is not None:
                return sent, False
        room = self._rooms[draft.room_id]
        room.last_id += 1
        message = accept(draft, room.last_id, utc_now())
        if message.client_msg_id is not None:
            self._remember_sent(message)
        if deliver:
            self.deliver(message)
        return message, True

    def deliver(self, message: Message) -> None:
        room = self._rooms.get(message.room_id)
        for subscriber in room.subscribers if room is not None else ():
            subscriber.deliver(message)

    async def event(self, room_id: int, text: str) -> None:
        room = self._rooms.get(room_id)
        for subscriber in room.subscribers if room is not None else ():
            subscriber.deliver_event(text)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        pass  # it never loses a connection

    async def forget(self, room_id: int) -> None:
        pass  # it keeps nothing beyond a live room's counter

    async def control(self, room_id: int, command: dict[str, Any]) -> None:
        room = self._rooms.get(room_id)
        for subscriber in list(room.subscribers) if room is not None else ():
            subscriber.control(command)

    async def presence(self, room_id: int, add: Collection[int], remove: Collection[int],
                       ttl: float) -> list[int]:
        # One node: its own entries are all there is, and they never outlive it.
        online = self._online.setdefault(room_id, set())
        events = []
        for author_id in remove:
            if author_id in online:
                online.discard(author_id)
                events.append(presence_event("chat_exit", room_id, author_id, len(online),
                                             utc_now()))
        for author_id in add:
            if author_id not in online:
                online.add(author_id)
                events.append(presence_event("chat_enter", room_id, author_id, len(online),
                                             utc_now()))
        if not online:
            del self._online[room_id]
        room = self._rooms.get(room_id)
        if room is not None:
            for text in events:
                for subscriber in room.subscribers:
                    subscriber.deliver_event(text)
        return sorted(online)
