#!/usr/bin/env python3
"""The message codec on three JSON libraries: the standard json module, orjson, msgspec.

Each codec is trio-chat's own protocol code (:mod:`trio_chat.protocol`,
:mod:`trio_chat.outbound`) with the JSON library swapped, on the hot path:

- decode: a client text frame to a :class:`~trio_chat.protocol.Draft` (or a
  :class:`~trio_chat.protocol.FrameError` with its code and detail), with the
  validation of :func:`~trio_chat.protocol.parse_frame`;
- encode: a :class:`~trio_chat.protocol.Message` to the bytes of its server
  WebSocket frame.

The fast libraries word their own parse errors and read a slightly different
JSON (orjson reads integers past 64 bits as floats and refuses NaN and lone
surrogates; msgspec wants valid UTF-8), so a frame one of them refuses, or that
fails validation, is decoded again by the standard module and judged on that:
errors are exactly the standard ones, and only bad frames pay twice. ``orjson``
is what trio-chat ships (``protocol.parse_frame`` and ``outbound.message_frame``
themselves); ``json`` is the standard module alone, the reference.

Before timing, every codec must give the same Draft or the same error as the
reference on every frame of a corpus of good and bad frames, and the same frame
bytes for every message; the script exits 1 otherwise.

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
from trio_chat.framing import text_frame, utf8_frame
from trio_chat.outbound import message_frame
from trio_chat.protocol import FrameError, Message

ROOM = 123
CREATE_AT = "2022-06-05T12:00:00.000Z"


def decode_json(text: str, room: int) -> protocol.Draft | protocol.Typing:
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("invalid_json", f"frame is not valid JSON: {exc}") from None
    return protocol._validate(frame, text, room, False)


_msgspec_decode = msgspec.json.Decoder().decode


def decode_msgspec(text: str, room: int) -> protocol.Draft | protocol.Typing:
    try:
        frame = _msgspec_decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        return decode_json(text, room)
    try:
        return protocol._validate(frame, text, room, False)
    except FrameError:
        return decode_json(text, room)


def encode_json(message: Message) -> bytes:
    return text_frame(
        json.dumps(message.to_wire(), ensure_ascii=False, separators=(",", ":")))


_msgspec_encode = msgspec.json.Encoder().encode


def encode_msgspec(message: Message) -> bytes:
    return utf8_frame(_msgspec_encode(message.to_wire()))


CODECS: dict[str, tuple[Callable[[str, int], Any], Callable[[Message], bytes]]] = {
    "json": (decode_json, encode_json),
    "orjson": (lambda text, room: protocol.parse_frame(text, room), message_frame),
    "msgspec": (decode_msgspec, encode_msgspec),
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


def _outcome(decode: Callable[[str, int], Any], text: str) -> Any:
    try:
        return decode(text, ROOM)
    except FrameError as exc:
        return ("error", exc.code, exc.detail)


def check() -> list[str]:
    """Where any codec differs from the standard json module's results."""
    problems = []
    for text in [*GOOD.values(), *BAD]:
        want = _outcome(decode_json, text)
        for name, (decode, _) in CODECS.items():
            got = _outcome(decode, text)
            if got != want:
                problems.append(f"{name} decode {text[:50]!r}: {got!r} != {want!r}")
    for message in MESSAGES:
        want_bytes = encode_json(message)
        for name, (_, encode) in CODECS.items():
            if encode(message) != want_bytes:
                problems.append(f"{name} encode message {message.id}: "
                                f"{encode(message)[:80]!r} != {want_bytes[:80]!r}")
    return problems


def _time(fns: dict[str, Callable[[], Any]], seconds: float) -> dict[str, float]:
    """Microseconds per call of each function: the best of nine rounds of about
    seconds/9 each, the functions taking turns within each round, so a change in
    the machine's load falls on all of them alike."""
    loops = {}
    for name, fn in fns.items():
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - t0 > 0.02:
                break
            n *= 2
        per = (time.perf_counter() - t0) / n
        loops[name] = max(1, int(seconds / 9 / per))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(9):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / loops[name])
    return {name: t * 1e6 for name, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about 0.1 s per case, not 1 s")
    args = p.parse_args(argv)
    seconds = 0.1 if args.quick else 1.0
    problems = check()
    for problem in problems:
        print(f"# MISMATCH {problem}")
    print(f"# same results as the json module on {len(GOOD)} good and {len(BAD)} bad "
          f"frames and {len(MESSAGES)} messages: {'no' if problems else 'yes'}")
    print(f"# python {sys.version.split()[0]}, orjson {orjson.__version__}, "
          f"msgspec {msgspec.__version__}; microseconds per call, best of 9 interleaved rounds")
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
        row = _time({n: make(n) for n in names}, seconds)
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
