"""A large room's fan-out, per flush: real clients over real sockets, each reading the
server's frames itself so the test sees every WebSocket frame as it was sent.

A room of more than WRITE_NOW_MEMBERS members keeps its pending frames once and
hands every member the same joined bytes per flush (trio_chat/room.py,
trio_chat/flush.py); the wire must still carry one message per frame.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from trio_chat import room as room_module
from trio_chat.flush import Flush
from trio_chat.metrics import Metrics
from trio_chat.outbound import PRESENCE_EVENTS
from trio_chat.protocol import Message
from trio_chat.room import WRITE_NOW_MEMBERS, Room
from trio_chat.server import Server

from .conftest import (
    chat_frame,
    make_config,
    start_server,
    task_census,
    wait_no_tasks_beyond,
    wait_until,
)
from .rawws import read_head
from .wire import client_frame, handshake_request

MEMBERS = WRITE_NOW_MEMBERS + 6
TEXT = 0x81
CLOSE = 0x88


@attrs.define(eq=False)
class Member:
    """An upgraded connection that parses the server's (unmasked) frames itself."""

    stream: trio.SocketStream
    buffer: bytearray

    async def next_frame(self) -> tuple[int, bytes]:
        """The next frame's first byte (FIN and opcode) and payload; EOFError at the end."""
        while True:
            buffer = self.buffer
            if len(buffer) >= 2:
                assert not buffer[1] & 0x80, "a server frame is never masked"
                size, start = buffer[1] & 0x7F, 2
                if size == 126:
                    size, start = int.from_bytes(buffer[2:4], "big"), 4
                elif size == 127:
                    size, start = int.from_bytes(buffer[2:10], "big"), 10
                if len(buffer) >= start + size:
                    first, payload = buffer[0], bytes(buffer[start:start + size])
                    del buffer[:start + size]
                    return first, payload
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            buffer += data

    async def next_message(self) -> dict[str, Any]:
        """The next chat message: one whole JSON object in one final text frame."""
        while True:
            first, payload = await self.next_frame()
            if first == 0x89:
                continue  # a ping; the tests end long before a pong is due
            assert first == TEXT, f"frame {first:#x} {payload[:80]!r}: one message per " \
                                  "final text frame"
            message = json.loads(payload)
            assert isinstance(message, dict)
            if message.get("message_type") not in PRESENCE_EVENTS:
                return message

    async def close_code(self) -> int:
        """Read on to the server's close frame; its code."""
        while True:
            first, payload = await self.next_frame()
            if first == CLOSE:
                return int.from_bytes(payload[:2], "big")

    async def send(self, *frames: str) -> None:
        """Every frame in one write: the server reads them as one burst."""
        await self.stream.send_all(b"".join(client_frame(f.encode()) for f in frames))


@asynccontextmanager
async def member(port: int, room: int, *, receive_buffer: int | None = None
                 ) -> AsyncIterator[Member]:
    """A member of ``room``, closed on the way out, also when the test fails."""
    sock = trio.socket.socket()
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
    except BaseException:
        sock.close()
        raise
    try:
        await stream.send_all(handshake_request(f"/ws/{room}"))
        _, rest = await read_head(stream)
        yield Member(stream, bytearray(rest))
    finally:
        await trio.aclose_forcefully(stream)


async def members(stack: AsyncExitStack, server: Server, room: int, n: int) -> list[Member]:
    """``n`` members of ``room``, once the room counts them all."""
    joined = [await stack.enter_async_context(member(server.port, room)) for _ in range(n)]
    await wait_until(lambda: room in server.hub.rooms and
                     len(server.hub.rooms[room].members) >= n)
    return joined


def texts(room: int, n: int, prefix: str = "m", size: int = 0) -> list[str]:
    return [chat_frame(f"{prefix}{i}:{'x' * size}", room_id=room) for i in range(n)]


async def expect(members: list[Member], contents: list[str]) -> None:
    """Every member gets exactly ``contents`` (up to the colon), in order, ids rising."""
    async def read(m: Member) -> None:
        got, ids = [], []
        for _ in contents:
            message = await m.next_message()
            got.append(message["content"].split(":")[0])
            ids.append(message["id"])
        assert got == contents
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

    with trio.fail_after(60):
        async with trio.open_nursery() as readers:
            for m in members:
                readers.start_soon(read, m)


async def test_a_burst_reaches_every_member_whole_in_order_one_message_per_frame(
        nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path))
    metrics = server.metrics
    async with AsyncExitStack() as stack:
        everyone = await members(stack, server, 5, MEMBERS)
        await everyone[0].send(*texts(5, 300))
        await expect(everyone, [f"m{i}" for i in range(300)])
        # Every frame went through the room's flushes (the sender's chat_enter too), to
        # every member, in fewer writes than frames.
        assert metrics.room_flushed_frames == 301 * MEMBERS
        assert MEMBERS <= metrics.room_flush_writes <= 301 * MEMBERS
        assert metrics.messages_delivered == 300 * MEMBERS


async def test_a_lone_message_in_an_idle_large_room_is_flushed_at_once(nursery, db_path
                                                                       ) -> None:
    server = await start_server(nursery, make_config(db_path))
    metrics = server.metrics
    async with AsyncExitStack() as stack:
        everyone = await members(stack, server, 6, MEMBERS)
        await everyone[0].send(*texts(6, 1, "first"))
        await expect(everyone, ["first0"])
        writes = metrics.room_flush_writes
        # No timer: the one message of an idle room is its own flush, awaited, not timed.
        await everyone[1].send(*texts(6, 1, "lone"))
        await expect(everyone, ["lone0"])
        assert metrics.room_flush_writes == writes + MEMBERS


async def test_in_a_large_room_each_senders_ack_follows_its_own_copy(nursery, db_path
                                                                     ) -> None:
    server = await start_server(nursery, make_config(db_path))
    async with AsyncExitStack() as stack:
        everyone = await members(stack, server, 12, MEMBERS)
        senders = everyone[:5]
        for n, sender in enumerate(senders):
            await sender.send(*(chat_frame(f"s{n}-{i}", room_id=12, author_id=20 + n,
                                           client_msg_id=f"c{n}-{i}") for i in range(20)))

        async def read(n: int, sender: Member) -> None:
            seen: set[str] = set()
            for _ in range(20 * len(senders) + 20):
                message = await sender.next_message()
                if message["message_type"] == "ack":
                    i = message["client_msg_id"].split("-")[1]
                    assert f"s{n}-{i}" in seen, f"ack of s{n}-{i} before its copy"
                else:
                    seen.add(message["content"])

        with trio.fail_after(60):
            async with trio.open_nursery() as readers:
                for n, sender in enumerate(senders):
                    readers.start_soon(read, n, sender)


async def test_a_member_that_never_reads_is_closed_4001_and_the_rest_get_everything(
        nursery, db_path) -> None:
    server = await start_server(nursery, make_config(
        db_path, send_queue_messages=1000, send_queue_bytes=128 * 1024, write_wait=30.0))
    metrics = server.metrics
    async with AsyncExitStack() as stack:
        slow = await stack.enter_async_context(member(server.port, 7, receive_buffer=4096))
        everyone = await members(stack, server, 7, MEMBERS)
        # In steps the readers (all in this process) keep up with: only the one that
        # never reads falls behind, by far more than its queue and the kernel's buffers.
        for step in range(30):
            await everyone[0].send(*texts(7, 20, f"{step}-", size=2000))
            await expect(everyone, [f"{step}-{i}" for i in range(20)])
        await wait_until(lambda: metrics.slow_consumer_disconnects == 1)
        # What was queued before the close comes first, then the close frame.
        with trio.fail_after(30):
            assert await slow.close_code() == 4001
        await wait_until(lambda: len(server.hub.rooms[7].members) == MEMBERS)


async def test_a_member_joining_during_a_burst_sees_no_gap_and_no_repeat(nursery, db_path
                                                                          ) -> None:
    total = 1500
    server = await start_server(nursery, make_config(db_path, history_on_join=total))
    async with AsyncExitStack() as stack:
        everyone = await members(stack, server, 8, MEMBERS)

        async def join_and_read() -> None:
            m = await stack.enter_async_context(member(server.port, 8))
            # History (everything so far) and then live: 1, 2, ... without a hole.
            ids = [(await m.next_message())["id"] for _ in range(total)]
            assert ids == list(range(1, total + 1))

        with trio.fail_after(60):
            async with trio.open_nursery() as joiners:
                for step in range(total // 100):
                    await everyone[0].send(*texts(8, 100, f"{step}-"))
                    if step % 3 == 1:
                        # Joins while the burst is being flushed.
                        joiners.start_soon(join_and_read)
                    await expect(everyone, [f"{step}-{i}" for i in range(100)])


async def test_a_failing_flush_ends_its_room_with_1011_and_spares_the_others(
        nursery, db_path, monkeypatch, caplog) -> None:
    class Broken(Flush):
        @property
        def joined(self) -> bytes:
            if any(b"boom" in frame for frame in self.frames):
                raise RuntimeError("a bug in a flush")
            return super().joined

    monkeypatch.setattr(room_module, "Flush", Broken)
    server = await start_server(nursery, make_config(db_path))
    metrics = server.metrics
    async with AsyncExitStack() as stack:
        doomed = await members(stack, server, 9, MEMBERS)
        spared = await members(stack, server, 10, MEMBERS)
        await doomed[0].send(*texts(9, 1, "boom"))

        async def closed(m: Member) -> None:
            assert await m.close_code() == 1011

        with trio.fail_after(30):
            async with trio.open_nursery() as readers:
                for m in doomed:
                    readers.start_soon(closed, m)
        assert metrics.room_failures == 1
        failures = [r for r in caplog.records if r.levelno == logging.ERROR and
                    "room 9 failed" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None
        # The flusher and the server go on: the other large room is served, and room 9
        # starts afresh for a new joiner.
        await spared[0].send(*texts(10, 50))
        await expect(spared, [f"m{i}" for i in range(50)])
        await wait_until(lambda: 9 not in server.hub.rooms)
        again = await members(stack, server, 9, MEMBERS)
        await again[0].send(*texts(9, 5, "again"))
        # The message whose flush failed was accepted and stored: it is history now.
        await expect(again, ["boom0", *(f"again{i}" for i in range(5))])
        assert metrics.room_failures == 1


async def test_a_large_room_leaves_no_task_behind(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path))
    assert server.task is not None
    baseline = task_census(server.task)
    async with AsyncExitStack() as stack:
        everyone = await members(stack, server, 11, MEMBERS)
        await everyone[0].send(*texts(11, 200, size=1000))
        await expect(everyone, [f"m{i}" for i in range(200)])
    await wait_until(lambda: not server.hub.rooms and not server.hub.connections)
    await wait_no_tasks_beyond(server.task, baseline)


# The room's side of a flush, with in-memory members.

@attrs.define(eq=False)
class FakeMember:
    author_id: int | None = None
    got: list[bytes] = attrs.field(factory=list)
    flushes: list[Flush] = attrs.field(factory=list)
    history: list[bytes] = attrs.field(factory=list)

    def send_frame(self, frame: bytes) -> None:
        self.got.append(frame)

    def send_flush(self, flush: Flush) -> None:
        self.flushes.append(flush)
        self.got.append(flush.joined)

    def close(self, code: int, reason: str) -> None:
        pass

    async def send_history(self, frames: list[bytes]) -> None:
        self.history.extend(frames)

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


def message(i: int) -> Message:
    return Message(id=i, room_id=1, author_id=2, message_type="chat_txt",
                   content=f"c{i}", create_at="2022-06-05T12:00:00.000Z",
                   received_at="2022-06-05T12:00:00.000Z")


def large_room(scheduled: list[Room]) -> tuple[Room, list[FakeMember]]:
    room = Room(1, None, Metrics(), 100, 1000, schedule=scheduled.append)  # type: ignore[arg-type]
    room._early = None  # started: what its run() does once the history is loaded
    fakes = [FakeMember() for _ in range(MEMBERS)]
    for fake in fakes:
        room.members.add(fake)
        room._list(fake)  # what join() does, without the history
    return room, fakes


def test_a_flush_hands_every_member_the_same_joined_frames_once() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    for i in range(1, 4):
        room.deliver(message(i))
    assert scheduled == [room], "the first frame of a burst asks the flusher, once"
    assert not any(f.got for f in fakes)
    room.flush()
    flush = fakes[0].flushes[0]
    assert len(flush.frames) == 3 and flush.nbytes == sum(map(len, flush.frames))
    assert all(f.flushes == [flush] for f in fakes), "one Flush object for every member"
    assert flush.joined is flush.joined, "joined once"
    assert room._metrics.room_flush_writes == MEMBERS
    assert room._metrics.room_flushed_frames == 3 * MEMBERS
    room.flush()
    assert all(len(f.flushes) == 1 for f in fakes), "nothing pending, nothing flushed"


def test_pending_frames_are_flushed_early_past_their_byte_bound() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    big = attrs.evolve(message(1), content="x" * (room_module.PENDING_BYTES + 1))
    room.deliver(big)
    assert len(fakes[0].flushes) == 1, "over the bound: flushed without the flusher"
    room.deliver(message(2))
    room.flush()
    assert [len(f.frames) for f in fakes[0].flushes] == [1, 1]


async def test_a_joiner_gets_pending_frames_as_history_and_never_again() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    room.deliver(message(1))
    room.deliver(message(2))
    joiner = FakeMember()
    await room.join(joiner)
    assert len(joiner.history) == 2 and not any(f.got for f in fakes), "nobody waits for a join"
    room.flush()
    assert all(len(f.flushes) == 1 and len(f.flushes[0].frames) == 2 for f in fakes)
    assert not joiner.got
    room.deliver(message(3))
    room.flush()
    assert [len(f.frames) for f in joiner.flushes] == [1]
    assert all(len(f.flushes) == 2 for f in fakes)


def frames_of(fake: FakeMember) -> list[bytes]:
    return [frame for flush in fake.flushes for frame in flush.frames]


def test_frames_arriving_during_a_round_reach_the_members_not_yet_visited_at_once() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    room.flush_slice = 32
    assert room.flush() is False, "nobody behind"
    room.deliver(message(1))
    assert room.flush(), "members still behind"
    first = [f for f in fakes if f.flushes]
    assert len(first) == 32
    room.deliver(message(2))
    room.deliver(message(3))
    more = [room.flush() for _ in range(3)]
    # 70 members: 32, then 32 + 6 visited with everything so far, then the first 32
    # again with what they had not had.
    assert more == [True, True, False]
    every = [room_module.message_frame(message(i)) for i in (1, 2, 3)]
    assert all(frames_of(f) == every for f in fakes), "all of it, in order, once"
    assert all(len(f.flushes) == (2 if f in first else 1) for f in fakes)
    assert room._metrics.room_flush_writes == MEMBERS + 32
    assert room._metrics.room_flushed_frames == 32 * 1 + (MEMBERS - 32) * 3 + 32 * 2
    room.deliver(message(4))
    while room.flush():
        pass
    assert all(frames_of(f)[-1] == room_module.message_frame(message(4)) for f in fakes)


async def test_members_who_join_or_leave_during_a_round_get_only_what_is_theirs() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    room.flush_slice = 32
    room.deliver(message(1))
    room.flush()
    gone = [f for f in fakes if not f.flushes][:10]
    for fake in gone:
        room.leave(fake)
    joiner = FakeMember()
    await room.join(joiner)
    room.deliver(message(2))
    while room.flush():
        pass
    assert not any(f.got for f in gone), "nothing for those who left"
    assert frames_of(joiner) == [room_module.message_frame(message(2))]
    assert joiner.history == [room_module.message_frame(message(1))]
    assert all(len(frames_of(f)) == 2 for f in fakes if f not in gone)


def test_a_small_room_writes_at_once_only_when_nobody_is_behind() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    room.flush_slice = 32
    room.deliver(message(1))
    room.flush()
    for fake in fakes[WRITE_NOW_MEMBERS - 1:]:
        room.leave(fake)
    staying = [f for f in fakes if f in room.members]
    assert len(staying) == WRITE_NOW_MEMBERS - 1
    room.deliver(message(2))
    assert not any(len(f.got) > 1 for f in staying), "behind the frames still pending"
    while room.flush():
        pass
    assert all(frames_of(f)[-1] == room_module.message_frame(message(2)) for f in staying)
    room.deliver(message(3))
    assert all(f.got[-1] == room_module.message_frame(message(3)) for f in staying), \
        "written at once again"


def test_members_who_left_are_dropped_from_the_lists_while_the_room_is_idle() -> None:
    scheduled: list[Room] = []
    room, _ = large_room(scheduled)
    for _ in range(5):
        extra = [FakeMember() for _ in range(room_module.FLUSH_SLICE)]
        for fake in extra:
            room.members.add(fake)
            room._list(fake)
        for fake in extra:
            room.leave(fake)
    listed = sum(len(group.members) for group in room._behind)
    assert listed <= 2 * MEMBERS + room_module.FLUSH_SLICE


def test_a_frame_sent_after_the_pending_ones_waits_until_every_member_has_them() -> None:
    scheduled: list[Room] = []
    room, fakes = large_room(scheduled)
    room.flush_slice = 32
    room.send_after_pending(fakes[0], b"now")
    assert fakes[0].got == [b"now"], "nothing pending: sent at once"
    room.deliver(message(1))
    room.send_after_pending(fakes[0], b"ack")
    assert room.flush()
    assert fakes[0].got[-1] != b"ack", "not before the last member has the frame"
    while room.flush():
        pass
    assert fakes[0].got[-2:] == [fakes[0].flushes[0].joined, b"ack"]


def test_an_encoding_is_made_once_per_flush() -> None:
    calls: list[list[bytes]] = []

    def encode(frames: list[bytes]) -> bytes:
        calls.append(frames)
        return b"z" * len(frames)

    flush = Flush([b"a", b"b"], 2)
    assert flush.joined == b"ab"
    assert flush.encoded("deflate", encode) == b"zz"
    assert flush.encoded("deflate", encode) == b"zz"
    assert len(calls) == 1


@pytest.mark.parametrize("frames", [1, 3])
def test_joined_bytes_are_the_frames_back_to_back(frames: int) -> None:
    parts = [bytes([i]) * 3 for i in range(frames)]
    assert Flush(parts, 3 * frames).joined == b"".join(parts)
