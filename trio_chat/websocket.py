"""Server-side WebSockets after the upgrade: framing, writing, heartbeat, close.

Owns the transport of every connection. A connection has one task, its reader
(the task that calls :meth:`WebSocket.serve`); writing takes no task of its own
while the socket keeps up:

- a frame goes out at once from the task that sends it (one ``os.write``) when
  nothing is queued for that member and the socket takes it;
- inside :func:`queued_writes` (a large room's fan-out) frames are queued and
  the flusher task of :class:`Writers` writes each member's queue with one
  ``os.write`` once the fan-out is done, so messages to a member share a write;
- what a socket does not take is sent by a writer task started for that
  connection while its socket is full; it drops the member after ``writeWait``;
- the heartbeat of :class:`Writers` pings every connection once per
  ``pingPeriod`` and closes those whose pong does not come within ``pongWait``.

Those tasks run in the nursery of :meth:`Writers.run`, under the server's root.
A server frame is unmasked, so a broadcast is framed once
(:func:`trio_chat.protocol.text_frame`) and the same bytes go to every member.
Incoming frames are parsed by :class:`FrameReader`, sans-IO.

The outbound queue is bounded in frames and bytes. Its policy for a slow
consumer is *disconnect*: a member whose queue overflows, or whose socket does
not take a write within ``writeWait``, is closed (code 4001 or dropped) and the
room never waits for it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

log = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024

# Close codes; the README's table lists them for client authors.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
NO_STATUS = 1005
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
SLOW_CONSUMER = 4001
HEARTBEAT_TIMEOUT = 4002
# Closed by an operator through the rooms API.
ROOM_DELETED = 4003
KICKED = 4004
BANNED = 4005

# Opcodes, and the kinds of event FrameReader.feed returns.
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
FAIL = -1

# Close codes a peer may send (RFC 6455 7.4): 1004-1006 and 1015 are never on the wire.
_PEER_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013, 1014, *range(3000, 5000)))

PING_FRAME = b"\x89\x00"


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame; the reason is cut to fit a control frame, on a character."""
    if code == NO_STATUS:
        return b"\x88\x00"
    payload = code.to_bytes(2, "big") + \
        reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return bytes((0x88, len(payload))) + payload


def _pong_frame(payload: bytes) -> bytes:
    return bytes((0x8A, len(payload))) + payload


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    n = len(payload)
    if not n:
        return b""
    # One XOR over the whole payload as a big integer: C speed, no loop per byte.
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


class FrameReader:
    """Client-to-server frames in, messages and control frames out (RFC 6455, sans-IO).

    :meth:`feed` returns ``(kind, value)`` events: ``(TEXT, str)``,
    ``(BINARY, bytes)``, ``(PING, payload)``, ``(PONG, payload)``,
    ``(CLOSE, (code, reason))`` (code 1005 when the peer gave none), and last
    ``(FAIL, (code, reason))`` when the peer broke the protocol: the close code
    to answer with, after which the reader takes no more data. No extension is
    negotiated, so reserved bits are errors; client frames must be masked.
    A message over ``max_message`` bytes fails (1009) as soon as the header
    announcing it arrives, so nothing that large is buffered.
    """

    __slots__ = ("_buf", "_failed", "_part_bytes", "_part_op", "_parts", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf: bytes | bytearray = b""
        self._parts: list[bytes] = []
        self._part_op = 0
        self._part_bytes = 0
        self._failed = False

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        if self._failed:
            return []
        buf = self._buf
        if buf:
            assert isinstance(buf, bytearray)
            buf += data
        else:
            buf = data
        events: list[tuple[int, Any]] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                if b0 & 0x70:
                    raise _Fail(PROTOCOL_ERROR, "reserved bits set; no extension was negotiated")
                if not b1 & 0x80:
                    raise _Fail(PROTOCOL_ERROR, "client frames must be masked")
                opcode, fin, length = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
                head = pos + 6
                if length == 126:
                    if end - pos < 8:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 8
                elif length == 127:
                    if end - pos < 14:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 14
                    if length >> 63:
                        raise _Fail(PROTOCOL_ERROR, "frame length over 2**63")
                self._check_header(opcode, fin, length)
                if end - head < length:
                    break
                payload = _unmask(buf[head:head + length], buf[head - 4:head])
                pos = head + length
                if opcode >= CLOSE:
                    events.append(_control(opcode, payload))
                    if opcode == CLOSE:
                        self._failed = True
                        break
                elif fin and opcode:
                    events.append(_message(opcode, payload))
                elif opcode:
                    self._part_op, self._parts, self._part_bytes = opcode, [payload], length
                else:
                    self._parts.append(payload)
                    self._part_bytes += length
                    if fin:
                        op, parts = self._part_op, self._parts
                        self._part_op, self._parts, self._part_bytes = 0, [], 0
                        events.append(_message(op, b"".join(parts)))
        except _Fail as exc:
            events.append((FAIL, (exc.code, exc.reason)))
        if events and events[-1][0] == FAIL:
            self._failed = True
        if self._failed or pos == end:
            self._buf = b""
        elif buf is data:
            self._buf = bytearray(memoryview(data)[pos:])
        else:
            assert isinstance(buf, bytearray)
            del buf[:pos]
            self._buf = buf
        return events

    def _check_header(self, opcode: int, fin: int, length: int) -> None:
        if opcode >= CLOSE:
            if opcode > PONG:
                raise _Fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not fin:
                raise _Fail(PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise _Fail(PROTOCOL_ERROR, "control frame over 125 bytes")
            return
        if opcode > BINARY:
            raise _Fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode == CONTINUATION and not self._part_op:
            raise _Fail(PROTOCOL_ERROR, "continuation frame with no message to continue")
        if opcode != CONTINUATION and self._part_op:
            raise _Fail(PROTOCOL_ERROR, "new message before the last one was finished")
        if self._part_bytes + length > self.max_message:
            raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")


class _Fail(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


def _message(opcode: int, payload: bytes) -> tuple[int, Any]:
    if opcode == BINARY:
        return BINARY, payload
    try:
        return TEXT, payload.decode("utf-8")
    except UnicodeDecodeError:
        return FAIL, (INVALID_PAYLOAD, "invalid UTF-8 in a text message")


def _control(opcode: int, payload: bytes) -> tuple[int, Any]:
    if opcode != CLOSE:
        return opcode, payload
    if not payload:
        return CLOSE, (NO_STATUS, "")
    if len(payload) == 1:
        return FAIL, (PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _PEER_CLOSE_CODES:
        return FAIL, (PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return CLOSE, (code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        return FAIL, (INVALID_PAYLOAD, "invalid UTF-8 in a close reason")


# Whether a frame may be written from the sending task (WebSocket.send_frame);
# off inside queued_writes().
_write_now_allowed = True


@contextmanager
def queued_writes() -> Iterator[None]:
    """Leave every frame sent in this block to the flusher: for a large fan-out.

    A write(2) per member per message costs more than one per member per
    flush when there are many: under load the flusher runs late and sends
    several frames in one write. The block must not await (the flag is the
    whole process's).
    """
    global _write_now_allowed
    _write_now_allowed = False
    try:
        yield
    finally:
        _write_now_allowed = True


@attrs.frozen
class Limits:
    max_message_bytes: int
    queue_frames: int
    queue_bytes: int
    write_wait: float
    ping_period: float
    pong_wait: float
    close_timeout: float


@attrs.define(eq=False)
class Writers:
    """The tasks that write for every connection: the flusher, the heartbeat, and
    a writer for each connection whose socket is full, in one nursery."""

    limits: Limits
    _sockets: set[WebSocket] = attrs.field(init=False, factory=set)
    _dirty: list[WebSocket] = attrs.field(init=False, factory=list)
    # The flusher while it waits for something to flush.
    _parked: trio.lowlevel.Task | None = attrs.field(init=False, default=None)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the flusher and, in this task, the heartbeat, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            task_status.started()
            limits = self.limits
            # One timer for all connections; each is pinged at its own time, within a tick.
            tick = min(1.0, limits.ping_period / 10, limits.pong_wait / 10)
            while True:
                await trio.sleep(tick)
                now = trio.current_time()
                for ws in self._sockets:
                    ws._beat(now)

    def add(self, ws: WebSocket) -> None:
        self._sockets.add(ws)

    def discard(self, ws: WebSocket) -> None:
        self._sockets.discard(ws)

    def flush_soon(self, ws: WebSocket) -> None:
        self._dirty.append(ws)
        task, self._parked = self._parked, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def start_writer(self, ws: WebSocket) -> None:
        assert self._nursery is not None, "Writers.run is not running"
        self._nursery.start_soon(ws._write_blocked)

    async def _flusher(self) -> None:
        while True:
            if not self._dirty:
                self._parked = trio.lowlevel.current_task()

                def abort(_: object) -> trio.lowlevel.Abort:
                    self._parked = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            dirty, self._dirty = self._dirty, []
            for ws in dirty:
                ws._flush()
            # Let the tasks that queued run before the next round.
            await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class WebSocket:
    """The transport of one connection. Create it after the 101 response is sent."""

    _stream: trio.abc.Stream
    _writers: Writers
    _on_slow: Callable[[], None]
    _trailing: bytes = b""
    # Called when handling a frame failed unexpectedly (the connection closes with 1011).
    _on_failure: Callable[[], None] = lambda: None
    _reader: FrameReader = attrs.field(init=False)
    # Frames not yet written. Non-empty only while the connection is waiting for the
    # flusher (_dirty) or has a writer (_writing).
    _queue: list[bytes] = attrs.field(init=False, factory=list)
    _queued_bytes: int = attrs.field(init=False, default=0)
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
        self._reader = FrameReader(self._writers.limits.max_message_bytes)
        if isinstance(self._stream, trio.SocketStream):
            self._fd = self._stream.socket.fileno()

    @property
    def closing(self) -> bool:
        return self._closing

    def send_frame(self, frame: bytes) -> None:
        """Write or queue pre-framed bytes; never blocks. Overflow closes the connection."""
        if self._closing:
            return
        queue = self._queue
        if not queue and _write_now_allowed and not (frame := self._write_now(frame)):
            return
        queue.append(frame)
        self._queued_bytes += len(frame)
        limits = self._writers.limits
        if len(queue) > limits.queue_frames or self._queued_bytes > limits.queue_bytes:
            self._on_slow()
            self.close(SLOW_CONSUMER, "slow consumer: outbound queue full")
        else:
            self._flush_soon()

    def send_exempt(self, data: bytes) -> None:
        """Send frames exempt from the slow-consumer limit: control frames, and
        history (bounded by the replay limit instead)."""
        if not self._closing:
            self._send(data)

    def _send(self, data: bytes) -> None:
        if not self._queue and not (data := self._write_now(data)):
            return
        self._queue.append(data)
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
        self._send(close_frame(code, reason))
        # The peer has close_timeout to answer; a dead peer must not hold the reader.
        self._read_scope.deadline = min(
            self._read_scope.deadline, trio.current_time() + self._writers.limits.close_timeout)

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

    def _flush(self) -> None:
        """The flusher's turn: write everything queued, or hand it to a writer task."""
        self._dirty = False
        queue = self._queue
        if self._writing or not queue:
            return
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        if data := self._write_now(data):
            queue.append(data)
            self._queued_bytes = len(data)
            self._writing = True
            self._writer_scope = trio.CancelScope()
            self._writer_done = trio.Event()
            self._writers.start_writer(self)
        else:
            self._queued_bytes = 0

    async def _write_blocked(self) -> None:
        """Send the queue while the socket is full, then end; drops a slow consumer."""
        assert self._writer_scope is not None and self._writer_done is not None
        queue = self._queue
        try:
            with self._writer_scope:
                while queue:
                    data = queue[0] if len(queue) == 1 else b"".join(queue)
                    queue.clear()
                    self._queued_bytes = 0
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
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._read_scope.cancel()
        except Exception:
            # Runs outside the connection's task: its failure must end only this connection.
            log.exception("error writing to a connection")
            self._read_scope.cancel()
        finally:
            self._writing = False
            self._writer_done.set()

    def _beat(self, now: float) -> None:
        """The heartbeat's turn: close on a missed pong, else ping when due."""
        if self._closing:
            return
        limits = self._writers.limits
        if now >= self._pong_deadline:
            log.info("no pong within %gs, closing", limits.pong_wait)
            self.close(HEARTBEAT_TIMEOUT, "heartbeat timeout")
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
        try:
            with self._read_scope:
                await self._read(on_message)
                # The peer hung up without a close frame: still say goodbye properly.
                self.close(NORMAL)
        finally:
            writers.discard(self)
            # The caller closes the socket next, and its number can then be reused.
            self._fd = -1
            self._closing = True
            self._queue.clear()
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
        data, self._trailing = self._trailing, b""
        reader = self._reader
        while True:
            for kind, value in reader.feed(data) if data else ():
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
                    self.send_exempt(_pong_frame(value))
                elif kind == PONG:
                    self._pong_deadline = math.inf
                elif kind == CLOSE:
                    code, reason = value
                    if self.peer_close_code is None:
                        self.peer_close_code = code
                    # The peer's close: echo its code.
                    self.close(code, reason)
                    return
                else:
                    # A protocol error such as invalid UTF-8 (1007): send that code.
                    self.close(*value)
                    return
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
