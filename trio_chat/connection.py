"""One chat connection (the seed's Client, LINE's UserActor).

Owns a member's session in one room: it joins the room, turns each incoming
frame into a published message or an error frame, and leaves the room when
the connection ends. The task that calls :func:`serve_connection` is its only
task, the reader; writing and the heartbeat are
:class:`~trio_chat.websocket.Writers`'.

Frames are rate limited per connection and per identity (every connection of
one token's author, or of one address when tokens are off). History is queued
at the pace the socket takes it; live frames arriving meanwhile are held back
and count against the same queue bound: a member over it is closed as a slow
consumer (4001) and resumes later.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from functools import partial

import attrs
import trio

from .auth import TokenBucket
from .broker import BrokerUnavailable
from .config import LimitsConfig
from .deflate import Deflate
from .flush import Flush
from .framing import (
    BANNED,
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    SLOW_CONSUMER,
    TRY_AGAIN_LATER,
    text_frame,
)
from .hub import Hub
from .metrics import Metrics
from .outbound import encode_ack, encode_error
from .protocol import (
    Draft,
    FrameError,
    Message,
    Typing,
    check_change,
    parse_frame,
    peek_client_msg_id,
)
from .room import Room
from .store import Outcome, StoreUnavailable
from .websocket import WebSocket
from .writers import Writers

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class ChatConnection:
    room_id: int
    remote: str
    _hub: Hub
    _metrics: Metrics
    # Who is connected: from the upgrade URL's author_id, else the first valid frame's.
    author_id: int | None = None
    # A token proved author_id: a frame claiming anyone else is refused.
    verified: bool = False
    bucket: TokenBucket | None = None
    flood_limit: int = 0
    typing_interval: float = 0.0
    # Largest text frame other than a chat_img (server.maxFrameBytes).
    frame_limit: int = 64 * 1024
    ws: WebSocket = attrs.field(init=False)
    room: Room | None = attrs.field(init=False, default=None)
    # Shared by every connection of this one's identity (see IdentityRates).
    identity_bucket: TokenBucket | None = None
    # Live frames (and large rooms' flushes) kept back while history is sent, and
    # their frames and bytes.
    _held: list[bytes | Flush] | None = attrs.field(init=False, default=None)
    _held_frames: int = attrs.field(init=False, default=0)
    _held_bytes: int = attrs.field(init=False, default=0)
    _typed_at: float = attrs.field(init=False, default=-math.inf)
    _on_slow: Callable[[], None] = lambda: None

    @property
    def queued_bytes(self) -> int:
        return self.ws.queued_bytes + self._held_bytes

    def send_frame(self, frame: bytes) -> None:
        if self._held is None:
            self.ws.send_frame(frame)
        else:
            self._hold(frame, 1, len(frame))

    def send_flush(self, flush: Flush) -> None:
        if self._held is None:
            self.ws.send_flush(flush)
        else:
            self._hold(flush, len(flush.frames), flush.nbytes)

    def _hold(self, item: bytes | Flush, frames: int, size: int) -> None:
        held = self._held
        assert held is not None
        if self.ws.closing:
            return
        held.append(item)
        self._held_frames += frames
        self._held_bytes += size
        if self._held_frames > self.ws.limits.queue_frames or \
                not self.ws.fits(self._held_bytes):
            # History and what arrived meanwhile do not fit: resuming later costs less.
            held.clear()
            self._held_frames = self._held_bytes = 0
            self._on_slow()
            self.ws.close(SLOW_CONSUMER, "slow consumer: outbound queue full during history")

    async def send_history(self, frames: list[bytes]) -> None:
        await self.ws.send_paced(frames, self.ws.limits.queue_bytes // 4)

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        self._held_frames = self._held_bytes = 0
        for item in held:
            if isinstance(item, bytes):
                self.ws.send_frame(item)
            else:
                self.ws.send_flush(item)

    def close(self, code: int, reason: str) -> None:
        self.ws.close(code, reason)

    def _error(self, code: str, detail: str, client_msg_id: str | None = None) -> None:
        self.ws.send_frame(text_frame(encode_error(code, detail, client_msg_id)))

    async def _banned(self, author_id: int) -> bool:
        """Close the connection if ``author_id``, now known, is banned from the room."""
        try:
            ban = await self._hub.ban_of(self.room_id, author_id)
        except Exception as exc:
            # The ban was checked at the upgrade whenever the author was known then.
            log.warning("%s: cannot check bans in room %d: %r", self.remote, self.room_id, exc)
            return False
        if ban is not None:
            self.ws.close(BANNED, ban.reason or "banned")
        return ban is not None

    async def ban_check_after_join(self, author_id: int) -> None:
        """Look at the bans again once joined (see :func:`serve_connection`).

        Failure boundary: an unexpected error closes this connection alone (1011),
        counted in ``connection_failures``; the hub's nursery it runs in goes on.
        """
        try:
            await self._banned(author_id)
        except Exception:
            self._metrics.unexpected("connection_failures", log, "%s: checking the bans of "
                                     "room %d again failed", self.remote, self.room_id)
            self.ws.close(INTERNAL_ERROR, "internal error")

    def _over_rate(self) -> TokenBucket | None:
        """The bucket (this connection's or its identity's) that refuses a frame now."""
        now = trio.current_time()
        for bucket in (self.bucket, self.identity_bucket):
            if bucket is not None and not bucket.take(now):
                return bucket
        return None

    async def on_message(self, message: str | bytes) -> None:
        if (bucket := self._over_rate()) is not None:
            self._metrics.rate_limited += 1
            if bucket.strikes >= self.flood_limit:
                self._metrics.flood_disconnects += 1
                log.info("%s: flooding room %d, disconnecting", self.remote, self.room_id)
                self.ws.close(POLICY_VIOLATION, "flooding: too many messages")
            else:
                self._error("rate_limited", "too many messages; slow down (this one was "
                                            "not accepted)", peek_client_msg_id(message))
            return
        if isinstance(message, bytes):
            self._metrics.bad_frames += 1
            self._error("binary_frame", "binary frames are not accepted; send JSON as a "
                        "text frame")
            return
        # The transport lets messages as large as an image's data URL through: anything
        # over the text limit must be a chat_img.
        oversized = len(message) * 4 > self.frame_limit and \
            len(message.encode("utf-8", "surrogatepass")) > self.frame_limit
        try:
            frame = parse_frame(message, self.room_id, author_known=self.author_id is not None)
        except FrameError as exc:
            if oversized:
                self._too_big()
                return
            self._metrics.bad_frames += 1
            self._error(exc.code, exc.detail, exc.client_msg_id)
            return
        if oversized and not (isinstance(frame, Draft) and frame.message_type == "chat_img"):
            self._too_big()
            return
        cmid = frame.client_msg_id if isinstance(frame, Draft) else None
        try:
            await self._handle(frame)
        except FrameError as exc:
            self._metrics.bad_frames += 1
            self._error(exc.code, exc.detail, exc.client_msg_id)
        except StoreUnavailable as exc:
            # The history store cannot say (a lookup) or cannot take more: refused, and
            # the sender told, so it can send again.
            self._error("persistence_unavailable", str(exc), cmid)
        except BrokerUnavailable as exc:
            self._error("sync_unavailable", f"{exc}; message not accepted, send it again", cmid)

    def _too_big(self) -> None:
        self.ws.close(MESSAGE_TOO_BIG, f"message over {self.frame_limit} bytes")

    async def _handle(self, frame: Draft | Typing) -> None:
        """Act on a valid frame; raises :class:`FrameError` to refuse it."""
        cmid = frame.client_msg_id if isinstance(frame, Draft) else None
        if frame.author_id is None:
            frame = attrs.evolve(frame, author_id=self.author_id)
        elif self.verified and frame.author_id != self.author_id:
            raise FrameError("author_mismatch", f"author_id {frame.author_id} is not you: your "
                                                f"token is for author {self.author_id}", cmid)
        assert frame.author_id is not None
        if self.author_id is None and self.room is not None:
            if await self._banned(frame.author_id):
                return
            self._hub.identify(self.room, self, frame.author_id)
        if isinstance(frame, Typing):
            await self._typing(frame.author_id)
            return
        target = None
        if frame.target_id is not None:
            target = await self._hub.message(self.room_id, frame.target_id)
            check_change(target, frame, frame.author_id)
        await self._hub.publish(frame, target, None if cmid is None else partial(
            self._settled, cmid))

    def _settled(self, cmid: str, message: Message, outcome: Outcome) -> None:
        if outcome is Outcome.REFUSED:
            self._error("persistence_refused", f"the history store refused message "
                        f"{message.id}; it was not delivered", cmid)
        else:
            ack = text_frame(encode_ack(cmid, message, durable=outcome is Outcome.STORED))
            if self.room is not None:
                self.room.send_after_pending(self, ack)
            else:
                self.ws.send_frame(ack)

    async def _typing(self, author_id: int) -> None:
        # Clients send these per keystroke: pass one on per interval, drop the rest.
        now = trio.current_time()
        if now - self._typed_at < self.typing_interval:
            return
        self._typed_at = now
        # Ephemeral: nobody misses a typing hint that could not be sent.
        with contextlib.suppress(BrokerUnavailable):
            await self._hub.typing(self.room_id, author_id)


async def serve_connection(stream: trio.abc.Stream, *, hub: Hub, metrics: Metrics,
                           writers: Writers, room_id: int, remote: str, since: int | None = None,
                           author_id: int | None = None, verified: bool = False,
                           rate: LimitsConfig | None = None, trailing_data: bytes = b"",
                           frame_limit: int | None = None, expires: float | None = None,
                           deflate: Deflate | None = None) -> None:
    """Run one upgraded connection to its end. The caller closes ``stream``.

    ``frame_limit`` holds every frame but a chat_img to that many bytes (default:
    the transport's limit). ``expires`` (seconds since the epoch: the token's
    ``exp``) closes the connection with 4006 then. ``deflate``: permessage-deflate as
    agreed at the upgrade.
    """
    connection = ChatConnection(room_id, remote, hub, metrics, author_id, verified,
                                frame_limit=frame_limit or writers.limits.max_message_bytes)
    if rate is not None:
        connection.bucket = TokenBucket(rate.messages_per_second, rate.message_burst)
        connection.flood_limit = rate.flood_limit
        connection.typing_interval = rate.typing_interval
    # A token's subject is one identity wherever it connects from; without tokens an
    # author id is only a claim, so the address is.
    identity = f"author:{author_id}" if verified else f"ip:{remote.rpartition(':')[0]}"
    rates = hub.identity_rates
    if rates is not None and rate is not None:
        connection.identity_bucket = rates.acquire(identity)

    def on_slow() -> None:
        metrics.slow_consumer_disconnects += 1
        log.info("%s: slow consumer in room %d, disconnecting", remote, room_id)

    def on_failure() -> None:
        metrics.frame_failures += 1

    connection._on_slow = on_slow
    ws = connection.ws = WebSocket(
        stream, writers, on_slow, trailing_data, on_failure,
        ip=remote.rpartition(":")[0] or remote,
        deflater=None if deflate is None else writers.deflaters.get(deflate.window_bits))
    if expires is not None:
        ws.expires_at = trio.current_time() + (expires - time.time())
    metrics.connections_total += 1
    # The connection's number in this process, for following it through the log.
    number = metrics.connections_total
    opened = trio.current_time()
    log.debug("%s: connection %d opened in room %d", remote, number, room_id,
              extra={"event": "ws_open", "connection": number, "room": room_id,
                     "remote": remote})
    hub.connections.add(connection)
    try:
        try:
            room = await hub.join(room_id, connection, since)
        except Exception as exc:
            # Typically the store is unreachable and the room cannot learn its last id.
            log.warning("%s: cannot open room %d: %r", remote, room_id, exc)
            ws.close(TRY_AGAIN_LATER, "room unavailable, try again later")
            await ws.serve(connection.on_message)
            return
        connection.room = room
        if author_id is not None:
            # A ban made after the upgrade's check closed the room's members before this
            # one was among them (its room was still starting, here or nowhere): the ban
            # is stored before that close is sent, so looking again now finds it. Beside
            # serving, which must start at once (the room counts on this member's
            # writer), and in the hub's nursery (a nursery per connection costs 1.3 KiB).
            hub.check_soon(partial(connection.ban_check_after_join, author_id))
        try:
            await ws.serve(connection.on_message)
        finally:
            hub.leave(room, connection)
        if ws.close_code == MESSAGE_TOO_BIG:
            metrics.oversized_frames += 1
        elif ws.close_code == TRY_AGAIN_LATER:
            # Once joined, only the reader closes with 1013: its inbound budget is full.
            metrics.inbound_budget_disconnects += 1
    finally:
        hub.connections.discard(connection)
        code = ws.close_code if ws.close_code is not None else ws.peer_close_code
        duration = trio.current_time() - opened
        log.debug("%s: connection %d closed in room %d with %s after %.3fs", remote, number,
                  room_id, code, duration,
                  extra={"event": "ws_close", "connection": number, "room": room_id,
                         "remote": remote, "close_code": code,
                         "duration": round(duration, 6)})
        if connection.identity_bucket is not None and rates is not None:
            rates.release(identity)
