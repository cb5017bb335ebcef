"""WebSocket framing, sans-IO: client frames read from in-memory bytes, server frames
checked against wsproto's parser. No sockets."""

from __future__ import annotations

import random

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)

from trio_chat import framing
from trio_chat.budget import ByteBudget
from trio_chat.framing import (
    BINARY,
    CLOSE,
    FAIL,
    INBOUND_STEP,
    LARGE_WEIGHT,
    PIECE,
    PING,
    PING_FRAME,
    PONG,
    TEXT,
    FrameReader,
    LargeFrames,
    close_frame,
    close_payload,
    pong_frame,
    text_frame,
    unmask,
    utf8_frame,
)

from .wire import client_frame


def feed_all(reader: FrameReader, data: bytes, chunk: int | None = None) -> list:
    if chunk is None:
        return reader.feed(data)
    events = []
    for i in range(0, len(data), chunk):
        events += reader.feed(data[i:i + chunk])
    return events


def test_a_text_frame_in_one_piece_and_byte_by_byte() -> None:
    frame = client_frame("héllo".encode())
    assert FrameReader(1000).feed(frame) == [(TEXT, "héllo")]
    assert feed_all(FrameReader(1000), frame * 3, chunk=1) == [(TEXT, "héllo")] * 3


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_every_length_encoding(size: int) -> None:
    payload = bytes(random.Random(size).randrange(256) for _ in range(size))
    events = feed_all(FrameReader(10**6), client_frame(payload, opcode=0x2), chunk=7000)
    assert events == [(BINARY, payload)]


def test_fragments_with_a_ping_between_them_and_utf8_split_across_them() -> None:
    text = "añb€c".encode()
    data = (client_frame(text[:2], fin=False) + client_frame(b"hi", opcode=0x9) +
            client_frame(text[2:5], opcode=0x0, fin=False) +
            client_frame(text[5:], opcode=0x0))
    assert FrameReader(100).feed(data) == [(PING, b"hi"), (TEXT, "añb€c")]


def test_pong_and_close_events() -> None:
    reader = FrameReader(100)
    assert reader.feed(client_frame(b"x", opcode=0xA)) == [(PONG, b"x")]
    close = client_frame((1001).to_bytes(2, "big") + "bye ✓".encode(), opcode=0x8)
    assert reader.feed(close + client_frame(b"after")) == [(CLOSE, (1001, "bye ✓"))]
    assert reader.feed(client_frame(b"more")) == [], "nothing is read after a close"
    assert FrameReader(100).feed(client_frame(b"", opcode=0x8)) == [(CLOSE, (1005, ""))]


def masked_head(first: int, length: int) -> bytes:
    return bytes((first, 0x80 | length)) + b"\0\0\0\0"


@pytest.mark.parametrize(("data", "code", "detail"), [
    (bytes((0x81, 0x02)) + b"hi", 1002, "must be masked"),
    (client_frame(b"hi")[:1].replace(b"\x81", b"\xc1") + client_frame(b"hi")[1:], 1002,
     "reserved bits"),
    (client_frame(b"x", opcode=0x3), 1002, "unknown opcode 3"),
    (client_frame(b"x", opcode=0xB), 1002, "unknown opcode 11"),
    (client_frame(b"x" * 126, opcode=0x9), 1002, "control frame over 125"),
    (client_frame(b"x", opcode=0x9, fin=False), 1002, "fragmented control"),
    (client_frame(b"x", opcode=0x0), 1002, "continuation frame with no message"),
    (client_frame(b"a", fin=False) + client_frame(b"b"), 1002, "before the last one"),
    (client_frame(b"\xff\xfe"), 1007, "invalid UTF-8"),
    (client_frame(b"\xe2\x82", fin=False) + client_frame(b"", opcode=0), 1007, "UTF-8"),
    (client_frame(b"\x03", opcode=0x8), 1002, "one-byte"),
    (client_frame((1005).to_bytes(2, "big"), opcode=0x8), 1002, "close code 1005"),
    (client_frame((999).to_bytes(2, "big"), opcode=0x8), 1002, "close code 999"),
    (client_frame((2000).to_bytes(2, "big"), opcode=0x8), 1002, "close code 2000"),
    (client_frame((1000).to_bytes(2, "big") + b"\xff", opcode=0x8), 1007, "close reason"),
    (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"\0\0\0\0", 1002, "2**63"),
])
def test_protocol_errors_name_their_close_code(data: bytes, code: int, detail: str) -> None:
    reader = FrameReader(1000)
    events = reader.feed(client_frame(b"first") + data)
    assert events[0] == (TEXT, "first"), "what came before the error is kept"
    kind, (got_code, reason) = events[-1]
    assert (kind, got_code) == (FAIL, code)
    assert detail in reason
    assert reader.feed(client_frame(b"later")) == []


def test_a_3000_close_code_is_allowed() -> None:
    assert FrameReader(10).feed(client_frame((3000).to_bytes(2, "big"), opcode=0x8)) == [
        (CLOSE, (3000, ""))]


def test_an_oversized_message_fails_on_its_header_before_the_payload_arrives() -> None:
    reader = FrameReader(1000)
    frame = client_frame(b"x" * 5000)
    assert reader.feed(frame[:20]) == [(FAIL, (1009, "message over 1000 bytes"))]
    fragmented = client_frame(b"x" * 600, fin=False) + client_frame(b"x" * 600, opcode=0)
    assert FrameReader(1000).feed(fragmented) == [(FAIL, (1009, "message over 1000 bytes"))]
    exact = client_frame(b"x" * 500, fin=False) + client_frame(b"x" * 500, opcode=0)
    assert FrameReader(1000).feed(exact) == [(TEXT, "x" * 1000)]


def test_agrees_with_wsproto_on_random_traffic() -> None:
    rng = random.Random(8)
    client = Connection(ConnectionType.CLIENT)
    wire, expected = b"", []
    for _ in range(300):
        roll = rng.random()
        if roll < 0.1:
            payload = rng.randbytes(rng.randrange(126))
            wire += client.send(Ping(payload))
            expected.append((PING, payload))
            continue
        size = rng.choice([0, 1, 100, 125, 126, 4000, 70000])
        if roll < 0.5:
            data: str | bytes = rng.randbytes(size)
            event: Message = BytesMessage(data=data)
            expected.append((BINARY, data))
        else:
            data = "".join(rng.choice("aé€😀 ") for _ in range(size // 2))
            event = TextMessage(data=data)
            expected.append((TEXT, data))
        wire += client.send(event)
    wire += client.send(CloseConnection(code=1000, reason="done"))
    expected.append((CLOSE, (1000, "done")))
    for chunk in (None, 1, 4096, 65536):
        assert feed_all(FrameReader(10**6), wire, chunk) == expected


def test_close_frame_cuts_a_long_reason_on_a_character() -> None:
    frame = close_frame(4001, "é" * 100)
    assert frame[0] == 0x88 and frame[1] == len(frame) - 2 <= 125
    assert frame[2:4] == (4001).to_bytes(2, "big")
    assert frame[4:].decode() == "é" * 61
    assert close_frame(1005) == b"\x88\x00"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_decodes_with_a_real_websocket_parser(size: int) -> None:
    text = "가" * (size // 3) + "x" * (size % 3)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(text_frame(text) + text_frame("next"))
    received = [event.data for event in client.events()]
    assert "".join(received[:-1]) == text
    assert received[-1] == "next"


def server_events(data: bytes) -> list:
    """What a real client makes of ``data`` from the server."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


def test_utf8_frame_is_text_frame_of_the_same_text() -> None:
    for text in ("", "héllo", "가" * 50_000):
        assert utf8_frame(text.encode()) == text_frame(text)


@pytest.mark.parametrize(("size", "header"), [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + (65536).to_bytes(8, "big")),
])
def test_text_frame_uses_the_shortest_length_encoding(size: int, header: bytes) -> None:
    frame = text_frame("x" * size)
    assert frame == header + b"x" * size


def test_control_frames_decode_with_a_real_websocket_parser() -> None:
    events = server_events(PING_FRAME + pong_frame(b"abc") + close_frame(4004, "kicked ✓"))
    assert isinstance(events[0], Ping) and events[0].payload == b""
    assert isinstance(events[1], Pong) and events[1].payload == b"abc"
    assert isinstance(events[2], CloseConnection)
    assert (events[2].code, events[2].reason) == (4004, "kicked ✓")


def test_close_payload_is_the_code_then_the_reason_cut_to_125_bytes() -> None:
    assert close_payload(1000) == b"\x03\xe8"
    assert close_payload(4001, "slow") == b"\x0f\xa1slow"
    # 62 two-byte characters would be 126 bytes with the code: one is dropped whole.
    assert close_payload(4001, "é" * 62) == b"\x0f\xa1" + ("é" * 61).encode()
    assert len(close_payload(1000, "x" * 300)) == 125


def test_unmask_undoes_masking_at_every_length() -> None:
    rng = random.Random(3)
    mask = bytes((0x12, 0x34, 0x56, 0x78))
    for size in (0, 1, 3, 4, 5, 127, 4096):
        payload = rng.randbytes(size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert unmask(masked, mask) == payload
        assert unmask(bytearray(payload), bytearray(mask)) == masked


def test_a_frame_split_inside_its_extended_length_waits_for_the_rest() -> None:
    reader = FrameReader(10**6)
    frame = client_frame(b"z" * 70_000, opcode=0x2)
    assert reader.feed(frame[:5]) == [], "the 8-byte length is not all there"
    assert reader.feed(frame[5:13]) == []
    assert reader.feed(frame[13:]) == [(BINARY, b"z" * 70_000)]
    assert reader.feed(client_frame(b"next")) == [(TEXT, "next")]


def test_a_partial_frame_and_fragments_count_in_the_inbound_budget_until_handled() -> None:
    budget = ByteBudget(64 * 1024, 1 << 20)
    reader = FrameReader(16 * 1024, inbound=budget, key="a")
    # Whole frames in one read never touch the budget.
    assert reader.feed(client_frame(b"hi")) == [(TEXT, "hi")]
    reader.release_done()
    assert budget.held() == 0
    # A partial frame takes a step; its fragments and the rest take what they need.
    frame = client_frame(b"x" * 10_000, fin=False)
    assert reader.feed(frame[:100]) == []
    assert reader.reserved == budget.held("a") == INBOUND_STEP
    assert reader.feed(frame[100:]) == []
    assert budget.held("a") == 10_000
    last = client_frame(b"y" * 5000, opcode=0)
    events = reader.feed(last)
    assert events == [(TEXT, "x" * 10_000 + "y" * 5000)]
    # Held while the message is handled, then given back at once.
    assert budget.held("a") >= 15_000
    reader.release_done()
    assert budget.held() == reader.reserved == 0


def test_a_reader_over_its_addresss_inbound_budget_fails_with_1013() -> None:
    budget = ByteBudget(24 * 1024, 1 << 20)
    first, second = (FrameReader(16 * 1024, inbound=budget, key="a") for _ in range(2))
    other = FrameReader(16 * 1024, inbound=budget, key="b")
    frame = client_frame(b"x" * 15_000)
    assert first.feed(frame[:-1]) == []
    held = budget.held("a")
    # The second connection of the address would pass the bound: it fails, and holds
    # nothing more; another address is not affected.
    assert second.feed(frame[:-1]) == [(FAIL, (1013, "the inbound budget of this address "
                                               "or server is full; try again later"))]
    assert second.feed(frame) == [] and budget.held("a") == held
    assert other.feed(frame[:-1]) == [] and budget.held("b") > 0
    assert first.feed(frame[-1:]) == [(TEXT, "x" * 15_000)]
    first.release_done()
    for reader in (first, second, other):
        reader.release_all()
    assert budget.held() == 0


def test_a_large_message_counts_three_times_from_its_header() -> None:
    budget = ByteBudget(3 * 20_000 + 8192, 1 << 20)
    large = LargeFrames(1 << 20)
    prefix = b'{"message_type": "chat_img", "content": "data:image/png;base64,'
    frame = client_frame(prefix + b"A" * 20_000)
    reader = FrameReader(1024, 100_000, large, inbound=budget, key="a")
    assert reader.feed(frame[:300]) == []
    payload = len(frame) - 8  # a 16-bit length and the mask
    assert budget.held("a") == LARGE_WEIGHT * payload and large.used == payload
    # A second one from the address does not fit: refused at its header, nothing kept.
    again = FrameReader(1024, 100_000, large, inbound=budget, key="a")
    assert again.feed(frame[:300])[-1][1][0] == 1013
    assert large.used == payload and budget.held("a") == LARGE_WEIGHT * payload
    events = reader.feed(frame[300:])
    assert events[0][0] == TEXT
    reader.release_done()
    assert budget.held() == large.used == 0


def test_payloads_around_a_piece_in_any_reads() -> None:
    rng = random.Random(5)
    for size in (PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7):
        payload = rng.randbytes(size)
        fragments = client_frame(payload, opcode=0x2, fin=False) + \
            client_frame(b"", opcode=0, fin=False) + client_frame(b"end", opcode=0)
        for chunk in (None, 4093, 9000):
            assert feed_all(FrameReader(10**6), client_frame(payload, opcode=0x2), chunk) == [
                (BINARY, payload)]
            assert feed_all(FrameReader(10**6), fragments, chunk) == [
                (BINARY, payload + b"end")]


def test_each_read_unmasks_no_more_than_it_brought(monkeypatch) -> None:
    """A large message arriving in reads is unmasked as they come, so the read that ends
    it does no more than the others (the connections of a busy server all read in the
    same loop iterations: a frame's worth in one read would stall it)."""
    unmasked = [0]

    def counted(out: bytearray, data: bytes, start: int, n: int, mask: bytes) -> None:
        unmasked[0] += n
        into(out, data, start, n, mask)

    into = framing._unmask_into
    monkeypatch.setattr(framing, "_unmask_into", counted)
    prefix = b'{"message_type": "chat_img", "content": "data:image/png;base64,'
    text = prefix + b"A" * (3 * 1024 * 1024)
    wire = client_frame(text[:1024 * 1024], fin=False) + client_frame(
        text[1024 * 1024:], opcode=0)
    reader = FrameReader(64 * 1024, 4 * 1024 * 1024, LargeFrames(4 * 1024 * 1024))
    events = []
    for at in range(0, len(wire), 65536):
        before = unmasked[0]
        events += reader.feed(wire[at:at + 65536])
        assert unmasked[0] - before <= 65536
    assert events == [(TEXT, text.decode())]
    assert unmasked[0] == len(text)
