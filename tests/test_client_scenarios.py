"""The scenario list every trio-chat client passes (docs/clients.md), run on the trio
client and on the asyncio client against a real server, through the TCP proxy where
the network misbehaves: server restart, network cut, stalled network, lost ack, resend
idempotent, edit/delete applied, typing shown, presence shown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import jwt
import pytest
import trio

from trio_chat import aio_client
from trio_chat.client_core import ChatError
from trio_chat.config import AuthConfig
from trio_chat.protocol import Message

from .clients import CLIENTS, Driver, OpenClient
from .conftest import make_config, open_ws, recv, wait_until
from .proxy import Proxy
from .rawws import http_call
from .test_client import ROOM, Restartable, restartable, stored

# Short enough that a stalled link is given up within seconds.
FAST = {"dead_after": 2.0, "backoff_max": 0.5}


@attrs.define
class Scene:
    node: Restartable
    proxy: Proxy
    open_client: OpenClient

    @property
    def port(self) -> int:
        assert self.node.server is not None
        return self.node.server.port

    @property
    def direct(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def through_proxy(self) -> str:
        return f"ws://127.0.0.1:{self.proxy.port}"


async def post(port: int, content: str, author_id: int = 99) -> int:
    """Another author's message, through the rooms API."""
    status, body = await http_call(port, "POST", f"/rooms/{ROOM}/messages", {
        "message_type": "chat_txt", "author_id": author_id, "content": content})
    assert status == 201, body
    return body["id"]


async def exchange(client: Driver, disrupt: Callable[[list[Message]], Awaitable[list[str]]],
                   count: int = 12) -> list[Message]:
    """``client`` sends ``count`` messages while ``disrupt`` (given what the client has
    received so far) misbehaves and has others post; returns what the client received,
    once it has every message, and checks each came once, in id order."""
    expected = {f"mine-{i}" for i in range(count)}
    seen: list[Message] = []
    disrupted = trio.Event()

    async def send_all() -> None:
        for text in sorted(expected, key=lambda t: int(t.split("-")[1])):
            await client.send(text)

    async def receive_all() -> None:
        while True:
            seen.append(await client.next_message())

    async def run_disrupt() -> None:
        expected.update(await disrupt(seen))
        disrupted.set()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            nursery.start_soon(receive_all)
            nursery.start_soon(run_disrupt)
            await wait_until(lambda: disrupted.is_set()
                             and expected <= {m.content for m in seen}, timeout=90)
            nursery.cancel_scope.cancel()
    ids = [m.id for m in seen]
    assert ids == sorted(set(ids)), "not once each, in id order"
    assert sorted(m.content for m in seen) == sorted(expected)
    return seen


async def server_restart(scene: Scene) -> None:
    async with scene.open_client(scene.direct, ROOM, author_id=1, **FAST) as client:
        async def restart(seen: list[Message]) -> list[str]:
            await wait_until(lambda: len(seen) >= 3)
            await scene.node.stop()
            await wait_until(lambda: client.state == "reconnecting")
            await scene.node.start()
            await post(scene.port, "while-it-was-away")
            await wait_until(lambda: client.state == "resumed")
            return ["while-it-was-away"]

        await exchange(client, restart)
    contents = await stored(scene.port)
    assert len(contents) == len(set(contents)) == 13


async def network_cut(scene: Scene) -> None:
    async with scene.open_client(scene.through_proxy, ROOM, author_id=1, **FAST) as client:
        async def cut(seen: list[Message]) -> list[str]:
            await wait_until(lambda: len(seen) >= 3)
            scene.proxy.cut()
            await wait_until(lambda: client.state == "reconnecting")
            await post(scene.port, "missed-in-the-cut")
            scene.proxy.restore()
            await wait_until(lambda: client.state == "resumed")
            return ["missed-in-the-cut"]

        await exchange(client, cut)
    contents = await stored(scene.port)
    assert len(contents) == len(set(contents)) == 13


async def stalled_network(scene: Scene) -> None:
    async with scene.open_client(scene.through_proxy, ROOM, author_id=1, **FAST) as client:
        async def stall(seen: list[Message]) -> list[str]:
            await wait_until(lambda: len(seen) >= 3)
            # TCP stays up and silent: only the unanswered ping tells.
            scene.proxy.stall()
            await wait_until(lambda: client.state == "reconnecting")
            await post(scene.port, "missed-in-the-stall")
            scene.proxy.restore()
            await wait_until(lambda: client.state == "resumed")
            return ["missed-in-the-stall"]

        await exchange(client, stall)
    contents = await stored(scene.port)
    assert len(contents) == len(set(contents)) == 13


async def lost_ack(scene: Scene) -> None:
    async with open_ws(f"{scene.direct}/ws/{ROOM}") as watcher, \
            scene.open_client(scene.through_proxy, ROOM, author_id=1, **FAST) as client:
        await wait_until(lambda: client.state == "connected")
        # The frame reaches the server; nothing comes back, the ack included.
        scene.proxy.stall("down")
        async with trio.open_nursery() as nursery:
            sent: dict[str, int] = {}
            nursery.start_soon(_send_into, sent, client, "once")
            seen_by_watcher = await recv(watcher)
            assert seen_by_watcher["content"] == "once"
            await wait_until(lambda: client.state == "reconnecting")
            scene.proxy.restore()
        assert sent == {"once": seen_by_watcher["id"]}
        assert (await client.next_message()).content == "once"
    assert await stored(scene.port) == ["once"]
    assert scene.node.server is not None
    assert scene.node.server.metrics.duplicates == 1, "sent again, and recognised"


async def resend_idempotent(scene: Scene) -> None:
    async with scene.open_client(scene.through_proxy, ROOM, author_id=1, **FAST) as client:
        await wait_until(lambda: client.state == "connected")
        sent: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            async with open_ws(f"{scene.direct}/ws/{ROOM}") as watcher:
                # Stored, but its ack is lost; then the server goes away altogether.
                scene.proxy.stall("down")
                nursery.start_soon(_send_into, sent, client, "stored-before-the-restart")
                first = await recv(watcher)
            await scene.node.stop()
            await wait_until(lambda: client.state == "reconnecting")
            # Typed while the server is down: it waits in the outbox.
            nursery.start_soon(_send_into, sent, client, "typed-while-down")
            scene.proxy.restore()
            await scene.node.start()
        assert sent["stored-before-the-restart"] == first["id"], "the same message, again"
        contents = {(await client.next_message()).content for _ in range(2)}
        assert contents == set(sent)
    assert sorted(await stored(scene.port)) == sorted(sent)
    assert scene.node.server is not None
    assert scene.node.server.metrics.duplicates == 1, "the restarted server knew it"


async def edit_delete_applied(scene: Scene) -> None:
    async with scene.open_client(scene.direct, ROOM, author_id=1, **FAST) as client, \
            scene.open_client(scene.direct, ROOM, author_id=2, **FAST) as other:
        draft = await client.send("draft")
        doomed = await client.send("doomed")
        edit = await client.edit(draft, "final")
        delete = await client.delete(doomed)
        with pytest.raises(ChatError) as refused:
            await other.delete(draft)
        assert refused.value.code == "forbidden"
        got = [await other.next_message() for _ in range(4)]
        assert [(m.id, m.message_type, m.target_id) for m in got] == [
            (draft, "chat_txt", None), (doomed, "chat_txt", None),
            (edit, "chat_edit", draft), (delete, "chat_delete", doomed)]
        assert got[2].content == "final"
    status, body = await http_call(scene.port, "GET", f"/rooms/{ROOM}/messages?order=asc")
    assert status == 200
    history = {m["id"]: m for m in body["messages"]}
    assert history[draft]["content"] == "final" and history[draft]["edited_at"]
    assert history[doomed]["content"] == "" and history[doomed]["deleted_at"]


async def typing_shown(scene: Scene) -> None:
    async with open_ws(f"{scene.direct}/ws/{ROOM}?author_id=2") as other, \
            scene.open_client(scene.direct, ROOM, author_id=1, **FAST) as client:
        await wait_until(lambda: client.state == "connected")
        await client.typing()
        shown = await recv(other)
        assert (shown["message_type"], shown["author_id"]) == ("typing", 1)
        await other.send_message('{"message_type": "typing"}')
        await _next_event(client, "typing", author_id=2)


async def presence_shown(scene: Scene) -> None:
    async with scene.open_client(scene.direct, ROOM, author_id=1, **FAST) as client:
        await wait_until(lambda: client.state == "connected")
        async with open_ws(f"{scene.direct}/ws/{ROOM}?author_id=2"):
            enter = await _next_event(client, "chat_enter", author_id=2)
            assert enter["online"] == 2
        leave = await _next_event(client, "chat_exit", author_id=2)
        assert leave["online"] == 1


async def _send_into(into: dict[str, int], client: Driver, text: str) -> None:
    into[text] = await client.send(text)


async def _next_event(client: Driver, kind: str, **fields: Any) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            event = await client.next_event()
            if event["message_type"] == kind and fields.items() <= event.items():
                return event


SCENARIOS = {
    "server restart": server_restart,
    "network cut": network_cut,
    "stalled network": stalled_network,
    "lost ack": lost_ack,
    "resend idempotent": resend_idempotent,
    "edit/delete applied": edit_delete_applied,
    "typing shown": typing_shown,
    "presence shown": presence_shown,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("client", list(CLIENTS))
async def test_scenario(tmp_path, client: str, scenario: str) -> None:
    async with restartable(tmp_path) as node, trio.open_nursery() as nursery:
        assert node.server is not None
        proxy = await nursery.start(Proxy(node.server.port).run)
        await SCENARIOS[scenario](Scene(node, proxy, CLIENTS[client]))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_a_token_function_is_called_before_every_attempt(tmp_path, client: str
                                                               ) -> None:
    secret = "s" * 32
    calls: list[int] = []

    def fresh_token() -> str:
        calls.append(1)
        return jwt.encode({"sub": "5", "n": len(calls)}, secret, algorithm="HS256")

    config = make_config(tmp_path / "tokens.db", shutdown_timeout=2.0,
                         auth=AuthConfig(mode="token", secret=secret))
    async with trio.open_nursery() as nursery:
        node = Restartable(config, nursery)
        await node.start()
        async with CLIENTS[client](f"ws://127.0.0.1:{node.server.port}", ROOM,
                                   token=fresh_token, **FAST) as chat:
            assert (await chat.send("first")) > 0
            await node.stop()
            await node.start()
            assert (await chat.send("second")) > 0
            assert len(calls) >= 2
        nursery.cancel_scope.cancel()


async def test_the_asyncio_client_leaves_no_task_behind(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        assert node.server is not None
        url = f"ws://127.0.0.1:{node.server.port}"

        async def application() -> tuple[int, int, str]:
            before = len(asyncio.all_tasks())
            for i in range(20):
                async with aio_client.open_chat(url, ROOM, author_id=1) as chat:
                    if i % 5 == 0:
                        await chat.send(f"round {i}")
            return before, len(asyncio.all_tasks()), chat.state

        before, after, state = await trio.to_thread.run_sync(asyncio.run, application())
        assert (after, state) == (before, "closed")
