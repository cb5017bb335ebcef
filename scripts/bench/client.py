"""One connection of the load generator: a non-blocking socket that does the
upgrade itself and scans runs of server frames with regexes, never decoding JSON."""

from __future__ import annotations

import base64
import random
import re
import socket
from typing import TYPE_CHECKING

from bench import HOST
from bench.report import BIN_NS
from tests.wire import accept_key, client_frame, handshake_request

if TYPE_CHECKING:
    from bench.loadgen import Load

# Message frames as both servers lay them out: the id first, the content after.
_IDS = re.compile(rb'\x81(?:\x7e..|[\x00-\x7d])\{"id":(\d+),', re.S)
_MEASURED = re.compile(rb'"content":"m(\d+):')
_MEASURED_FROM = re.compile(rb'"content":"m(\d+):s(\d+):')  # send time and sender
# Presence events carry no id; they are counted, not taken for messages.
_EVENT = re.compile(rb'"message_type":"chat_(?:enter|exit)"')
_ASCII = bytes(range(128))


class Client:
    """One connection of the load generator: a non-blocking socket driven by :class:`Load`.

    It does the HTTP upgrade itself, parses server frames with a few slices each
    and sends masked frames. Message frames are not JSON-decoded: the id is the
    number after ``{"id":`` (both servers put it first) and the send time is read
    from the content, ``<phase><time_ns>:s<sender>:...``, where phase ``m`` marks
    a measured message. ``same``, with several nodes, holds the senders (their
    numbers as bytes) on this client's node, to split latency by hop.
    """

    def __init__(self, load: Load, path: str, port: int, timed: bool = True,
                 same: frozenset[bytes] | None = None) -> None:
        self.load = load
        self.timed = timed  # whether this client's latencies go into the histogram
        self.same = same
        self.tally = load.tally
        self.expected = load.tally.expected  # measured messages this client should get
        self.key = base64.b64encode(random.randbytes(16)).decode()
        self.request = handshake_request(path, key=self.key, host=f"{HOST}:{port}")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.fd = self.sock.fileno()
        self.upgraded = False
        self.ended = False
        self.error: str | None = None
        self.buf = b""
        self.out = b""
        self.fragments = bytearray()
        self.counted_done = False
        self.close_sent = False
        self.close_code: int | None = None
        self.close_reason = ""
        # Ordering and loss.
        self.first_id = 0
        self.last_id = 0
        self.frames = 0  # message frames with a new, increasing id
        self.count = 0  # measured messages received
        self.violations = 0
        self.gaps = 0
        self.last_rx_ns = 0

    def connect(self, port: int, timeout: float) -> None:
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.load.register(self)
        self.write(self.request)

    @property
    def alive(self) -> bool:
        return self.upgraded and not self.close_sent and not self.ended

    # reading

    def on_readable(self, now: int) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(f"recv: {exc}")
            return
        if not data:
            self.end(None if self.close_code is not None or self.close_sent
                     else "connection closed without a close frame")
            return
        if self.upgraded:
            self.feed(data, now)
        else:
            self._upgrade(data, now)

    def feed(self, data: bytes, now: int) -> None:
        """Take bytes from the socket: every complete frame is handled, the rest kept."""
        if self.buf:
            data = self.buf + data
        n = len(data)
        # The usual case: only unfragmented text frames with ASCII payloads and
        # two-byte lengths under 0x8000 with no byte over 0x7f. Then every byte
        # over 0x7f is a frame's first byte, 0x81, and only the last frame's
        # header needs reading. The messages are then read with two regex scans
        # over the whole run of frames instead of frame by frame.
        high = data.translate(None, _ASCII)
        frames = len(high)
        pos = -1
        if frames and high == b"\x81" * frames:
            last = data.rfind(b"\x81")
            if n - last < 4:
                pos, frames = last, frames - 1
            elif data[last + 1] == 126:
                end = last + 4 + ((data[last + 2] << 8) | data[last + 3])
                if end == n:
                    pos = n
                elif end > n:
                    pos, frames = last, frames - 1
        if pos < 0:
            pos, frames = self._walk(data)
        if frames < 0:
            pos = self._frames(data, now)
        elif frames and not self._run(data, pos, frames, now):
            self._frames(data[:pos], now)
        self.buf = data[pos:] if pos < n else b""

    @staticmethod
    def _walk(data: bytes) -> tuple[int, int]:
        """Where the complete frames end and how many: -1 frames if not all are text."""
        n = len(data)
        pos = frames = 0
        while n - pos >= 2:
            length = data[pos + 1]
            if data[pos] != 0x81 or length > 126:
                return pos, -1
            if length == 126:
                if n - pos < 4:
                    break
                end = pos + 4 + ((data[pos + 2] << 8) | data[pos + 3])
            else:
                end = pos + 2 + length
            if end > n:
                break
            pos = end
            frames += 1
        return pos, frames

    def _run(self, data: bytes, end: int, frames: int, now: int) -> bool:
        """Handle ``frames`` text frames in ``data[:end]`` if they are consecutive messages.

        Returns False (having done nothing) when anything is unusual; the caller
        then goes frame by frame.
        """
        ids = _IDS.findall(data, 0, end)
        if len(ids) != frames:
            return False
        first = int(ids[0])
        if (self.last_id and first != self.last_id + 1) or (
                frames > 1 and list(map(int, ids)) != list(range(first, first + frames))):
            return False
        if not self.first_id:
            self.first_id = first
        self.last_id = first + frames - 1
        self.frames += frames
        if self.timed and self.same is not None:
            found = _MEASURED_FROM.findall(data, 0, end)
            measured = len(found)
            same, lat_same, lat_cross = self.same, self.tally.lat_same, self.tally.lat_cross
            for t, s in found:
                (lat_same if s in same else lat_cross)[(now - int(t)) // BIN_NS] += 1
        elif self.timed:
            sent_at = _MEASURED.findall(data, 0, end)
            measured = len(sent_at)
            if measured:
                self.tally.lat.update([(now - t) // BIN_NS for t in map(int, sent_at)])
        else:
            measured = data.count(b'"content":"m', 0, end)
        if measured:
            self.last_rx_ns = now
            self.count += measured
            if self.count >= self.expected:
                self._finish()
        return True

    def _frames(self, data: bytes, now: int) -> int:
        """Frame by frame: any frame type, any length. Returns the bytes consumed."""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                self.end("masked frame from the server")
                return n
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            if b0 == 0x81:
                self._message(data, start, end, now)
            else:
                self._other(b0, data[start:end], now)
                if self.ended:
                    return n
            pos = end
        return pos

    def _message(self, data: bytes, start: int, end: int, now: int) -> None:
        if not data.startswith(b'{"id":', start, end) and _EVENT.search(data, start, end):
            self.tally.events += 1
            return
        comma = data.find(b",", start + 6, end)
        try:
            if not data.startswith(b'{"id":', start, end) or comma < 0:
                raise ValueError
            message_id = int(data[start + 6:comma])
        except ValueError:
            self.tally.other(data[start:end])
            return
        if message_id <= self.last_id:
            self.violations += 1
            return
        if self.last_id and message_id != self.last_id + 1:
            self.gaps += message_id - self.last_id - 1
        if not self.first_id:
            self.first_id = message_id
        self.last_id = message_id
        self.frames += 1
        at = data.find(b'"content":"', comma, end) + 11
        if at > 10 and data[at] == 0x6D:  # "m": a measured message
            colon = data.find(b":", at + 1, end)
            if self.timed and colon > 0 and data[at + 1:colon].isdigit():
                lat = self.tally.lat
                if self.same is not None:
                    sender = data[colon + 2:data.find(b":", colon + 2, end)]
                    lat = self.tally.lat_same if sender in self.same else self.tally.lat_cross
                lat[(now - int(data[at + 1:colon])) // BIN_NS] += 1
            self.last_rx_ns = now
            self.count += 1
            if self.count >= self.expected:
                self._finish()

    def _other(self, b0: int, payload: bytes, now: int) -> None:
        opcode = b0 & 0x0F
        if opcode in (0x0, 0x1):  # fragments of a text message
            self.fragments += payload
            if b0 & 0x80:
                whole, self.fragments = bytes(self.fragments), bytearray()
                self._message(whole, 0, len(whole), now)
        elif opcode == 0x8:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.close_code = 1005
            self.close()
            self.end(None)
        elif opcode == 0x9:
            self.tally.pings += 1
            self.write(client_frame(payload, 0xA))
        elif opcode != 0xA:
            self.tally.other(payload)

    def _upgrade(self, data: bytes, now: int) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            if len(self.buf) > 16384:
                self.end("oversized handshake response")
            return
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = accept_key(self.key)
        if len(status) < 2 or status[1] != b"101":
            self.end(f"upgrade refused: {lines[0].decode('latin-1')}")
            return
        if headers.get(b"sec-websocket-accept") != accept:
            self.end("bad Sec-WebSocket-Accept")
            return
        self.upgraded = True
        self.buf = b""
        if rest:
            self.feed(rest, now)

    # writing and closing

    def write(self, data: bytes) -> bool:
        if self.ended:
            return False
        if self.out:
            self.out += data
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.end(f"send: {exc}")
            return False
        if sent < len(data):
            self.out = data[sent:]
            self.load.pending.add(self)
        return True

    def flush(self) -> None:
        data, self.out = self.out, b""
        self.load.pending.discard(self)
        if data:
            self.write(data)

    def send_text(self, text: str) -> bool:
        return self.alive and self.write(client_frame(text.encode()))

    def close(self, code: int = 1000) -> None:
        if self.upgraded and not self.close_sent and not self.ended:
            self.close_sent = True
            self.write(client_frame(code.to_bytes(2, "big"), 0x8))

    def end(self, error: str | None) -> None:
        """Close the socket; ``error`` says why if it was not a clean close."""
        if self.ended:
            return
        self.ended = True
        if error and self.error is None:
            self.error = error
        self.load.unregister(self)
        self.sock.close()
        self._finish()

    def _finish(self) -> None:
        if not self.counted_done:
            self.counted_done = True
            self.tally.finished += 1
