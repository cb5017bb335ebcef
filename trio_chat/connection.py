"""One chat connection (the seed's Client, LINE's UserActor).

Owns a member's session in one room: it joins the room, turns each incoming
frame into a published message or an error frame, and leaves the room when
the connection ends. The task that calls :func:`serve_connection` is the
reader; the :class:`~trio_chat.websocket.WebSocket` runs the writer (and its
heartbeat) beside it in the connection's own nursery.
"""

from __future__ import annotations

import logging

import attrs
import trio

from .hub import Hub
from .metrics import Metrics
from .protocol import FrameError, encode_error, parse_chat_frame, text_frame
from .store import StoreUnavailable
from .websocket import INTERNAL_ERROR, MESSAGE_TOO_BIG, Limits, WebSocket

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class ChatConnection:
    room_id: int
    remote: str
    _hub: Hub
    _metrics: Metrics
    ws: WebSocket = attrs.field(init=False)

    def send_frame(self, frame: bytes) -> None:
        self.ws.send_frame(frame)

    def close(self, code: int, reason: str) -> None:
        self.ws.close(code, reason)

    def _error(self, code: str, detail: str) -> None:
        self.ws.send_frame(text_frame(encode_error(code, detail)))

    async def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._metrics.bad_frames += 1
            self._error("binary_frame", "binary frames are not accepted; send JSON as a "
                        "text frame")
            return
        try:
            draft = parse_chat_frame(message, self.room_id)
        except FrameError as exc:
            self._metrics.bad_frames += 1
            self._error(exc.code, exc.detail)
            return
        try:
            await self._hub.publish(draft)
        except StoreUnavailable as exc:
            self._error("persistence_unavailable", str(exc))


async def serve_connection(stream: trio.abc.Stream, *, hub: Hub, metrics: Metrics,
                           limits: Limits, room_id: int, remote: str,
                           trailing_data: bytes = b"") -> None:
    """Run one upgraded connection to its end. The caller closes ``stream``."""
    connection = ChatConnection(room_id, remote, hub, metrics)

    def on_slow() -> None:
        metrics.slow_consumer_disconnects += 1
        log.info("%s: slow consumer in room %d, disconnecting", remote, room_id)

    ws = connection.ws = WebSocket(stream, limits, on_slow, trailing_data)
    metrics.connections_total += 1
    hub.connections.add(connection)
    try:
        try:
            room = await hub.join(room_id, connection)
        except Exception:
            log.exception("%s: cannot join room %d", remote, room_id)
            ws.close(INTERNAL_ERROR, "room unavailable")
            await ws.serve(connection.on_message)
            return
        try:
            await ws.serve(connection.on_message)
        finally:
            hub.leave(room, connection)
        if ws.close_code == MESSAGE_TOO_BIG:
            metrics.oversized_frames += 1
    finally:
        hub.connections.discard(connection)
