"""The Python client (trio_chat.client) and `trio-chat chat` against real servers: server
restarts, cut and stalled networks, lost acks, exactly-once delivery and no leaked task."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from PIL import Image

from trio_chat.client import ChatError, open_chat
from trio_chat.config import Config
from trio_chat.metrics import count_tasks
from trio_chat.server import Server

from .conftest import make_config, open_ws, recv, start_server, wait_until
from .proxy import Proxy
from .rawws import http_call

ROOM = 51
def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (2, 1), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


@attrs.define
class Restartable:
    """A server the test stops and starts again on the same port and SQLite file."""

    config: Config
    nursery: trio.Nursery
    server: Server | None = None
    stopped: trio.Event = attrs.field(factory=trio.Event)

    async def start(self) -> Server:
        async def run(*, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
                      ) -> None:
            async with trio.open_nursery() as inner:
                task_status.started(await start_server(inner, self.config))
            stopped.set()

        self.stopped = stopped = trio.Event()
        self.server = await self.nursery.start(run)
        self.config = attrs.evolve(self.config, server=attrs.evolve(
            self.config.server, port=self.server.port))
        return self.server

    async def stop(self) -> None:
        """A graceful stop (clients are closed with 1001), as for a deployment."""
        assert self.server is not None
        self.server.shutdown()
        await self.stopped.wait()


@asynccontextmanager
async def restartable(tmp_path: Path) -> AsyncIterator[Restartable]:
    async with trio.open_nursery() as nursery:
        node = Restartable(make_config(tmp_path / "client.db", shutdown_timeout=2.0), nursery)
        await node.start()
        yield node
        nursery.cancel_scope.cancel()


async def stored(port: int) -> list[str]:
    status, body = await http_call(port, "GET", f"/rooms/{ROOM}/messages?order=asc&limit=500")
    assert status == 200
    return [m["content"] for m in body["messages"]]


async def chat_both_ways(url_a: str, url_b: str, disrupt: Any, per_side: int = 30
                         ) -> dict[str, list[Any]]:
    """Two clients each send ``per_side`` messages while ``disrupt()`` runs; returns what
    each application received."""
    sent = {f"{side}-{i}" for side in "ab" for i in range(per_side)}
    seen: dict[str, list[Any]] = {"a": [], "b": []}

    async def side(name: str, url: str, author: int, *, task_status=trio.TASK_STATUS_IGNORED
                   ) -> None:
        async with open_chat(url, ROOM, author_id=author, dead_after=2,
                             backoff_max=0.5) as chat:
            task_status.started()

            async def send_all() -> None:
                for i in range(per_side):
                    await chat.send(f"{name}-{i}")
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                async for message in chat:
                    seen[name].append(message)
                    if {m.content for m in seen[name]} >= sent:
                        break

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(side, "a", url_a, 1)
            await nursery.start(side, "b", url_b, 2)
            nursery.start_soon(disrupt)
    for name, messages in seen.items():
        ids = [m.id for m in messages]
        assert ids == sorted(set(ids)), f"{name}: not once each, in id order"
        assert sorted(m.content for m in messages) == sorted(sent), name
    return seen


async def test_send_returns_the_id_and_messages_come_in_order(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        url = f"http://127.0.0.1:{node.server.port}"
        async with open_chat(url, ROOM, author_id=1) as one, \
                open_chat(url, ROOM, author_id=2) as two:
            first = await one.send("hello")
            second = await two.send("hi there")
            assert second == first + 1
            image = await one.send_image(png())
            received = []
            async for message in two:
                received.append(message)
                if message.id == image:
                    break
        assert [(m.content, m.author_id) for m in received[:2]] == [("hello", 1),
                                                                     ("hi there", 2)]
        assert received[2].message_type == "chat_img" and received[2].image["width"] == 2
        with pytest.raises(ChatError) as info:
            async with open_chat(url, ROOM, author_id=3) as three:
                await three.send_frame({"message_type": "chat_delete", "target_id": first})
        assert info.value.code == "forbidden"


async def test_exactly_once_across_server_restarts(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        url = f"ws://127.0.0.1:{node.server.port}"

        async def restart_twice() -> None:
            for _ in range(2):
                await trio.sleep(0.3)
                await node.stop()
                await trio.sleep(0.5)
                await node.start()

        await chat_both_ways(url, url, restart_twice)
        contents = await stored(node.server.port)
        assert len(contents) == len(set(contents)) == 60


@pytest.mark.parametrize("how", ["cut", "stall"])
async def test_exactly_once_across_a_cut_or_stalled_network(tmp_path, how: str) -> None:
    async with restartable(tmp_path) as node, trio.open_nursery() as nursery:
        proxy = await nursery.start(Proxy(node.server.port).run)
        direct = f"ws://127.0.0.1:{node.server.port}"
        through = f"ws://127.0.0.1:{proxy.port}"

        async def disrupt() -> None:
            for _ in range(2):
                await trio.sleep(0.3)
                proxy.cut() if how == "cut" else proxy.stall()
                await trio.sleep(3 if how == "stall" else 0.5)
                proxy.restore()

        await chat_both_ways(through, direct, disrupt)
        contents = await stored(node.server.port)
        assert len(contents) == len(set(contents)) == 60
        nursery.cancel_scope.cancel()


async def test_a_message_whose_ack_was_lost_is_stored_once(tmp_path) -> None:
    async with restartable(tmp_path) as node, trio.open_nursery() as nursery:
        proxy = await nursery.start(Proxy(node.server.port).run)
        async with open_ws(f"ws://127.0.0.1:{node.server.port}/ws/{ROOM}") as watcher, \
                open_chat(f"ws://127.0.0.1:{proxy.port}", ROOM, author_id=1, dead_after=2,
                          backoff_max=0.5) as chat:
            await wait_until(lambda: chat.state == "connected")
            # The frame reaches the server; nothing comes back, the ack included.
            proxy.stall("down")
            async with trio.open_nursery() as sending:
                sending.start_soon(chat.send, "once")
                assert (await recv(watcher))["content"] == "once"
                await wait_until(lambda: chat.state == "reconnecting")
                proxy.restore()
            received = [m async for m in _take(chat, 1)]
        assert [m.content for m in received] == ["once"]
        assert await stored(node.server.port) == ["once"]
        assert node.server.metrics.duplicates == 1, "it was sent again, and recognised"
        nursery.cancel_scope.cancel()


async def _take(chat: Any, n: int) -> AsyncIterator[Any]:
    async for message in chat:
        yield message
        n -= 1
        if n == 0:
            return


async def test_states_are_observed_in_order(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        url = f"ws://127.0.0.1:{node.server.port}"
        async with open_chat(url, ROOM, author_id=1, backoff_max=0.5) as chat:
            states = chat.states()
            assert (await states.receive()).state == "connecting"
            assert (await states.receive()).state == "connected"
            await node.stop()
            assert (await states.receive()).state == "reconnecting"
            await node.start()
            with trio.fail_after(30):
                assert (await states.receive()).state == "resumed"
            assert await chat.send("after") > 0


async def test_no_task_is_left_behind(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        url = f"ws://127.0.0.1:{node.server.port}"
        before = count_tasks()
        for i in range(50):
            async with open_chat(url, ROOM, author_id=1) as chat:
                if i % 10 == 0:
                    await chat.send(f"round {i}")
        assert count_tasks() == before
        await node.stop()
        before = count_tasks()
        # Cancelled while reconnecting to a server that is not there.
        with trio.move_on_after(1.5):
            async with open_chat(url, ROOM, author_id=1, backoff_max=0.2) as chat:
                await chat.send("never acknowledged")
        assert chat.state == "closed"
        assert count_tasks() == before


async def test_the_command_line_chat(tmp_path) -> None:
    async with restartable(tmp_path) as node:
        url = f"http://127.0.0.1:{node.server.port}"
        async with open_chat(url, ROOM, author_id=9) as other:
            await other.send("hello from 9")
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_chat.cli", "chat", url, "--room", str(ROOM),
                 "--author-id", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            try:
                await process.stdin.send_all(b"hi from the terminal\nsecond line\n")
                got = []
                with trio.fail_after(60):
                    async for message in other:
                        got.append(message.content)
                        if message.content == "second line":
                            break
                assert got[-2:] == ["hi from the terminal", "second line"]
                await process.stdin.aclose()  # EOF: it exits once everything is acked
                with trio.fail_after(30):
                    await process.wait()
                out = (await _read_all(process.stdout)).decode()
            finally:
                process.kill()
                await process.wait()
        assert process.returncode == 0
        lines = out.splitlines()
        assert any(line.endswith("#9: hello from 9") for line in lines), out
        assert any(line.endswith("#4: second line") for line in lines), out
        assert lines[0].startswith("[") and "] #" in lines[0]
        assert sorted(await stored(node.server.port)) == sorted(
            ["hello from 9", "hi from the terminal", "second line"])


async def _read_all(stream: Any) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data
