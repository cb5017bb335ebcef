"""The hub (the seed's Hub, LINE's ChatSupervisor): which rooms are alive, who is connected.

Owns the registry of live rooms and open connections, who is online in each
room, and the nursery the rooms run in (:meth:`Hub.run`). A room is created
when its first member joins and removed from the registry the moment its last
member leaves, so a new joiner never lands in a room that is shutting down.

One room is a failure boundary. If its start fails (the store or the broker
cannot be reached, or a bug), the joiner starting it and every joiner waiting
for it are refused (:class:`RoomUnavailable`; their connections close with
1013) and the room is dropped from the registry, so the next joiner starts it
afresh. If it fails once started, the error is logged with its traceback and
counted (``room_failures``), its members are closed with 1011 and the room is
dropped: never restarted, the next joiner starts it afresh.

Presence (:class:`trio_chat.presence.Presence`) counts this node's connections per author and
room and keeps the broker's registry, shared by every node, in step: an author
is online in a room while any node has a connection of theirs there. Its task
runs in the hub's nursery beside the rooms, and is a failure boundary too: an
update that fails is retried, never fatal to the node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import attrs
import trio

from .auth import IdentityRates
from .broker import Broker
from .config import MediaConfig
from .flush import Flush
from .framing import INTERNAL_ERROR
from .media import attach_image
from .metrics import Metrics
from .outbound import typing_event
from .presence import Presence
from .protocol import INT64_MAX, Draft, Message, check_change, utc_now
from .room import Member, Room
from .store import Ban, Outcome, Repository, Store, StoreUnavailable

ENSURED_FOR = 60.0
ENSURED_MAX = 100_000

log = logging.getLogger(__name__)

# Told what became of a published message: (the message, its outcome).
Settled = Callable[[Message, Outcome], None]


class RoomUnavailable(Exception):
    """The room failed to start on this node; joining may succeed later."""


class Connection(Member, Protocol):
    def close(self, code: int, reason: str) -> None: ...

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to be sent to this connection, frames held back included."""


@attrs.define(eq=False)
class Hub:
    _store: Store
    _repository: Repository
    _broker: Broker
    _metrics: Metrics
    _history_size: int
    _replay_limit: int
    rooms: dict[int, Room] = attrs.field(init=False, factory=dict)
    presence_ttl: float = 30.0
    # "auto": a room joined for the first time is created (the seed's way).
    room_policy: str = "auto"
    media: MediaConfig = attrs.field(factory=MediaConfig)
    # server.ackAfter is "stored": a message is acked (and, where the broker is not
    # durable on publish, delivered) once it is durable.
    ack_after_stored: bool = True
    # The recent messages a live room keeps, in bytes; messages a replay reads at a time.
    history_bytes: int = 1024 * 1024
    replay_page: int = 16
    # Message rates per identity, shared by its connections (None: not limited).
    identity_rates: IdentityRates | None = None
    # Asks the server's flusher to flush a large room soon (Writers.flush_room_soon;
    # None: a large room flushes every frame at once).
    schedule_flush: Callable[[Room], None] | None = None
    connections: set[Connection] = attrs.field(init=False, factory=set)
    presence: Presence = attrs.field(init=False)
    # Rooms this node made sure exist (auto policy), and when: a room that empties and
    # fills again often (churn) costs no write each time. Another node's deletion is
    # seen once the entry is ENSURED_FOR old: until then a join here does not bring
    # the room back (messages never create rooms).
    _ensured: dict[int, float] = attrs.field(init=False, factory=dict)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.presence = Presence(self._broker, self._metrics, self.rooms.keys,
                                 self.presence_ttl)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hold the rooms' nursery open, with the presence task in it, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.presence.run)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def check_soon(self, check: Callable[[], Awaitable[object]]) -> None:
        """Run ``check``, a short look at the store for one connection, in the rooms'
        nursery: its connection goes on meanwhile. ``check`` must contain its own
        failures: one that raised would end every room."""
        assert self._nursery is not None, "Hub.run is not running"
        self._nursery.start_soon(check)

    async def join(self, room_id: int, member: Member, since: int | None = None) -> Room:
        """Add ``member`` to ``room_id``, starting the room if it is not alive.

        ``since`` resumes after that message id (see :meth:`Room.join`).
        """
        live = self.rooms.get(room_id)
        if self.room_policy == "auto" and live is not None and live.ready.is_set() and \
                room_id not in self._ensured:
            # Deleted through the API while still closing here (forget_room): joining
            # makes it exist again, as it would a room alive nowhere.
            await self._ensure_room(room_id)
        room = self.rooms.get(room_id)
        if room is None:
            room = await self._start_room(room_id)
        elif not room.ready.is_set():
            await room.ready.wait()
            if room.failed is not None:
                raise RoomUnavailable(f"room {room_id} failed to start: {room.failed!r}"
                                      ) from room.failed
        try:
            await room.join(member, since)
        except BaseException:
            self._leave_room(room, member)
            raise
        if member.author_id is not None:
            self.presence.add(room_id, member.author_id)
        return room

    async def _start_room(self, room_id: int) -> Room:
        assert self._nursery is not None, "Hub.run is not running"
        room = Room(room_id, self._broker, self._metrics, self._history_size,
                    self._replay_limit, self.history_bytes, self.replay_page,
                    self.schedule_flush)
        self.rooms[room_id] = room
        try:
            if self.room_policy == "auto":
                await self._ensure_room(room_id)
            await self._nursery.start(self._run_room, room)
        except BaseException as exc:
            # Joiners waiting for the room fail with it (cancelled too: the room will
            # never be ready); the next joiner starts it afresh.
            room.failed = exc
            room.ready.set()
            if self.rooms.get(room_id) is room:
                del self.rooms[room_id]
            raise
        return room

    async def _run_room(self, room: Room, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """``room``'s task in the rooms' nursery: once started, its failure is its own."""
        try:
            await room.run(task_status=task_status)
        except Exception:
            if not room.ready.is_set():
                raise  # not started: the joiner starting it hears of it (_start_room)
            self._metrics.unexpected("room_failures", log, "room %d failed; closing its %d "
                                     "members with 1011", room.id, len(room.members))
            if self.rooms.get(room.id) is room:
                del self.rooms[room.id]
            for member in list(room.members):
                member.close(INTERNAL_ERROR, "room failed; join again")

    async def _ensure_room(self, room_id: int) -> None:
        now = trio.current_time()
        if now - self._ensured.get(room_id, -math.inf) < ENSURED_FOR:
            return
        await self._repository.ensure_room(room_id, utc_now())
        if len(self._ensured) >= ENSURED_MAX:
            self._ensured.clear()
        self._ensured[room_id] = now

    def forget_room(self, room_id: int) -> None:
        """``room_id`` was deleted: the next join creates it again (auto policy), even
        while the room is still alive here."""
        self._ensured.pop(room_id, None)

    def identify(self, room: Room, member: Member, author_id: int) -> None:
        """``member``, in ``room`` and not yet known, turns out to be ``author_id``."""
        member.author_id = author_id
        self.presence.add(room.id, author_id)

    def leave(self, room: Room, member: Member) -> None:
        if member.author_id is not None:
            self.presence.remove(room.id, member.author_id)
        self._leave_room(room, member)

    def _leave_room(self, room: Room, member: Member) -> None:
        if room.leave(member) and self.rooms.get(room.id) is room:
            del self.rooms[room.id]

    async def publish(self, draft: Draft, target: Message | None = None,
                      settled: Settled | None = None) -> tuple[Message, bool]:
        """Accept ``draft``: the broker gives it an id and delivers it, the store keeps it.

        Returns the message and whether it is new (see :meth:`Broker.publish`: a
        resent client_msg_id gives back the message sent before). A chat_img's
        image is validated and stored first (:class:`FrameError` if refused). ``target`` is
        the message a change changes, as :meth:`message` found it.

        ``settled(message, outcome)`` is called once the message is durable (or
        cannot be yet, or was refused: see :class:`Outcome`), at once where it is
        durable on publish. With ``ack_after_stored`` and a broker that is not, the
        room's members get the message only then too, so nobody sees a message
        that a crash could still take back.
        """
        self._store.check_capacity()
        if draft.message_type == "chat_img" and draft.image is None:
            # A resend must not store its image again.
            if draft.client_msg_id is not None and \
                    (sent := await self._broker.sent_before(draft)) is not None:
                self._duplicate(sent, settled)
                return sent, False
            # Stored once, here; what is published is a reference to it.
            draft = await attach_image(self._repository, self.media, draft)
        durable_on_publish = self._broker.durable_on_publish
        wait = self.ack_after_stored and not durable_on_publish
        message, fresh = await self._broker.publish(draft, target, deliver=not wait)
        if not fresh:
            self._duplicate(message, settled)
            return message, False
        self._metrics.messages_received += 1
        if wait:
            self._store.append(message, partial(self._settled, message, settled))
        else:
            self._store.append(message)
            if settled is not None:
                settled(message, Outcome.STORED if durable_on_publish else Outcome.BUFFERED)
        return message, True

    def _duplicate(self, message: Message, settled: Settled | None) -> None:
        self._metrics.duplicates += 1
        if settled is None:
            return
        if self._broker.durable_on_publish:
            settled(message, Outcome.STORED)
        else:
            # Acked when the first copy is settled, with what became of it.
            self._store.when_settled(message, partial(settled, message))

    def _settled(self, message: Message, settled: Settled | None, outcome: Outcome) -> None:
        if outcome is Outcome.REFUSED:
            self._broker.forget_sent(message)
        else:
            self._broker.deliver(message)
        if settled is not None:
            settled(message, outcome)

    async def message(self, room_id: int, message_id: int) -> Message | None:
        """Message ``message_id`` of ``room_id`` as it is now (edits applied), if any."""
        if not 0 < message_id < INT64_MAX:
            return None  # ids start at 1; the bounds below must stay in the int64 range
        found = await self._broker.history(room_id, after=message_id - 1,
                                           before=message_id + 1)
        return found[0] if found else None

    async def typing(self, room_id: int, author_id: int) -> None:
        """Tell the room's members on every node that ``author_id`` is typing."""
        await self._broker.event(room_id, typing_event(room_id, author_id, utc_now()))

    async def ban_of(self, room_id: int, author_id: int) -> Ban | None:
        """The ban in force for ``author_id`` in ``room_id``, if any."""
        return await self._repository.ban_of(room_id, author_id, utc_now())

    async def announce(self, draft: Draft) -> Message:
        """Publish ``draft`` for the server itself (the HTTP API), opening the room here
        for the moment if it is not alive on this node.

        A change (an operator's edit or delete) is checked against the message it
        changes, which raises :class:`FrameError` to refuse it, and is made in
        that message's author's name.
        """
        announcer = _Announcer()
        room = await self.join(draft.room_id, announcer)
        try:
            target = None
            if draft.target_id is not None:
                target = await self.message(draft.room_id, draft.target_id)
                check_change(target, draft, None, admin=True)
                assert target is not None
                draft = attrs.evolve(draft, author_id=target.author_id, moderated=True)
            done = trio.Event()
            outcomes: list[Outcome] = []

            def settled(message: Message, outcome: Outcome) -> None:
                outcomes.append(outcome)
                done.set()

            message, _ = await self.publish(draft, target, settled)
            # The store's watchdog settles every message within its wait.
            with trio.move_on_after(3 * self._store.wait + 1):
                await done.wait()
            if outcomes == [Outcome.REFUSED]:
                raise StoreUnavailable(f"the history store refused message {message.id}; it "
                                       "is kept with the dead letters")
            return message
        finally:
            self.leave(room, announcer)

    def close_all(self, code: int, reason: str) -> None:
        for connection in list(self.connections):
            connection.close(code, reason)


@attrs.define(eq=False)
class _Announcer:
    """A member that receives nothing: the server, publishing through the HTTP API."""

    author_id: int | None = None

    def send_frame(self, frame: bytes) -> None:
        pass

    def send_flush(self, flush: Flush) -> None:
        pass

    async def send_history(self, frames: list[bytes]) -> None:
        pass

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass
