"""One server-side WebSocket after the upgrade: framing, queueing, heartbeat, close.

Owns the transport of one connection and runs its writer task (which also
sends the heartbeat pings); the task that calls :meth:`WebSocket.serve` is the
reader. Parsing of incoming frames is wsproto's (the sans-IO engine under
trio-websocket); outgoing data frames bypass it: a server frame is unmasked, so
a broadcast is framed once (:func:`trio_chat.protocol.text_frame`) and the same
bytes go to every member: written at once from the caller's task when that
member's writer is idle and the socket takes them, else queued, and the writer
sends everything queued in one ``send_all``.

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

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

log = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024

# Close codes; the README's table lists them for client authors.
NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
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


# Whether a frame may be written from the caller's task when the writer is idle
# (WebSocket._write_now); off inside queued_writes().
_write_now_allowed = True


@contextmanager
def queued_writes() -> Iterator[None]:
    """Leave every frame queued in this block to its writer: for a large fan-out.

    A write(2) per member costs more than waking the writers when there are many:
    under load they run late and send several frames in one write. The block
    must not await (the flag is the whole process's).
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
class WebSocket:
    """The transport of one connection. Create it after the 101 response is sent."""

    _stream: trio.abc.Stream
    _limits: Limits
    _on_slow: Callable[[], None]
    _proto: Connection = attrs.field(init=False)
    # A list, not a deque: it is only appended to and emptied whole, and an empty
    # deque costs a 64-slot block per connection.
    _queue: list[bytes] = attrs.field(init=False, factory=list)
    _queued_bytes: int = attrs.field(init=False, default=0)
    # The writer while it waits for something to send (a ParkingLot costs an
    # OrderedDict per connection for at most one waiter).
    _parked: trio.lowlevel.Task | None = attrs.field(init=False, default=None)
    # The socket's descriptor, for writes that need no waiting (-1: not a socket).
    _fd: int = attrs.field(init=False, default=-1)
    _parts: list[str | bytes] = attrs.field(init=False, factory=list)
    _part_bytes: int = attrs.field(init=False, default=0)
    _pong_deadline: float = attrs.field(init=False, default=math.inf)
    _read_scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _closing: bool = attrs.field(init=False, default=False)
    _close_sent: bool = attrs.field(init=False, default=False)
    close_code: int | None = attrs.field(init=False, default=None)
    close_reason: str = attrs.field(init=False, default="")
    peer_close_code: int | None = attrs.field(init=False, default=None)
    # Bytes the client sent right after its upgrade request.
    _trailing: bytes = b""

    def __attrs_post_init__(self) -> None:
        self._proto = Connection(ConnectionType.SERVER, trailing_data=self._trailing)
        self._trailing = b""
        if isinstance(self._stream, trio.SocketStream):
            self._fd = self._stream.socket.fileno()

    @property
    def closing(self) -> bool:
        return self._closing

    def send_frame(self, frame: bytes) -> None:
        """Queue pre-framed bytes; never blocks. Overflow closes the connection."""
        if self._closing:
            return
        if self._parked is not None and not (frame := self._write_now(frame)):
            return
        queue = self._queue
        queue.append(frame)
        self._queued_bytes += len(frame)
        if len(queue) > self._limits.queue_frames or self._queued_bytes > self._limits.queue_bytes:
            self._on_slow()
            self.close(SLOW_CONSUMER, "slow consumer: outbound queue full")
        elif len(queue) == 1:
            self._wake()

    def send_exempt(self, data: bytes) -> None:
        """Queue frames exempt from the slow-consumer limit: control frames, and
        history (bounded by the replay limit instead)."""
        if self._closing or (self._parked is not None and not (data := self._write_now(data))):
            return
        self._queue.append(data)
        if len(self._queue) == 1:
            self._wake()

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake: drop what is queued, send a close frame."""
        if self._closing:
            return
        self._closing = True
        self.close_code, self.close_reason = code, reason
        self._queue.clear()
        self._queued_bytes = 0
        if self._proto.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._queue.append(self._proto.send(CloseConnection(code, reason)))
        self._close_sent = True
        self._wake()
        # The peer has close_timeout to answer; a dead peer must not hold the reader.
        self._read_scope.deadline = min(self._read_scope.deadline,
                                        trio.current_time() + self._limits.close_timeout)

    def _write_now(self, data: bytes) -> bytes:
        """Write what the socket takes at once, from the caller's task; returns the rest.

        Only while the writer is parked, so nothing is queued or being sent and the
        stream is open. Waking the writer to send one frame costs three trips
        through trio's scheduler and two cancel scopes; one write(2) is cheaper
        for a small room, whose fan-out mostly finds its members' writers idle
        (large rooms use :func:`queued_writes`). What the socket does not take (or
        an error) is left to the writer, which waits for the socket and times out
        as before.
        """
        if self._fd < 0 or not _write_now_allowed:
            return data
        try:
            sent = os.write(self._fd, data)
        except OSError:
            return data
        return data[sent:]

    def _wake(self) -> None:
        task, self._parked = self._parked, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def _park(self) -> None:
        self._parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def serve(self, on_message: Callable[[str | bytes], Awaitable[None]]) -> None:
        """Read messages and pass each to ``on_message`` until the connection ends.

        Runs the writer beside the caller and returns once both are done; the
        caller still owns (and closes) the stream.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, nursery.cancel_scope)
            with self._read_scope:
                while (message := await self._receive()) is not None:
                    try:
                        await on_message(message)
                    except Exception:
                        # A bug in handling one frame ends this connection, politely.
                        log.exception("error handling a message; closing with 1011")
                        self.close(INTERNAL_ERROR, "internal server error")
                # The peer hung up without a close frame: still say goodbye properly.
                self.close(NORMAL)
                # Drain until the peer answers our close frame or hangs up.
                while await self._receive() is not None:
                    pass

    async def _receive(self) -> str | bytes | None:
        proto = self._proto
        while True:
            for event in proto.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    if self._closing:
                        continue
                    data = event.data
                    if isinstance(data, str) and not data.isascii():
                        self._part_bytes += len(data.encode("utf-8"))
                    else:
                        self._part_bytes += len(data)
                    if self._part_bytes > self._limits.max_message_bytes:
                        self._parts.clear()
                        self.close(MESSAGE_TOO_BIG, f"message over "
                                   f"{self._limits.max_message_bytes} bytes")
                        continue
                    if event.message_finished:
                        parts, self._parts, self._part_bytes = self._parts, [], 0
                        if not parts:
                            return data
                        parts.append(data)
                        return "".join(parts) if isinstance(data, str) else b"".join(parts)
                    self._parts.append(data)
                elif isinstance(event, Ping):
                    if proto.state is ConnectionState.OPEN:
                        self.send_exempt(proto.send(event.response()))
                elif isinstance(event, Pong):
                    self._pong_deadline = math.inf
                elif isinstance(event, CloseConnection):
                    if self.peer_close_code is None:
                        self.peer_close_code = event.code
                    # Either the peer's close (echo it) or wsproto's verdict on a
                    # protocol error such as invalid UTF-8 (1007): send that code.
                    self.close(event.code, event.reason or "")
                    return None
            if proto.state is ConnectionState.CLOSED:
                return None
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            proto.receive_data(data)

    async def _writer(self, connection_scope: trio.CancelScope) -> None:
        limits = self._limits
        queue = self._queue
        next_ping = trio.current_time() + limits.ping_period
        while True:
            data = b""
            last = False
            # One timer scope for as long as writes go through at once, not one per
            # wait: entering and leaving a scope per frame was half the writer's time
            # at 200 frames/s a connection. _park is its only checkpoint, so the
            # timer never interrupts a write.
            with trio.move_on_at(min(next_ping, self._pong_deadline)):
                while True:
                    if not queue:
                        if self._close_sent:
                            return
                        await self._park()
                        continue
                    data = queue[0] if len(queue) == 1 else b"".join(queue)
                    queue.clear()
                    self._queued_bytes = 0
                    last = self._close_sent
                    # Most writes go through at once; the rest waits for the socket.
                    if (data := self._write_now(data)) or last:
                        break
            if data:
                with trio.move_on_after(limits.write_wait) as write_scope:
                    try:
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        connection_scope.cancel()
                        return
                if write_scope.cancelled_caught:
                    if not self._closing:
                        self._on_slow()
                        self._closing = True
                        self.close_code, self.close_reason = SLOW_CONSUMER, "write timed out"
                    log.info("write blocked for %gs, dropping the connection",
                             limits.write_wait)
                    connection_scope.cancel()
                    return
            if last:
                return
            now = trio.current_time()
            if now >= self._pong_deadline and not self._closing:
                log.info("no pong within %gs, closing", limits.pong_wait)
                self.close(HEARTBEAT_TIMEOUT, "heartbeat timeout")
            elif now >= next_ping and not self._closing:
                next_ping = now + limits.ping_period
                if self._pong_deadline == math.inf:
                    self._pong_deadline = now + limits.pong_wait
                self.send_exempt(self._proto.send(Ping()))
