"""Identity and limits on a real server: tokens, private rooms, the admin key, Origin,
the per-connection rate limit and the per-address connection limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_chat.auth import make_token
from trio_chat.config import AuthConfig, LimitsConfig

from .conftest import chat_frame, make_config, open_ws, recv, start_server, wait_until, ws_url
from .rawws import http_call, read_http_response
from .wire import handshake_request

SECRET = "s" * 40
ADMIN = "admin-key-0123456789"
ADMIN_HEADERS = {"X-Admin-Key": ADMIN}


def token(author_id: int, **kw: Any) -> str:
    return make_token(author_id, SECRET, **kw)


@pytest.fixture
async def secured(nursery, db_path) -> Any:
    return await start_server(nursery, make_config(db_path, auth=AuthConfig(
        mode="token", secret=SECRET, admin_key=ADMIN)))


async def upgrade(server: Any, path: str, headers: dict[str, str] | None = None
                  ) -> tuple[int, dict[str, Any]]:
    """A raw upgrade request: the status and, for a refusal, the JSON body."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(handshake_request(path, extra=extra,
                                                  host=f"127.0.0.1:{server.port}"))
        status, _, body = await read_http_response(stream)
    return status, (json.loads(body) if status != 101 else {})


async def test_upgrade_needs_a_good_token(secured) -> None:
    assert (await upgrade(secured, "/ws/1"))[1]["error"] == "token_missing"
    status, answer = await upgrade(secured, f"/ws/1?token={token(7, ttl=-10)}")
    assert (status, answer["error"]) == (401, "token_expired")
    forged = make_token(7, "x" * 40)
    assert (await upgrade(secured, f"/ws/1?token={forged}"))[1]["error"] == "bad_signature"
    assert (await upgrade(secured, "/ws/1?token=not.a.jwt"))[0] == 401
    assert (await upgrade(secured, f"/ws/1?token={token(7)}"))[0] == 101
    assert (await upgrade(secured, "/ws/1",
                          {"Authorization": f"Bearer {token(7)}"}))[0] == 101
    assert secured.metrics.auth_failures >= 4


async def test_a_frame_claiming_someone_else_is_refused_and_never_broadcast(secured) -> None:
    async with open_ws(ws_url(secured, 2, f"?token={token(7)}&author_id=8")) as seven, \
            open_ws(ws_url(secured, 2, f"?token={token(9)}")) as watcher:
        await seven.send_message(chat_frame("as eight", room_id=2, author_id=8))
        refusal = await recv(seven)
        assert (refusal["message_type"], refusal["code"]) == ("error", "author_mismatch")
        await seven.send_message(chat_frame("as myself", room_id=2, author_id=7))
        assert (await recv(watcher))["content"] == "as myself", "the spoof reached nobody"
        # The token's subject is who is online, not the author_id in the URL.
        _, members = await http_call(secured.port, "GET", "/rooms/2/members",
                                     headers=ADMIN_HEADERS)
        assert members["members"] == [7, 9]


async def test_private_rooms_need_the_room_in_the_token(secured) -> None:
    status, room = await http_call(secured.port, "POST", "/rooms",
                                   {"name": "staff", "private": True}, headers=ADMIN_HEADERS)
    assert status == 201
    rid = room["id"]
    status, answer = await upgrade(secured, f"/ws/{rid}?token={token(7)}")
    assert (status, answer["error"]) == (403, "room_forbidden")
    assert (await upgrade(secured, f"/ws/{rid}?token={token(7, rooms=[rid])}"))[0] == 101
    bearer = {"Authorization": f"Bearer {token(7)}"}
    assert (await http_call(secured.port, "GET", f"/rooms/{rid}/messages",
                            headers=bearer))[0] == 403
    granted = {"Authorization": f"Bearer {token(7, rooms=[rid])}"}
    assert (await http_call(secured.port, "GET", f"/rooms/{rid}/messages",
                            headers=granted))[0] == 200
    assert (await http_call(secured.port, "GET", f"/rooms/{rid}/messages"))[0] == 401
    assert (await http_call(secured.port, "GET", f"/rooms/{rid}",
                            headers=ADMIN_HEADERS))[0] == 200


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "admin_key_required"),
    ({"X-Admin-Key": "wrong-key-0123456789"}, 401, "admin_key_invalid"),
    ({"Authorization": f"Bearer {make_token(7, SECRET)}"}, 403, "forbidden"),
    ({"Authorization": f"Bearer {ADMIN}"}, 201, None),
    ({"X-Admin-Key": ADMIN}, 201, None),
])
async def test_management_needs_the_admin_key(secured, headers, status, code) -> None:
    got, answer = await http_call(secured.port, "POST", "/rooms", {"name": "ops"},
                                  headers=headers)
    assert got == status
    if code is not None:
        assert answer["error"] == code
    # Nothing was created by a refused request.
    _, rooms = await http_call(secured.port, "GET", "/rooms", headers=ADMIN_HEADERS)
    assert len(rooms["rooms"]) == (1 if code is None else 0)


async def test_admin_key_without_tokens_guards_management_only(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, auth=AuthConfig(
        admin_key=ADMIN)))
    assert (await http_call(server.port, "POST", "/rooms", {"name": "a"}))[0] == 401
    assert (await http_call(server.port, "POST", "/rooms", {"name": "a"},
                            headers=ADMIN_HEADERS))[0] == 201
    assert (await http_call(server.port, "GET", "/rooms/1/members"))[0] == 200
    assert (await upgrade(server, "/ws/1"))[0] == 101


async def test_origin_allow_list(nursery, db_path, server) -> None:
    # Default: the page must come from the server's own host.
    status, answer = await upgrade(server, "/ws/1", {"Origin": "https://evil.example"})
    assert (status, answer["error"]) == (403, "origin_not_allowed")
    assert (await upgrade(server, "/ws/1", {"Origin": f"http://127.0.0.1:{server.port}"}))[0] \
        == 101
    assert (await upgrade(server, "/ws/1"))[0] == 101, "no Origin: not a browser"
    listed = await start_server(nursery, make_config(db_path.with_name("o.db"), auth=AuthConfig(
        allowed_origins=("https://app.example",))))
    assert (await upgrade(listed, "/ws/1", {"Origin": "https://app.example"}))[0] == 101
    assert (await upgrade(listed, "/ws/1", {"Origin": "http://app.example"}))[0] == 403
    assert listed.metrics.origin_refusals == 1


async def test_a_flooding_client_is_limited_then_closed_others_unaffected(nursery,
                                                                         db_path) -> None:
    server = await start_server(nursery, make_config(db_path, limits=LimitsConfig(
        messages_per_second=0.5, message_burst=5, flood_limit=10)))
    async with open_ws(ws_url(server, 3)) as flooder, open_ws(ws_url(server, 3)) as calm:
        # One over the burst: refused with an error frame, the connection stays.
        for i in range(6):
            await flooder.send_message(chat_frame(f"f{i}", room_id=3))
        frames = [await recv(flooder) for _ in range(6)]
        assert [f.get("code") for f in frames if "id" not in f] == ["rate_limited"]
        assert sorted(f["content"] for f in frames if "id" in f) == [f"f{i}" for i in range(5)]
        # Keeping on: closed with 1008.
        for i in range(6, 40):
            try:
                await flooder.send_message(chat_frame(f"f{i}", room_id=3))
            except ConnectionClosed:
                break
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(15):
            while True:
                await flooder.get_message()
        assert info.value.reason.code == 1008
        assert server.metrics.flood_disconnects == 1 and server.metrics.rate_limited >= 10
        await calm.send_message(chat_frame("calm", room_id=3))
        contents = []
        while not contents or contents[-1] != "calm":
            contents.append((await recv(calm))["content"])
        # The burst got through, then (nearly) nothing until the close.
        assert 5 <= len(contents) - 1 <= 8 and contents[:5] == [f"f{i}" for i in range(5)]


async def test_connections_per_address_are_capped(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, limits=LimitsConfig(
        connections_per_ip=2)))
    async with open_ws(ws_url(server, 4)), open_ws(ws_url(server, 4)):
        status, answer = await upgrade(server, "/ws/4")
        assert (status, answer["error"]) == (429, "too_many_connections")
        assert server.metrics.ip_limit_refusals == 1
    await wait_until(lambda: not server.hub.connections)
    async with open_ws(ws_url(server, 4)) as again:
        await again.send_message(chat_frame("room again", room_id=4))
        assert (await recv(again))["content"] == "room again"
