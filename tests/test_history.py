"""History over HTTP and gap-free resume, on both stores (SQLite and real MariaDB)."""

from __future__ import annotations

import json

import pytest
import trio

from .conftest import chat_frame, open_ws, recv, recv_text, start_server, ws_url
from .rawws import http_get, read_http_response


async def fill(server, room: int, n: int, prefix: str = "m") -> None:
    async with open_ws(ws_url(server, room)) as ws:
        for i in range(n):
            await ws.send_message(chat_frame(f"{prefix}{i}", room_id=room))
        last = None
        while last is None or last["content"] != f"{prefix}{n - 1}":
            last = await recv(ws)


async def get_json(server, path: str) -> tuple[int, dict]:
    status, _, body = await http_get(server.port, path)
    return status, json.loads(body)


async def test_history_endpoint_pages_newest_first(nursery, any_config) -> None:
    server = await start_server(nursery, any_config())
    await fill(server, 21, 120)
    status, page = await get_json(server, "/rooms/21/messages")
    assert status == 200
    assert [m["id"] for m in page["messages"]] == list(range(120, 70, -1))
    assert page["messages"][0]["content"] == "m119"
    seen = [m["id"] for m in page["messages"]]
    while page["next"]:
        status, page = await get_json(server, page["next"])
        assert status == 200
        seen += [m["id"] for m in page["messages"]]
    assert seen == list(range(120, 0, -1))
    status, page = await get_json(server, "/rooms/21/messages?after=100&order=asc&limit=5")
    assert [m["id"] for m in page["messages"]] == [101, 102, 103, 104, 105]
    status, page = await get_json(server, page["next"])
    assert [m["id"] for m in page["messages"]] == [106, 107, 108, 109, 110]
    status, page = await get_json(server, "/rooms/21/messages?before=10&after=5")
    assert [m["id"] for m in page["messages"]] == [9, 8, 7, 6] and page["next"] is None
    status, page = await get_json(server, "/rooms/21/messages?limit=500")
    assert len(page["messages"]) == 120
    status, page = await get_json(server, "/rooms/999/messages")
    assert status == 200 and page == {"room_id": 999, "messages": [], "next": None}


@pytest.mark.parametrize(("query", "code", "word"), [
    ("limit=0", "bad_parameter", "limit"), ("limit=501", "bad_parameter", "limit"),
    ("limit=ten", "bad_parameter", "limit"), ("before=-1", "bad_parameter", "before"),
    ("after=x", "bad_parameter", "after"), ("order=sideways", "bad_parameter", "order"),
])
async def test_history_bad_parameters(server, query: str, code: str, word: str) -> None:
    status, body = await get_json(server, f"/rooms/1/messages?{query}")
    assert status == 400 and body["error"] == code and word in body["detail"]
    status, body = await get_json(server, "/rooms/abc/messages")
    assert status == 400 and body["error"] == "bad_room_id"


async def resume_ids(server, room: int, since: int, count: int) -> list[dict]:
    async with open_ws(ws_url(server, room, f"?since={since}")) as ws:
        return [await recv(ws) for _ in range(count)]


@pytest.mark.parametrize("since", [0, 1, 35, 49, 50, 51, 59])
async def test_resume_replays_exactly_what_was_missed(nursery, any_config, since) -> None:
    # 60 messages; the room keeps the last 10 in memory, so small `since` reads the store.
    server = await start_server(nursery, any_config(history_on_join=10, replay_limit=100))
    async with open_ws(ws_url(server, 22)) as keeper:  # keeps the room alive
        await fill(server, 22, 60)
        frames = await resume_ids(server, 22, since, 60 - since)
        assert [f["id"] for f in frames] == list(range(since + 1, 61))
        assert all(f["message_type"] == "chat_txt" for f in frames)
        del keeper
    # And once the room is gone from memory, the same from the store alone.
    frames = await resume_ids(server, 22, since, 60 - since)
    assert [f["id"] for f in frames] == list(range(since + 1, 61))


async def test_resume_at_the_latest_id_gets_only_live(nursery, any_config) -> None:
    server = await start_server(nursery, any_config(history_on_join=10))
    await fill(server, 23, 5)
    async with open_ws(ws_url(server, 23, "?since=5")) as ws, open_ws(ws_url(server, 23)) as b:
        for _ in range(5):
            await recv(b)
        await b.send_message(chat_frame("new", room_id=23))
        got = await recv(ws)
        assert (got["id"], got["content"]) == (6, "new")


@pytest.mark.parametrize(("since", "why"), [(5, "too old"), (500, "ahead of the room")])
async def test_resume_too_far_gets_a_reset_then_latest_history(nursery, any_config, since,
                                                               why) -> None:
    server = await start_server(nursery, any_config(history_on_join=10, replay_limit=30))
    await fill(server, 24, 60)
    frames = await resume_ids(server, 24, since, 11)
    reset = frames[0]
    assert reset["message_type"] == "history_reset", why
    assert (reset["since"], reset["latest_id"], reset["room_id"]) == (since, 60, 24)
    assert [f["id"] for f in frames[1:]] == list(range(51, 61))


async def test_resume_has_no_gap_or_duplicate_while_others_send(nursery, any_config) -> None:
    server = await start_server(nursery, any_config(history_on_join=5, replay_limit=1000))
    await fill(server, 25, 100)
    stop = trio.Event()
    async with open_ws(ws_url(server, 25)) as sender:

        async def keep_sending() -> None:
            i = 0
            while not stop.is_set():
                await sender.send_message(chat_frame(f"live{i}", room_id=25))
                i += 1
                await trio.sleep(0.002)

        async def drain() -> None:
            while True:
                await recv_text(sender)

        with trio.fail_after(60):
            async with trio.open_nursery() as work:
                work.start_soon(drain)
                work.start_soon(keep_sending)
                await trio.sleep(0.05)
                # since=20 is far behind the 5 in memory: read from the store while live
                # messages keep arriving, then continue live.
                frames = await resume_ids(server, 25, 20, 200)
                stop.set()
                work.cancel_scope.cancel()
    ids = [f["id"] for f in frames]
    assert ids == list(range(21, 221))


async def test_reconnect_with_since_gets_what_it_missed(nursery, any_config) -> None:
    server = await start_server(nursery, any_config())
    async with open_ws(ws_url(server, 26)) as stayer:
        async with open_ws(ws_url(server, 26)) as leaver:
            await stayer.send_message(chat_frame("one", room_id=26))
            last_seen = (await recv(leaver))["id"]
        for word in ("two", "three", "four"):
            await stayer.send_message(chat_frame(word, room_id=26))
        async with open_ws(ws_url(server, 26, f"?since={last_seen}")) as back:
            assert [(await recv(back))["content"] for _ in range(3)] == ["two", "three", "four"]
            await stayer.send_message(chat_frame("five", room_id=26))
            assert (await recv(back))["content"] == "five"


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", str(2**63)])
async def test_bad_since_is_refused_before_the_upgrade(server, since: str) -> None:
    from .wire import handshake_request
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request(f"/ws/1?since={since}"))
        status, _, body = await read_http_response(stream)
    assert status == 400 and json.loads(body)["error"] == "bad_parameter"


async def test_restart_keeps_history_and_ids_continue(any_config) -> None:
    for round_ in range(2):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, any_config())
            async with open_ws(ws_url(server, 27)) as ws:
                history = [await recv(ws) for _ in range(3 * round_)]
                assert [m["content"] for m in history] == [f"r0-{i}" for i in range(3 * round_)]
                for i in range(3):
                    await ws.send_message(chat_frame(f"r{round_}-{i}", room_id=27))
                ids = [(await recv(ws))["id"] for _ in range(3)]
                assert ids == [3 * round_ + 1, 3 * round_ + 2, 3 * round_ + 3]
                server.shutdown()
