"""The rooms API on both stores: every endpoint's success and error paths, and what
kick, ban and delete do to live connections (on one node and across nodes)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

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
from .rawws import RawClient, http_call, read_http_response
from .wire import handshake_request


@pytest.fixture
async def api(nursery, any_config) -> Any:
    return await start_server(nursery, any_config())


async def call(server: Any, method: str, path: str, body: object = None, **kw: Any
               ) -> tuple[int, Any]:
    return await http_call(server.port, method, path, body, **kw)


async def closed_with(ws: Any) -> int:
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(15):
        while True:
            await ws.get_message()
    return info.value.reason.code


async def upgrade_status(server: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request(path))
        return await read_http_response(stream)


async def test_create_read_list_rename(api) -> None:
    status, general = await call(api, "POST", "/rooms", {"name": "general"})
    assert status == 201
    assert general == {"id": general["id"], "name": "general", "private": False,
                       "created_at": general["created_at"], "online": 0}
    status, secret = await call(api, "POST", "/rooms", {"name": "비밀", "private": True})
    assert status == 201 and secret["private"] and secret["id"] == general["id"] + 1
    assert await call(api, "POST", "/rooms", {"name": "general"}) == (409, {
        "error": "name_taken", "detail": "a room is already named 'general'"})

    status, room = await call(api, "GET", f"/rooms/{general['id']}")
    assert status == 200 and room == general
    status, page = await call(api, "GET", "/rooms?limit=1")
    assert status == 200 and [r["id"] for r in page["rooms"]] == [general["id"]]
    status, page = await call(api, "GET", page["next"])
    assert [r["name"] for r in page["rooms"]] == ["비밀"]
    status, last = await call(api, "GET", page["next"])
    assert status == 200 and last == {"rooms": [], "next": None}

    status, renamed = await call(api, "PATCH", f"/rooms/{general['id']}",
                                 {"name": "lobby", "private": True})
    assert status == 200 and (renamed["name"], renamed["private"]) == ("lobby", True)
    status, answer = await call(api, "PATCH", f"/rooms/{secret['id']}", {"name": "lobby"})
    assert status == 409 and answer["error"] == "name_taken"
    status, answer = await call(api, "PATCH", "/rooms/999", {"name": "x"})
    assert status == 404 and answer["error"] == "room_not_found"


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "name"),
    ({"name": ""}, 422, "name"),
    ({"name": "   "}, 422, "name"),
    ({"name": "x" * 51}, 422, "name"),
    ({"name": 5}, 422, "name"),
    ({"name": "a\nb"}, 422, "name"),
    ({"name": "ok", "private": "yes"}, 422, "private"),
    ({"name": "ok", "owner": 1}, 422, "owner"),
    ([], 400, None),
    ("room", 400, None),
])
async def test_create_refuses_bad_bodies_naming_the_field(api, body, status, field) -> None:
    got, answer = await call(api, "POST", "/rooms", body)
    assert got == status
    if field is None:
        assert answer["error"] == "bad_json"
    else:
        assert answer["error"] == "invalid_field" and answer["field"] == field
        assert answer["detail"].startswith(field)
    assert (await call(api, "GET", "/rooms"))[1]["rooms"] == [], "nothing created"


async def test_malformed_json_and_parameters(api) -> None:
    status, answer = await call(api, "POST", "/rooms", raw=b'{"name": ')
    assert status == 400 and answer["error"] == "bad_json"
    assert (await call(api, "GET", "/rooms?limit=0"))[0] == 400
    assert (await call(api, "GET", "/rooms?after=x"))[0] == 400
    assert (await call(api, "GET", "/rooms/abc"))[1]["error"] == "bad_room_id"
    assert (await call(api, "DELETE", "/rooms/1?purge=maybe"))[0] == 400
    assert (await call(api, "PUT", "/rooms/1"))[0] == 405


async def test_joining_creates_the_room_and_get_counts_who_is_online(api) -> None:
    assert (await call(api, "GET", "/rooms/55"))[0] == 404
    async with open_ws(ws_url(api, 55, "?author_id=3")):
        await wait_until(lambda: api.hub.presence.entries == 1)
        status, room = await call(api, "GET", "/rooms/55")
        assert status == 200 and (room["name"], room["online"]) == (None, 1)


async def test_delete_disconnects_members_and_keeps_or_purges_history(api) -> None:
    _, room = await call(api, "POST", "/rooms", {"name": "doomed"})
    rid = room["id"]
    async with open_ws(ws_url(api, rid)) as a, open_ws(ws_url(api, rid)) as b:
        await a.send_message(chat_frame("keep me", room_id=rid))
        await recv(b)
        assert await call(api, "DELETE", f"/rooms/{rid}") == (200, {
            "id": rid, "deleted": True, "purged": False})
        assert await closed_with(a) == 4003 and await closed_with(b) == 4003
    assert (await call(api, "GET", f"/rooms/{rid}"))[0] == 404
    status, history = await call(api, "GET", f"/rooms/{rid}/messages")
    assert [m["content"] for m in history["messages"]] == ["keep me"]
    assert (await call(api, "DELETE", f"/rooms/{rid}"))[0] == 404
    # Joined again (the default auto policy), the deleted room exists again at once.
    async with open_ws(ws_url(api, rid)) as a:
        await a.send_message(chat_frame("back", room_id=rid))
        await recv(a)
    assert (await call(api, "GET", f"/rooms/{rid}"))[0] == 200

    _, room = await call(api, "POST", "/rooms", {"name": "purged"})
    rid = room["id"]
    async with open_ws(ws_url(api, rid)) as a:
        await a.send_message(chat_frame("forget me", room_id=rid))
        await recv(a)
        status, answer = await call(api, "DELETE", f"/rooms/{rid}?purge=true")
        assert status == 200 and answer["purged"]
        assert await closed_with(a) == 4003
    assert (await call(api, "GET", f"/rooms/{rid}/messages"))[1]["messages"] == []


async def test_a_deleted_room_stays_deleted_when_its_messages_are_written_later(
        api, monkeypatch) -> None:
    """A message accepted before the delete and written after it (write-behind) does not
    bring the room back."""
    backend = type(api.store.backend)
    original = backend.insert
    holding, release = trio.Event(), trio.Event()

    async def held(self, messages):
        holding.set()
        await release.wait()
        await original(self, messages)

    monkeypatch.setattr(backend, "insert", held)
    _, room = await call(api, "POST", "/rooms", {"name": "doomed"})
    rid = room["id"]
    async with open_ws(ws_url(api, rid)) as ws:
        await ws.send_message(chat_frame("accepted before the delete", room_id=rid))
        await recv(ws)
        with trio.fail_after(10):
            await holding.wait()
        assert api.store.lag == 1
        assert (await call(api, "DELETE", f"/rooms/{rid}"))[0] == 200
        assert await closed_with(ws) == 4003
    release.set()
    await wait_until(lambda: api.store.lag == 0)
    assert (await call(api, "GET", f"/rooms/{rid}"))[0] == 404
    _, history = await call(api, "GET", f"/rooms/{rid}/messages")
    assert [m["content"] for m in history["messages"]] == ["accepted before the delete"]


async def test_joining_a_deleted_room_still_closing_here_makes_it_exist_again(
        nursery, any_config) -> None:
    # A member that does not answer the close keeps the room alive here that long.
    api = await start_server(nursery, any_config(close_timeout=30))
    _, room = await call(api, "POST", "/rooms", {"name": "doomed"})
    rid = room["id"]
    lingering = await RawClient.connect(api.port, f"/ws/{rid}")
    try:
        await wait_until(lambda: rid in api.hub.rooms and bool(api.hub.rooms[rid].members))
        assert (await call(api, "DELETE", f"/rooms/{rid}"))[0] == 200
        assert await lingering.wait_closed() == 4003
        assert rid in api.hub.rooms, "the room is still closing"
        async with open_ws(ws_url(api, rid)) as ws:
            await ws.send_message(chat_frame("back", room_id=rid))
            assert (await recv(ws))["content"] == "back"
            assert (await call(api, "GET", f"/rooms/{rid}"))[0] == 200
    finally:
        await lingering.aclose()


async def test_kick_closes_that_authors_connections_only(api) -> None:
    async with open_ws(ws_url(api, 60, "?author_id=7")) as seven, \
            open_ws(ws_url(api, 60)) as seven_again, \
            open_ws(ws_url(api, 60, "?author_id=8")) as eight, \
            open_ws(ws_url(api, 61, "?author_id=7")) as seven_elsewhere:
        # The seed client becomes author 7 by sending as 7.
        await seven_again.send_message(chat_frame("hi", room_id=60, author_id=7))
        await recv(eight)
        status, answer = await call(api, "POST", "/rooms/60/kick",
                                    {"author_id": 7, "reason": "cool off"})
        assert status == 200 and answer["kicked"]
        assert await closed_with(seven) == 4004 and await closed_with(seven_again) == 4004
        await eight.send_message(chat_frame("still here", room_id=60, author_id=8))
        assert (await recv(eight))["content"] == "still here"
        await seven_elsewhere.send_message(chat_frame("other room", room_id=61, author_id=7))
        assert (await recv(seven_elsewhere))["content"] == "other room"
    # A kick is not a ban.
    async with open_ws(ws_url(api, 60, "?author_id=7")) as back:
        assert [(await recv(back))["content"] for _ in range(2)] == ["hi", "still here"]
        await back.send_message(chat_frame("back", room_id=60, author_id=7))
        assert (await recv(back))["content"] == "back"


async def test_ban_closes_and_refuses_rejoining_until_it_ends(api) -> None:
    async with open_ws(ws_url(api, 62, "?author_id=7")) as seven, \
            open_ws(ws_url(api, 62, "?author_id=8")) as eight:
        status, ban = await call(api, "POST", "/rooms/62/ban",
                                 {"author_id": 7, "reason": "spam", "duration": 8})
        assert status == 200 and (ban["author_id"], ban["reason"]) == (7, "spam")
        assert ban["until"].endswith("Z")
        assert await closed_with(seven) == 4005
        status, _, body = await upgrade_status(api, "/ws/62?author_id=7")
        assert status == 403 and b'"banned"' in body and b"spam" in body
        # A seed client that does not say who it is is closed at its first frame as 7,
        # and that frame reaches nobody.
        async with open_ws(ws_url(api, 62)) as sneaky:
            await sneaky.send_message(chat_frame("sneaky", room_id=62, author_id=7))
            assert await closed_with(sneaky) == 4005
        await eight.send_message(chat_frame("only me", room_id=62, author_id=8))
        assert (await recv(eight))["content"] == "only me"
    # Elsewhere, and once it ends, author 7 is welcome.
    assert (await upgrade_status(api, "/ws/63?author_id=7"))[0] == 101
    with trio.fail_after(20):
        while (await upgrade_status(api, "/ws/62?author_id=7"))[0] != 101:
            await trio.sleep(0.2)


async def test_a_ban_while_the_banned_author_is_joining_closes_it_once_joined(
        api, monkeypatch) -> None:
    from trio_chat.hub import Hub

    joining, go_on = trio.Event(), trio.Event()
    ensure_room = Hub._ensure_room

    async def held(hub: Hub, room_id: int) -> None:
        if room_id == 64:
            joining.set()
            await go_on.wait()
        await ensure_room(hub, room_id)

    monkeypatch.setattr(Hub, "_ensure_room", held)
    # Upgraded past the ban check, its room still starting: the ban's close reaches
    # no member of room 64 on this node.
    async with open_ws(ws_url(api, 64, "?author_id=7")) as seven:
        await joining.wait()
        status, _ = await call(api, "POST", "/rooms/64/ban", {"author_id": 7, "reason": "x"})
        assert status == 200
        go_on.set()
        assert await closed_with(seven) == 4005


async def test_a_failing_second_look_at_the_bans_closes_its_connection_alone(
        api, monkeypatch) -> None:
    from trio_chat.connection import ChatConnection

    banned = ChatConnection._banned

    async def broken(self: ChatConnection, author_id: int) -> bool:
        if author_id == 7:
            raise RuntimeError("a bug")
        return await banned(self, author_id)

    monkeypatch.setattr(ChatConnection, "_banned", broken)
    async with open_ws(ws_url(api, 65, "?author_id=7")) as seven:
        assert await closed_with(seven) == 1011
    # The hub's nursery, where the look ran, goes on: rooms still work.
    async with open_ws(ws_url(api, 65)) as anyone:
        await anyone.send_message(chat_frame("still served", room_id=65, author_id=9))
        assert (await recv(anyone))["content"] == "still served"
    assert api.metrics.connection_failures == 1


@pytest.mark.parametrize("body, field", [
    ({"author_id": "7"}, "author_id"),
    ({"author_id": 2**63}, "author_id"),
    ({"author_id": 7, "duration": 0}, "duration"),
    ({"author_id": 7, "duration": True}, "duration"),
    ({"author_id": 7, "reason": 5}, "reason"),
    ({"author_id": 7, "reason": "x" * 501}, "reason"),
])
async def test_ban_refuses_bad_bodies(api, body, field) -> None:
    status, answer = await call(api, "POST", "/rooms/62/ban", body)
    assert status == 422 and answer["field"] == field


async def test_announce_publishes_with_frame_validation(api) -> None:
    async with open_ws(ws_url(api, 64)) as ws:
        status, message = await call(api, "POST", "/rooms/64/messages", raw=chat_frame(
            "maintenance at noon", room_id=64, author_id=0).encode())
        assert status == 201 and message["id"] == 1
        got = await recv(ws)
        assert got == message
        status, answer = await call(api, "POST", "/rooms/64/messages",
                                    raw=chat_frame("x", room_id=65).encode())
        assert status == 422 and answer["error"] == "room_mismatch"
        status, answer = await call(api, "POST", "/rooms/64/messages", raw=b"{")
        assert status == 400 and answer["error"] == "invalid_json"
        status, answer = await call(api, "POST", "/rooms/64/messages", raw=b"\xff")
        assert status == 400 and answer["error"] == "bad_json"
    # Into a room alive nowhere: it is opened for the moment; ids go on.
    status, message = await call(api, "POST", "/rooms/64/messages",
                                 raw=chat_frame("later", room_id=64).encode())
    assert status == 201 and message["id"] == 2


async def test_strict_policy_refuses_unknown_rooms(nursery, any_config) -> None:
    server = await start_server(nursery, any_config(room_policy="strict"))
    status, _, body = await upgrade_status(server, "/ws/70")
    assert status == 404 and b"room_not_found" in body
    status, _ = await call(server, "POST", "/rooms/70/messages",
                                raw=chat_frame("x", room_id=70).encode())
    assert status == 404
    _, room = await call(server, "POST", "/rooms", {"name": "made"})
    async with open_ws(ws_url(server, room["id"])) as ws:
        await ws.send_message(chat_frame("in", room_id=room["id"]))
        assert (await recv(ws))["content"] == "in"


async def test_kick_reaches_every_node(nursery, tmp_path, channel) -> None:
    a, b = [await start_server(nursery, node_config(tmp_path / f"{n}.db", REDIS_PORT, channel))
            for n in "ab"]
    async with open_ws(ws_url(b, 66, "?author_id=7")) as on_b, \
            open_ws(ws_url(a, 66, "?author_id=8")) as on_a:
        # Both rooms subscribed and holding their member: a kick sent earlier could
        # pass a room that is still subscribing (a ban would not: it is stored).
        await wait_until(lambda: all(66 in n.hub.rooms and n.hub.rooms[66].members
                                     for n in (a, b)))
        assert (await call(a, "POST", "/rooms/66/kick", {"author_id": 7}))[0] == 200
        assert await closed_with(on_b) == 4004
        await on_a.send_message(chat_frame("left alone", room_id=66, author_id=8))
        assert (await recv(on_a))["content"] == "left alone"
