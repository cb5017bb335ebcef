"""What every broker is: the :class:`Broker` and :class:`Subscriber` protocols, and
:class:`BrokerUnavailable`, the one error a broker raises for "not now".

Also the idempotency look-up both brokers fall back on: the history store,
asked whether an author already sent a client_msg_id. It runs no tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from ..protocol import Draft, Message, utc_after
from ..store import Store


class BrokerUnavailable(Exception):
    """The broker cannot assign ids right now (Redis unreachable); nothing was sent."""


class Subscriber(Protocol):
    last_id: int

    def deliver(self, message: Message) -> None: ...

    def deliver_event(self, text: str) -> None:
        """An event without an id (presence), in order with the messages around it."""

    def control(self, command: dict[str, Any]) -> None:
        """An operator's command for the room on this node (close some connections)."""


class Broker(Protocol):
    async def subscribe(self, room_id: int, subscriber: Subscriber) -> None:
        """Start delivering ``room_id``'s messages to ``subscriber``."""

    async def unsubscribe(self, room_id: int, subscriber: Subscriber) -> None: ...

    async def tail(self, room_id: int, limit: int) -> tuple[list[Message], int]:
        """The last ``limit`` messages (oldest first) and the room's last id."""

    async def history(self, room_id: int, after: int, before: int) -> list[Message]:
        """Every message with ``after < id < before``, oldest first."""

    async def sent_before(self, draft: Draft) -> Message | None:
        """The message ``draft``'s author already sent with its client_msg_id within the
        idempotency window, if any: a cheap look before work that a resend must not
        repeat (storing an image). :meth:`publish` checks again, atomically."""

    @property
    def durable_on_publish(self) -> bool:
        """Whether a message is durable once publish returns (in Redis's log), rather
        than once the history store has committed it."""

    async def publish(self, draft: Draft, target: Message | None = None, *,
                      deliver: bool = True) -> tuple[Message, bool]:
        """Assign an id to ``draft`` (its author known); the room must have a subscriber
        on this node. Returns the message and whether it is new.

        With ``deliver=False`` a new message is delivered only when
        :meth:`deliver` is called (once it is durable); brokers that are durable on
        publish deliver at once regardless.

        A draft whose author sent its ``client_msg_id`` in the room within the
        idempotency window is not published again: the message sent then comes
        back, not new. ``target`` is, for a ``chat_edit``/``chat_delete``, the
        message it changes as it is now, so the broker's recent copy can follow.
        """

    def deliver(self, message: Message) -> None:
        """Deliver a message published with ``deliver=False``, in id order."""

    def forget_sent(self, message: Message) -> None:
        """``message`` was not kept after all: a resend of its client_msg_id is new."""

    async def event(self, room_id: int, text: str) -> None:
        """Hand an event without an id (typing) to ``room_id``'s members on every node."""

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the broker is back after losing its connection."""

    async def control(self, room_id: int, command: dict[str, Any]) -> None:
        """Hand ``command`` to ``room_id`` on every node where it is alive."""

    async def forget(self, room_id: int) -> None:
        """Drop what the broker keeps of ``room_id`` (its history was purged)."""

    async def presence(self, room_id: int, add: Collection[int], remove: Collection[int],
                       ttl: float) -> list[int]:
        """Register (``add``, also a refresh) or withdraw (``remove``) this node's presence
        of authors in ``room_id``; entries not refreshed within ``ttl`` seconds expire.

        An author's first entry on any node is announced to the room as
        ``chat_enter``, its last one leaving (or expiring) as ``chat_exit``.
        Returns the authors online in the room on every node.
        """


async def sent_to_store(store: Store, draft: Draft, window: float) -> Message | None:
    """What the history store knows of ``draft``'s client_msg_id from its author in
    the last ``window`` seconds."""
    assert draft.author_id is not None and draft.client_msg_id is not None
    return await store.client_message(draft.room_id, draft.author_id, draft.client_msg_id,
                                      utc_after(-window))

