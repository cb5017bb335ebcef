"""A trio-chat client for asyncio programs that survives network drops and server restarts.

Owns the asyncio side of one application's session in one room: the WebSocket
(the ``websockets`` library), its liveness (pings that must be answered within
``dead_after``), the waits between attempts, and the tasks. Everything the
protocol decides (what is delivered, what is sent again, how long to wait) is
the sans-IO :class:`~trio_chat.client_core.ClientCore` that the trio client
(:mod:`trio_chat.client`) uses too, so both behave the same.

Every function here is asyncio flavoured; nothing here imports trio.

Tasks: :func:`open_chat` starts one supervisor task (:meth:`Chat._run`); for each
connection the supervisor runs a reader and a pinger, and a task per refusal
that passes (sent again a second later). Leaving the ``async with`` block, or
cancelling the task in it, cancels the supervisor and waits for it, so no task
outlives the block.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
from websockets.asyncio.client import ClientConnection, connect

from .client_core import (
    CLOSE_TIMEOUT,
    MAX_FRAME_BYTES,
    RETRY_AFTER,
    ChatError,
    ClientCore,
    Deliver,
    Reset,
    RetryLater,
    Settled,
    StateChange,
    TokenSource,
    delete_frame,
    describe,
    edit_frame,
    image_frame,
    resolve_token,
    text_frame,
)
from .protocol import Message

__all__ = ["Chat", "ChatError", "Feed", "StateChange", "open_chat"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Feed(Generic[T]):
    """A bounded queue the application reads with ``await feed.receive()`` or
    ``async for item in feed``."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[T] = asyncio.Queue(size)

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        return await self._queue.get()

    async def receive(self) -> T:
        return await self._queue.get()

    async def _put(self, item: T) -> None:
        await self._queue.put(item)

    def _offer(self, item: T) -> None:
        """Hints are dropped, not waited for, when the application does not read them."""
        with suppress(asyncio.QueueFull):
            self._queue.put_nowait(item)


class StalledError(ConnectionError):
    """No pong came within ``dead_after``: the link is dead even if TCP has not noticed."""


@attrs.define(eq=False)
class Chat:
    """One room, as the application sees it. Made by :func:`open_chat`."""

    _core: ClientCore
    _token: TokenSource = None
    _waiters: dict[str, asyncio.Future[int | ChatError]] = attrs.field(init=False, factory=dict)
    _ws: ClientConnection | None = attrs.field(init=False, default=None)
    # A full message feed stops the reader: the server then drops this slow client and
    # the client resumes where it was. States and events are dropped instead.
    _messages: Feed[Message] = attrs.field(init=False, factory=lambda: Feed(1000))
    _states: Feed[StateChange] = attrs.field(init=False, factory=lambda: Feed(100))
    _events: Feed[dict[str, Any]] = attrs.field(init=False, factory=lambda: Feed(100))

    @property
    def state(self) -> str:
        """The latest state (see :class:`StateChange`)."""
        return self._core.state

    @property
    def last_id(self) -> int | None:
        """The id of the last message delivered; the next connection resumes after it."""
        return self._core.last_id

    def __aiter__(self) -> Feed[Message]:
        """Every room message once, in id order, until the block ends."""
        return self._messages

    def states(self) -> Feed[StateChange]:
        """Connection state changes, in order (``async for change in chat.states()``)."""
        return self._states

    def events(self) -> Feed[dict[str, Any]]:
        """Frames without an id, decoded: chat_enter, chat_exit, typing, and error frames
        that name no frame of ours."""
        return self._events

    async def send(self, text: str) -> int:
        """Send a chat_txt and return its id once the server accepted it.

        Waits through reconnections; raises :class:`ChatError` if it is refused.
        """
        return await self.send_frame(text_frame(text))

    async def send_image(self, image: bytes | str | os.PathLike[str]) -> int:
        """Send an image (its bytes, or a file's path) as a chat_img; returns its id."""
        if not isinstance(image, bytes):
            image = await asyncio.get_running_loop().run_in_executor(
                None, Path(image).read_bytes)
        return await self.send_frame(image_frame(image))

    async def edit(self, target_id: int, text: str) -> int:
        """Replace the text of one's own message ``target_id``; returns the edit's id."""
        return await self.send_frame(edit_frame(target_id, text))

    async def delete(self, target_id: int) -> int:
        """Delete one's own message ``target_id``; returns the delete's id."""
        return await self.send_frame(delete_frame(target_id))

    async def send_frame(self, frame: dict[str, Any]) -> int:
        """Send any message frame reliably; returns the id the server gave it."""
        cmid, text = self._core.outgoing(frame)
        waiter: asyncio.Future[int | ChatError] = asyncio.get_running_loop().create_future()
        self._waiters[cmid] = waiter
        try:
            if self._ws is not None:
                await self._transmit(self._ws, text)
            result = await waiter
        finally:
            del self._waiters[cmid]
            self._core.forget(cmid)
        if isinstance(result, ChatError):
            raise result
        return result

    async def typing(self) -> None:
        """Tell the room the author is typing (dropped while disconnected)."""
        if self._ws is not None:
            await self._transmit(self._ws, self._core.typing_frame())

    async def _transmit(self, ws: ClientConnection, text: str) -> None:
        try:
            await ws.send(text)
        except Exception as exc:  # the connection is going: the outbox keeps it
            log.debug("send failed, kept for the next connection: %r", exc)

    def _settle(self, settled: Settled) -> None:
        waiter = self._waiters.get(settled.client_msg_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(settled.result)

    async def _run(self) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled."""
        while True:
            try:
                async with connect(
                        self._core.connect_url(await resolve_token(self._token)),
                        open_timeout=self._core.dead_after, close_timeout=CLOSE_TIMEOUT,
                        ping_interval=None, max_size=MAX_FRAME_BYTES, compression="deflate",
                        proxy=None) as ws:
                    self._states._offer(self._core.connected())
                    await self._serve(ws)
                reason = "the server closed the connection"
            except Exception as exc:
                reason = describe(exc)
            change = self._core.lost(reason)
            self._states._offer(change)
            await asyncio.sleep(change.delay or 0)

    def _close(self) -> None:
        """After the supervisor ended (it may have been cancelled before it started)."""
        for settled in self._core.close():
            self._settle(settled)
        self._states._offer(StateChange("closed"))

    async def _serve(self, ws: ClientConnection) -> None:
        """Read ``ws`` until it closes or stops answering pings."""
        self._ws = ws
        retries: set[asyncio.Task[None]] = set()
        tasks: list[asyncio.Task[None]] = []
        try:
            for text in self._core.pending_frames():
                await self._transmit(ws, text)
            tasks = [asyncio.create_task(self._read(ws, retries)),
                     asyncio.create_task(self._ping(ws))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # why it ended, if it failed
        finally:
            self._ws = None
            for task in (*tasks, *retries):
                task.cancel()
            await asyncio.gather(*tasks, *retries, return_exceptions=True)

    async def _ping(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self._core.ping_interval)
            try:
                pong = await ws.ping()
                await asyncio.wait_for(pong, self._core.dead_after)
            except asyncio.TimeoutError:
                # A stalled stream (no pong) is as dead as a closed one.
                log.info("no pong within %.1f s: reconnecting", self._core.dead_after)
                raise StalledError(f"no pong within {self._core.dead_after:g} s") from None

    async def _read(self, ws: ClientConnection, retries: set[asyncio.Task[None]]) -> None:
        async for text in ws:
            for action in self._core.receive(text):
                if isinstance(action, Deliver):
                    await self._messages._put(action.message)
                    self._core.delivered(action.message)
                elif isinstance(action, Settled):
                    self._settle(action)
                elif isinstance(action, RetryLater):
                    retry = asyncio.create_task(self._send_later(ws, action.client_msg_id))
                    retries.add(retry)
                    retry.add_done_callback(retries.discard)
                elif isinstance(action, Reset):
                    self._states._offer(StateChange("reset", action.detail))
                else:
                    self._events._offer(action.frame)

    async def _send_later(self, ws: ClientConnection, client_msg_id: str) -> None:
        await asyncio.sleep(RETRY_AFTER)
        if (text := self._core.pending_frame(client_msg_id)) is not None:
            await self._transmit(ws, text)


@asynccontextmanager
async def open_chat(url: str, room_id: int, token: TokenSource = None, *,
                    author_id: int | None = None, since: int | None = None,
                    dead_after: float = 10.0, backoff_first: float = 0.25,
                    backoff_max: float = 10.0) -> AsyncIterator[Chat]:
    """Join ``room_id`` on the server at ``url`` (``ws://host:port`` or
    ``http://host:port``) and stay joined until the block ends (asyncio).

    The same arguments as :func:`trio_chat.client.open_chat`: ``token`` (a user
    token, or a function returning one, plain or async, called before every
    connection attempt) or ``author_id`` says who the client is; ``since`` starts
    after that message id; a connection that does not answer a ping within
    ``dead_after`` seconds is replaced; attempts are spaced by jittered
    exponential backoff from ``backoff_first`` up to ``backoff_max`` seconds.
    """
    core = ClientCore(url, room_id, author_id, since, dead_after, backoff_first, backoff_max)
    chat = Chat(core, token)
    chat._states._offer(StateChange("connecting"))
    supervisor = asyncio.create_task(chat._run())
    try:
        yield chat
    finally:
        supervisor.cancel()
        # Waited for without raising its CancelledError here: a cancellation of the
        # caller's own task still propagates from this await.
        try:
            await asyncio.wait([supervisor])
        finally:
            chat._close()
