"""bench_abuse's hostile clients and its probe.

Each attack is one async function of the attacker (address 127.0.0.1, busy rooms'
senders from 127.0.0.3 on): it attacks, holds what it opened for ``hold``
seconds, reads what the server answered, closes everything and returns that
answer as a short text. The probe runs in a process of its own (so the
attacker's work does not delay it), from 127.0.0.2: every ``interval`` it times
a ``/healthz`` answer and a chat message's round trip (sent on one WebSocket,
received on another in the same room).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bench import HOST
from bench.rawclient import RawWs, connect_from, get, http_status, stuck_ws, what_came
from tests.wire import client_frame

PROBE_SOURCE = "127.0.0.2"
PROBE_ROOM = 9001
PROBE_TIMEOUT = 5.0  # a probe that waits longer is recorded as this and counted
# The probe's senders take turns: each stays under the default per-connection rate
# (20/s) and all of them under the per-address one (50/s) at a 25 ms interval.
PROBE_SENDERS = 3
_PROBE = re.compile(rb'"probe (\d+)"')

HALF_OPEN_EACH = 9_000

FILL_ROOM = 9100
FILL_MESSAGES = 990  # within the default replayLimit (1000), so ?since=0 resumes
FILL_SIZE = 30_000

Attack = Callable[[int, float], Awaitable[str]]


def chat(content: str, room: int, author: int = 9) -> bytes:
    return json.dumps({"message_type": "chat_txt", "author_id": author, "room_id": room,
                       "content": content,
                       "create_at": "2022-06-05T12:00:00.000Z"}).encode()


def tally(answers: list[str]) -> str:
    """``['1009', '1009', 'open']`` as ``1009x2 openx1``."""
    return " ".join(f"{what}x{n}" for what, n in Counter(answers).most_common())


async def _aclose_all(streams: list[Any]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def multipart_parts(port: int, hold: float) -> str:
    """Three uploads of 1 MB each: 150,000 empty parts of a multipart form."""
    body = b"--B\r\n\r\n\r\n" * 150_000 + b"--B--\r\n"
    head = (f"POST /rooms/1/images?author_id=5 HTTP/1.1\r\nHost: {HOST}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    ends = trio.current_time() + hold
    answers = []
    for _ in range(3):
        with trio.move_on_after(60) as scope:
            answers.append(str(await http_status(port, head + body)))
        if scope.cancelled_caught:
            answers.append("none in 60 s")
    await trio.sleep_until(ends)
    return tally(answers)


async def fill_history(port: int) -> None:
    """:data:`FILL_MESSAGES` messages of :data:`FILL_SIZE` bytes in :data:`FILL_ROOM`
    (on a server whose rate limits are lifted), read back as they go."""
    ws = await RawWs.connect(port, f"/ws/{FILL_ROOM}?author_id=9")
    try:
        frames = ws.frames()
        for batch in range(0, FILL_MESSAGES, 16):
            sent = range(batch, min(FILL_MESSAGES, batch + 16))
            for i in sent:
                await ws.send(chat(f"{i}:".ljust(FILL_SIZE, "h"), FILL_ROOM))
            got = 0
            while got < len(sent):
                opcode, payload = await frames.__anext__()
                got += opcode == 0x1 and b'"chat_txt"' in payload
    finally:
        await ws.aclose()


async def resume_never_reads(port: int, hold: float) -> str:
    """A resume from the start of a room's 30 MB history on a socket that never reads."""
    stream = await stuck_ws(port, f"/ws/{FILL_ROOM}?since=0&author_id=9")
    try:
        await trio.sleep(hold)
        return await what_came(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def ping_flood(port: int, hold: float) -> str:
    """100,000 pings of 125 bytes (13 MB of pongs to answer) on a socket that never reads."""
    stream = await stuck_ws(port, "/ws/9200?author_id=9")
    flood = client_frame(b"p" * 125, opcode=0x9) * 100_000 + client_frame(chat("end", 9200))
    sent = "all sent"
    try:
        with trio.move_on_after(hold) as scope:
            try:
                await stream.send_all(flood)
            except trio.BrokenResourceError:
                sent = "cut off"
            await trio.sleep(hold)
        if scope.cancelled_caught and sent == "all sent":
            sent = "not all taken"
        return f"{sent}, {await what_came(stream)}"
    finally:
        await trio.aclose_forcefully(stream)


async def _hold_frames(port: int, hold: float, frames: list[bytes], count: int,
                       sources: list[str] | None = None) -> str:
    """``count`` connections (the n-th from ``sources[n]``, else from :data:`HOST`), each
    sending ``frames`` at once; what each was answered."""
    clients: list[RawWs] = []

    async def one(n: int) -> None:
        ws = await RawWs.connect(port, "/ws/9300?author_id=9",
                                 sources[n] if sources else HOST)
        clients.append(ws)
        with contextlib.suppress(trio.BrokenResourceError):
            for frame in frames:
                await ws.stream.send_all(frame)

    try:
        with trio.move_on_after(hold):
            async with trio.open_nursery() as nursery:
                for n in range(count):
                    nursery.start_soon(one, n)
            await trio.sleep(hold)
        answers: list[str] = []

        async def answer(ws: RawWs) -> None:
            answers.append(await what_came(ws.stream, 1.0, upgraded=bytes(ws.buf)))

        async with trio.open_nursery() as nursery:
            for ws in clients:
                nursery.start_soon(answer, ws)
        return tally(answers)
    finally:
        await _aclose_all([ws.stream for ws in clients])


def _masked(payload: bytes, opcode: int, fin: bool) -> bytes:
    frame: bytes = client_frame(payload, opcode=opcode, fin=fin)
    return frame


def _unfinished_data_url() -> list[bytes]:
    """6 MiB of a chat_img data URL in 1 MiB fragments, the last never sent."""
    start = b'{"message_type": "chat_img", "author_id": 9, "content": "data:image/png;base64,'
    mib = 1024 * 1024
    frames = [_masked(start + b"A" * (mib - len(start)), 0x1, False)]
    return frames + [_masked(b"A" * mib, 0x0, False)] * 5


async def unfinished_fragments(port: int, hold: float) -> str:
    """40 connections, each 6 MiB into a fragmented chat_img data URL it never finishes."""
    return await _hold_frames(port, hold, _unfinished_data_url(), 40)


async def unfinished_fragments_spread(port: int, hold: float) -> str:
    """:func:`unfinished_fragments` from 40 addresses (127.0.1.1 to .40), one connection
    each, so no address's inbound budget stops them before the server's
    largeFrameBudget."""
    sources = [f"127.0.1.{n}" for n in range(1, 41)]
    return await _hold_frames(port, hold, _unfinished_data_url(), 40, sources)


async def big_text_frames(port: int, hold: float) -> str:
    """Three 7 MB chat_txt frames (not images; just under the data-URL size of the
    largest image, media.maxImageBytes), one on each of three connections."""
    frame = _masked(chat("t" * 6_990_000, 9300), 0x1, True)
    return await _hold_frames(port, hold, [frame], 3)


async def half_open_requests(port: int, hold: float, most: int = 20_500) -> str:
    """Up to ``most`` HTTP connections from one address (bench_abuse: 500 more than
    the server's descriptor limit), each stopping in the middle of its request head;
    opened by processes of :data:`HALF_OPEN_EACH` connections, as one process may hold
    no more descriptors than the server."""
    ctx = mp.get_context("spawn")
    workers = []
    for n in range(0, most, HALF_OPEN_EACH):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_half_open_worker, daemon=True,
                           args=(child, port, min(HALF_OPEN_EACH, most - n)))
        proc.start()
        workers.append((parent, proc))
    ends = trio.current_time() + hold
    try:
        opened = [await trio.to_thread.run_sync(pipe.recv) for pipe, _ in workers]
        await trio.sleep_until(ends)
        for pipe, _ in workers:
            pipe.send("stop")
        answers = [a for pipe, _ in workers for a in await trio.to_thread.run_sync(pipe.recv)]
    finally:
        for _, proc in workers:
            await trio.to_thread.run_sync(proc.join, 30)
            if proc.is_alive():
                proc.kill()
    stops = {note for _, note in opened if note}
    return (f"{sum(n for n, _ in opened)} opened{' (' + ', '.join(stops) + ')' if stops else ''}"
            f"; {tally(answers)}")


def _half_open_worker(pipe: multiprocessing.connection.Connection, port: int,
                      count: int) -> None:
    trio.run(_half_open, pipe, port, count)


async def _half_open(pipe: multiprocessing.connection.Connection, port: int,
                     count: int) -> None:
    streams: list[trio.SocketStream] = []
    note = ""
    try:
        with trio.move_on_after(15):
            while len(streams) < count:
                try:
                    with trio.fail_after(1.0):
                        stream = await connect_from(port)
                except (OSError, trio.TooSlowError) as exc:
                    note = f"stopped: {type(exc).__name__}"
                    break
                streams.append(stream)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        pipe.send((len(streams), note))
        await trio.to_thread.run_sync(pipe.recv)
        answers: list[str] = []
        with trio.move_on_after(30):
            for stream in streams:
                answers.append(await what_came(stream, 0.001, 4096))
        pipe.send(answers)
    finally:
        await _aclose_all(streams)


async def busy_room_stuck(port: int, hold: float, stuck: int = 24, senders: int = 4) -> str:
    """``stuck`` connections of one address that never read, in a room where
    ``senders`` members (other addresses) send 60 KB messages at their rate limit."""
    room = 9400
    streams = [await stuck_ws(port, f"/ws/{room}?author_id=9") for _ in range(stuck)]
    members: list[RawWs] = []
    try:
        for n in range(senders):
            members.append(await RawWs.connect(port, f"/ws/{room}?author_id={20 + n}",
                                               source=f"127.0.0.{3 + n}"))

        async def drain(ws: RawWs) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await ws.stream.receive_some(1 << 20):
                    pass

        async def send(n: int, ws: RawWs) -> None:
            text = "b" * 60_000
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await ws.send(chat(text, room, 20 + n))
                    await trio.sleep(0.05)  # the default messagesPerSecond, 20

        with trio.move_on_after(hold):
            async with trio.open_nursery() as nursery:
                for n, ws in enumerate(members):
                    nursery.start_soon(drain, ws)
                    nursery.start_soon(send, n, ws)
        answers: list[str] = []

        async def answer(stream: trio.SocketStream) -> None:
            answers.append(await what_came(stream, 3.0, 16 * 1024 * 1024))

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(answer, stream)
        return tally(answers)
    finally:
        await _aclose_all(streams + [ws.stream for ws in members])


ATTACKS: dict[str, tuple[str, Attack]] = {
    "multipart": ("1 MB upload of 150,000 empty parts, x3", multipart_parts),
    "resume": (f"?since=0 over {FILL_MESSAGES} x 30 KB, never reads", resume_never_reads),
    "pings": ("100,000 pings, never reads", ping_flood),
    "fragments": ("40 x unfinished 6 MiB fragmented message", unfinished_fragments),
    "fragspread": ("the same from 40 addresses", unfinished_fragments_spread),
    "bigtext": ("3 x 7 MB chat_txt frames", big_text_frames),
    "halfopen": ("half-open HTTP requests from one address", half_open_requests),
    "busyroom": ("24 non-reading sockets of one address, busy room", busy_room_stuck),
}


def probe_process(pipe: multiprocessing.connection.Connection, port: int,
                  interval: float) -> None:
    """The probe's process: ``ready`` once connected, then samples until told to stop."""
    trio.run(_probe, pipe, port, interval)


async def _timed(what: Callable[[], Awaitable[Any]]) -> float | None:
    """Seconds ``what`` took; None when it failed; :data:`PROBE_TIMEOUT` if it hung."""
    started = time.monotonic()
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            await what()
    except trio.TooSlowError:
        return PROBE_TIMEOUT
    except (OSError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError,
            ValueError, IndexError):
        return None
    return time.monotonic() - started


async def _probe(pipe: multiprocessing.connection.Connection, port: int,
                 interval: float) -> None:
    path = f"/ws/{PROBE_ROOM}?author_id=77"
    receiver = await RawWs.connect(port, path, PROBE_SOURCE)
    senders = [await RawWs.connect(port, path, PROBE_SOURCE) for _ in range(PROBE_SENDERS)]
    arrived: dict[bytes, trio.Event] = {}
    samples: list[tuple[float, float | None, float | None]] = []

    async def receive() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for opcode, payload in receiver.frames():
                if opcode == 0x1 and (found := _PROBE.search(payload)):
                    arrived.setdefault(found[1], trio.Event()).set()

    async def drain(ws: RawWs) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for _ in ws.frames():
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        for ws in senders:
            nursery.start_soon(drain, ws)
        pipe.send("ready")
        n = 0
        while not pipe.poll():
            started = time.monotonic()
            healthz = await _timed(lambda: http_status(port, get("/healthz"), PROBE_SOURCE))
            key = str(n).encode()
            event = arrived.setdefault(key, trio.Event())

            async def round_trip(ws: RawWs = senders[n % PROBE_SENDERS], n: int = n,
                                 event: trio.Event = event) -> None:
                await ws.send(chat(f"probe {n}", PROBE_ROOM, 77))
                await event.wait()

            samples.append((started, healthz, await _timed(round_trip)))
            arrived.pop(key, None)
            n += 1
            await trio.sleep(max(0.0, started + interval - time.monotonic()))
        nursery.cancel_scope.cancel()
    for ws in [receiver, *senders]:
        await ws.aclose()
    pipe.send(samples)
