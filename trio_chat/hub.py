"""The hub (the seed's Hub, LINE's ChatSupervisor): which rooms are alive, who is connected.

Owns the registry of live rooms and open connections, and the nursery the
rooms run in (:meth:`Hub.run`). A room is created when its first member
joins and removed from the registry the moment its last member leaves, so a
new joiner never lands in a room that is shutting down.
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from .broker import Broker
from .metrics import Metrics
from .protocol import Draft, Message
from .room import Member, Room
from .store import Store

log = logging.getLogger(__name__)


class Connection(Member, Protocol):
    def close(self, code: int, reason: str) -> None: ...


@attrs.define(eq=False)
class Hub:
    _store: Store
    _broker: Broker
    _metrics: Metrics
    _history_size: int
    _replay_limit: int
    rooms: dict[int, Room] = attrs.field(init=False, factory=dict)
    connections: set[Connection] = attrs.field(init=False, factory=set)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hold the rooms' nursery open until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def join(self, room_id: int, member: Member, since: int | None = None) -> Room:
        """Add ``member`` to ``room_id``, starting the room if it is not alive.

        ``since`` resumes after that message id (see :meth:`Room.join`).
        """
        room = self.rooms.get(room_id)
        if room is None:
            assert self._nursery is not None, "Hub.run is not running"
            room = Room(room_id, self._broker, self._metrics, self._history_size,
                        self._replay_limit)
            self.rooms[room_id] = room
            try:
                await self._nursery.start(room.run)
            except BaseException:
                if self.rooms.get(room_id) is room:
                    del self.rooms[room_id]
                raise
        elif not room.ready.is_set():
            await room.ready.wait()
            if room.failed is not None:
                raise RuntimeError(f"room {room_id} failed to start") from room.failed
        try:
            await room.join(member, since)
        except BaseException:
            self.leave(room, member)
            raise
        return room

    def leave(self, room: Room, member: Member) -> None:
        if room.leave(member) and self.rooms.get(room.id) is room:
            del self.rooms[room.id]

    async def publish(self, draft: Draft) -> Message:
        """Accept ``draft``: the broker gives it an id and delivers it, the store keeps it."""
        self._store.check_capacity()
        message = await self._broker.publish(draft)
        self._store.append(message)
        self._metrics.messages_received += 1
        return message

    def close_all(self, code: int, reason: str) -> None:
        for connection in list(self.connections):
            connection.close(code, reason)
