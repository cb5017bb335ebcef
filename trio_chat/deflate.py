"""permessage-deflate (RFC 7692), sans-IO: the negotiation and the server's compressor.

Owns parsing a request's ``Sec-WebSocket-Extensions`` (:func:`negotiate`, whose
answer is a :class:`Deflate` record or None), compressing the frames the server
sends (:class:`FrameDeflater`, one per window size, shared by every
connection allowed that window) and the bound on what one compressed frame
costs. Decompressing what clients send is :class:`trio_chat.framing.FrameReader`'s,
since it is bounded by the reader's limits and budgets. Runs no task, does no IO.

What the server agrees to, always: ``server_no_context_takeover``, so every
message is compressed on its own and one compressed frame is valid for every
member that negotiated deflate (a broadcast is compressed once, not once per
member); and ``client_no_context_takeover``, which RFC 7692 section 7.1.1.2
lets a server ask for even when the offer did not, so a connection keeps no
inflate window between messages (about 44 KiB each: 10,000 idle connections
would hold 440 MB on top of the 84 MB they hold today). A client's
``server_max_window_bits`` of 9 to 15 is honoured (8 is declined: zlib cannot
make a raw deflate stream with a 256-byte window); ``client_max_window_bits``
is accepted and not answered, since the decompressor takes any window. An offer
with an unknown or repeated parameter, or a value out of range, is declined and
the next offer is considered. A header that does not parse is ignored whole:
the connection goes on without compression (a client that offers an extension
works without it, so a refusal with 400 would only cost it its chat).
"""

from __future__ import annotations

import re
import zlib

import attrs

from .flush import Flush
from .metrics import Metrics

EXTENSION = "permessage-deflate"
# What a sync flush ends with, and what RFC 7692 7.2.1 has the sender remove.
TAIL = b"\x00\x00\xff\xff"
# Frames with a payload shorter than this go out uncompressed (RSV1 clear), which
# RFC 7692 allows per message: a typing event, an ack or a chat_enter (93 to 125 bytes)
# shrinks by 6 to 14 bytes for about 8 µs of compression, and an ack is compressed per
# connection, never shared; a message from about 130 bytes up shrinks by 28 % or more
# (scripts/bench_deflate.py --frames).
MIN_DEFLATE = 128
# zlib's compression level: the default; the messages are short, so its longer
# searches cost little (measured against level 1: the same size, within noise).
LEVEL = 6
# The compressed frames of recent flushes kept, in bytes of the frames: a large room
# hands members behind by different amounts flushes that share frames (trio_chat/room.py),
# and a frame is compressed once for all of them.
RECENT_BYTES = 512 * 1024
# zlib keeps matches this far short of its window (MIN_LOOKAHEAD): a window of
# 2**bits finds every match of a payload up to 2**bits - 262 bytes.
_LOOKAHEAD = 262

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_NAME = re.compile(rf"[ \t]*({_TOKEN})[ \t]*")
_PARAM = re.compile(rf";[ \t]*({_TOKEN})[ \t]*(?:=[ \t]*({_TOKEN}|{_QUOTED})[ \t]*)?")
_BITS = re.compile(r"[1-9][0-9]?")


@attrs.frozen
class Deflate:
    """permessage-deflate as agreed with one client."""

    # The window the server may compress with (the client's server_max_window_bits).
    window_bits: int = 15
    # Whether the client asked for server_max_window_bits: then the answer repeats it.
    window_asked: bool = False

    @property
    def header(self) -> str:
        """The ``Sec-WebSocket-Extensions`` value of the 101."""
        answer = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"
        if self.window_asked:
            answer += f"; server_max_window_bits={self.window_bits}"
        return answer


def parse_extensions(value: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """``Sec-WebSocket-Extensions`` (RFC 6455 9.1) as ``[(name, [(param, value)])]``, a
    quoted value unquoted; ValueError if it does not parse."""
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    pos, end = 0, len(value)
    while pos < end:
        if value[pos] in ", \t":
            pos += 1  # empty list elements are allowed (RFC 9110 5.6.1)
            continue
        name = _NAME.match(value, pos)
        if name is None:
            raise ValueError(f"expected an extension name at {pos}")
        pos = name.end()
        params: list[tuple[str, str | None]] = []
        while (param := _PARAM.match(value, pos)) is not None:
            raw = param.group(2)
            if raw is not None and raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params.append((param.group(1).lower(), raw))
            pos = param.end()
        if pos < end and value[pos] != ",":
            raise ValueError(f"unexpected {value[pos]!r} at {pos}")
        offers.append((name.group(1).lower(), params))
    return offers


def negotiate(header: str | None) -> Deflate | None:
    """What to agree to for a request's ``Sec-WebSocket-Extensions`` (all its copies
    joined with commas): the first permessage-deflate offer the server can honour,
    or None."""
    if not header:
        return None
    try:
        offers = parse_extensions(header)
    except ValueError:
        return None
    for name, params in offers:
        if name == EXTENSION and (agreed := _accept(params)) is not None:
            return agreed
    return None


def _accept(params: list[tuple[str, str | None]]) -> Deflate | None:
    """One offer's parameters (RFC 7692 7.1): what we agree to, or None to decline."""
    seen: set[str] = set()
    bits, asked = 15, False
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            if value is None or not _BITS.fullmatch(value) or not 8 <= int(value) <= 15:
                return None
            bits, asked = int(value), True
            if bits == 8:
                return None
        elif name == "client_max_window_bits":
            if value is not None and (not _BITS.fullmatch(value) or
                                      not 8 <= int(value) <= 15):
                return None
        else:
            return None
    return Deflate(bits, asked)


def window_for(size: int) -> int:
    """The smallest zlib window (9 to 15 bits) that finds every match in ``size`` bytes:
    a small window costs less to set up (the hash table zlib clears per message
    scales with it) and compresses a chat message as well as a large one."""
    bits = 9
    while bits < 15 and (1 << bits) - _LOOKAHEAD < size:
        bits += 1
    return bits


def deflate_frame(frame: bytes, max_bits: int = 15) -> bytes:
    """A server data frame (one built by :mod:`trio_chat.framing`: final, unmasked)
    with its payload compressed on its own and RSV1 set; the frame itself when its
    payload is short, when it needs a window over ``max_bits``, or when compressing
    does not make it smaller."""
    n = frame[1]
    head = 2 if n < 126 else 4 if n == 126 else 10
    size = len(frame) - head
    bits = window_for(size)
    if size < MIN_DEFLATE or bits > max_bits:
        return frame
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -bits, max(1, bits - 7))
    with memoryview(frame) as view:
        data = compressor.compress(view[head:]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    m = len(data) - len(TAIL)
    if m >= size:
        return frame
    first = frame[0] | 0x40
    if m < 126:
        header = bytes((first, m))
    elif m < 65536:
        header = bytes((first, 126)) + m.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + m.to_bytes(8, "big")
    with memoryview(data) as view:
        return header + view[:m]


@attrs.define(eq=False)
class FrameDeflater:
    """Compresses server frames for every connection whose window is ``max_bits``.

    A small room hands each member the same frame object, one member after
    the other: the last frame and its compressed form are kept (one entry), so
    a message is compressed once however many members it goes to. A large
    room's flush is compressed once through :meth:`Flush.encoded`, and shared
    the same way; the frames of recent flushes are kept compressed (at most
    :data:`RECENT_BYTES` of them), since the flushes of one round share frames.
    The counters are per compression, never per member.
    """

    max_bits: int
    _metrics: Metrics
    _last_in: bytes | None = attrs.field(init=False, default=None)
    _last_out: bytes = attrs.field(init=False, default=b"")
    # The name of this window's encoding of a flush (Flush.encoded): made once here, as
    # flush() runs once per member.
    _encoding: str = attrs.field(init=False, default="")
    # Recent flushes' frames by id, each with the frame (alive, so its id is its own)
    # and its compressed form; oldest first.
    _recent: dict[int, tuple[bytes, bytes]] = attrs.field(init=False, factory=dict)
    _recent_bytes: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._encoding = f"deflate{self.max_bits}"

    def frame(self, frame: bytes) -> bytes:
        """``frame`` as this window's connections send it."""
        if frame is self._last_in:
            return self._last_out
        out = self._deflate(frame)
        self._last_in, self._last_out = frame, out
        return out

    def flush(self, flush: Flush) -> bytes:
        """A large room's flush as this window's connections write it, made once."""
        return flush.encoded(self._encoding, self._join)

    def _join(self, frames: list[bytes]) -> bytes:
        recent = self._recent
        out = []
        for frame in frames:
            kept = recent.get(id(frame))
            if kept is not None and kept[0] is frame:
                out.append(kept[1])
                continue
            deflated = self._deflate(frame)
            recent[id(frame)] = (frame, deflated)
            self._recent_bytes += len(frame)
            out.append(deflated)
        while self._recent_bytes > RECENT_BYTES:
            oldest = recent.pop(next(iter(recent)))
            self._recent_bytes -= len(oldest[0])
        return b"".join(out)

    def _deflate(self, frame: bytes) -> bytes:
        out = deflate_frame(frame, self.max_bits)
        if out is not frame:
            metrics = self._metrics
            metrics.deflated_frames += 1
            metrics.deflate_in_bytes += len(frame)
            metrics.deflate_out_bytes += len(out)
        return out


@attrs.define(eq=False)
class Deflaters:
    """The server's :class:`FrameDeflater` for each window clients asked for (at most
    seven: 9 to 15 bits), made when first needed."""

    _metrics: Metrics = attrs.field(factory=Metrics)
    # Connections using one of them now (the gauge triochat_deflate_connections).
    connections: int = attrs.field(init=False, default=0)
    _by_bits: dict[int, FrameDeflater] = attrs.field(init=False, factory=dict)

    def get(self, bits: int) -> FrameDeflater:
        deflater = self._by_bits.get(bits)
        if deflater is None:
            deflater = self._by_bits[bits] = FrameDeflater(bits, self._metrics)
        return deflater
