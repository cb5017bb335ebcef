"""Lifetimes: leak-free churn, slow consumers, heartbeats, shutdown and cancellation."""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_chat.metrics import count_tasks

from .conftest import (
    chat_frame,
    listening_port,
    make_config,
    open_ws,
    recv,
    recv_text,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import open_raw, read_http_response
from .wire import client_frame, handshake_request


def task_names(root: trio.lowlevel.Task) -> list[str]:
    stack = [root]
    names = []
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _clean_session(port: int, room: int) -> None:
    async with open_ws(f"ws://127.0.0.1:{port}/ws/{room}") as ws:
        await ws.send_message(chat_frame("hi", room_id=room))
        await recv_text(ws)


async def _reset_mid_frame(port: int, room: int) -> None:
    async with open_raw(port, f"/ws/{room}") as client:
        frame = client_frame(chat_frame("cut off", room_id=room).encode())
        await client.send_raw(frame[: len(frame) // 2])
        reset(client.stream)


async def _never_reads(port: int, room: int) -> None:
    async with open_raw(port, f"/ws/{room}") as client:
        for i in range(20):
            await client.send_text(chat_frame(f"unread {i}", room_id=room))


async def _abandoned_handshake(port: int, room: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(handshake_request(f"/ws/{room}")[:30])


async def _reset_during_handshake(port: int, room: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(handshake_request(f"/ws/{room}")[:-2])
        reset(stream)


CHURN = [_clean_session, _reset_mid_frame, _never_reads, _abandoned_handshake,
         _reset_during_handshake]


async def test_churn_leaves_no_task_and_no_room(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, handshake_timeout=1.0))
    baseline = count_tasks(server.task)
    for cycle in range(60):
        async with trio.open_nursery() as batch:
            for i, kind in enumerate(CHURN):
                batch.start_soon(kind, server.port, 1000 + (cycle + i) % 7)
    # A handshake that never finishes holds its task until handshakeTimeout.
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stuck:
        await stuck.send_all(b"GET /ws/1 HTTP/1.1\r\n")
        await wait_until(lambda: not server.hub.connections and not server.hub.rooms)
        try:
            await wait_until(lambda: count_tasks(server.task) == baseline)
        except trio.TooSlowError:
            raise AssertionError(f"{count_tasks(server.task)} tasks, baseline {baseline}: "
                                 f"{task_names(server.task)}") from None
        assert server.metrics.connections_total == 60 * 3
        assert server.metrics.handshake_failures >= 60 * 2 + 1


async def test_cancelling_the_root_ends_every_task_promptly(db_path) -> None:
    async with AsyncExitStack() as stack:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery, make_config(db_path))
                before = count_tasks(server.task)
                clients = [await stack.enter_async_context(
                    open_raw(server.port, f"/ws/{i % 3}")) for i in range(9)]
                await clients[0].send_text(chat_frame("x", room_id=0))
                await stack.enter_async_context(
                    await trio.open_tcp_stream("127.0.0.1", server.port))
                await wait_until(lambda: len(server.hub.rooms) == 3 and
                                 len(server.hub.connections) == 9)
                # Each connection: its one task; each room: one task; the stuck one.
                await wait_until(lambda: count_tasks(server.task) == before + 9 + 3 + 1)
                nursery.cancel_scope.cancel()
        assert server.task is not None
        assert not server.task.child_nurseries, "every nursery under the server is closed"
        assert count_tasks(nursery.parent_task) == 1, "only the test's own task is left"


async def test_slow_consumer_is_disconnected_and_the_room_keeps_going(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(
        db_path, send_queue_messages=200, send_queue_bytes=1024 * 1024, write_wait=2.0))
    slow_sock = socket.socket()
    try:
        slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow_sock.connect(("127.0.0.1", server.port))
        slow_sock.sendall(handshake_request("/ws/66"))
        total = 400
        big = "x" * 4000
        async with open_ws(ws_url(server, 66)) as sender, open_ws(ws_url(server, 66)) as reader:
            got = []
            drained = 0

            async def read_all() -> None:
                while len(got) < total:
                    got.append((await recv(reader))["content"])

            async def drain_sender() -> None:
                nonlocal drained
                for _ in range(total):
                    await recv_text(sender)
                    drained += 1

            with trio.fail_after(60):
                async with trio.open_nursery() as work:
                    work.start_soon(read_all)
                    work.start_soon(drain_sender)
                    for i in range(total):
                        # The two readers in this process keep well within their queue
                        # (200 frames), however the machine schedules them: only the
                        # socket that never reads is a slow consumer.
                        await wait_until(lambda i=i: i - min(drained, len(got)) <= 100)
                        await sender.send_message(chat_frame(f"{i}:{big}", room_id=66))
            assert [c.split(":")[0] for c in got] == [str(i) for i in range(total)]
            await wait_until(lambda: server.metrics.slow_consumer_disconnects == 1)
            await wait_until(lambda: len(server.hub.connections) == 2)
    finally:
        slow_sock.close()


async def test_peer_that_never_answers_pings_is_closed(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, ping_period=0.2, pong_wait=0.6))
    async with open_raw(server.port, "/ws/2") as silent, \
            open_raw(server.port, "/ws/2") as polite:
        silent.answer_pings = False
        closed_polite = []

        async def read_polite() -> None:
            closed_polite.append(await polite.wait_closed())

        async with trio.open_nursery() as readers:
            readers.start_soon(read_polite)
            with trio.fail_after(10):
                assert await silent.wait_closed() == 4002
            # Several ping periods in which the polite client must stay.
            await trio.sleep(1.5)
            readers.cancel_scope.cancel()
        assert closed_polite == [], "a client answering pings was closed"
        await wait_until(lambda: len(server.hub.connections) == 1)


async def test_graceful_shutdown_closes_with_1001_and_stores_everything(db_path) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, make_config(db_path))
        async with open_ws(ws_url(server, 12)) as a, open_ws(ws_url(server, 13)) as b:
            for i in range(50):
                await a.send_message(chat_frame(f"a{i}", room_id=12))
                await b.send_message(chat_frame(f"b{i}", room_id=13))
            for _ in range(50):
                await recv_text(a)
                await recv_text(b)
            server.shutdown()
            for ws in (a, b):
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
                    await recv_text(ws)
                assert info.value.reason.code == 1001
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT room_id, COUNT(*), MAX(id) FROM messages GROUP BY room_id "
                          "ORDER BY room_id").fetchall()
    assert rows == [(12, 50, 50), (13, 50, 50)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_process_stops_on_signal_with_1001_and_exit_0(tmp_path, signum) -> None:
    db = tmp_path / "signal.db"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", "--port", "0", "--sqlite", str(db)],
        stderr=subprocess.PIPE)
    try:
        port = await listening_port(process)
        async with open_ws(f"ws://127.0.0.1:{port}/ws/7") as ws:
            for i in range(30):
                await ws.send_message(chat_frame(f"m{i}", room_id=7))
            for _ in range(30):
                await recv_text(ws)
            process.send_signal(signum)
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(15):
                await recv_text(ws)
            assert info.value.reason.code == 1001
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        await process.stderr.aclose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 30


async def test_shutdown_does_not_wait_for_idle_http_connections(db_path, caplog) -> None:
    async with AsyncExitStack() as stack:
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, make_config(db_path, shutdown_timeout=60))
            idle = await stack.enter_async_context(  # never sends a request
                await trio.open_tcp_stream("127.0.0.1", server.port))
            kept = await stack.enter_async_context(  # keep-alive after one
                await trio.open_tcp_stream("127.0.0.1", server.port))
            await kept.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_http_response(kept)
            assert status == 200
            started = trio.current_time()
            server.shutdown()
        # Not the 30 s grace: idle connections are closed at once.
        assert trio.current_time() - started < 10
        assert await idle.receive_some() == b"" and await kept.receive_some() == b""
    # Closing them is routine, not a failed connection.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
