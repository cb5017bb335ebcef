"""The chaos run's clients: trio-chat's client library sending and reading in one
room each, recording every send, ack, delivery and reconnection."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from bench.chaos.common import Clock
from bench.chaos.services import Node
from trio_chat.client import Chat, ChatError, open_chat


@attrs.define(eq=False)
class Sent:
    """One ``chat.send()``: its unique content, and how the server answered it."""

    content: str
    room: int
    author: int
    node: int
    started: float
    acked_id: int | None = None
    acked_at: float | None = None
    error: str | None = None


@attrs.define(eq=False)
class Progress:
    """Wakes whoever waits for a condition on the clients' state when that state changes."""

    _changed: trio.Event = attrs.field(factory=trio.Event)

    def bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


@attrs.define(eq=False)
class Client:
    """One chat member: sends at a steady rate, reads everything its room delivers."""

    index: int
    room: int
    author: int
    node: Node
    rate: float
    clock: Clock
    progress: Progress
    sent: list[Sent] = attrs.field(factory=list)
    # (id, content, author_id) as the application received them, in order.
    delivered: list[tuple[int, str, int]] = attrs.field(factory=list)
    states: list[tuple[float, str, str]] = attrs.field(factory=list)
    # When the client resent a refused frame, and which (by content).
    resends: list[float] = attrs.field(factory=list)
    resent: set[str] = attrs.field(factory=set)
    in_flight: int = 0
    sending: bool = False
    connected: trio.Event = attrs.field(factory=trio.Event)
    chat: Chat | None = None

    @property
    def name(self) -> str:
        return f"client{self.index}(author {self.author}, room {self.room}, {self.node.name})"

    def journey(self, sent: Sent) -> str:
        """What happened to ``sent`` on the way: refusals resent, reconnections."""
        end = sent.acked_at if sent.acked_at is not None else math.inf
        drops = [f"{t:.1f}s ({detail})" for t, state, detail in self.states
                 if state == "reconnecting" and sent.started <= t <= end]
        return ((", refused and resent" if sent.content in self.resent else "")
                + (f", reconnected meanwhile: {'; '.join(drops[:2])}" if drops else ""))

    async def run(self, go: trio.Event, stop: trio.Event, close: trio.Event) -> None:
        url = f"http://127.0.0.1:{self.node.port}"
        # The default liveness window; a short backoff, so recovery fits the quiet periods.
        async with open_chat(url, self.room, author_id=self.author, backoff_first=0.2,
                             backoff_max=2) as chat:
            self.chat = chat
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, chat)
                nursery.start_soon(self._watch_states, chat)
                nursery.start_soon(self._send_steadily, chat, go, stop)
                await close.wait()
                nursery.cancel_scope.cancel()

    async def _read(self, chat: Chat) -> None:
        async for message in chat:
            self.delivered.append((message.id, message.content, message.author_id))
            self.progress.bump()

    async def _watch_states(self, chat: Chat) -> None:
        async for change in chat.states():
            self.states.append((self.clock.now(), change.state, change.detail))
            if change.state in ("connected", "resumed"):
                self.connected.set()

    async def _send_steadily(self, chat: Chat, go: trio.Event, stop: trio.Event) -> None:
        await go.wait()
        self.sending = True
        # Sends overlap (each waits for its ack), so an outage fills the outbox; the
        # limit only keeps a very long outage from growing it without bound.
        slots = trio.Semaphore(500)
        try:
            async with trio.open_nursery() as sends:
                due, seq = trio.current_time(), 0
                while not stop.is_set():
                    await slots.acquire()
                    sends.start_soon(self._send_one, chat, seq, slots)
                    seq += 1
                    due = max(due + 1 / self.rate, trio.current_time())
                    with trio.move_on_at(due):
                        await stop.wait()
        finally:
            self.sending = False
            self.progress.bump()

    async def _send_one(self, chat: Chat, seq: int, slots: trio.Semaphore) -> None:
        sent = Sent(f"r{self.room}-a{self.author}-{seq}", self.room, self.author,
                    self.node.index, self.clock.now())
        self.sent.append(sent)
        self.in_flight += 1
        try:
            sent.acked_id = await chat.send(sent.content)
            sent.acked_at = self.clock.now()
        except ChatError as exc:
            sent.error = exc.code
        except Exception as exc:  # not the client's contract: recorded, judged as refused
            sent.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            slots.release()
            self.progress.bump()


@contextmanager
def counting_resends(clients: dict[int, Client]) -> Iterator[None]:
    """Count the refusals the client resends: it schedules each with ``_send_later``
    and reports them nowhere else."""
    original = Chat._send_later

    async def counted(self: Chat, ws: Any, client_msg_id: str) -> None:
        client = clients.get(id(self))
        frame = self._core.pending_frame(client_msg_id)
        if client is not None and frame is not None:
            client.resends.append(client.clock.now())
            client.resent.add(json.loads(frame).get("content", ""))
        await original(self, ws, client_msg_id)

    Chat._send_later = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        Chat._send_later = original  # type: ignore[method-assign]


# --- the schedule ---------------------------------------------------------------------------
