"""Presence: who is online in a room, on one node and across nodes; chat_enter/chat_exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from trio_chat.outbound import presence_event

from .conftest import (
    REDIS_PORT,
    chat_frame,
    listening_port,
    make_config,
    node_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .rawws import http_get, read_http_response
from .wire import handshake_request


async def members(server: Any, room: int) -> dict[str, Any]:
    status, _, body = await http_get(server.port, f"/rooms/{room}/members")
    assert status == 200, body
    return json.loads(body)


async def event(ws: Any, timeout: float = 20) -> dict[str, Any]:
    """The next presence event, passing over chat messages."""
    with trio.fail_after(timeout):
        while True:
            frame = await recv(ws, events=True)
            if "id" not in frame:
                return frame


def presence_of(frame: dict[str, Any]) -> tuple[str, int, int]:
    return frame["message_type"], frame["author_id"], frame["online"]


async def test_enter_and_exit_count_each_author_once(server) -> None:
    async with open_ws(ws_url(server, 70, "?author_id=1")) as a:
        first = await recv(a, events=True)
        # The seed's message fields, no id (not part of the room's history), plus online.
        assert first == json.loads(presence_event("chat_enter", 70, 1, 1, first["create_at"]))
        assert first["create_at"].endswith("Z")
        async with open_ws(ws_url(server, 70, "?author_id=2")) as b1:
            assert presence_of(await event(a)) == ("chat_enter", 2, 2)
            assert presence_of(await event(b1)) == ("chat_enter", 2, 2)
            async with open_ws(ws_url(server, 70, "?author_id=2")):
                assert await members(server, 70) == {"room_id": 70, "online": 2,
                                                     "members": [1, 2]}
                # A second connection of author 2 is not announced: the next frame
                # after it is this message.
                await a.send_message(chat_frame("after", room_id=70, author_id=1))
                assert (await recv(a, events=True))["content"] == "after"
            # Author 2 is still online through b1: no exit.
            await a.send_message(chat_frame("still", room_id=70, author_id=1))
            assert (await recv(a, events=True))["content"] == "still"
        assert presence_of(await event(a)) == ("chat_exit", 2, 1)
        assert await members(server, 70) == {"room_id": 70, "online": 1, "members": [1]}
    assert await members(server, 70) == {"room_id": 70, "online": 0, "members": []}
    assert server.hub.presence.entries == 0


async def test_author_is_learned_from_the_first_valid_frame(server) -> None:
    async with open_ws(ws_url(server, 71, "?author_id=1")) as watcher, \
            open_ws(ws_url(server, 71)) as seed_client:
        assert presence_of(await event(watcher)) == ("chat_enter", 1, 1)
        # A seed client never says who it is until it sends.
        assert (await members(server, 71))["members"] == [1]
        await seed_client.send_message("{not json")
        await seed_client.send_message(chat_frame("hi", room_id=71, author_id=5))
        frames = [await recv(watcher, events=True) for _ in range(2)]
        assert sorted(f.get("content") or presence_of(f)[0] for f in frames) == [
            "chat_enter", "hi"]
        assert [presence_of(f) for f in frames if "id" not in f] == [("chat_enter", 5, 2)]
        # Without authentication the first identity stays for the connection.
        await seed_client.send_message(chat_frame("again", room_id=71, author_id=6))
        assert (await recv(watcher, events=True))["content"] == "again"
        assert (await members(server, 71))["members"] == [1, 5]
    assert server.hub.presence.entries == 0


@pytest.mark.parametrize("query, detail", [
    ("?author_id=x", "author_id must be an integer"),
    ("?author_id=99999999999999999999", "author_id must be an integer"),
])
async def test_bad_author_id_is_refused_before_the_upgrade(server, query, detail) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request(f"/ws/70{query}"))
        status, _, body = await read_http_response(stream)
    assert status == 400
    answer = json.loads(body)
    assert answer["error"] == "bad_parameter" and answer["detail"].startswith(detail)


async def test_members_of_a_bad_room_id_is_a_400(server) -> None:
    status, _, body = await http_get(server.port, "/rooms/abc/members")
    assert status == 400 and json.loads(body)["error"] == "bad_room_id"


async def test_presence_across_nodes(nursery, tmp_path, channel) -> None:
    a, b = [await start_server(nursery, node_config(tmp_path / f"{n}.db", REDIS_PORT, channel))
            for n in "ab"]
    async with open_ws(ws_url(a, 72, "?author_id=1")) as one:
        first = await event(one)
        # Redis's script writes the same frame as the single-node broker.
        assert first == json.loads(presence_event("chat_enter", 72, 1, 1, first["create_at"]))
        async with open_ws(ws_url(b, 72, "?author_id=2")) as two_on_b:
            assert presence_of(await event(one)) == ("chat_enter", 2, 2)
            async with open_ws(ws_url(a, 72, "?author_id=2")):
                assert await members(a, 72) == await members(b, 72) == {
                    "room_id": 72, "online": 2, "members": [1, 2]}
                await two_on_b.aclose()
                # Author 2 is still here through node a: nothing announced.
                await one.send_message(chat_frame("ping", room_id=72, author_id=1))
                assert (await recv(one, events=True))["content"] == "ping"
            assert presence_of(await event(one)) == ("chat_exit", 2, 1)
        assert (await members(b, 72))["members"] == [1]


async def test_graceful_shutdown_withdraws_presence_at_once(nursery, tmp_path, channel) -> None:
    # Entries that would live ten minutes: the exit must come from the withdrawal.
    a = await start_server(nursery, node_config(tmp_path / "a.db", REDIS_PORT, channel,
                                                presence_ttl=600))
    async with trio.open_nursery() as b_nursery:
        b = await start_server(b_nursery, node_config(tmp_path / "b.db", REDIS_PORT, channel,
                                                      presence_ttl=600))
        async with open_ws(ws_url(a, 73, "?author_id=1")) as watcher:
            assert presence_of(await event(watcher)) == ("chat_enter", 1, 1)
            async with open_ws(ws_url(b, 73, "?author_id=9")):
                assert presence_of(await event(watcher)) == ("chat_enter", 9, 2)
                b.shutdown()
                assert presence_of(await event(watcher)) == ("chat_exit", 9, 1)
            assert (await members(a, 73))["members"] == [1]


async def start_node_process(tmp_path: Path, channel: str, **server: Any
                             ) -> tuple[trio.Process, int]:
    config = tmp_path / "node.json"
    config.write_text(json.dumps({
        "server": {"port": 0, **server},
        "redis": {"host": "127.0.0.1", "port": REDIS_PORT, "listeningChannelName": channel,
                  "publishChannelName": channel}}))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(config), "--sqlite",
         str(tmp_path / "node.db")], stderr=subprocess.PIPE)
    return process, await listening_port(process)


async def test_a_killed_node_leaves_no_ghosts(nursery, tmp_path, channel) -> None:
    ttl = 1.5
    a = await start_server(nursery, node_config(tmp_path / "a.db", REDIS_PORT, channel,
                                                presence_ttl=ttl))
    process, port = await start_node_process(tmp_path, channel, presenceTtl=ttl)
    try:
        async with open_ws(ws_url(a, 74, "?author_id=1")) as watcher:
            assert presence_of(await event(watcher)) == ("chat_enter", 1, 1)
            async with open_ws(f"ws://127.0.0.1:{port}/ws/74?author_id=9"):
                assert presence_of(await event(watcher)) == ("chat_enter", 9, 2)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            # No withdrawal came: node a's refresh purges the expired entry and says so.
            assert presence_of(await event(watcher, timeout=30)) == ("chat_exit", 9, 1)
            assert (await members(a, 74))["members"] == [1]
            # The survivor keeps serving.
            await watcher.send_message(chat_frame("alive", room_id=74, author_id=1))
            assert (await recv(watcher))["content"] == "alive"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stderr.aclose()
    entries = redis.Redis(port=REDIS_PORT, decode_responses=True).zrange(
        f"{channel}:{{74}}:presence", 0, -1)
    assert not any(entry.startswith("9|") for entry in entries)


async def test_single_node_presence_needs_no_redis(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path))
    assert server.config.redis is None
    async with open_ws(ws_url(server, 75, "?author_id=3")) as ws:
        assert presence_of(await event(ws)) == ("chat_enter", 3, 1)
        assert "triochat_presence_entries 1" in server.metrics.render()


async def test_presence_comes_back_after_redis_loses_it(nursery, tmp_path, channel,
                                                        redis_server) -> None:
    port = redis_server()
    # Entries that would outlive the test: only a re-registration can bring them back.
    a = await start_server(nursery, node_config(tmp_path / "a.db", port, channel,
                                                presence_ttl=600))
    async with open_ws(ws_url(a, 76, "?author_id=4")) as ws:
        assert presence_of(await event(ws)) == ("chat_enter", 4, 1)
        process = redis_server.processes[-1]
        process.kill()
        process.wait()
        await wait_until(lambda: not a.broker.connected)
        status, _, body = await http_get(a.port, "/rooms/76/members")
        assert status == 503 and json.loads(body)["error"] == "sync_unavailable"
        redis_server()  # empty: the restart lost every key
        # Back, and announced again: to Redis this is a new arrival.
        assert presence_of(await event(ws, timeout=30)) == ("chat_enter", 4, 1)
        assert (await members(a, 76))["members"] == [4]
