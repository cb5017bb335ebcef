"""Failure boundaries, one fault-injection test each: what fails there stays there.

Each test makes one unit fail (a request, a connection) and checks that the
node logs it once with its traceback, counts it, and goes on serving.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import pytest
import redis
import trio
from trio_websocket import ConnectionClosed

import trio_chat.server
from trio_chat.broker import LocalBroker
from trio_chat.metrics import count_tasks
from trio_chat.room import Room
from trio_chat.store import SqliteBackend

from .conftest import (
    REDIS_PORT,
    chat_frame,
    node_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import http_call

AT = "2022-06-05T12:00:00.000Z"


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def room_tasks(server: Any) -> int:
    """The tasks under the hub: Hub.run, presence and each live room's task.

    Counted there rather than under the whole server, whose start-up may leave a task
    or two running for a while after it is ready.
    """
    return count_tasks(server.hub._nursery.parent_task)


async def closed_with(ws: Any, timeout: float = 15) -> int:
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(timeout):
        while True:
            await ws.get_message()
    return info.value.reason.code


async def test_a_failing_http_handler_answers_500_and_is_counted(server, monkeypatch,
                                                                 caplog) -> None:
    async def broken(self, after, limit):
        raise RuntimeError("a bug in listing rooms")

    monkeypatch.setattr(SqliteBackend, "rooms", broken)
    status, answer = await http_call(server.port, "GET", "/rooms")
    assert (status, answer["error"]) == (500, "internal_error")
    assert server.metrics.http_errors == 1
    assert [r.exc_info[1].args for r in tracebacks(caplog)] == [("a bug in listing rooms",)]
    assert (await http_call(server.port, "GET", "/healthz"))[0] == 200


async def test_a_failing_connection_is_counted_and_ends_alone(server, monkeypatch,
                                                             caplog) -> None:
    original = trio_chat.server.serve_http
    calls = 0

    async def fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in serving a connection")
        await original(*args)

    monkeypatch.setattr(trio_chat.server, "serve_http", fails_once)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            assert await stream.receive_some() == b"", "closed without an answer"
    assert server.metrics.connection_failures == 1
    assert [r.exc_info[1].args for r in tracebacks(caplog)] == [
        ("a bug in serving a connection",)]
    async with open_ws(ws_url(server, 7)) as ws:
        await ws.send_message(chat_frame("still serving", room_id=7))
        assert (await recv(ws))["content"] == "still serving"


def wire_message(message_id: Any, room_id: int = 9, **fields: Any) -> dict[str, Any]:
    """A message as the Redis broker's publish script sends it between nodes."""
    return {"id": message_id, "message_type": "chat_txt", "author_id": 4, "room_id": room_id,
            "content": f"message {message_id}", "create_at": AT, "received_at": AT, **fields}


# What a broken (or hostile) publisher on the room's channel could send.
GARBAGE = [
    b'{"id":5}',
    b"not json",
    b"",
    b'{"message_type":"bogus"}',
    b'{"control":"nope"}',
    b'{"control":"close","author_id":null,"code":"x","reason":""}',
    b"[1, 2, 3]",
    b'"just a string"',
    b"\xff\xfe is not UTF-8",
    json.dumps(wire_message(2**70)).encode(),
    json.dumps(wire_message(0)).encode(),
    json.dumps(wire_message("7")).encode(),
    json.dumps(wire_message(7, room_id=10)).encode(),
    json.dumps(wire_message(7, message_type="chat_poll")).encode(),
    json.dumps(wire_message(7, content=None)).encode(),
    json.dumps(wire_message(7, content="\ud800")).encode(),
    json.dumps(wire_message(7, message_type="chat_edit")).encode(),
    b'{"message_type":"chat_enter","room_id":9}',
    json.dumps({"message_type": "typing", "author_id": "4", "room_id": 9,
                "create_at": AT}).encode(),
    json.dumps({"message_type": "chat_exit", "author_id": 4, "room_id": 9, "content": "",
                "create_at": AT, "online": 0, "extra": "\ud800"}).encode(),
]


async def test_bad_broker_payloads_are_dropped_and_the_node_goes_on(
        nursery, tmp_path, channel, caplog) -> None:
    server = await start_server(nursery, node_config(tmp_path / "n.db", REDIS_PORT, channel))
    with redis.Redis(port=REDIS_PORT) as client:
        async with open_ws(ws_url(server, 9, "?author_id=3")) as ws:
            # Our own arrival, back through Redis: the room is listening.
            assert (await recv(ws, events=True))["message_type"] == "chat_enter"
            for payload in GARBAGE:
                client.execute_command("SPUBLISH", f"{channel}:{{9}}", payload)
            # From a newer trio-chat: fields this one does not know are no reason to drop.
            # (It takes id 1 as the publish script would: the room's counter knows.)
            client.set(f"{channel}:{{9}}:seq", 1)
            client.execute_command("SPUBLISH", f"{channel}:{{9}}",
                                   json.dumps(wire_message(1, reactions={"+1": 2})))
            typing = {"message_type": "typing", "author_id": 4, "room_id": 9,
                      "create_at": AT, "device": "phone"}
            client.execute_command("SPUBLISH", f"{channel}:{{9}}", json.dumps(typing))
            await ws.send_message(chat_frame("after the garbage", room_id=9, author_id=3))
            got = [await recv(ws, events=True) for _ in range(3)]
            assert got[0] == wire_message(1)
            assert got[1] == typing
            assert (got[2]["id"], got[2]["content"]) == (2, "after the garbage")
            await wait_until(lambda: server.metrics.broker_payloads_dropped == len(GARBAGE))
            async with open_ws(ws_url(server, 9)) as newcomer, \
                    open_ws(ws_url(server, 10)) as elsewhere:
                assert [(await recv(newcomer))["id"] for _ in range(2)] == [1, 2]
                await newcomer.send_message(chat_frame("hello", room_id=9))
                assert (await recv(ws))["content"] == (await recv(newcomer))["content"]
                await elsewhere.send_message(chat_frame("elsewhere", room_id=10))
                assert (await recv(elsewhere))["content"] == "elsewhere"
    # Another node's nonsense is worth a warning, not a traceback.
    assert not tracebacks(caplog)
    assert 0 < sum("dropped" in r.getMessage() for r in caplog.records) < len(GARBAGE)


async def test_bad_entries_in_a_rooms_recent_list_are_dropped(nursery, tmp_path,
                                                              channel) -> None:
    server = await start_server(nursery, node_config(tmp_path / "n.db", REDIS_PORT, channel))
    with redis.Redis(port=REDIS_PORT) as client:
        client.rpush(f"{channel}:{{12}}:recent", b'{"id":1}', b"not json",
                     json.dumps(wire_message(2, room_id=12)))
        async with open_ws(ws_url(server, 12)) as ws:
            assert (await recv(ws))["content"] == "message 2"
            await ws.send_message(chat_frame("next", room_id=12))
            assert ((got := await recv(ws))["id"], got["content"]) == (3, "next")
        assert server.metrics.broker_payloads_dropped == 2


async def test_a_hung_redis_is_noticed_and_sends_are_refused_not_held(
        nursery, tmp_path, channel, redis_server) -> None:
    port = redis_server()
    server = await start_server(nursery, node_config(tmp_path / "n.db", port, channel))
    # Quick to give up, so the test is quick; the defaults are 5 s and 3 s.
    server.broker.timeout = 1.0
    server.broker.outage_hold = 0.5
    process = redis_server.processes[-1]  # type: ignore[attr-defined]
    async with open_ws(ws_url(server, 15, "?author_id=3")) as ws:
        await ws.send_message(chat_frame("before", room_id=15, author_id=3))
        assert (await recv(ws))["content"] == "before"
        os.kill(process.pid, signal.SIGSTOP)
        try:
            # Stopped, Redis keeps the connections open and answers nothing.
            await wait_until(lambda: not server.broker.connected)
            assert server.broker.down_since is not None
            assert server.metrics.gauges["redis_connected"][1]() == 0
            await ws.send_message(chat_frame("during", room_id=15, author_id=3,
                                             client_msg_id="hung-1"))
            refused = await recv(ws)
            assert (refused["message_type"], refused["code"], refused["client_msg_id"]) == (
                "error", "sync_unavailable", "hung-1")
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await wait_until(lambda: server.broker.connected, timeout=40)
        assert server.broker.down_since is None
        await ws.send_message(chat_frame("after", room_id=15, author_id=3))
        assert (await recv(ws))["content"] == "after"


@pytest.mark.parametrize("failing", ["ensure_room", "tail"])
async def test_a_room_that_fails_to_start_fails_every_joiner_waiting_for_it(
        server, monkeypatch, failing) -> None:
    """The first joiner starts the room: making sure it exists in the store, then
    reading its history. If that fails, a second joiner waiting for the room is told
    too (1013, try again later), and the next joiner starts the room afresh."""
    baseline = room_tasks(server)
    entered, release = trio.Event(), trio.Event()
    owner = {"ensure_room": SqliteBackend, "tail": LocalBroker}[failing]
    original = getattr(owner, failing)
    calls = 0

    async def fails_first(self, room_id, *args):
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await release.wait()
            raise OSError("the database went away")
        return await original(self, room_id, *args)

    monkeypatch.setattr(owner, failing, fails_first)
    async with open_ws(ws_url(server, 20)) as first:
        with trio.fail_after(10):
            await entered.wait()
        async with open_ws(ws_url(server, 20)) as second:
            room = server.hub.rooms[20]
            await wait_until(lambda: room.ready.statistics().tasks_waiting == 1)
            release.set()
            assert await closed_with(first, timeout=10) == 1013
            assert await closed_with(second, timeout=10) == 1013
    assert 20 not in server.hub.rooms
    async with open_ws(ws_url(server, 20)) as third:
        await third.send_message(chat_frame("third time lucky", room_id=20))
        assert (await recv(third))["content"] == "third time lucky"
    await wait_until(lambda: not server.hub.rooms and not server.hub.connections)
    await wait_until(lambda: room_tasks(server) == baseline)


async def test_a_room_that_fails_once_started_ends_alone(server, monkeypatch,
                                                         caplog) -> None:
    baseline = room_tasks(server)
    boom = trio.Event()
    original = Room.run
    failed = False

    async def fails_when_told(self, *, task_status=trio.TASK_STATUS_IGNORED):
        nonlocal failed
        if self.id != 21 or failed:
            return await original(self, task_status=task_status)
        async with trio.open_nursery() as nursery:
            await nursery.start(original, self)
            task_status.started()
            await boom.wait()
            failed = True
            raise RuntimeError("a bug in room 21")

    monkeypatch.setattr(Room, "run", fails_when_told)
    async with open_ws(ws_url(server, 21)) as doomed, \
            open_ws(ws_url(server, 22)) as bystander:
        await doomed.send_message(chat_frame("before", room_id=21))
        assert (await recv(doomed))["content"] == "before"
        boom.set()
        assert await closed_with(doomed) == 1011
        assert server.metrics.room_failures == 1
        [record] = tracebacks(caplog)
        assert "room 21" in record.getMessage()
        assert 21 not in server.hub.rooms
        await bystander.send_message(chat_frame("unaffected", room_id=22))
        assert (await recv(bystander))["content"] == "unaffected"
        async with open_ws(ws_url(server, 21)) as again:
            assert (await recv(again))["content"] == "before"
            await again.send_message(chat_frame("after", room_id=21))
            assert ((got := await recv(again))["id"], got["content"]) == (2, "after")
    await wait_until(lambda: not server.hub.rooms and not server.hub.connections)
    await wait_until(lambda: room_tasks(server) == baseline)


async def test_a_failing_presence_update_is_retried_with_backoff(server, monkeypatch,
                                                                 caplog) -> None:
    original = LocalBroker.presence
    failures = 0

    async def fails_twice(self, room_id, add, remove, ttl):
        nonlocal failures
        if add and failures < 2:
            failures += 1
            raise RuntimeError("a bug in presence")
        return await original(self, room_id, add, remove, ttl)

    monkeypatch.setattr(LocalBroker, "presence", fails_twice)
    async with open_ws(ws_url(server, 23, "?author_id=5")) as ws:
        # Retried until it goes through: the author's arrival is announced after all.
        entered = await recv(ws, events=True, timeout=30)
        assert (entered["message_type"], entered["author_id"]) == ("chat_enter", 5)
        await ws.send_message(chat_frame("still here", room_id=23, author_id=5))
        assert (await recv(ws))["content"] == "still here"
    assert server.metrics.presence_failures == 2
    assert [r.exc_info[1].args for r in tracebacks(caplog)] == [("a bug in presence",)] * 2


async def test_frames_sent_into_a_hung_redis_wait_for_it_once_not_each(
        nursery, tmp_path, channel, redis_server) -> None:
    """The connection's reader (and with it the answers to the client's pings) waits on
    each frame it handles: frames sent back to back into a hung Redis must not each
    wait the broker's timeout. The first finds Redis hung; the rest are refused
    without waiting, and say so, and a ping sent after them is answered."""
    port = redis_server()
    server = await start_server(nursery, node_config(tmp_path / "n.db", port, channel))
    server.broker.timeout = 2.0
    server.broker.outage_hold = 0.5
    process = redis_server.processes[-1]  # type: ignore[attr-defined]
    async with open_ws(ws_url(server, 16, "?author_id=3")) as ws:
        await ws.send_message(chat_frame("before", room_id=16, author_id=3))
        assert (await recv(ws))["content"] == "before"
        os.kill(process.pid, signal.SIGSTOP)
        try:
            for i in range(5):
                await ws.send_message(chat_frame(f"during-{i}", room_id=16, author_id=3,
                                                 client_msg_id=f"h{i}"))
            details = []
            for i in range(5):
                refused = await recv(ws)
                assert (refused["code"], refused["client_msg_id"]) == ("sync_unavailable",
                                                                       f"h{i}")
                details.append(refused["detail"])
            # Only the first frame reached Redis; its fate is unknown, and it says so.
            assert ["may have been accepted" in d for d in details] == [True] + [False] * 4
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await wait_until(lambda: server.broker.connected, timeout=40)
        await ws.send_message(chat_frame("after", room_id=16, author_id=3))
        while (frame := await recv(ws))["content"] != "after":
            assert frame["content"] == "during-0"  # run by Redis once it woke up
