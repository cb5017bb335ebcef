"""A trio-chat client for trio programs that survives network drops and server restarts.

Owns the trio side of one application's session in one room: the WebSocket
(trio-websocket), its liveness (pings that must be answered within
``dead_after``), the waits between attempts, and the tasks. What is sent, what
is delivered, what is sent again and how long to wait are decided by the
sans-IO :class:`~trio_chat.client_core.ClientCore`, which the asyncio client
(:mod:`trio_chat.aio_client`) shares. The application sees every room message
once, in id order; frames not yet acknowledged are sent again (with the same
``client_msg_id``, so the server stores each once) after every reconnection.

Tasks: :func:`open_chat` opens a nursery that runs the supervisor
(:meth:`Chat._run`); for each connection the supervisor runs a reader and a
pinger in a nursery of that connection's own. Leaving the ``async with`` block,
or cancelling it, ends them all.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

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

__all__ = ["Chat", "ChatError", "StateChange", "open_chat"]

log = logging.getLogger(__name__)
# Long enough to hand our close frame to the socket.
_CLOSE_CANCELLED = 0.1


@attrs.define(eq=False)
class _Waiter:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: int | ChatError | None = None

    def settle(self, result: int | ChatError) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()


@attrs.define(eq=False)
class Chat:
    """One room, as the application sees it. Made by :func:`open_chat`."""

    _core: ClientCore
    _token: TokenSource = None
    _waiters: dict[str, _Waiter] = attrs.field(init=False, factory=dict)
    _ws: WebSocketConnection | None = attrs.field(init=False, default=None)
    # The application reads messages at its pace: a full channel stops the reader, the
    # server then drops this slow client, and the client resumes where it was.
    _messages: tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel[Message](1000))
    # States and id-less events are hints: when the application does not read them,
    # the oldest wait and new ones are dropped rather than stopping the reader.
    _states: tuple[trio.MemorySendChannel[StateChange],
                   trio.MemoryReceiveChannel[StateChange]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel[StateChange](100))
    _events: tuple[trio.MemorySendChannel[dict[str, Any]],
                   trio.MemoryReceiveChannel[dict[str, Any]]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel[dict[str, Any]](100))

    @property
    def state(self) -> str:
        """The latest state (see :class:`StateChange`)."""
        return self._core.state

    @property
    def last_id(self) -> int | None:
        """The id of the last message delivered; the next connection resumes after it."""
        return self._core.last_id

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages[1].__aiter__()

    def states(self) -> trio.MemoryReceiveChannel[StateChange]:
        """Connection state changes, in order (``async for change in chat.states()``)."""
        return self._states[1]

    def events(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """Frames without an id, decoded: chat_enter, chat_exit, typing, and error frames
        that name no frame of ours."""
        return self._events[1]

    async def send(self, text: str) -> int:
        """Send a chat_txt and return its id once the server accepted it.

        Waits through reconnections; raises :class:`ChatError` if it is refused.
        """
        return await self.send_frame(text_frame(text))

    async def send_image(self, image: bytes | str | os.PathLike[str]) -> int:
        """Send an image (its bytes, or a file's path) as a chat_img; returns its id."""
        if not isinstance(image, bytes):
            image = await trio.Path(image).read_bytes()
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
        waiter = self._waiters[cmid] = _Waiter()
        try:
            if self._ws is not None:
                await self._transmit(self._ws, text)
            await waiter.done.wait()
        finally:
            del self._waiters[cmid]
            self._core.forget(cmid)
        if isinstance(waiter.result, ChatError):
            raise waiter.result
        assert waiter.result is not None
        return waiter.result

    async def typing(self) -> None:
        """Tell the room the author is typing (dropped while disconnected)."""
        if self._ws is not None:
            await self._transmit(self._ws, self._core.typing_frame())

    async def _transmit(self, ws: WebSocketConnection, text: str) -> None:
        try:
            await ws.send_message(text)
        except Exception as exc:  # the connection is going: the outbox keeps it
            log.debug("send failed, kept for the next connection: %r", exc)

    def _state(self, change: StateChange) -> None:
        with suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._states[0].send_nowait(change)

    def _settle(self, settled: Settled) -> None:
        if (waiter := self._waiters.get(settled.client_msg_id)) is not None:
            waiter.settle(settled.result)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled."""
        task_status.started()
        try:
            while True:
                try:
                    async with self._connection() as ws:
                        self._state(self._core.connected())
                        await self._serve(ws)
                    reason = "the server closed the connection"
                except Exception as exc:
                    reason = describe(exc)
                change = self._core.lost(reason)
                self._state(change)
                assert change.delay is not None
                await trio.sleep(change.delay)
        finally:
            for settled in self._core.close():
                self._settle(settled)
            self._state(StateChange("closed"))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[WebSocketConnection]:
        """One WebSocket; its socket is ours, so it is closed however the attempt ends."""
        url = urlsplit(self._core.connect_url(await resolve_token(self._token)))
        host, secure = url.hostname or "127.0.0.1", url.scheme == "wss"
        port = url.port or (443 if secure else 80)
        with trio.fail_after(self._core.dead_after):
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = (
                await trio.open_ssl_over_tcp_stream(host, port) if secure
                else await trio.open_tcp_stream(host, port))
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self._core.dead_after):
                    ws = await wrap_client_stream(
                        nursery, stream, host, f"{url.path}?{url.query}" if url.query
                        else url.path, max_message_size=MAX_FRAME_BYTES)
                try:
                    yield ws
                finally:
                    # Cancelled (the chat is closing), trio-websocket's reader is cancelled
                    # too and the server's close frame would never be read: send ours and
                    # do not wait out the closing handshake.
                    cancelled = trio.current_effective_deadline() == -math.inf
                    with trio.move_on_after(_CLOSE_CANCELLED if cancelled else CLOSE_TIMEOUT,
                                            shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, ws: WebSocketConnection) -> None:
        """Read ``ws`` until it closes or stops answering pings."""
        async with trio.open_nursery() as nursery:
            self._ws = ws
            try:
                for text in self._core.pending_frames():
                    await self._transmit(ws, text)
                nursery.start_soon(self._ping, ws, nursery.cancel_scope)
                await self._read(ws, nursery)
            finally:
                self._ws = None
                nursery.cancel_scope.cancel()

    async def _ping(self, ws: WebSocketConnection, connection: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self._core.ping_interval)
            with trio.move_on_after(self._core.dead_after) as waiting:
                await ws.ping()
            if waiting.cancelled_caught:
                # A stalled stream (no pong) is as dead as a closed one.
                log.info("no pong within %.1f s: reconnecting", self._core.dead_after)
                connection.cancel()
                return

    async def _read(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        while True:
            for action in self._core.receive(await ws.get_message()):
                if isinstance(action, Deliver):
                    await self._messages[0].send(action.message)
                    self._core.delivered(action.message)
                elif isinstance(action, Settled):
                    self._settle(action)
                elif isinstance(action, RetryLater):
                    nursery.start_soon(self._send_later, ws, action.client_msg_id)
                elif isinstance(action, Reset):
                    self._state(StateChange("reset", action.detail))
                else:
                    with suppress(trio.WouldBlock):
                        self._events[0].send_nowait(action.frame)

    async def _send_later(self, ws: WebSocketConnection, client_msg_id: str) -> None:
        await trio.sleep(RETRY_AFTER)
        if (text := self._core.pending_frame(client_msg_id)) is not None:
            await self._transmit(ws, text)


@asynccontextmanager
async def open_chat(url: str, room_id: int, token: TokenSource = None, *,
                    author_id: int | None = None, since: int | None = None,
                    dead_after: float = 10.0, backoff_first: float = 0.25,
                    backoff_max: float = 10.0) -> AsyncIterator[Chat]:
    """Join ``room_id`` on the server at ``url`` (``ws://host:port`` or
    ``http://host:port``) and stay joined until the block ends.

    ``token`` (a user token, or a function returning one, plain or async, called
    before every connection attempt) or ``author_id`` says who the client is.
    ``since`` starts after that message id instead of with the room's recent
    history. A connection that does not answer a ping within ``dead_after``
    seconds is given up and replaced; attempts are spaced by jittered exponential
    backoff from ``backoff_first`` up to ``backoff_max`` seconds.
    """
    core = ClientCore(url, room_id, author_id, since, dead_after, backoff_first, backoff_max)
    chat = Chat(core, token)
    chat._state(StateChange("connecting"))
    with chat._messages[0], chat._states[0], chat._events[0]:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(chat._run)
                try:
                    yield chat
                finally:
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            # The block runs inside the nursery, whose group would wrap what the caller
            # raised (a ChatError, say): give the caller its own exception back.
            inner = getattr(exc, "exceptions", None)
            if isinstance(inner, tuple) and len(inner) == 1:
                raise inner[0] from None
            raise
