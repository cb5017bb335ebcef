"""A chat room (the seed's Room, LINE's ChatRoomActor): members, recent history, fan-out.

Owns one room's live state while it has members. Its one task,
:meth:`Room.run`, is the room's lifetime: it subscribes to the broker, loads
the recent history, reports ready, and waits until the last member leaves;
cancelling it unsubscribes. Fan-out (:meth:`Room.deliver`) is synchronous: a
message is encoded and framed once, and the same bytes are queued for every
member without waiting for any of them.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

import attrs
import trio

from .broker import Broker
from .metrics import Metrics
from .protocol import Message, encode_message, text_frame
from .store import Store

log = logging.getLogger(__name__)


class Member(Protocol):
    def send_frame(self, frame: bytes) -> None: ...


@attrs.define(eq=False)
class Room:
    id: int
    _store: Store
    _broker: Broker
    _metrics: Metrics
    _history_size: int
    members: set[Member] = attrs.field(init=False, factory=set)
    last_id: int = attrs.field(init=False, default=0)
    # Framed recent messages, sent to each member on joining.
    _recent: deque[bytes] = attrs.field(init=False)
    _early: list[Message] | None = attrs.field(init=False, factory=list)
    ready: trio.Event = attrs.field(init=False, factory=trio.Event)
    _empty: trio.Event = attrs.field(init=False, factory=trio.Event)
    failed: BaseException | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._recent = deque(maxlen=self._history_size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        try:
            handle = await self._broker.subscribe(self.id, self.deliver)
            try:
                # Subscribed first, loaded second: whatever is published meanwhile
                # waits in _early, so nothing falls between history and live.
                for message in await self._store.recent(self.id, self._history_size):
                    self._remember(message)
                early, self._early = self._early, None
                for message in early or ():
                    if message.id > self.last_id:
                        self.deliver(message)
                self.ready.set()
                task_status.started()
                await self._empty.wait()
            finally:
                with trio.move_on_after(5, shield=True):
                    await self._broker.unsubscribe(handle)
        except BaseException as exc:
            self.failed = exc
            self.ready.set()
            raise

    def _remember(self, message: Message) -> bytes:
        frame = text_frame(encode_message(message))
        self._recent.append(frame)
        self.last_id = message.id
        return frame

    def deliver(self, message: Message) -> None:
        """Fan ``message`` out to every member; called by the broker in id order."""
        if self._early is not None:
            self._early.append(message)
            return
        if message.id <= self.last_id:
            return
        frame = self._remember(message)
        for member in self.members:
            member.send_frame(frame)
        self._metrics.messages_delivered += len(self.members)

    def join(self, member: Member) -> None:
        """Send ``member`` the recent history, then make it a member (no gap, no repeat)."""
        for frame in self._recent:
            member.send_frame(frame)
        self.members.add(member)

    def leave(self, member: Member) -> bool:
        """Remove ``member``; returns True (and ends :meth:`run`) if the room is now empty."""
        self.members.discard(member)
        if not self.members:
            self._empty.set()
            return True
        return False
