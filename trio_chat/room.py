"""A chat room (the seed's Room, LINE's ChatRoomActor): members, recent history, fan-out.

Owns one room's live state while it has members, and the history a member
gets on joining or resuming: the recent messages are bounded in count
(``server.historyOnJoin``) and in bytes (``server.historyBytes``), and history
is handed to a member in pages it takes at its socket's pace, never built whole
(see :meth:`Room.join`). Its one task,
:meth:`Room.run`, is the room's lifetime: it subscribes to the broker, loads
the recent history, reports ready, and waits until the last member leaves;
cancelling it unsubscribes; if it fails, the hub ends this room alone (see
trio_chat/hub.py). Fan-out (:meth:`Room.deliver`) is synchronous: a
message is encoded and framed once, and the same bytes are written or queued
for every member without waiting for any of them.

A room of up to :data:`WRITE_NOW_MEMBERS` members writes each frame to each
member at once. A larger one keeps the frames that not every member has yet
once, in order (at most :data:`PENDING_BYTES`), and has the server's flusher
call :meth:`Room.flush`: each call hands the next :data:`FLUSH_SLICE` members
that are behind everything they have not had, as one
:class:`~trio_chat.flush.Flush` shared by every member that was as far behind,
and the flusher lets the other tasks run between two calls. A member costs one
step and one write per visit, however many messages it carries; frames that
arrive while the flusher goes round reach the members it has not visited yet
in the same visit, and only those it had visited need another. The first frame
of a burst asks the flusher at once, so a lone message waits for no timer, the
batching comes from load, and the event loop never waits for a whole room of
thousands at once. A flush is this room's failure
boundary: an error in it (a bug) is logged by the hub with its traceback,
counted in ``room_failures`` and ends this room alone, its members closed
with 1011, as if :meth:`Room.run` had failed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs
import trio

from .broker import Broker
from .flush import Flush
from .framing import text_frame
from .metrics import Metrics
from .outbound import encode_event, message_frame
from .protocol import Message, apply_change
from .store import StoreUnavailable

# Up to this many members a fan-out writes each frame at once where the member's
# writer is idle; above it, frames wait in the room for the flusher, which batches.
WRITE_NOW_MEMBERS = 64
# A large room's pending frames are handed to every member at once past this many bytes.
PENDING_BYTES = 64 * 1024
# Members visited per call of the flusher: at about 10 µs each (nearly all of it the
# socket's write), a few milliseconds of the event loop at a time.
FLUSH_SLICE = 256

log = logging.getLogger(__name__)


class Member(Protocol):
    # Who this member is, once known (from the upgrade URL or the first message).
    author_id: int | None

    def send_frame(self, frame: bytes) -> None: ...

    def send_flush(self, flush: Flush) -> None:
        """A large room's pending frames at once (see trio_chat/flush.py)."""

    def close(self, code: int, reason: str) -> None: ...

    async def send_history(self, frames: list[bytes]) -> None:
        """Queue already-sent messages, at the pace the member's socket takes them."""

    def hold(self) -> None:
        """Keep live frames back until :meth:`release` (while history is sent)."""

    def release(self) -> None:
        """Send the frames held back since :meth:`hold`."""


@attrs.define(eq=False)
class _Behind:
    """Members that have every frame of a room before ``at`` and none after it."""

    at: int
    members: list[Member]


@attrs.define(eq=False)
class Room:
    id: int
    _broker: Broker
    _metrics: Metrics
    _history_size: int
    _replay_limit: int
    # The recent messages' frames hold at most this many bytes together.
    _history_bytes: int = 1024 * 1024
    # Messages read from the store at a time when replaying.
    _replay_page: int = 16
    # Asks the server's flusher to call flush() soon (None: every fan-out flushes at once).
    _schedule: Callable[[Room], None] | None = None
    members: set[Member] = attrs.field(init=False, factory=set)
    last_id: int = attrs.field(init=False, default=0)
    # The recent messages, as they are now (edits applied) and framed, sent to each
    # member on joining.
    _recent: deque[tuple[Message, bytes]] = attrs.field(init=False)
    _recent_bytes: int = attrs.field(init=False, default=0)
    _early: list[Message] | None = attrs.field(init=False, factory=list)
    # Set once the room is started, or once its start failed (then ``failed`` says why).
    ready: trio.Event = attrs.field(init=False, factory=trio.Event)
    # Set once the last member has left, or a flush broke.
    _ended: trio.Event = attrs.field(init=False, factory=trio.Event)
    failed: BaseException | None = attrs.field(init=False, default=None)
    # A large room's frames that not every member has yet, in order: the first is
    # frame number _pending_at. Their bytes, and the received_at of the messages among
    # them (None for events), for the delivery latency.
    _pending: list[bytes] = attrs.field(init=False, factory=list)
    _pending_at: int = attrs.field(init=False, default=0)
    _pending_bytes: int = attrs.field(init=False, default=0)
    _pending_received: list[str | None] = attrs.field(init=False, factory=list)
    # The members by how far they are: ascending, the last one up to date. A member
    # appears once among those still in ``members`` (one that left is dropped when
    # its turn comes, or when too many have left).
    _behind: deque[_Behind] = attrs.field(init=False, factory=deque)
    _listed: int = attrs.field(init=False, default=0)
    # The Flush last made, for the next members as far behind.
    _last_flush: tuple[int, int, Flush] | None = attrs.field(init=False, default=None)
    # Frames for one member (a sender's ack) that wait until the frames pending when
    # they came have reached every member, so an ack follows the sender's own copy.
    _after: deque[tuple[int, Member, bytes]] = attrs.field(init=False, factory=deque)
    _scheduled: bool = attrs.field(init=False, default=False)
    flush_slice: int = attrs.field(init=False, default=FLUSH_SLICE)
    # What broke a flush: run() raises it, so the hub ends this room.
    _broken: Exception | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._recent = deque(maxlen=self._history_size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self._broker.subscribe(self.id, self)
        try:
            # Subscribed first, loaded second: whatever is published meanwhile
            # waits in _early, so nothing falls between history and live.
            recent, last_id = await self._broker.tail(self.id, self._history_size)
            for message in recent:
                self._remember(message)
            self.last_id = max(self.last_id, last_id)
            early, self._early = self._early, None
            for message in early or ():
                if message.id > self.last_id:
                    self.deliver(message)
            self.ready.set()
            task_status.started()
            await self._ended.wait()
            if self._broken is not None:
                raise self._broken
        finally:
            with trio.move_on_after(5, shield=True):
                await self._broker.unsubscribe(self.id, self)

    def _remember(self, message: Message) -> bytes:
        frame = message_frame(message)
        if message.target_id is not None:
            self._change(message)
        recent = self._recent
        if recent.maxlen:
            if len(recent) == recent.maxlen:
                self._recent_bytes -= len(recent[0][1])
            recent.append((message, frame))
            self._recent_bytes += len(frame)
        while self._recent_bytes > self._history_bytes and recent:
            self._recent_bytes -= len(recent.popleft()[1])
        self.last_id = message.id
        return frame

    def _change(self, change: Message) -> None:
        """A joiner sees an edited or deleted message as it is now (and then the change)."""
        for i, (message, frame) in enumerate(self._recent):
            if message.id == change.target_id:
                changed = apply_change(message, change)
                self._recent[i] = (changed, changed_frame := message_frame(changed))
                self._recent_bytes += len(changed_frame) - len(frame)
                return

    def deliver(self, message: Message) -> None:
        """Fan ``message`` out to every member; called by the broker in id order."""
        if self._early is not None:
            self._early.append(message)
            return
        if message.id <= self.last_id:
            return
        frame = self._remember(message)
        if self.members:
            self._metrics.messages_delivered += len(self.members)
            self._fan_out(frame, message.received_at)

    def deliver_event(self, text: str) -> None:
        """Fan an event without an id (presence) out to every member; not kept for replay."""
        if self._early is not None:
            return  # the room is still loading: it has no members to tell
        if self.members:
            self._metrics.events_delivered += len(self.members)
            self._fan_out(text_frame(text), None)

    def _fan_out(self, frame: bytes, received_at: str | None) -> None:
        if self._broken is not None:
            return
        members = self.members
        if not self._pending and len(members) <= WRITE_NOW_MEMBERS:
            for member in members:
                member.send_frame(frame)
            if received_at is not None:
                # Once per message, weighted by its members: nothing per delivery.
                self._metrics.delivery_latency.observe(_age(received_at), len(members))
            return
        # Behind what is pending, whatever the room's size now: frames keep their order.
        self._pending.append(frame)
        self._pending_received.append(received_at)
        self._pending_bytes += len(frame)
        if self._pending_bytes > PENDING_BYTES or self._schedule is None:
            self._flush_all()
        elif not self._scheduled:
            self._scheduled = True
            self._schedule(self)

    @property
    def _end(self) -> int:
        return self._pending_at + len(self._pending)

    def send_after_pending(self, member: Member, frame: bytes) -> None:
        """Send ``member`` its own ``frame`` once the frames pending now have reached
        every member, at once if none is pending: a sender's ack follows its copy."""
        if self._pending:
            self._after.append((self._end, member, frame))
        else:
            member.send_frame(frame)

    def flush(self) -> bool:
        """The flusher's turn: hand the next :attr:`flush_slice` members that are behind
        the frames they have not had. Returns whether members are still behind (the
        flusher calls again once the other tasks have run)."""
        if self._broken is None:
            self._visit(self.flush_slice)
        self._scheduled = self._broken is None and bool(self._pending)
        return self._scheduled

    def _flush_all(self) -> None:
        """Bring every member up to date at once."""
        while self._pending and self._broken is None:
            self._visit(max(1, len(self.members)))

    def _visit(self, count: int) -> None:
        """Hand up to ``count`` of the members furthest behind what they have not had."""
        behind = self._behind
        end = self._end
        if not behind or behind[0].at == end:
            self._caught_up()
            return
        group = behind[0]
        if behind[-1].at != end:
            behind.append(_Behind(end, []))
        done = behind[-1].members
        flush = self._flush_from(group.at, end)
        current = self.members
        taken = group.members[:count]
        del group.members[:count]
        written = len(done)
        try:
            for member in taken:
                if member in current:
                    member.send_flush(flush)
                    done.append(member)
                else:
                    self._listed -= 1
        except Exception as exc:
            # A bug: this room's, not the flusher's (which serves every room) nor the
            # delivering task's. run() raises it and the hub ends the room.
            self._broken = exc
            self._ended.set()
            return
        written = len(done) - written
        metrics = self._metrics
        metrics.room_flush_writes += written
        metrics.room_flushed_frames += written * len(flush.frames)
        if not group.members:
            behind.popleft()
            self._caught_up()

    def _flush_from(self, at: int, end: int) -> Flush:
        """The frames from number ``at`` to the end, made once for every member that far
        behind."""
        last = self._last_flush
        if last is not None and last[0] == at and last[1] == end:
            return last[2]
        frames = self._pending[at - self._pending_at:]
        flush = Flush(frames, sum(map(len, frames)))
        self._last_flush = (at, end, flush)
        return flush

    def _caught_up(self) -> None:
        """Forget the frames every member has, counting their deliveries' latency."""
        oldest = self._behind[0].at if self._behind else self._end
        gone = oldest - self._pending_at
        if not gone:
            return
        if oldest == self._end:
            self._last_flush = None
        members = len(self.members)
        for received_at in self._pending_received[:gone]:
            if received_at is not None:
                self._metrics.delivery_latency.observe(_age(received_at), members)
        self._pending_bytes -= sum(map(len, self._pending[:gone]))
        del self._pending[:gone]
        del self._pending_received[:gone]
        self._pending_at = oldest
        after = self._after
        while after and after[0][0] <= oldest:
            _, member, frame = after.popleft()
            if member in self.members:
                member.send_frame(frame)

    def _list(self, member: Member) -> None:
        """List a new member as up to date (its history covers everything so far)."""
        behind = self._behind
        end = self._end
        if not behind or behind[-1].at != end:
            behind.append(_Behind(end, []))
        behind[-1].members.append(member)
        self._listed += 1

    def control(self, command: dict[str, Any]) -> None:
        """An operator's ``{"control": "close", "author_id": A, "code": C, "reason": R}``:
        close the members who are author A (every member if A is null)."""
        if command.get("control") != "close":
            log.warning("room %d: unknown control command %r", self.id, command)
            return
        author_id = command.get("author_id")
        for member in list(self.members):
            if author_id is None or member.author_id == author_id:
                member.close(command["code"], command["reason"])

    async def join(self, member: Member, since: int | None = None) -> None:
        """Make ``member`` a member, sending history first: no gap, no repeat.

        Without ``since`` the history is the recent messages. With it, it is
        every message after ``since`` (a client resuming): from memory when the
        recent messages reach back that far, else from the store, a page of
        ``replay_page`` messages at a time, each read once the member's queue
        has drained. If ``since`` is further back than the replay limit, or
        ahead of the room, or the store cannot be read, a ``history_reset``
        event comes first and then the recent messages, so the client knows to
        reload (its history page answers 503 until the store is back). Live
        frames are held back meanwhile, within the member's queue bound.
        """
        last = self.last_id
        # Taken with the hold, before any await: live frames from here on are held.
        # Pending frames are in the recent history already: this member is listed as
        # having them, and gets them once, as history.
        recent = list(self._recent)
        member.hold()
        self.members.add(member)
        self._list(member)
        try:
            if since is not None and (since > last or last - since > self._replay_limit):
                await member.send_history([self._reset(
                    since, f"cannot resume after message {since}; the room is at {last} and "
                           f"at most {self._replay_limit} messages are replayed")])
                since = None
            if since is None or since >= last or (recent and recent[0][0].id <= since + 1):
                await member.send_history([frame for message, frame in recent
                                           if since is None or message.id > since])
                return
            await self._replay(member, since, last, recent)
        finally:
            member.release()

    async def _replay(self, member: Member, after: int, last: int,
                      recent: list[tuple[Message, bytes]]) -> None:
        """Send every message from after ``after`` up to ``last`` from the store, a page
        at a time; if the store fails, a ``history_reset`` and the recent messages."""
        while after < last:
            before = min(last + 1, after + self._replay_page + 1)
            try:
                messages = await self._broker.history(self.id, after=after, before=before)
            except StoreUnavailable as exc:
                # The member stays, with what memory holds and a word that it is not all.
                await member.send_history([
                    self._reset(after, f"cannot resume after message {after}: {exc}"),
                    *(frame for message, frame in recent if message.id > after)])
                return
            await member.send_history([message_frame(m) for m in messages])
            after = before - 1

    def _reset(self, since: int, detail: str) -> bytes:
        return text_frame(encode_event("history_reset", room_id=self.id, since=since,
                                       latest_id=self.last_id, detail=detail))

    def leave(self, member: Member) -> bool:
        """Remove ``member``; returns True (and ends :meth:`run`) if the room is now empty."""
        self.members.discard(member)
        if not self.members:
            self._pending.clear()
            self._pending_received.clear()
            self._pending_bytes = 0
            self._behind.clear()
            self._after.clear()
            self._ended.set()
            return True
        if self._listed > 2 * len(self.members) + FLUSH_SLICE:
            # Many have left since their turn last came: drop them from the lists.
            current = self.members
            for group in self._behind:
                group.members = [m for m in group.members if m in current]
            self._listed = len(current)
        return False


def _age(received_at: str) -> float:
    """Seconds since ``received_at`` (utc_now's shape; another node's clock too)."""
    try:
        then = datetime.fromisoformat(received_at.removesuffix("Z"))
    except ValueError:
        return 0.0
    return max(0.0, time.time() - then.replace(tzinfo=timezone.utc).timestamp())
