"""Server-side WebSocket transport after the upgrade: writing, heartbeat, close.

Longer than the house's 400 lines on purpose: sending, the writer task, the
close handshake and the reader share one connection's state (its queue, its
reservation in the outbound budget, whether it is closing), and that state is
easiest to check when every change to it is in one class.

Owns the IO of every connection; the frames themselves (the reader, the frame
builders, the close codes) are :mod:`trio_chat.framing`'s, sans-IO. A
connection has one task, its reader (the task that calls
:meth:`WebSocket.serve`); writing takes no task of its own while the socket
keeps up:

- :meth:`WebSocket.send_frame` writes a frame at once from the task that sends
  it (one ``os.write``) when nothing is queued for that member and the socket
  takes it;
- :meth:`WebSocket.send_flush` (a large room's fan-out, from the flusher task of
  :class:`~trio_chat.writers.Writers`) writes the room's pending frames, joined
  once for every member, with one ``os.write``, or queues them as one entry
  that counts as that many frames; the flusher writes each queue it touched
  with one ``os.write`` at the end of its pass;
- what a socket does not take is sent by a writer task started for that
  connection while its socket is full; it drops the member after ``writeWait``;
- the heartbeat of :class:`~trio_chat.writers.Writers` pings every connection once per
  ``pingPeriod`` and closes those whose pong does not come within ``pongWait``.

Those tasks run in the nursery of :meth:`~trio_chat.writers.Writers.run`, under
the server's root.

The outbound queue is bounded in frames and bytes, and everything sent counts
(messages, events, acks, errors, history, pongs, and bytes a writer task is
still sending); only the server's pings and its close frame are exempt. Its
policy for a slow consumer is *disconnect*: a member whose queue overflows, or
whose socket does not take a write within ``writeWait``, is closed (code 4001
or dropped) and the room never waits for it. History goes through
:meth:`WebSocket.send_paced`, at the pace the socket takes it. Of several
pongs not yet sent only the latest is kept (RFC 6455 5.5.3). What is read is
:class:`~trio_chat.framing.FrameReader`'s, and so are its shares of the
large-message and inbound budgets; they are given back once the messages of a
read are handled and when the connection ends.

With permessage-deflate negotiated (a ``deflater``), every data frame sent is
compressed by the :class:`~trio_chat.deflate.FrameDeflater` that every
connection of its window shares, so a broadcast is compressed once; pings,
pongs and the close frame never are. The reader inflates compressed messages
within its limits, a bounded step per call: a read that leaves output to
inflate is fed again after a checkpoint, before the socket is read again.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .deflate import FrameDeflater
from .flush import Flush
from .framing import (
    BINARY,
    CLOSE,
    HEARTBEAT_TIMEOUT,
    INTERNAL_ERROR,
    NORMAL,
    PING,
    PING_FRAME,
    PONG,
    SLOW_CONSUMER,
    TEXT,
    TOKEN_EXPIRED,
    FrameReader,
    close_frame,
    pong_frame,
)
from .writers import Limits, Writers

log = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024
# The outbound budget is taken in steps of at least this many bytes: a queue of a
# few frames (a large room's flush) fits in one and never touches the budget again.
RESERVE_STEP = 4 * 1024


@attrs.define(eq=False)
class WebSocket:
    """The transport of one connection. Create it after the 101 response is sent."""

    _stream: trio.abc.Stream
    _writers: Writers
    _on_slow: Callable[[], None]
    _trailing: bytes = b""
    # Called when handling a frame failed unexpectedly (the connection closes with 1011).
    _on_failure: Callable[[], None] = lambda: None
    # Closed at this time of trio's clock (a token's expiry), by the heartbeat.
    expires_at: float = math.inf
    # The client's address: its connections share one outbound and one inbound budget.
    ip: str = ""
    # Compresses data frames (permessage-deflate was negotiated), or None.
    deflater: FrameDeflater | None = None
    _reader: FrameReader = attrs.field(init=False)
    # Frames not yet written. Non-empty only while the connection is waiting for the
    # flusher (_dirty) or has a writer (_writing).
    _queue: list[bytes] = attrs.field(init=False, factory=list)
    # Frames in the queue: an entry from a flush counts as all of its frames.
    _queued_frames: int = attrs.field(init=False, default=0)
    # Bytes queued, the pending pong and what a writer task is sending.
    _queued_bytes: int = attrs.field(init=False, default=0)
    # Held for this queue in the address's and the server's outbound budget: grown in
    # steps as the queue grows, kept at one step once it drains, so a connection that
    # keeps up costs the budget nothing per frame.
    _reserved: int = attrs.field(init=False, default=0)
    # The answer to the latest ping, while it waits behind the queue.
    _pong: bytes = attrs.field(init=False, default=b"")
    # Woken when the queue drains to send_paced's low-water mark (or the connection ends).
    _drained: trio.Event | None = attrs.field(init=False, default=None)
    _dirty: bool = attrs.field(init=False, default=False)
    _writing: bool = attrs.field(init=False, default=False)
    _writer_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _writer_done: trio.Event | None = attrs.field(init=False, default=None)
    # The socket's descriptor, for writes that need no waiting (-1: not a socket, or
    # the connection is over and the number may already belong to another).
    _fd: int = attrs.field(init=False, default=-1)
    _next_ping: float = attrs.field(init=False, default=math.inf)
    _pong_deadline: float = attrs.field(init=False, default=math.inf)
    _read_scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _closing: bool = attrs.field(init=False, default=False)
    close_code: int | None = attrs.field(init=False, default=None)
    close_reason: str = attrs.field(init=False, default="")
    peer_close_code: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        limits = self._writers.limits
        self._reader = FrameReader(limits.max_message_bytes, limits.large_message_bytes,
                                   self._writers.large, self._writers.inbound, self.ip,
                                   inflate=self.deflater is not None)
        if isinstance(self._stream, trio.SocketStream):
            self._fd = self._stream.socket.fileno()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def limits(self) -> Limits:
        return self._writers.limits

    @property
    def queued_bytes(self) -> int:
        """Bytes sent to this connection that its socket has not taken yet."""
        return self._queued_bytes

    def send_frame(self, frame: bytes) -> None:
        """Write or queue pre-framed bytes; never blocks. Overflow closes the connection."""
        if self._closing:
            return
        if self.deflater is not None:
            frame = self.deflater.frame(frame)
        if not self._queue and not (frame := self._write_now(frame)):
            return
        self._enqueue(frame, 1)

    def send_flush(self, flush: Flush) -> None:
        """A large room's flush: its frames, joined, in one write if nothing is queued,
        else as one queue entry that counts as all of them against the queue's bounds."""
        if self._closing:
            return
        data = flush.joined if self.deflater is None else self.deflater.flush(flush)
        if not self._queue and not (data := self._write_now(data)):
            return
        self._enqueue(data, len(flush.frames))

    def _enqueue(self, data: bytes, frames: int) -> None:
        self._queue.append(data)
        self._queued_frames += frames
        self._queued_bytes += len(data)
        limits = self._writers.limits
        if self._queued_frames > limits.queue_frames or \
                self._queued_bytes > limits.queue_bytes:
            self._close_slow("slow consumer: outbound queue full")
        elif self._queued_bytes > self._reserved and not self._reserve():
            self._close_slow("slow consumer: the address's outbound budget is full")
        else:
            self._flush_soon()

    def _close_slow(self, reason: str) -> None:
        self._on_slow()
        self.close(SLOW_CONSUMER, reason)

    def fits(self, extra: int) -> bool:
        """Whether ``extra`` more bytes (frames held back elsewhere) fit in the queue."""
        return self._queued_bytes + extra <= self._writers.limits.queue_bytes

    async def send_paced(self, frames: list[bytes], low_water: int) -> None:
        """Queue ``frames`` (history) in order, each once the queue is down to
        ``low_water`` bytes and a quarter of its frames: a replay goes out as fast
        as the socket takes it and holds about ``low_water`` bytes plus a frame,
        however small its frames. Returns early if the connection closes; the
        writer's ``writeWait`` drops a client that stops reading."""
        low_frames = self._writers.limits.queue_frames // 4
        for frame in frames:
            while (self._queued_bytes > low_water or self._queued_frames > low_frames) \
                    and not self._closing:
                self._drained = trio.Event()
                await self._drained.wait()
            if self._closing:
                return
            self.send_frame(frame)

    def _send(self, data: bytes) -> None:
        """Queue the server's own control frames (its pings, the close frame): exempt
        from the limits, as they are a few bytes per ping period and one close."""
        if not self._queue and not (data := self._write_now(data)):
            return
        self._queue.append(data)
        self._queued_frames += 1
        self._queued_bytes += len(data)
        self._flush_soon()

    def _answer_ping(self, payload: bytes) -> None:
        """Pong now if nothing waits, else replace the pong still waiting: one is kept."""
        if self._closing:
            return
        pong = pong_frame(payload)
        if not self._queue and not self._pong:
            rest = self._write_now(pong)
            if not rest:
                return
            if len(rest) < len(pong):
                # Half written, the rest is part of the stream now: it goes first.
                self._send(rest)
                return
        self._queued_bytes += len(pong) - len(self._pong)
        self._pong = pong
        if self._queued_bytes > self._writers.limits.queue_bytes:
            self._close_slow("slow consumer: outbound queue full")
        elif self._queued_bytes > self._reserved and not self._reserve():
            self._close_slow("slow consumer: the address's outbound budget is full")
        else:
            self._flush_soon()

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake: send a close frame after what is queued.

        What is queued is sent first: its head may be the rest of a frame already
        half written, and a close frame in the middle of a frame breaks the
        stream. Nothing more is queued after it, and a peer that does not take it
        within writeWait is dropped like any slow consumer.
        """
        if self._closing:
            return
        self._closing = True
        self.close_code, self.close_reason = code, reason
        # Nothing may follow the close frame: a pong still waiting is not needed any more.
        self._queued_bytes -= len(self._pong)
        self._pong = b""
        self._send(close_frame(code, reason))
        self._wake_drained()
        # The peer has close_timeout to answer; a dead peer must not hold the reader.
        self._read_scope.deadline = min(
            self._read_scope.deadline, trio.current_time() + self._writers.limits.close_timeout)

    def _reserve(self) -> bool:
        """Grow the reservation to cover the queue, a step at least; False if the
        address's or the server's outbound budget has no room (nothing is taken)."""
        more = max(RESERVE_STEP, self._queued_bytes - self._reserved)
        if self._writers.outbound.reserve(self.ip, more) is not None:
            return False
        self._reserved += more
        return True

    def _drained_to_zero(self) -> None:
        """The queue is empty: give back all of the reservation but one step."""
        if self._reserved > RESERVE_STEP:
            self._writers.outbound.release(self.ip, self._reserved - RESERVE_STEP)
            self._reserved = RESERVE_STEP

    def _write_now(self, data: bytes) -> bytes:
        """Write what the socket takes at once, from the caller's task; returns the rest.

        Only when nothing is queued or being sent, so frames keep their order.
        What the socket does not take (or an error) is left to a writer task,
        which waits for the socket and times out.
        """
        if self._fd < 0 or self._writing:
            return data
        try:
            sent = os.write(self._fd, data)
        except OSError:
            return data
        return data[sent:]

    def _flush_soon(self) -> None:
        if not self._dirty and not self._writing:
            self._dirty = True
            self._writers.flush_soon(self)

    def _take(self) -> bytes:
        """Everything waiting, as one write: the queue (ending on a frame boundary), then
        the pong."""
        queue = self._queue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._queued_frames = 0
        if self._pong:
            data, self._pong = data + self._pong, b""
        return data

    def _wake_drained(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def _flush(self) -> None:
        """The flusher's turn: write everything queued, or hand it to a writer task."""
        self._dirty = False
        if self._writing or not (self._queue or self._pong):
            return
        if data := self._write_now(self._take()):
            self._queue.append(data)
            self._queued_frames = 1
            self._queued_bytes = len(data)
            self._writing = True
            self._writer_scope = trio.CancelScope()
            self._writer_done = trio.Event()
            self._writers.start_writer(self)
        else:
            self._queued_bytes = 0
            if self._reserved > RESERVE_STEP:
                self._drained_to_zero()
        self._wake_drained()

    async def _write_blocked(self) -> None:
        """Send the queue while the socket is full, then end; drops a slow consumer."""
        assert self._writer_scope is not None and self._writer_done is not None
        try:
            with self._writer_scope:
                while self._queue or self._pong:
                    data = self._take()
                    with trio.move_on_after(self._writers.limits.write_wait) as timer:
                        await self._stream.send_all(data)
                    if timer.cancelled_caught:
                        if not self._closing:
                            self._on_slow()
                            self._closing = True
                            self.close_code, self.close_reason = SLOW_CONSUMER, \
                                "write timed out"
                        log.info("write blocked for %gs, dropping the connection",
                                 self._writers.limits.write_wait)
                        self._read_scope.cancel()
                        return
                    self._queued_bytes -= len(data)
                    if not self._queued_bytes and self._reserved > RESERVE_STEP:
                        self._drained_to_zero()
                    self._wake_drained()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._read_scope.cancel()
        except Exception:
            # Runs outside the connection's task: its failure must end only this connection.
            log.exception("error writing to a connection")
            self._read_scope.cancel()
        finally:
            self._writing = False
            self._writer_done.set()
            self._wake_drained()

    def _beat(self, now: float) -> None:
        """The heartbeat's turn: close on a missed pong or an expired token, else ping
        when due."""
        if self._closing:
            return
        limits = self._writers.limits
        if now >= self._pong_deadline:
            log.info("no pong within %gs, closing", limits.pong_wait)
            self.close(HEARTBEAT_TIMEOUT, "heartbeat timeout")
        elif now + self._writers.tick >= self.expires_at:
            # A tick early rather than late: the connection never outlives its token.
            self.close(TOKEN_EXPIRED, "token expired")
        elif now >= self._next_ping:
            self._next_ping = now + limits.ping_period
            if self._pong_deadline == math.inf:
                self._pong_deadline = now + limits.pong_wait
            self._send(PING_FRAME)

    async def serve(self, on_message: Callable[[str | bytes], Awaitable[None]]) -> None:
        """Read messages and pass each to ``on_message`` until the connection ends.

        Returns once the close handshake is done (or the peer is gone) and no
        writer is left; the caller still owns (and closes) the stream.
        """
        writers = self._writers
        self._next_ping = trio.current_time() + writers.limits.ping_period
        writers.add(self)
        if self.deflater is not None:
            writers.deflaters.connections += 1
        try:
            with self._read_scope:
                await self._read(on_message)
                # The peer hung up without a close frame: still say goodbye properly.
                self.close(NORMAL)
        finally:
            writers.discard(self)
            if self.deflater is not None:
                writers.deflaters.connections -= 1
            # The caller closes the socket next, and its number can then be reused.
            self._fd = -1
            self._closing = True
            self._queue.clear()
            self._pong = b""
            self._queued_frames = 0
            self._queued_bytes = 0
            if self._reserved:
                writers.outbound.release(self.ip, self._reserved)
                self._reserved = 0
            self._wake_drained()
            self._reader.release_all()
            if self._writer_scope is not None and self._writer_done is not None:
                # Cancelled, the writer ends at its next checkpoint; the deadline is
                # only a guard.
                self._writer_scope.cancel()
                with trio.move_on_after(writers.limits.close_timeout, shield=True):
                    await self._writer_done.wait()

    async def _read(self, on_message: Callable[[str | bytes], Awaitable[None]]) -> None:
        """Until the peer's close frame, a protocol error, or the end of the stream.

        After our own close frame, messages are read and dropped while the peer
        answers.
        """
        data: bytes | bytearray = self._trailing
        self._trailing = b""
        reader = self._reader
        while True:
            if data or reader.more:
                # Only the reader keeps the bytes while they are handled: they count in
                # the address's inbound budget until release_done.
                events, data = reader.feed(data), b""
                ended = await self._dispatch(events, on_message)
                events.clear()
                reader.release_done()
                if ended:
                    return
                if reader.more:
                    # A compressed message left output to inflate: others run first.
                    await trio.lowlevel.checkpoint()
                    continue
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return

    async def _dispatch(self, events: list[tuple[int, Any]],
                        on_message: Callable[[str | bytes], Awaitable[None]]) -> bool:
        """Act on what one read completed; True once the peer's close frame came."""
        for kind, value in events:
            if kind in (TEXT, BINARY):
                if self._closing:
                    continue
                try:
                    await on_message(value)
                except Exception:
                    # A bug in handling one frame ends this connection, politely.
                    log.exception("error handling a message; closing with 1011")
                    self._on_failure()
                    self.close(INTERNAL_ERROR, "internal server error")
            elif kind == PING:
                self._answer_ping(value)
            elif kind == PONG:
                self._pong_deadline = math.inf
            elif kind == CLOSE:
                code, reason = value
                if self.peer_close_code is None:
                    self.peer_close_code = code
                # The peer's close: echo its code.
                self.close(code, reason)
                return True
            else:
                # A protocol error such as invalid UTF-8 (1007), a message too big
                # (1009, seen at its header) or the inbound budget full (1013): send
                # that code, then read on and drop what comes until the peer hangs up
                # or close_timeout, so the peer still sending the rest reads our close
                # rather than a reset.
                self.close(*value)
        return False
