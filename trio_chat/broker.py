"""Message brokers: who assigns a message its id and hands it to the rooms.

Owns ordering. A room subscribes while it is alive; ``publish`` gives a draft
its id and delivers the accepted message to every subscriber of that room, in
id order. :class:`LocalBroker` is the embedded, single-node broker: the id is
a counter per live room, seeded from the store when the room subscribes, and
delivery is a direct call. It runs no tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from .protocol import Draft, Message, accept, utc_now
from .store import Store

Deliver = Callable[[Message], None]


class Broker(Protocol):
    async def subscribe(self, room_id: int, deliver: Deliver) -> object:
        """Start delivering ``room_id``'s messages to ``deliver``; returns a handle."""

    async def unsubscribe(self, handle: object) -> None: ...

    async def publish(self, draft: Draft) -> Message:
        """Assign an id to ``draft``; the room must have a subscriber on this node."""


@attrs.define(eq=False)
class _LocalRoom:
    last_id: int
    subscribers: list[Deliver]


@attrs.define(eq=False)
class LocalBroker:
    _store: Store
    _rooms: dict[int, _LocalRoom] = attrs.field(init=False, factory=dict)

    async def subscribe(self, room_id: int, deliver: Deliver) -> object:
        room = self._rooms.get(room_id)
        if room is None:
            last_id = await self._store.last_id(room_id)
            # Another subscriber may have arrived while we read the store.
            room = self._rooms.setdefault(room_id, _LocalRoom(last_id, []))
        room.subscribers.append(deliver)
        return (room_id, deliver)

    async def unsubscribe(self, handle: object) -> None:
        room_id, deliver = handle  # type: ignore[misc]
        room = self._rooms.get(room_id)
        if room is not None:
            room.subscribers.remove(deliver)
            if not room.subscribers:
                del self._rooms[room_id]

    async def publish(self, draft: Draft) -> Message:
        room = self._rooms[draft.room_id]
        room.last_id += 1
        message = accept(draft, room.last_id, utc_now())
        for deliver in room.subscribers:
            deliver(message)
        return message
