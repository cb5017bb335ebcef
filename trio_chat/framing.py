"""WebSocket framing, sans-IO (RFC 6455): bytes in, events out; frames out as bytes.

Longer than the house's 400 lines on purpose: the reader's parsing, the message it
is reading and its shares of the two budgets are one state machine, easiest to
check when every change to it is in one class.

Owns the wire layout of WebSocket frames on the server's side: the close codes
and opcodes, :class:`FrameReader` (client frames in: unmasking, fragmentation,
control frames, UTF-8, close codes, the size limit checked on the header),
:class:`LargeFrames` (the server-wide budget for messages over that limit, which
only a ``chat_img`` carrying a data URL may use), the reader's share of its
address's inbound budget, and the builders of server frames (text, close, ping,
pong). Server frames are unmasked, so a broadcast is framed once and the same
bytes go to every member. Runs no tasks and does no IO; the transport is
:mod:`trio_chat.websocket`.
"""

from __future__ import annotations

import zlib
from typing import Any

from .budget import ByteBudget

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
# The token the connection was opened with has expired (its exp claim).
TOKEN_EXPIRED = 4006
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
# A message over the frame limit is looked at this far to see whether it is a chat_img.
LARGE_PREFIX = 256
# The inbound budget is taken in steps of at least this many bytes, so a frame that
# arrives over several reads does not touch it on each of them.
INBOUND_STEP = 4 * 1024
# A large message (a chat_img data URL) counts this many times its size in the inbound
# budget: while it waits for a decoder the server holds its text, the content parsed
# out of it and the decoded image bytes (2.75 times its size, measured).
LARGE_WEIGHT = 3
# A message being read is kept unmasked in pieces of about this size, as its bytes
# arrive: a read costs the bytes it brought, never a frame's or a message's worth.
# (A buffer grown whole is copied whenever the allocator moves it, megabytes in one
# step, and connections sending alike all do it in the same loop iteration.) A whole
# frame up to this size that arrived in one read is unmasked at once.
PIECE = 64 * 1024
# A compressed message (permessage-deflate) is inflated at most this much per call of
# FrameReader.feed: a read that inflates to more leaves the rest for the next call,
# after the event loop had its turn, so a small frame of zeros costs no long stall.
INFLATE_STEP = 2 * PIECE
# What zlib's inflate holds while a compressed message is being read (its state and a
# 32 KiB window: 42 KiB, measured with tracemalloc), counted in the inbound budget meanwhile.
INFLATE_COST = 44 * 1024
# What a sync flush ends with: RFC 7692 7.2.2 has the receiver put it back.
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (server to client)."""
    return utf8_frame(text.encode("utf-8"))


def utf8_frame(payload: bytes) -> bytes:
    """:func:`text_frame` of a payload that is already UTF-8 (encoded JSON, say)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame; the reason is cut to fit a control frame, on a character."""
    if code == NO_STATUS:
        return b"\x88\x00"
    payload = close_payload(code, reason)
    return bytes((0x88, len(payload))) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then as much of the reason as fits in 125
    bytes, cut on a character."""
    return code.to_bytes(2, "big") + \
        reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping carrying ``payload`` (at most 125 bytes, as the reader checked)."""
    return bytes((0x8A, len(payload))) + payload


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``payload`` XORed with the 4-byte ``mask``, repeated (masking and unmasking alike)."""
    n = len(payload)
    if not n:
        return b""
    # One XOR over the whole payload as a big integer: C speed, no loop per byte.
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


# For each mask byte, the table that XORs a byte with it (bytes.translate).
_XOR = tuple(unmask(bytes(range(256)), bytes((m, m, m, m))) for m in range(256))


def _unmask_into(out: bytearray, data: bytes | bytearray, start: int, n: int,
                 mask: bytes) -> None:
    """Append ``data[start:start + n]`` to ``out``, unmasked with ``mask`` (its first
    byte for the first byte appended): each fourth byte through one table."""
    at = len(out)
    with memoryview(data) as view:
        out += view[start:start + n]
    for i in range(min(4, n)):
        out[at + i::4] = out[at + i::4].translate(_XOR[mask[i]])


class LargeFrames:
    """The bytes of messages over the frame limit that every connection together may
    be reading or handling at once (``server.largeFrameBudget``).

    Only a text message whose first bytes show a ``chat_img`` (an image sent as a
    data URL) may be that large, and only while the budget has room; a reader
    reserves a message's announced length as its frame headers arrive and gives
    it back once the message is handled, or when its connection ends.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes: False (and nothing reserved) if they do not fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class FrameReader:
    """Client-to-server frames in, messages and control frames out.

    :meth:`feed` returns ``(kind, value)`` events: ``(TEXT, str)``,
    ``(BINARY, bytes)``, ``(PING, payload)``, ``(PONG, payload)``,
    ``(CLOSE, (code, reason))`` (code 1005 when the peer gave none), and last
    ``(FAIL, (code, reason))`` when the peer broke the protocol: the close code
    to answer with, after which the reader takes no more data. Client frames
    must be masked; reserved bits are errors, but for RSV1 on the first frame
    of a message when permessage-deflate was negotiated (``inflate``).
    A message over ``max_message`` bytes fails (1009) as soon as the header
    announcing it arrives, so nothing that large is buffered; except a text
    message of at most ``large_message`` bytes whose first ``LARGE_PREFIX``
    bytes show a ``chat_img``, while ``large`` has room for it. What such
    messages reserved is given back by :meth:`release_done` once the caller
    has handled them, and by :meth:`release_all` when the connection ends.

    A data frame is unmasked as its bytes arrive, into the message's pieces of
    :data:`PIECE` bytes, so each call does work in proportion to the bytes it
    was given: a large message costs no more in the call that ends it than in
    the others, but for joining its pieces.

    With an ``inbound`` budget, what the reader holds between calls counts in it
    under ``key`` (the client's address): a partial frame, the message being
    read, the messages :meth:`feed` returned until :meth:`release_done`, and a
    large message at :data:`LARGE_WEIGHT` times its announced size from its first
    header. It is taken in :data:`INBOUND_STEP` steps; when the budget has no room
    the reader fails with 1013 (try again later), a large message at its header.

    A compressed message (RSV1, with ``inflate``) is inflated as its bytes arrive,
    with a new decompressor per message (the server asked for
    ``client_no_context_takeover``), each step asking zlib for no more than the
    message may still grow by: the limits above apply to the inflated bytes, so
    a small frame that would inflate past ``max_message`` fails with 1009 having
    made at most ``max_message`` bytes, and a message grows past it only as a
    ``chat_img`` (its first inflated bytes), within the large-message budget as
    it grows. Its compressed bytes may be at most about the inflated limit
    (checked at each header). While a decompressor is alive it counts
    :data:`INFLATE_COST` in the inbound budget. One call inflates at most
    :data:`INFLATE_STEP` bytes; :attr:`more` then asks for a call with no data.
    """

    __slots__ = ("_buf", "_done", "_failed", "_fin", "_inbound", "_inflate", "_key",
                 "_large", "_large_held", "_left", "_mask", "_part_bytes", "_part_op",
                 "_parts", "_parts_len", "_reserved", "_returned", "_z", "_zfin", "_zin",
                 "_zipped", "_zmore", "large_message", "max_message")

    def __init__(self, max_message: int, large_message: int = 0,
                 large: LargeFrames | None = None, inbound: ByteBudget | None = None,
                 key: str = "", inflate: bool = False) -> None:
        self.max_message = max_message
        self.large_message = large_message
        self._large = large or LargeFrames(0)
        self._inbound = inbound
        self._key = key
        # Held in the inbound budget; what feed returned and is not handled yet.
        self._reserved = 0
        self._returned = 0
        # Bytes not parsed yet: at most a frame header, a control frame, or a large
        # frame's first LARGE_PREFIX bytes.
        self._buf: bytes | bytearray = b""
        # The message being read, unmasked, in pieces of about PIECE bytes (a message of
        # tiny fragments still costs its bytes and no more); its opcode, the bytes its
        # frame headers announced so far, and the bytes it has.
        self._parts: list[bytearray] = []
        self._part_op = 0
        self._part_bytes = 0
        self._parts_len = 0
        # The data frame whose payload is arriving: its mask turned to the next byte
        # (empty between frames), the bytes still to come, and its FIN bit.
        self._mask = b""
        self._left = 0
        self._fin = 0
        self._failed = False
        # Reserved in the large budget by the message being read; by those read and
        # not yet released.
        self._large_held = 0
        self._done = 0
        # permessage-deflate was negotiated. For the message being read, if it is
        # compressed: its decompressor, the compressed bytes it has not taken yet,
        # whether they end the message, whether it may have more output for them.
        self._inflate = inflate
        self._zipped = False
        self._z: Any = None
        self._zin: bytes | bytearray = b""
        self._zfin = False
        self._zmore = False

    @property
    def more(self) -> bool:
        """Whether a compressed message has bytes left to inflate: call :meth:`feed`
        again (with no data) once the event loop had its turn."""
        return bool(self._zin or self._zmore) and not self._failed

    def feed(self, data: bytes | bytearray) -> list[tuple[int, Any]]:
        """The events completed by ``data``; a partial frame waits for the next call."""
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
            while True:
                if (self._zin or self._zmore) and not self._inflate_some(events):
                    break
                if self._mask:
                    pos = self._payload(buf, pos, end, events)
                    if self._mask:
                        if self._zin:
                            self._inflate_some(events)
                        break
                    continue
                if end - pos < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                if b0 & 0x70:
                    self._check_rsv(b0)
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
                if opcode >= CLOSE:
                    if end - head < length:
                        break
                    pos = head + length
                    events.append(_control(opcode, unmask(buf[head:pos], buf[head - 4:head])))
                    if opcode == CLOSE:
                        self._failed = True
                        break
                    continue
                if b0 & 0x40 or self._zipped:
                    self._check_compressed(opcode, length)
                elif self._part_bytes + length > self.max_message and \
                        not self._admit_large(opcode, length, buf, head, end):
                    break
                if end < head:  # the mask is not all here yet
                    break
                if opcode and b0 & 0x40:
                    self._zipped = True
                elif fin and opcode and length <= min(PIECE, end - head):
                    # A whole message in this read, the usual case: unmasked at once.
                    pos = head + length
                    self._message_done(length)
                    events.append(_message(opcode, unmask(buf[head:pos], buf[head - 4:head])))
                    continue
                if opcode:
                    self._part_op, self._part_bytes = opcode, length
                else:
                    self._part_bytes += length
                self._mask, self._left, self._fin = bytes(buf[head - 4:head]), length, fin
                pos = head
        except _Fail as exc:
            events.append((FAIL, (exc.code, exc.reason)))
        if self._failed or pos == end:
            self._buf = b""
        elif buf is data:
            self._buf = bytearray(memoryview(data)[pos:])
        else:
            assert isinstance(buf, bytearray)
            del buf[:pos]
            self._buf = buf
        if not (events and events[-1][0] == FAIL) and not self._cover(self._need()):
            events.append((FAIL, (TRY_AGAIN_LATER, _BUDGET_FULL)))
        if events and events[-1][0] == FAIL:
            self._fail()
        return events

    def _payload(self, buf: bytes | bytearray, pos: int, end: int,
                 events: list[tuple[int, Any]]) -> int:
        """Take what ``buf[pos:end]`` has of the current data frame's payload into the
        message's pieces; at the frame's end, the message if it was the last. Returns
        the position after what was taken."""
        take = min(self._left, end - pos)
        if self._zipped:
            return self._take_compressed(buf, pos, take)
        parts, at, stop = self._parts, pos, pos + take
        while at < stop:
            if not parts or len(parts[-1]) >= PIECE:
                parts.append(bytearray())
            n = min(PIECE - len(parts[-1]), stop - at)
            _unmask_into(parts[-1], buf, at, n, self._mask)
            turn = n % 4
            self._mask = self._mask[turn:] + self._mask[:turn]
            at += n
        self._parts_len += take
        self._left -= take
        if not self._left:
            self._mask = b""
            if self._fin:
                op, parts, size = self._part_op, self._parts, self._part_bytes
                self._part_op, self._parts, self._part_bytes, self._parts_len = 0, [], 0, 0
                self._message_done(size)
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
                events.append(_message(op, payload))
        return pos + take

    def _take_compressed(self, buf: bytes | bytearray, pos: int, take: int) -> int:
        """Unmask what ``buf`` has of a compressed frame's payload into the bytes to
        inflate (with the tail a sync flush lost, at the message's end)."""
        chunk = bytearray()
        _unmask_into(chunk, buf, pos, take, self._mask)
        turn = take % 4
        self._mask = self._mask[turn:] + self._mask[:turn]
        self._left -= take
        if self._zin:
            chunk[:0] = self._zin
        if not self._left:
            self._mask = b""
            if self._fin:
                chunk += _DEFLATE_TAIL
                self._zfin = True
        self._zin = chunk
        return pos + take

    def _inflate_some(self, events: list[tuple[int, Any]]) -> bool:
        """Inflate what is waiting of the compressed message, :data:`INFLATE_STEP` bytes
        at most; at its end, the message. False if output is left for the next call."""
        z = self._z
        if z is None:
            z = self._z = zlib.decompressobj(-15)
        step = INFLATE_STEP
        while True:
            if step <= 0:
                return False
            # One byte over what the message may still grow by shows it is too big.
            room = self.large_message if self._part_op == TEXT else 0
            want = min(PIECE, step, max(self.max_message, room) - self._parts_len + 1)
            try:
                out = z.decompress(self._zin, want)
            except zlib.error:
                raise _Fail(INVALID_PAYLOAD, "invalid compressed data") from None
            self._zin = b"" if z.eof else z.unconsumed_tail
            if out:
                parts = self._parts
                if not parts or len(parts[-1]) >= PIECE:
                    parts.append(bytearray())
                last = parts[-1]
                n = PIECE - len(last)
                last += out[:n]
                if len(out) > n:
                    parts.append(bytearray(out[n:]))
                self._parts_len += len(out)
                step -= len(out)
                if self._parts_len > self.max_message:
                    self._grow_large()
            self._zmore = len(out) == want and not z.eof
            if not (self._zin or self._zmore):
                break
        if self._zfin:
            op, parts, size = self._part_op, self._parts, self._parts_len
            self._part_op, self._parts, self._part_bytes, self._parts_len = 0, [], 0, 0
            self._zipped, self._zfin, self._z = False, False, None
            self._message_done(size)
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            events.append(_message(op, payload))
        return True

    def _grow_large(self) -> None:
        """A compressed message inflated past ``max_message``: what
        :meth:`_admit_large` checks at an uncompressed message's header, checked on
        its inflated bytes as they grow."""
        total = self._parts_len
        if self._part_op != TEXT or total > self.large_message:
            raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        if not self._large_held:
            prefix = bytes(self._parts[0][:LARGE_PREFIX])
            if b"chat_img" not in prefix and b"data:image/" not in prefix:
                raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        self._hold_large(total)

    def _check_rsv(self, b0: int) -> None:
        """Reserved bits: only RSV1, only with permessage-deflate, only on the first
        frame of a data message."""
        if b0 & 0x30 or not self._inflate:
            raise _Fail(PROTOCOL_ERROR, "reserved bits set; no extension was negotiated"
                        if not self._inflate else "RSV2 or RSV3 set")
        if not b0 & 0x0F or b0 & 0x08:
            raise _Fail(PROTOCOL_ERROR, "RSV1 on a continuation or control frame")

    def _check_compressed(self, opcode: int, length: int) -> None:
        """A frame of a compressed message: its compressed bytes may be at most what the
        largest message it could inflate to takes, stored (deflate's worst case adds
        5 bytes per stored block of up to 64 KiB; a sender can do better than this)."""
        op = self._part_op or opcode
        cap = max(self.max_message, self.large_message if op == TEXT else 0)
        if self._part_bytes + length > cap + cap // 256 + 64:
            raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")

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

    def _admit_large(self, opcode: int, length: int, buf: bytes | bytearray, head: int,
                     end: int) -> bool:
        """Admit a data frame taking its message over ``max_message``: True to read
        on, False to wait for more of its first bytes; :class:`_Fail` (1009) to refuse.

        Called again for the same header until its first bytes are in, so it
        reserves only what it has not reserved yet."""
        total = self._part_bytes + length
        if (self._part_op or opcode) != TEXT or total > self.large_message:
            raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        if not self._large_held:
            need = min(length, max(0, LARGE_PREFIX - self._parts_len))
            if end - head < need:
                return False
            # A message's first PIECE bytes are all in its first piece.
            first = bytes(self._parts[0][:LARGE_PREFIX]) if self._parts else b""
            prefix = first + unmask(buf[head:head + need], buf[head - 4:head])
            if b"chat_img" not in prefix and b"data:image/" not in prefix:
                raise _Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        if total > self._large_held:
            self._hold_large(total)
        return True

    def _hold_large(self, total: int) -> None:
        """Hold a large message's ``total`` bytes in the inbound and large-message
        budgets (what is already held is not taken again)."""
        if not self._cover(LARGE_WEIGHT * total + self._returned):
            raise _Fail(TRY_AGAIN_LATER, _BUDGET_FULL)
        if not self._large.take(total - self._large_held):
            raise _Fail(MESSAGE_TOO_BIG, "too many large messages in flight; send the "
                                         "image again later, or upload it")
        self._large_held = total

    def _message_done(self, size: int) -> None:
        """A message of ``size`` bytes is complete: it is held until handled."""
        self._returned += LARGE_WEIGHT * self._large_held or size
        self._done += self._large_held
        self._large_held = 0

    def _need(self) -> int:
        """What the inbound budget must cover now. A large message's weighted size
        covers its bytes in the buffers."""
        held = len(self._buf) + self._parts_len + len(self._zin)
        if self._z is not None:
            held += INFLATE_COST
        return max(held, LARGE_WEIGHT * self._large_held) + self._returned

    def _cover(self, need: int) -> bool:
        """Grow the reservation to ``need`` bytes, a step at least; False if the
        address's or the server's budget has no room (nothing is taken)."""
        if need <= self._reserved or self._inbound is None:
            return True
        more = max(INBOUND_STEP, need - self._reserved)
        if self._inbound.reserve(self._key, more) is not None:
            return False
        self._reserved += more
        return True

    def _shrink(self) -> None:
        """Give back what is reserved beyond the need: all of it once nothing is held,
        else only when a step or more is spare."""
        need = self._need()
        if self._inbound is not None and (
                need == 0 < self._reserved or self._reserved - need >= INBOUND_STEP):
            self._inbound.release(self._key, self._reserved - need)
            self._reserved = need

    def _drop_message(self) -> None:
        """Forget the unparsed bytes and the message being read."""
        self._buf, self._parts, self._part_op, self._part_bytes = b"", [], 0, 0
        self._parts_len, self._mask, self._left = 0, b"", 0
        self._zipped, self._z, self._zin, self._zfin, self._zmore = False, None, b"", False, \
            False

    def _fail(self) -> None:
        """The reader takes no more data: what it buffered and the message it was
        reading are dropped, and their share of the budgets given back."""
        self._failed = True
        self._drop_message()
        if self._large_held:
            self._large.give(self._large_held)
            self._large_held = 0
        self._shrink()

    @property
    def reserved(self) -> int:
        """Bytes this reader holds in its address's inbound budget."""
        return self._reserved

    def release_done(self) -> None:
        """The messages :meth:`feed` returned are handled: give back what they held."""
        if self._done:
            self._large.give(self._done)
            self._done = 0
        self._returned = 0
        self._shrink()

    def release_all(self) -> None:
        """Give back everything reserved (the connection is over)."""
        self._drop_message()
        self._done += self._large_held
        self._large_held = 0
        self.release_done()


_BUDGET_FULL = "the inbound budget of this address or server is full; try again later"


class _Fail(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


def _message(opcode: int, payload: bytes | bytearray) -> tuple[int, Any]:
    if opcode == BINARY:
        return BINARY, bytes(payload)
    try:
        return TEXT, payload.decode("utf-8")
    except UnicodeDecodeError:
        return FAIL, (INVALID_PAYLOAD, "invalid UTF-8 in a text message")


def _control(opcode: int, payload: bytes | bytearray) -> tuple[int, Any]:
    if opcode != CLOSE:
        return opcode, bytes(payload)
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
