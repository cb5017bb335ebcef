"""Who is online: this node's connections per room and author, kept registered
with the broker so that every node sees the same members (:class:`Presence`).

Its task (:meth:`Presence.run`) runs in the hub's nursery beside the rooms. It
is a failure boundary: an update that fails is retried, never fatal to the node.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import attrs
import trio

from .broker import Broker, BrokerUnavailable
from .metrics import Metrics

# Presence retries an update that failed unexpectedly after 1 s, doubling up to this.
PRESENCE_BACKOFF_MAX = 60.0

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Presence:
    """This node's share of who is online: connections per (room, author), kept
    registered with the broker.

    :meth:`add` and :meth:`remove` only count; :meth:`run` sends the changes,
    coalesced (an author who comes and goes between two updates is never
    announced), and every ``ttl / 3`` seconds re-registers every entry of this
    node, which also purges the expired entries of nodes that died. When the
    broker is unreachable it retries every second, re-registering everything
    once it answers. Any other failure (a bug, a broker answering nonsense) is
    logged with its traceback, counted, and retried the same way after a
    backoff (1 s, doubling up to ``PRESENCE_BACKOFF_MAX``).
    """

    _broker: Broker
    _metrics: Metrics
    # The rooms alive on this node: refreshed even without an author here, so a
    # dead node's entries are purged (and announced) while anyone is listening.
    _live_rooms: Callable[[], Iterable[int]]
    ttl: float = 30.0
    _local: dict[int, Counter[int]] = attrs.field(init=False, factory=dict)
    _registered: dict[int, frozenset[int]] = attrs.field(init=False, factory=dict)
    _dirty: set[int] = attrs.field(init=False, factory=set)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _full: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        # Redis may have lost every entry (a restart): register them all again.
        self._broker.on_reconnect(self.refresh_soon)

    def refresh_soon(self) -> None:
        """Re-register every entry of this node at the next wake-up."""
        self._full = True
        self._wake.set()

    def add(self, room_id: int, author_id: int) -> None:
        authors = self._local.setdefault(room_id, Counter())
        authors[author_id] += 1
        if authors[author_id] == 1:
            self._changed(room_id)

    def remove(self, room_id: int, author_id: int) -> None:
        authors = self._local[room_id]
        authors[author_id] -= 1
        if not authors[author_id]:
            del authors[author_id]
            if not authors:
                del self._local[room_id]
            self._changed(room_id)

    def _changed(self, room_id: int) -> None:
        self._dirty.add(room_id)
        self._wake.set()

    @property
    def entries(self) -> int:
        """(room, author) pairs with a connection on this node."""
        return sum(len(authors) for authors in self._local.values())

    async def members(self, room_id: int) -> list[int]:
        """The authors online in ``room_id`` on every node."""
        return await self._broker.presence(room_id, (), (), self.ttl)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        refresh_at = trio.current_time() + self.ttl / 3
        backoff = 1.0
        while True:
            with trio.move_on_at(refresh_at):
                await self._wake.wait()
            self._wake = trio.Event()
            full, self._full = self._full or trio.current_time() >= refresh_at, False
            if full:
                refresh_at = trio.current_time() + self.ttl / 3
            try:
                await self._sync(full)
            except BrokerUnavailable as exc:
                self._metrics.presence_failures += 1
                log.debug("presence update failed: %s", exc)
                await trio.sleep(1)
                self.refresh_soon()
            except Exception:
                self._metrics.unexpected("presence_failures", log, "presence update failed; "
                                         "retrying in %gs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, PRESENCE_BACKOFF_MAX)
                self.refresh_soon()
            else:
                backoff = 1.0

    async def flush(self) -> None:
        """Send what changed now (graceful shutdown: withdraw before exiting)."""
        await self._sync(full=False)

    async def _sync(self, full: bool) -> None:
        async with self._lock:
            rooms = set(self._dirty)
            if full:
                rooms.update(self._registered, self._live_rooms())
            for room_id in rooms:
                self._dirty.discard(room_id)
                want = frozenset(self._local.get(room_id, ()))
                had = self._registered.get(room_id, frozenset())
                add, remove = (want if full else want - had), had - want
                if not (full or add or remove):
                    continue
                try:
                    await self._broker.presence(room_id, add, remove, self.ttl)
                except BaseException:
                    self._dirty.add(room_id)
                    raise
                if want:
                    self._registered[room_id] = want
                else:
                    self._registered.pop(room_id, None)
