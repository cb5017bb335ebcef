#!/usr/bin/env python3
"""The message codec on three JSON libraries: the standard json module, orjson, msgspec.

For each library this script implements what trio-chat's protocol does on the
hot path, with the same validation as :func:`trio_chat.protocol.parse_chat_frame`:

- decode: a client text frame to a :class:`~trio_chat.protocol.Draft`, or a
  :class:`~trio_chat.protocol.FrameError` with the exact code and detail;
- encode: a :class:`~trio_chat.protocol.Message` to the bytes of its server
  WebSocket frame (what :func:`~trio_chat.protocol.text_frame` of
  :func:`~trio_chat.protocol.encode_message` gives).

The fast libraries word their own parse errors and accept a slightly different
JSON (orjson refuses lone surrogates, NaN and integers past 64 bits; msgspec
wants valid UTF-8), so when one of them refuses a frame the standard module
decodes it again: the error (or the value) is then exactly the standard one,
and only bad frames pay twice. msgspec also runs typed (``msgspec-struct``):
the frame is decoded straight into a Struct, and whatever the Struct refuses
takes the generic path for its exact message.

Before timing, every codec must give the same Draft or the same error as
trio_chat.protocol on every frame of a corpus of good and bad frames, and the
same frame bytes for every message; the script exits 1 otherwise.

Usage::

    .venv/bin/python scripts/bench_codec.py --quick
    .venv/bin/python scripts/bench_codec.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

from trio_chat import protocol
from trio_chat.protocol import FrameError, Message

ROOM = 123
CREATE_AT = "2022-06-05T12:00:00.000Z"


# --- the validation, shared by every codec (protocol.parse_chat_frame after json.loads) --

def _validate(frame: Any, text: str, room: int) -> protocol.Draft:
    if not isinstance(frame, dict):
        raise FrameError("not_an_object",
                         f"frame must be a JSON object, got {protocol._kind(frame)}")
    missing = [name for name in ("message_type", "author_id", "content", "create_at")
               if name not in frame]
    if missing:
        raise FrameError("missing_field", f"missing field: {', '.join(missing)}")
    message_type = frame["message_type"]
    if not isinstance(message_type, str):
        raise FrameError("invalid_field",
                         f"message_type must be a string, got {protocol._kind(message_type)}")
    if message_type not in protocol.CHAT_TYPES:
        raise FrameError("unknown_message_type",
                         f"unknown message_type {message_type[:40]!r}; "
                         f"expected one of {', '.join(sorted(protocol.CHAT_TYPES))}")
    author_id = protocol._int64(frame, "author_id")
    if "room_id" in frame and frame["room_id"] is not None:
        room_id = protocol._int64(frame, "room_id")
        if room_id != room:
            raise FrameError("room_mismatch", f"room_id {room_id} does not match the "
                                              f"connection's room {room}")
    content = frame["content"]
    if not isinstance(content, str):
        raise FrameError("invalid_field",
                         f"content must be a string, got {protocol._kind(content)}")
    return _finish(text, room, author_id, message_type, content, frame["create_at"])


def _finish(text: str, room: int, author_id: int, message_type: str, content: str,
            create_at: Any) -> protocol.Draft:
    if not content:
        raise FrameError("invalid_field", "content must not be empty")
    if ("\\ud" in text or "\\uD" in text) and not protocol.encodable(content):
        raise FrameError("invalid_field", "content holds a lone surrogate (\\ud800 to "
                                          "\\udfff not in a pair), which is not text")
    if not isinstance(create_at, str) or not protocol._ISO_UTC.match(create_at):
        raise FrameError("invalid_field", "create_at must be an ISO-8601 UTC timestamp such "
                                          "as 2022-06-05T12:00:00.000Z")
    if not _real_time(create_at):
        raise FrameError("invalid_field", "create_at is not a real date and time")
    return protocol.Draft(room, author_id, message_type, content, create_at)


def _real_time(create_at: str) -> bool:
    try:
        protocol.datetime.strptime(create_at[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return True


def _stdlib_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("invalid_json", f"frame is not valid JSON: {exc}") from None


# --- decoders -------------------------------------------------------------------------

def decode_json(text: str, room: int) -> protocol.Draft:
    return _validate(_stdlib_loads(text), text, room)


def decode_orjson(text: str, room: int) -> protocol.Draft:
    try:
        frame = orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError, UnicodeEncodeError):
        frame = _stdlib_loads(text)  # the standard verdict and wording
    else:
        # orjson reads an integer past 64 bits as a float; the standard module keeps it
        # an int, and the error then says "out of range", not "got a number".
        if isinstance(frame, dict) and any(type(v) is float for v in frame.values()):
            frame = _stdlib_loads(text)
    return _validate(frame, text, room)


_msgspec_any = msgspec.json.Decoder()


def decode_msgspec(text: str, room: int) -> protocol.Draft:
    try:
        frame = _msgspec_any.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        frame = _stdlib_loads(text)
    return _validate(frame, text, room)


class _Frame(msgspec.Struct):
    message_type: str
    author_id: int
    content: str
    create_at: str
    room_id: int | None = None


_msgspec_frame = msgspec.json.Decoder(_Frame)


def decode_msgspec_struct(text: str, room: int) -> protocol.Draft:
    try:
        frame = _msgspec_frame.decode(text)
    # ValidationError included: the generic path words it.
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        return decode_msgspec(text, room)
    if frame.message_type not in protocol.CHAT_TYPES or not (
            protocol.INT64_MIN <= frame.author_id <= protocol.INT64_MAX):
        return decode_msgspec(text, room)
    if frame.room_id is not None and frame.room_id != room:
        return decode_msgspec(text, room)
    return _finish(text, room, frame.author_id, frame.message_type, frame.content,
                   frame.create_at)


# --- encoders: a Message to its frame's bytes -------------------------------------------

def _header(n: int) -> bytes:
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big")
    return bytes((0x81, 127)) + n.to_bytes(8, "big")


def encode_json(message: Message) -> bytes:
    payload = json.dumps(message.to_wire(), ensure_ascii=False,
                         separators=(",", ":")).encode("utf-8")
    return _header(len(payload)) + payload


def encode_orjson(message: Message) -> bytes:
    payload = orjson.dumps(message.to_wire())
    return _header(len(payload)) + payload


_msgspec_encoder = msgspec.json.Encoder()


def encode_msgspec(message: Message) -> bytes:
    payload = _msgspec_encoder.encode(message.to_wire())
    return _header(len(payload)) + payload


CODECS: dict[str, tuple[Callable[[str, int], protocol.Draft], Callable[[Message], bytes]]] = {
    "json": (decode_json, encode_json),
    "orjson": (decode_orjson, encode_orjson),
    "msgspec": (decode_msgspec, encode_msgspec),
    "msgspec-struct": (decode_msgspec_struct, encode_msgspec),
}


# --- the corpus ---------------------------------------------------------------------------

def _frame(**fields: Any) -> str:
    base = {"message_type": "chat_txt", "author_id": 11, "room_id": ROOM,
            "content": "hello", "create_at": CREATE_AT}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)


GOOD = {
    "short": _frame(),
    "100 B": _frame(content="m" + "x" * 99),
    "unicode": _frame(content="안녕하세요 😀 " * 4),
    "1 KiB": _frame(content="y" * 1024),
}

BAD = [
    "", "{", "not json", "[1, 2]", "null", "3", '"text"', "{\"a\": NaN}", "[" * 5000,
    _frame(message_type=...), _frame(author_id=..., content=...),
    _frame(message_type=5), _frame(message_type="chat_video"), _frame(author_id="11"),
    _frame(author_id=True), _frame(author_id=1.5), _frame(author_id=2**63),
    _frame(author_id=2**70), _frame(author_id=-(2**64)), _frame(room_id=124),
    _frame(room_id="123"), _frame(room_id=None), _frame(content=""), _frame(content=7),
    _frame(content=None), _frame(content=["a"]), _frame(content=2**70), _frame(content=1.5),
    _frame(content="bad \ud800 half"),
    '{"message_type":"chat_txt","author_id":11,"content":"\\ud800","create_at":"'
    + CREATE_AT + '"}',
    _frame(create_at="yesterday"), _frame(create_at="2022-02-30T12:00:00.000Z"),
    _frame(create_at=12), _frame(create_at="2022-06-05T12:00:00.000+01:00"),
    '{"message_type":"chat_txt","message_type":"chat_img","author_id":11,"content":"x",'
    '"create_at":"' + CREATE_AT + '"}',
    '{"message_type":"chat_txt","author_id":11e0,"content":"x","create_at":"'
    + CREATE_AT + '"}',
    _frame(extra={"nested": [1, 2, 3]}),
    _frame(content="tab\tnew\nline \u2028 \x7f \\ \" /"),
]

MESSAGES = [
    Message(1, ROOM, 11, "chat_txt", "hello", CREATE_AT, "2022-06-05T12:00:00.123Z"),
    Message(2**53, -5, 2**62, "chat_img", "안녕하세요 😀 " * 4, CREATE_AT,
            "2022-06-05T12:00:00.123Z"),
    Message(3, ROOM, 11, "chat_txt", "tab\tnew\nline \u2028 \x7f \\ \" / \x00 \x1f",
            CREATE_AT, "2022-06-05T12:00:00.123Z"),
    Message(4, ROOM, 11, "chat_txt", "m" + "x" * 99, CREATE_AT, "2022-06-05T12:00:00.123Z"),
    Message(5, ROOM, 11, "chat_txt", "y" * 70_000, CREATE_AT, "2022-06-05T12:00:00.123Z"),
]


def _outcome(decode: Callable[[str, int], protocol.Draft], text: str) -> Any:
    try:
        return decode(text, ROOM)
    except FrameError as exc:
        return ("error", exc.code, exc.detail)


def check() -> list[str]:
    """Where any codec differs from trio_chat.protocol."""
    problems = []
    for text in [*GOOD.values(), *BAD]:
        want = _outcome(protocol.parse_chat_frame, text)
        for name, (decode, _) in CODECS.items():
            got = _outcome(decode, text)
            if got != want:
                problems.append(f"{name} decode {text[:50]!r}: {got!r} != {want!r}")
    for message in MESSAGES:
        want_bytes = protocol.text_frame(protocol.encode_message(message))
        for name, (_, encode) in CODECS.items():
            if encode(message) != want_bytes:
                problems.append(f"{name} encode message {message.id}: "
                                f"{encode(message)[:80]!r} != {want_bytes[:80]!r}")
    return problems


def _time(fn: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call: the best of five runs of about seconds/5 each."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > 0.02:
            break
        n *= 2
    per = (time.perf_counter() - t0) / n
    loops = max(1, int(seconds / 5 / per))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about 0.1 s per case, not 1 s")
    args = p.parse_args(argv)
    seconds = 0.1 if args.quick else 1.0
    problems = check()
    for problem in problems:
        print(f"# MISMATCH {problem}")
    print(f"# same results as trio_chat.protocol on {len(GOOD)} good and {len(BAD)} bad "
          f"frames and {len(MESSAGES)} messages: {'no' if problems else 'yes'}")
    print(f"# python {sys.version.split()[0]}, orjson {orjson.__version__}, "
          f"msgspec {msgspec.__version__}; microseconds per call, best of 5")
    names = list(CODECS)
    print(f"{'case':<22}" + "".join(f"{n:>16}" for n in names))
    totals = {n: 0.0 for n in names}
    cases: list[tuple[str, Callable[[str], Callable[[], Any]]]] = []
    for label, text in GOOD.items():
        cases.append((f"decode {label}",
                      lambda n, text=text: (lambda: CODECS[n][0](text, ROOM))))
    bad = BAD[12]  # unknown message_type: a typical refusal
    cases.append(("decode bad frame", lambda n: (lambda: _outcome(CODECS[n][0], bad))))
    for message in MESSAGES[:2] + MESSAGES[3:4]:
        label = {1: "short", 2**53: "unicode", 4: "100 B"}[message.id]
        cases.append((f"encode {label}",
                      lambda n, message=message: (lambda: CODECS[n][1](message))))
    hot = {"decode 100 B", "encode 100 B"}
    for label, make in cases:
        row = {n: _time(make(n), seconds) for n in names}
        if label in hot:
            for n in names:
                totals[n] += row[n]
        print(f"{label:<22}" + "".join(f"{row[n]:>16.2f}" for n in names), flush=True)
    base = totals["json"]
    ranked = sorted(names, key=totals.get)
    print("codec: decode+encode of a 100 B message: " + ", ".join(
        f"{n} {totals[n]:.2f} us ({base / totals[n]:.2f}x)" for n in ranked)
        + f"; identical results: {'no' if problems else 'yes'}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
