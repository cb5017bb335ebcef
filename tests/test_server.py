"""The server over real sockets: wire protocol, errors, ordering, history, HTTP."""

from __future__ import annotations

import json
import sqlite3

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed

from trio_chat.connection import ChatConnection
from trio_chat.outbound import PRESENCE_EVENTS

from .conftest import (
    chat_frame,
    make_config,
    open_ws,
    recv,
    recv_text,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import RawClient, http_get, open_raw, read_http_response
from .wire import client_frame, handshake_request


async def assert_silent(ws, seconds: float = 0.2) -> None:
    with trio.move_on_after(seconds):
        message = await recv_text(ws)
        raise AssertionError(f"unexpected frame: {message}")


async def test_seed_frame_round_trips_to_every_member(server) -> None:
    async with open_ws(ws_url(server, 123)) as a, \
            open_ws(ws_url(server, 123)) as b, \
            open_ws(ws_url(server, 124)) as other:
        await a.send_message(chat_frame("안녕하세요 😀", author_id=11))
        got_a, got_b = await recv(a), await recv(b)
        assert got_a == got_b
        assert got_a["id"] == 1
        assert {k: got_a[k] for k in ("message_type", "author_id", "room_id", "content",
                                      "create_at")} == {
            "message_type": "chat_txt", "author_id": 11, "room_id": 123,
            "content": "안녕하세요 😀", "create_at": "2022-06-05T12:00:00.000Z"}
        assert got_a["received_at"].endswith("Z")
        await assert_silent(other)


async def test_one_message_one_frame(server) -> None:
    async with open_ws(ws_url(server, 5)) as ws:
        for i in range(20):
            await ws.send_message(chat_frame(f"m{i}", room_id=5))
        for i in range(20):
            raw = await recv_text(ws)
            assert "\n" not in raw
            assert json.loads(raw)["content"] == f"m{i}"


BAD_FRAMES = [
    ("{oops", "invalid_json"),
    ("[]", "not_an_object"),
    (json.dumps({"message_type": "chat_txt"}), "missing_field"),
    (chat_frame(author_id="eleven"), "invalid_field"),
    (chat_frame(message_type="chat_gif"), "unknown_message_type"),
    (chat_frame(room_id=999), "room_mismatch"),
    (chat_frame(create_at="now"), "invalid_field"),
]


async def test_bad_frames_get_named_errors_and_the_connection_survives(server) -> None:
    async with open_ws(ws_url(server, 123)) as sender, \
            open_ws(ws_url(server, 123)) as watcher:
        for text, code in BAD_FRAMES:
            await sender.send_message(text)
            error = await recv(sender)
            assert error["message_type"] == "error"
            assert error["code"] == code
            assert error["detail"]
        await sender.send_message(b'{"message_type": "chat_txt"}')
        assert (await recv(sender))["code"] == "binary_frame"
        await sender.send_message(chat_frame("still here"))
        assert (await recv(sender))["content"] == "still here"
        # The watcher saw the one valid message and nothing invalid.
        assert (await recv(watcher))["content"] == "still here"
        await assert_silent(watcher)
    assert server.metrics.bad_frames == len(BAD_FRAMES) + 1
    rows = await server.store.page(123, limit=100)
    assert [m.content for m in rows] == ["still here"]


async def test_invalid_utf8_fails_the_connection_with_1007(server) -> None:
    async with open_raw(server.port, "/ws/1") as client:
        await client.send_raw(client_frame(b'{"content": "\xff\xfe"}'))
        with trio.fail_after(10):
            assert await client.wait_closed() == 1007


async def test_oversized_frame_closes_with_1009_and_nothing_is_stored(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, max_frame_bytes=1024))
    async with open_ws(ws_url(server, 9)) as ws, \
            open_ws(ws_url(server, 9)) as watcher:
        await ws.send_message(chat_frame("x" * 2000, room_id=9))
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            await recv_text(ws)
        assert info.value.reason.code == 1009
        await assert_silent(watcher)
    assert server.metrics.oversized_frames == 1
    assert await server.store.page(9, limit=10) == []


async def test_fragmented_message_within_limit_is_accepted(server) -> None:
    client = await RawClient.connect(server.port, "/ws/3")
    try:
        text = chat_frame("in three parts", room_id=3).encode()
        await client.send_raw(client_frame(text[:10], fin=False)
                              + client_frame(text[10:20], opcode=0x0, fin=False)
                              + client_frame(text[20:], opcode=0x0))
        with trio.fail_after(10):
            while (frame := await client.receive_json())["message_type"] in PRESENCE_EVENTS:
                pass
        assert frame["content"] == "in three parts"
    finally:
        await client.aclose()


@pytest.mark.parametrize(("room", "detail"), [
    ("abc", "'abc'"), ("1.5", "'1.5'"), (str(2**63), str(2**63)), ("", "''")])
async def test_bad_room_id_is_refused_before_the_upgrade(server, room: str, detail: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request(f"/ws/{room}"))
        status, headers, body = await read_http_response(stream)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "bad_room_id"
    assert detail in json.loads(body)["detail"]


async def test_handshake_errors(server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request("/ws/1", version="8"))
        status, headers, body = await read_http_response(stream)
    assert status == 426 and headers["sec-websocket-version"] == "13"
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request("/ws/1", key="short"))
        status, _, body = await read_http_response(stream)
    assert status == 400 and json.loads(body)["error"] == "bad_handshake"


async def test_http_routes(server) -> None:
    status, headers, body = await http_get(server.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<html" in body.lower()
    status, _, body = await http_get(server.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = await http_get(server.port, "/ws/1")
    assert status == 426 and json.loads(body)["error"] == "upgrade_required"
    status, headers, body = await http_get(server.port, "/no/such/thing")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "not_found", "detail": "no such path: /no/such/thing"}
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        status, headers, body = await read_http_response(stream)
    assert status == 405 and headers["allow"] == "GET"
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await read_http_response(stream)
    assert status == 400 and json.loads(body)["error"] == "bad_request"


async def test_keep_alive_serves_several_requests_on_one_connection(server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        for _ in range(3):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_http_response(stream)
            assert status == 200 and "connection" not in headers


async def test_metrics_in_prometheus_format(server) -> None:
    async with open_ws(ws_url(server, 1)) as ws:
        await ws.send_message(chat_frame(room_id=1))
        await recv(ws)
        await ws.send_message("nope")
        await recv(ws)
        status, headers, body = await http_get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = dict(line.split(" ") for line in body.decode().splitlines()
                  if not line.startswith("#"))
    assert values["triochat_connections_open"] == "1"
    assert values["triochat_rooms_live"] == "1"
    assert values["triochat_messages_received_total"] == "1"
    assert values["triochat_messages_delivered_total"] == "1"
    assert values['triochat_refusals_total{reason="bad_frame"}'] == "1"
    assert values['triochat_disconnects_total{reason="slow_consumer"}'] == "0"
    assert int(values["triochat_trio_tasks"]) > 3
    assert "# TYPE triochat_messages_received_total counter" in body.decode()


async def test_concurrent_senders_one_order_for_everyone(server) -> None:
    senders, per_sender, receivers = 5, 30, 3
    total = senders * per_sender
    seen: list[list[tuple[int, str]]] = []

    async def receive_all(ws) -> None:
        got: list[tuple[int, str]] = []
        while len(got) < total:
            message = await recv(ws)
            got.append((message["id"], message["content"]))
        seen.append(got)

    async def send_all(ws, n: int) -> None:
        for i in range(per_sender):
            await ws.send_message(chat_frame(f"s{n}-{i}", author_id=n, room_id=77))
            if i % 7 == 0:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        listeners = [await nursery.start(_open, ws_url(server, 77)) for _ in range(receivers)]
        sockets = [await nursery.start(_open, ws_url(server, 77)) for _ in range(senders)]
        async with trio.open_nursery() as work:
            for ws in listeners:
                work.start_soon(receive_all, ws)
            for n, ws in enumerate(sockets):
                work.start_soon(send_all, ws, n)
        nursery.cancel_scope.cancel()
    assert all(order == seen[0] for order in seen)
    assert [i for i, _ in seen[0]] == list(range(1, total + 1))
    for n in range(senders):  # each sender's own messages keep its order
        mine = [c for _, c in seen[0] if c.startswith(f"s{n}-")]
        assert mine == [f"s{n}-{i}" for i in range(per_sender)]


async def _open(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_ws(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_join_gets_recent_history_then_live_without_gap(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, history_on_join=50))
    async with open_ws(ws_url(server, 8)) as sender:
        for i in range(60):
            await sender.send_message(chat_frame(f"old{i}", room_id=8))
        for _ in range(60):
            await recv(sender)

        stop = trio.Event()

        async def keep_sending() -> None:
            i = 0
            while not stop.is_set():
                await sender.send_message(chat_frame(f"live{i}", room_id=8))
                i += 1
                await trio.sleep(0.001)

        async def drain() -> None:
            while True:
                await recv_text(sender)

        with trio.fail_after(30):
            async with trio.open_nursery() as work:
                work.start_soon(drain)
                work.start_soon(keep_sending)
                await trio.sleep(0.05)
                async with open_ws(ws_url(server, 8)) as joiner:
                    ids = [(await recv(joiner))["id"] for _ in range(120)]
                stop.set()
                work.cancel_scope.cancel()
    # History is the last 50 messages at the moment of joining (60 old + some live).
    assert ids[0] >= 11
    assert ids == list(range(ids[0], ids[0] + len(ids))), "no gap, no duplicate at the seam"


async def test_history_is_refetched_when_a_room_comes_back(server) -> None:
    async with open_ws(ws_url(server, 31)) as ws:
        for i in range(3):
            await ws.send_message(chat_frame(f"h{i}", room_id=31))
            await recv(ws)
    await wait_until(lambda: 31 not in server.hub.rooms)
    async with open_ws(ws_url(server, 31)) as ws:
        assert [(await recv(ws))["content"] for _ in range(3)] == ["h0", "h1", "h2"]
        await ws.send_message(chat_frame("h3", room_id=31))
        assert (await recv(ws))["id"] == 4


async def test_restart_keeps_history_and_ids_continue(db_path) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, make_config(db_path))
        async with open_ws(ws_url(server, 55)) as ws:
            for i in range(5):
                await ws.send_message(chat_frame(f"before{i}", room_id=55))
            for _ in range(5):
                await recv(ws)
            server.shutdown()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages WHERE room_id = 55").fetchone()[0] == 5
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, make_config(db_path))
        async with open_ws(ws_url(server, 55)) as ws:
            history = [await recv(ws) for _ in range(5)]
            assert [m["content"] for m in history] == [f"before{i}" for i in range(5)]
            await ws.send_message(chat_frame("after", room_id=55))
            assert (await recv(ws))["id"] == 6
            server.shutdown()


async def test_exception_in_one_handler_leaves_others_alone(server, monkeypatch) -> None:
    original = ChatConnection.on_message

    async def explode(self, message):
        if "boom" in message:
            raise RuntimeError("handler bug")
        await original(self, message)

    monkeypatch.setattr(ChatConnection, "on_message", explode)
    async with open_ws(ws_url(server, 4)) as victim, \
            open_ws(ws_url(server, 4)) as bystander:
        await victim.send_message(chat_frame("boom", room_id=4))
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            await recv_text(victim)
        assert info.value.reason.code == 1011
        assert server.metrics.frame_failures == 1
        await bystander.send_message(chat_frame("fine", room_id=4))
        assert (await recv(bystander))["content"] == "fine"
    async with open_ws(ws_url(server, 4)) as again:
        assert (await recv(again))["content"] == "fine"
