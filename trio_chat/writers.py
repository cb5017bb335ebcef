"""The tasks that write for every WebSocket connection, and their bounds.

Owns :class:`Limits` (every connection's bounds and timers, from the
configuration) and :class:`Writers`, whose nursery (:meth:`Writers.run`, under
the server's root) holds the flusher task (hands each large room's pending
frames to a slice of its members per pass, see :meth:`trio_chat.room.Room.flush`,
then writes each connection's queue with one ``os.write``, then lets the other
tasks run before its next pass), the heartbeat (this task: pings every
connection once per ``pingPeriod``, closes those whose pong is late or whose
token expired) and one writer task per connection whose socket is full
(:meth:`trio_chat.websocket.WebSocket._write_blocked`, which contains that
connection's write failures). It also holds the server-wide budgets a
connection draws on (large inbound messages, and what is read and queued per
address) and the permessage-deflate compressors every compressing connection
shares.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from .budget import ByteBudget
from .deflate import Deflaters
from .framing import LargeFrames


class WebSocket(Protocol):
    """What the writers need of a connection's transport
    (:class:`trio_chat.websocket.WebSocket`), named here so this module does not
    import the one that imports it."""

    def _beat(self, now: float) -> None: ...

    def _flush(self) -> None: ...

    async def _write_blocked(self) -> None: ...


class PendingRoom(Protocol):
    """A large room with frames waiting for the flusher (:class:`trio_chat.room.Room`)."""

    def flush(self) -> bool:
        """Hand pending frames to a slice of the members; contains its own failures.
        True if there is more to hand out (the flusher comes back after a checkpoint)."""


@attrs.frozen
class Limits:
    """Every connection's bounds and timers, from the server's configuration."""

    max_message_bytes: int
    # A chat_img data URL may make a message this large (within the large-frame budget).
    large_message_bytes: int
    queue_frames: int
    queue_bytes: int
    write_wait: float
    ping_period: float
    pong_wait: float
    close_timeout: float


@attrs.define(eq=False)
class Writers:
    """The tasks that write for every connection: the flusher, the heartbeat, and
    a writer for each connection whose socket is full, in one nursery."""

    limits: Limits
    # Server-wide: the bytes of messages over max_message_bytes being read or handled.
    large: LargeFrames = attrs.field(factory=lambda: LargeFrames(0))
    # Per address and server-wide: the bytes of outbound queues (see WebSocket._reserve).
    outbound: ByteBudget = attrs.field(factory=lambda: ByteBudget(1 << 40, 1 << 40))
    # Per address and server-wide: the bytes readers hold (see framing.FrameReader).
    inbound: ByteBudget = attrs.field(factory=lambda: ByteBudget(1 << 40, 1 << 40))
    # The compressors of permessage-deflate connections, one per window size.
    deflaters: Deflaters = attrs.field(factory=Deflaters)
    _sockets: set[WebSocket] = attrs.field(init=False, factory=set)
    _rooms: list[PendingRoom] = attrs.field(init=False, factory=list)
    _dirty: list[WebSocket] = attrs.field(init=False, factory=list)
    # The flusher while it waits for something to flush.
    _parked: trio.lowlevel.Task | None = attrs.field(init=False, default=None)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the flusher and, in this task, the heartbeat, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            task_status.started()
            # One timer for all connections; each is pinged at its own time, within a tick.
            tick = self.tick
            while True:
                await trio.sleep(tick)
                now = trio.current_time()
                for ws in self._sockets:
                    ws._beat(now)

    @property
    def tick(self) -> float:
        """How often the heartbeat looks at every connection."""
        limits = self.limits
        return min(1.0, limits.ping_period / 10, limits.pong_wait / 10)

    def add(self, ws: WebSocket) -> None:
        self._sockets.add(ws)

    def discard(self, ws: WebSocket) -> None:
        self._sockets.discard(ws)

    def flush_soon(self, ws: WebSocket) -> None:
        self._dirty.append(ws)
        self._wake()

    def flush_room_soon(self, room: PendingRoom) -> None:
        """``room`` has frames pending: flush them in the flusher's next pass (the room
        asks once per pass)."""
        self._rooms.append(room)
        self._wake()

    def _wake(self) -> None:
        task, self._parked = self._parked, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def start_writer(self, ws: WebSocket) -> None:
        assert self._nursery is not None, "Writers.run is not running"
        self._nursery.start_soon(ws._write_blocked)

    async def _flusher(self) -> None:
        while True:
            if not self._dirty and not self._rooms:
                self._parked = trio.lowlevel.current_task()

                def abort(_: object) -> trio.lowlevel.Abort:
                    self._parked = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            rooms, self._rooms = self._rooms, []
            for room in rooms:
                if room.flush():
                    self._rooms.append(room)
            # The rooms first: a member that could not take a flush at once is written
            # in this same pass.
            dirty, self._dirty = self._dirty, []
            for ws in dirty:
                ws._flush()
            # Let the tasks that queued run before the next round.
            await trio.lowlevel.checkpoint()
