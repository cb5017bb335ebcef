"""A trio-chat client that survives network drops and server restarts on its own.

Owns one application's session in one room: the WebSocket, its liveness (pings
that must be answered within ``dead_after``), reconnecting with capped, jittered
exponential backoff, resuming after the last message it delivered, and an
outbox of frames sent but not yet acknowledged, sent again (with the same
``client_msg_id``, so the server stores each once) after every reconnection.
The application sees every room message once, in id order.

Tasks: :func:`open_chat` opens a nursery that runs the supervisor
(:meth:`Chat._run`); for each connection the supervisor runs a reader and a
pinger in a nursery of that connection's own. Leaving the ``async with`` block,
or cancelling it, ends them all.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from .protocol import CHANGE_TYPES, CHAT_TYPES, Message, message_from_wire

log = logging.getLogger(__name__)

# Refusals that pass: the frame stays in the outbox and is sent again shortly.
TRANSIENT = frozenset({"sync_unavailable", "persistence_unavailable", "rate_limited"})
_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


class ChatError(Exception):
    """The server refused a frame: ``code`` and ``detail`` from its error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@attrs.frozen
class StateChange:
    """The connection's state: ``connecting`` (the first time), ``connected``,
    ``reconnecting`` (lost; ``detail`` says why), ``resumed`` (connected again, the
    missed messages follow), ``reset`` (the server could not replay everything
    missed; what follows is the room's recent history) or ``closed``."""

    state: str
    detail: str = ""


@attrs.define(eq=False)
class _Pending:
    client_msg_id: str
    frame: str
    done: trio.Event = attrs.field(factory=trio.Event)
    result: int | ChatError | None = None

    def settle(self, result: int | ChatError) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()


@attrs.define(eq=False)
class Chat:
    """One room, as the application sees it. Made by :func:`open_chat`."""

    url: str
    room_id: int
    token: str | None = None
    author_id: int | None = None
    # The last message delivered to the application: the next connection resumes after it.
    last_id: int | None = None
    dead_after: float = 10.0
    backoff_first: float = 0.25
    backoff_max: float = 10.0
    state: str = attrs.field(init=False, default="connecting")
    _outbox: dict[str, _Pending] = attrs.field(init=False, factory=dict)
    _ws: WebSocketConnection | None = attrs.field(init=False, default=None)
    # The application reads messages at its pace: a full channel stops the reader, the
    # server then drops this slow client, and the client resumes where it was.
    _messages: tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel(1000))
    # States and id-less events are hints: when the application does not read them,
    # the oldest wait and new ones are dropped rather than stopping the reader.
    _states: tuple[trio.MemorySendChannel[StateChange],
                   trio.MemoryReceiveChannel[StateChange]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel(100))
    _events: tuple[trio.MemorySendChannel[dict[str, Any]],
                   trio.MemoryReceiveChannel[dict[str, Any]]] = \
        attrs.field(init=False, factory=lambda: trio.open_memory_channel(100))

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
        return await self.send_frame({"message_type": "chat_txt", "content": text})

    async def send_image(self, image: bytes | str | os.PathLike[str]) -> int:
        """Send an image (its bytes, or a file's path) as a chat_img; returns its id."""
        if not isinstance(image, bytes):
            image = await trio.Path(image).read_bytes()
        kind = next((t for magic, t in _IMAGE_TYPES if image.startswith(magic)),
                    "image/webp" if image[8:12] == b"WEBP" else "application/octet-stream")
        content = f"data:{kind};base64,{base64.b64encode(image).decode('ascii')}"
        return await self.send_frame({"message_type": "chat_img", "content": content})

    async def send_frame(self, frame: dict[str, Any]) -> int:
        """Send any message frame (``chat_edit``, ``chat_delete``...) reliably; returns the
        id the server gave it."""
        cmid = uuid.uuid4().hex
        if self.author_id is not None:
            frame = {**frame, "author_id": self.author_id}
        pending = _Pending(cmid, json.dumps({**frame, "client_msg_id": cmid}))
        self._outbox[cmid] = pending
        try:
            if self._ws is not None:
                await self._transmit(self._ws, pending)
            await pending.done.wait()
        finally:
            self._outbox.pop(cmid, None)
        if isinstance(pending.result, ChatError):
            raise pending.result
        assert pending.result is not None
        return pending.result

    async def typing(self) -> None:
        """Tell the room the author is typing (dropped while disconnected)."""
        if self._ws is not None:
            payload = {"message_type": "typing"}
            if self.author_id is not None:
                payload["author_id"] = self.author_id  # type: ignore[assignment]
            await self._transmit(self._ws, None, json.dumps(payload))

    async def _transmit(self, ws: WebSocketConnection, pending: _Pending | None,
                        text: str | None = None) -> None:
        try:
            await ws.send_message(text if pending is None else pending.frame)
        except Exception as exc:  # the connection is going: the outbox keeps it
            log.debug("send failed, kept for the next connection: %r", exc)

    def _state(self, state: str, detail: str = "") -> None:
        self.state = state
        with suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._states[0].send_nowait(StateChange(state, detail))

    def _connect_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        query: dict[str, str | int] = {}
        if self.author_id is not None:
            query["author_id"] = self.author_id
        if self.last_id is not None:
            query["since"] = self.last_id
        if self.token is not None:
            query["token"] = self.token
        path = f"{parts.path.rstrip('/')}/ws/{self.room_id}"
        return f"{scheme}://{parts.netloc}{path}" + (f"?{urlencode(query)}" if query else "")

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled."""
        task_status.started()
        attempt, connected_before = 0, False
        try:
            while True:
                try:
                    async with self._connection() as ws:
                        attempt = 0
                        self._state("resumed" if connected_before else "connected")
                        connected_before = True
                        await self._serve(ws)
                    reason = "the server closed the connection"
                except Exception as exc:
                    reason = _why(exc)
                self._state("reconnecting", reason)
                delay = min(self.backoff_max, self.backoff_first * 2 ** attempt)
                attempt += 1
                await trio.sleep(delay / 2 + random.random() * delay / 2)
        finally:
            self._state("closed")
            for pending in list(self._outbox.values()):
                pending.settle(ChatError("closed", "the chat was closed before the server "
                                                   "acknowledged this message"))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[WebSocketConnection]:
        """One WebSocket; its socket is ours, so it is closed however the attempt ends."""
        url = urlsplit(self._connect_url())
        host, secure = url.hostname or "127.0.0.1", url.scheme == "wss"
        port = url.port or (443 if secure else 80)
        with trio.fail_after(self.dead_after):
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = (
                await trio.open_ssl_over_tcp_stream(host, port) if secure
                else await trio.open_tcp_stream(host, port))
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self.dead_after):
                    ws = await wrap_client_stream(
                        nursery, stream, host, f"{url.path}?{url.query}" if url.query
                        else url.path, max_message_size=16 * 1024 * 1024)
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, ws: WebSocketConnection) -> None:
        """Read ``ws`` until it closes or stops answering pings."""
        async with trio.open_nursery() as nursery:
            self._ws = ws
            try:
                for pending in list(self._outbox.values()):
                    await self._transmit(ws, pending)
                nursery.start_soon(self._ping, ws, nursery.cancel_scope)
                await self._read(ws, nursery)
            finally:
                self._ws = None
                nursery.cancel_scope.cancel()

    async def _ping(self, ws: WebSocketConnection, connection: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.dead_after / 3)
            with trio.move_on_after(self.dead_after) as waiting:
                await ws.ping()
            if waiting.cancelled_caught:
                # A stalled stream (no pong) is as dead as a closed one.
                log.info("no pong within %.1f s: reconnecting", self.dead_after)
                connection.cancel()
                return

    async def _read(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        while True:
            frame = json.loads(await ws.get_message())
            kind = frame.get("message_type")
            if kind in CHAT_TYPES or kind in CHANGE_TYPES:
                message = message_from_wire(frame)
                pending = self._outbox.get(message.client_msg_id or "")
                if pending is not None and message.author_id == self.author_id:
                    pending.settle(message.id)
                if self.last_id is None or message.id > self.last_id:
                    self.last_id = message.id
                    await self._messages[0].send(message)
            elif kind == "ack":
                if (pending := self._outbox.get(frame["client_msg_id"])) is not None:
                    pending.settle(frame["id"])
            elif kind == "error" and (pending := self._outbox.get(
                    frame.get("client_msg_id") or "")) is not None:
                if frame["code"] in TRANSIENT:
                    nursery.start_soon(self._send_later, ws, pending)
                else:
                    pending.settle(ChatError(frame["code"], frame["detail"]))
            elif kind == "history_reset":
                # What follows is the room's recent history, whatever its ids.
                self.last_id = None
                self._state("reset", frame.get("detail", ""))
            else:
                with suppress(trio.WouldBlock):
                    self._events[0].send_nowait(frame)

    async def _send_later(self, ws: WebSocketConnection, pending: _Pending) -> None:
        await trio.sleep(1)
        if not pending.done.is_set():
            await self._transmit(ws, pending)


def _why(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)  # an exception group from a nursery
    if isinstance(inner, tuple) and len(inner) == 1:
        return _why(inner[0])
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


@asynccontextmanager
async def open_chat(url: str, room_id: int, token: str | None = None, *,
                    author_id: int | None = None, since: int | None = None,
                    dead_after: float = 10.0, backoff_first: float = 0.25,
                    backoff_max: float = 10.0) -> AsyncIterator[Chat]:
    """Join ``room_id`` on the server at ``url`` (``ws://host:port`` or
    ``http://host:port``) and stay joined until the block ends.

    ``token`` (a user token) or ``author_id`` says who the client is. ``since``
    starts after that message id instead of with the room's recent history. A
    connection that does not answer a ping within ``dead_after`` seconds is
    given up and replaced; attempts are spaced by jittered exponential backoff
    from ``backoff_first`` up to ``backoff_max`` seconds.
    """
    chat = Chat(url, room_id, token, author_id, since, dead_after, backoff_first, backoff_max)
    chat._state("connecting")
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
