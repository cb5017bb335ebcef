"""Acknowledgements and idempotent resends, edits and deletes, typing: over real sockets,
on both stores, across two nodes through real Redis and across a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_chat.config import LimitsConfig

from .conftest import (
    REDIS_PORT,
    UNLIMITED,
    chat_frame,
    make_config,
    node_config,
    open_ws,
    recv,
    recv_text,
    start_server,
    ws_url,
)
from .rawws import http_call

ROOM = 31


def frame(**fields: Any) -> str:
    return json.dumps(fields)


async def history(server: Any, room: int = ROOM) -> list[dict[str, Any]]:
    status, body = await http_call(server.port, "GET", f"/rooms/{room}/messages?order=asc")
    assert status == 200
    return body["messages"]


async def nothing_more(ws: Any, sender: Any) -> None:
    """What ``ws`` receives next is a marker sent now: nothing came before it."""
    await sender.send_message(chat_frame("marker", room_id=ROOM, author_id=99))
    assert (await recv(ws))["content"] == "marker"


@pytest.fixture
async def server(nursery: trio.Nursery, any_config: Any) -> Any:
    return await start_server(nursery, any_config())


async def test_a_client_msg_id_is_acked_once_and_a_resend_stores_nothing(server) -> None:
    url = ws_url(server, ROOM)
    async with open_ws(url) as sender, open_ws(url) as other:
        text = chat_frame("once", room_id=ROOM, client_msg_id="m-1")
        await sender.send_message(text)
        broadcast = await recv(other)
        assert broadcast["content"] == "once" and broadcast["client_msg_id"] == "m-1"
        replies = [json.loads(await recv_text(sender)) for _ in range(2)]
        ack = next(r for r in replies if r["message_type"] == "ack")
        assert ack == {"message_type": "ack", "client_msg_id": "m-1", "id": broadcast["id"],
                       "room_id": ROOM, "received_at": broadcast["received_at"],
                       "durable": True}
        # A resend (the ack was lost, say) gets the same ack, and nobody sees it again.
        await sender.send_message(text)
        assert await recv(sender) == ack
        await nothing_more(other, sender)
    stored = [m for m in await history(server) if m.get("client_msg_id") == "m-1"]
    assert len(stored) == 1
    assert server.metrics.duplicates == 1


async def test_ids_dropped_from_memory_are_still_recognised_from_the_store(
        nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path))
    server.broker.sent_limit = 3
    # Once the ids sent before the start are loaded, a miss in memory no longer asks the
    # store by itself.
    await server.broker.loaded.wait()
    acks = {}
    async with open_ws(ws_url(server, ROOM)) as sender:
        for i in range(6):
            await sender.send_message(chat_frame(f"m{i}", room_id=ROOM, client_msg_id=f"c{i}"))
            while (reply := await recv(sender))["message_type"] != "ack":
                pass
            acks[f"c{i}"] = reply
        assert len(server.broker._sent) == 3, "memory holds only the newest ids"
        # c0 was dropped from memory; the resend is still recognised.
        await sender.send_message(chat_frame("m0", room_id=ROOM, client_msg_id="c0"))
        assert await recv(sender) == acks["c0"]
    assert server.metrics.duplicates == 1
    assert [m["content"] for m in await history(server)] == [f"m{i}" for i in range(6)]


async def test_a_refused_frame_names_its_client_msg_id(server) -> None:
    async with open_ws(ws_url(server, ROOM)) as ws:
        await ws.send_message(chat_frame("", room_id=ROOM, client_msg_id="bad-1"))
        error = await recv(ws)
        assert error["message_type"] == "error" and error["code"] == "invalid_field"
        assert error["client_msg_id"] == "bad-1"
        await ws.send_message(chat_frame("x", room_id=ROOM + 1, client_msg_id="bad-2"))
        assert (await recv(ws))["client_msg_id"] == "bad-2"
    assert await history(server) == []


async def test_the_same_client_msg_id_from_two_authors_is_two_messages(server) -> None:
    async with open_ws(ws_url(server, ROOM)) as ws:
        for author in (1, 2):
            await ws.send_message(chat_frame("hi", room_id=ROOM, author_id=author,
                                             client_msg_id="same"))
        frames = [await recv(ws) for _ in range(4)]
    ids = {f["id"] for f in frames if f["message_type"] == "ack"}
    assert len(ids) == 2
    assert len(await history(server)) == 2


async def test_an_author_known_from_the_url_may_leave_it_out(server) -> None:
    async with open_ws(ws_url(server, ROOM, "?author_id=5")) as ws:
        await ws.send_message(frame(message_type="chat_txt", content="short form"))
        message = await recv(ws)
    assert (message["author_id"], message["content"]) == (5, "short form")
    assert message["create_at"] == message["received_at"]


async def test_idempotency_holds_across_a_restart(nursery, tmp_path: Path) -> None:
    config = make_config(tmp_path / "chat.db")
    text = chat_frame("survives", room_id=ROOM, client_msg_id="r-1")
    acks = []
    for _ in range(2):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                server = await start_server(inner, config)
                async with open_ws(ws_url(server, ROOM)) as ws:
                    await ws.send_message(text)
                    while (reply := await recv(ws))["message_type"] != "ack":
                        pass
                    acks.append(reply)
                scope.cancel()  # a graceful stop: buffered history is written first
    assert acks[0] == acks[1]
    async with trio.open_nursery() as inner:
        server = await start_server(inner, config)
        assert [m["content"] for m in await history(server)] == ["survives"]
        inner.cancel_scope.cancel()


async def test_idempotency_holds_across_nodes(nursery, tmp_path, channel, mysql_db) -> None:
    a, b = [await start_server(nursery, attrs.evolve(
        node_config(tmp_path / f"n{i}.db", REDIS_PORT, channel), db=mysql_db))
        for i in range(2)]
    text = chat_frame("across", room_id=ROOM, client_msg_id="x-1")
    async with open_ws(ws_url(a, ROOM)) as on_a, open_ws(ws_url(b, ROOM)) as on_b:
        await on_a.send_message(text)
        first = [await recv(on_a) for _ in range(2)]
        await on_b.send_message(text)
        again = await recv(on_b)
        while again["message_type"] != "ack":  # on_b saw the first send's broadcast
            again = await recv(on_b)
        assert again in first
        await nothing_more(on_a, on_b)
    stored = [m for m in await history(a) if m.get("client_msg_id") == "x-1"]
    assert len(stored) == 1
    assert a.metrics.duplicates + b.metrics.duplicates == 1


async def _send(ws: Any, **fields: Any) -> dict[str, Any]:
    """Send a frame with a client_msg_id and return the ack or error naming it."""
    cmid = f"c-{id(fields)}-{trio.current_time()}"
    await ws.send_message(frame(client_msg_id=cmid, **fields))
    while True:
        reply = await recv(ws)
        if reply.get("client_msg_id") == cmid and reply["message_type"] in ("ack", "error"):
            return reply


async def test_an_author_edits_and_deletes_and_everyone_sees_it(server) -> None:
    url = ws_url(server, ROOM)
    async with open_ws(url + "?author_id=7") as author, open_ws(url + "?author_id=8") as other:
        sent = await _send(author, message_type="chat_txt", content="frist")
        assert (await recv(other))["content"] == "frist"
        edit = await _send(author, message_type="chat_edit", target_id=sent["id"],
                           content="first")
        assert edit["message_type"] == "ack" and edit["id"] == sent["id"] + 1
        seen = await recv(other)
        assert (seen["message_type"], seen["target_id"], seen["content"]) == (
            "chat_edit", sent["id"], "first")
        # Anyone else is refused, and nothing is broadcast.
        refused = await _send(other, message_type="chat_edit", target_id=sent["id"],
                              content="mine now")
        assert refused["code"] == "forbidden"
        refused = await _send(other, message_type="chat_delete", target_id=sent["id"])
        assert refused["code"] == "forbidden"
        missing = await _send(author, message_type="chat_edit", target_id=999, content="x")
        assert missing["code"] == "message_not_found"
        await nothing_more(other, author)

        rows = await history(server)
        assert rows[0]["content"] == "first" and rows[0]["edited_at"] == seen["received_at"]
        # A newcomer sees the message as it is now.
        async with open_ws(url) as newcomer:
            assert (await recv(newcomer))["content"] == "first"

        deleted = await _send(author, message_type="chat_delete", target_id=sent["id"])
        assert deleted["message_type"] == "ack"
        seen = await recv(other)
        while seen["message_type"] != "chat_delete":
            seen = await recv(other)
        assert seen["target_id"] == sent["id"]
        again = await _send(author, message_type="chat_edit", target_id=sent["id"],
                            content="back")
        assert again["code"] == "message_deleted"
    rows = await history(server)
    assert rows[0]["content"] == "" and rows[0]["deleted_at"] == seen["received_at"]
    assert [r["message_type"] for r in rows] == ["chat_txt", "chat_edit", "chat_txt",
                                                  "chat_delete"]


async def test_a_resume_replays_the_edits_it_missed(server) -> None:
    url = ws_url(server, ROOM, "?author_id=7")
    async with open_ws(url) as ws:
        sent = await _send(ws, message_type="chat_txt", content="draft")
    async with open_ws(url) as ws:
        await _send(ws, message_type="chat_edit", target_id=sent["id"], content="final")
    async with open_ws(ws_url(server, ROOM, f"?since={sent['id']}")) as ws:
        replayed = await recv(ws)
    assert (replayed["message_type"], replayed["content"]) == ("chat_edit", "final")


async def test_operators_edit_and_delete_through_the_api(server) -> None:
    async with open_ws(ws_url(server, ROOM, "?author_id=7")) as ws:
        sent = await _send(ws, message_type="chat_txt", content="rude")
        status, body = await http_call(server.port, "PATCH",
                                       f"/rooms/{ROOM}/messages/{sent['id']}",
                                       {"content": "[removed by a moderator]"})
        assert status == 200, body
        assert (body["message_type"], body["author_id"], body["moderated"]) == (
            "chat_edit", 7, True)
        seen = await recv(ws)
        while seen["message_type"] != "chat_edit":
            seen = await recv(ws)
        assert seen == body
        status, body = await http_call(server.port, "DELETE",
                                       f"/rooms/{ROOM}/messages/{sent['id']}")
        assert status == 200 and body["message_type"] == "chat_delete"
    for method, path, body, expected in [
        ("DELETE", f"/rooms/{ROOM}/messages/{sent['id']}", None, (409, "message_deleted")),
        ("PATCH", f"/rooms/{ROOM}/messages/{sent['id']}", {"content": "x"},
         (409, "message_deleted")),
        ("DELETE", f"/rooms/{ROOM}/messages/500", None, (404, "message_not_found")),
        ("DELETE", f"/rooms/{ROOM}/messages/abc", None, (400, "bad_message_id")),
        ("PATCH", f"/rooms/{ROOM}/messages/1", {"content": ""}, (422, "invalid_field")),
        ("PATCH", f"/rooms/{ROOM}/messages/1", {"text": "x"}, (422, "invalid_field")),
    ]:
        status, answer = await http_call(server.port, method, path, body)
        assert (status, answer["error"]) == expected, (method, path, answer)


async def test_typing_is_relayed_rate_limited_and_never_stored(nursery, tmp_path) -> None:
    limits = attrs.evolve(UNLIMITED, typing_interval=3600)
    server = await start_server(nursery, make_config(tmp_path / "chat.db", limits=limits))
    url = ws_url(server, ROOM)
    async with open_ws(url + "?author_id=3") as typist, open_ws(url) as other:
        for _ in range(5):
            await typist.send_message(frame(message_type="typing"))
        event = await recv(other)
        assert {k: event[k] for k in ("message_type", "author_id", "room_id")} == {
            "message_type": "typing", "author_id": 3, "room_id": ROOM}
        await nothing_more(other, typist)  # the other four were dropped
    assert [m["content"] for m in await history(server)] == ["marker"]


async def test_edits_and_typing_cross_nodes(nursery, tmp_path, channel, mysql_db) -> None:
    a, b = [await start_server(nursery, attrs.evolve(
        node_config(tmp_path / f"n{i}.db", REDIS_PORT, channel,
                    ), db=mysql_db, limits=LimitsConfig(1_000_000, 1_000_000,
                                                         typing_interval=0)))
        for i in range(2)]
    async with open_ws(ws_url(a, ROOM, "?author_id=7")) as on_a, \
            open_ws(ws_url(b, ROOM, "?author_id=7")) as on_b:
        sent = await _send(on_a, message_type="chat_txt", content="teh")
        await on_b.send_message(frame(message_type="typing"))
        while (event := await recv(on_a))["message_type"] != "typing":
            pass
        assert event["author_id"] == 7
        edit = await _send(on_b, message_type="chat_edit", target_id=sent["id"],
                           content="the")
        assert edit["message_type"] == "ack"
        while (seen := await recv(on_a))["message_type"] != "chat_edit":
            pass
        assert seen["content"] == "the"
    # The room is gone from both nodes; rejoining reads Redis's recent list, which the
    # edit brought up to date.
    async with open_ws(ws_url(b, ROOM)) as newcomer:
        assert (await recv(newcomer))["content"] == "the"
