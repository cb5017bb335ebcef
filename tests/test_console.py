"""The operator console (``/console``): its feed over a real socket, and the page in
real headless Chromium following a scripted load and kicking a member.

Screenshots of the console go to ``artifacts/`` (git-ignored):
``console-1280x800.png`` and ``console-390x844.png``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto.events import CloseConnection, TextMessage

from trio_chat.config import AuthConfig
from trio_chat.http import console
from trio_chat.server import Server

from .conftest import make_config, start_server
from .rawws import RawClient, http_call, http_get, read_head
from .test_browser import OpenPage, Page, browser  # noqa: F401 (browser is a fixture)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
KEY = "console-admin-key-0123"
ROOM = 77
TIMEOUT = 15.0


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    return await start_server(nursery, make_config(tmp_path / "chat.db",
                                                   auth=AuthConfig(admin_key=KEY)))


@asynccontextmanager
async def open_feed(port: int, key: str) -> AsyncIterator[tuple[trio.SocketStream, bytes]]:
    """The feed's connection, with what followed the head of its answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET /console/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"X-Admin-Key: {key}\r\nAccept: text/event-stream\r\n\r\n"
                              .encode())
        head, rest = await read_head(stream, 200)
        assert b"content-type: text/event-stream" in head.lower()
        assert b"transfer-encoding: chunked" in head.lower()
        yield stream, rest


async def next_update(stream: trio.SocketStream, buffer: bytearray) -> dict[str, Any]:
    """The next ``stats`` event of a chunked feed (chunk sizes are left in ``buffer``
    but never inside an event, which is written as one chunk)."""
    while True:
        start = buffer.find(b"event: stats\ndata: ")
        end = buffer.find(b"\n\n", start)
        if start >= 0 and end >= 0:
            data = bytes(buffer[start + len(b"event: stats\ndata: "):end])
            del buffer[:end + 2]
            return json.loads(data)
        chunk = await stream.receive_some(65536)
        assert chunk, "the feed ended"
        buffer += chunk


async def member(port: int, author: int) -> RawClient:
    """A member of the room, once it is in (its own arrival announced to it)."""
    client = await RawClient.connect(port, f"/ws/{ROOM}?author_id={author}")
    with trio.fail_after(TIMEOUT):
        while (await client.receive_json()).get("message_type") != "chat_enter":
            pass
    return client


async def test_the_page_loads_without_the_key_and_the_feed_needs_it(server: Server) -> None:
    status, headers, page = await http_get(server.port, "/console")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert b'src="/console/console.js"' in page
    status, headers, script = await http_get(server.port, "/console/console.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"/console/events" in script

    assert await http_call(server.port, "GET", "/console/events") == (
        401, {"error": "admin_key_required", "detail": "This endpoint needs the admin key."})
    status, body = await http_call(server.port, "GET", "/console/events",
                                   headers={"X-Admin-Key": "not-the-key-at-all"})
    assert (status, body["error"]) == (401, "admin_key_invalid")


async def test_the_feed_reports_the_node_and_its_rooms_once_a_second(server: Server) -> None:
    one, two = await member(server.port, 1), await member(server.port, 2)
    try:
        async with open_feed(server.port, KEY) as (stream, rest):
            buffer = bytearray(rest)
            # The members' joins follow their upgrades.
            with trio.fail_after(TIMEOUT):
                while (first := await next_update(stream, buffer))["connections"] < 2:
                    pass
            assert first["node"]["id"] == "local" and first["node"]["worker"] is None
            assert first["node"]["pid"] > 0 and first["node"]["uptime"] >= 0
            assert first["connections"] == 2 and first["rooms_live"] == 1
            assert first["rooms"] == [{"id": str(ROOM), "connections": 2, "online": 2,
                                       "last_id": 0, "rate": 0.0}]
            for n in range(5):
                await one.send_text(json.dumps({"message_type": "chat_txt",
                                                "content": f"m{n}"}))
            started = trio.current_time()
            with trio.fail_after(TIMEOUT):
                while True:
                    update = await next_update(stream, buffer)
                    if update["rooms"][0]["last_id"] == 5:
                        break
            # One update a second, never faster.
            assert trio.current_time() - started >= 0.5
            assert update["messages_received"] == 5
            assert update["rooms"][0]["rate"] > 0 and update["received_rate"] > 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_graceful_shutdown_ends_the_feed(nursery: trio.Nursery, tmp_path: Path
                                                 ) -> None:
    server = await start_server(nursery, make_config(tmp_path / "chat.db",
                                                     auth=AuthConfig(admin_key=KEY)))
    async with open_feed(server.port, KEY) as (stream, rest):
        buffer = bytearray(rest)
        await next_update(stream, buffer)
        server.shutdown()
        with trio.fail_after(5):
            while (chunk := await stream.receive_some(65536)):
                buffer += chunk
        # The chunked body's last chunk: a clean end, not a cut connection.
        assert buffer.endswith(b"0\r\n\r\n")


async def test_a_reader_that_does_not_read_is_dropped_not_buffered(server: Server) -> None:
    writes: list[bytes] = []

    async def write(data: bytes) -> None:
        writes.append(data)
        if len(writes) > 1:
            await trio.sleep_forever()  # the socket is full: the reader stopped reading

    with trio.fail_after(5):
        await console.feed(server.services, "slow reader", write, interval=0.1,
                           send_wait=0.5)
    # The update that could not be written was the last one made.
    assert len(writes) == 2 and writes[0].startswith(b"event: stats\ndata: {")


# ---- the page in Chromium ------------------------------------------------------------

async def wait_js(page: Page, what: str, script: str, within: float = TIMEOUT) -> Any:
    """Evaluate ``script`` until it returns something truthy; fail after ``within`` s."""
    last: Any = None
    with trio.move_on_after(within):
        while True:
            last = await page.js(script)
            if last:
                return last
            await trio.sleep(0.1)
    state = await page.js("return document.getElementById('state').textContent")
    pytest.fail(f"console: no {what} within {within:g} s (last: {last!r}; state {state!r})")


def _cell(room: int, cell: str) -> str:
    """A JavaScript expression: the text of a cell of the room's row, or null."""
    return (f"(function () {{ var r = document.querySelector('#room-rows tr[data-room="
            f"\"{room}\"]'); return r && r.querySelector('.{cell}').textContent; }})()")


async def _read_all(client: RawClient, seen: list[Any]) -> None:
    """Keep reading a member's socket (answering pings and the close) until it closes."""
    while True:
        event = await client.next_event()
        if event is None:
            return
        if isinstance(event, CloseConnection):
            # Answer the close, as a browser would: the server then lets the socket go.
            await client.stream.send_all(client.proto.send(event.response()))
            return
        if isinstance(event, TextMessage):
            seen.append(json.loads(event.data))


async def _send_load(client: RawClient, per_second: int, seconds: float) -> None:
    for n in range(int(per_second * seconds)):
        await client.send_text(json.dumps({"message_type": "chat_txt",
                                           "content": f"load message {n}"}))
        await trio.sleep(1 / per_second)


async def _screenshot(page: Page, width: int, height: int) -> None:
    await page.call(page.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": height, "deviceScaleFactor": 1,
                     "mobile": width < 600})
    await page.js("document.activeElement && document.activeElement.blur()")
    await trio.sleep(0.3)  # let the layout settle at the new size
    await page.call(page.driver.save_screenshot,
                    str(ARTIFACTS / f"console-{width}x{height}.png"))


@asynccontextmanager
async def open_members(port: int, *authors: int
                       ) -> AsyncIterator[tuple[dict[int, RawClient], dict[int, list[Any]]]]:
    """Members of the room, each read all along; what each received."""
    clients: dict[int, RawClient] = {}
    seen: dict[int, list[Any]] = {author: [] for author in authors}
    try:
        async with trio.open_nursery() as readers:
            for author in authors:
                clients[author] = await member(port, author)
                readers.start_soon(_read_all, clients[author], seen[author])
            yield clients, seen
            readers.cancel_scope.cancel()
    finally:
        for client in clients.values():
            await client.aclose()


async def only_two_kicked(page: Page, clients: dict[int, RawClient],
                          seen: dict[int, list[Any]]) -> None:
    """Author 2's socket closed with 4004, the page shows 2 online, and author 3 (whose
    kick was cancelled) still gets the room's messages."""
    with trio.fail_after(TIMEOUT):
        while clients[2].close_code is None:
            await trio.sleep(0.05)
    assert clients[2].close_code == 4004
    await wait_js(page, "2 online after the kick", f"return {_cell(ROOM, 'online')} === '2'")
    await clients[1].send_text(json.dumps({"message_type": "chat_txt",
                                           "content": "after the kick"}))
    with trio.fail_after(TIMEOUT):
        while not any(m.get("content") == "after the kick" for m in seen[3]):
            await trio.sleep(0.05)
    assert clients[3].close_code is None


async def log_in(page: Page) -> None:
    """Type the admin key into the console, after a wrong one, until its feed is live."""
    # No key yet: the feed refuses, and the page asks for the key; a wrong one is refused.
    await wait_js(page, "a request for the key",
                  "return !document.getElementById('login').hidden && "
                  "document.getElementById('state').dataset.state === 'key'")
    await page.js("document.getElementById('key').value = 'wrong-key-wrong-key'; "
                  "document.querySelector('#login-form button').click()")
    await wait_js(page, "the wrong key refused",
                  "return document.getElementById('login-error').textContent")
    await page.js(f"document.getElementById('key').value = '{KEY}'; "
                  "document.querySelector('#login-form button').click()")
    await wait_js(page, "the live feed",
                  "return document.getElementById('state').dataset.state === 'live'")
    assert await page.js("return sessionStorage.getItem('trio-chat-admin-key')") == KEY
    assert await page.js("return document.getElementById('login').hidden")


async def test_the_console_follows_a_load_and_kicks_a_member(
        server: Server, browser: OpenPage) -> None:  # noqa: F811
    page = await browser(f"http://127.0.0.1:{server.port}/console", "console")
    await page.call(page.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride",
                    {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    await log_in(page)

    # Three members join: the console shows them online.
    async with open_members(server.port, 1, 2, 3) as (clients, seen):
        await wait_js(page, "3 online in the room", f"return {_cell(ROOM, 'online')} === '3'")
        assert await page.js("return " + _cell(ROOM, "rate")) == "0.0"
        assert await page.js("return document.getElementById('n-connections').textContent") \
            == "3"

        # Messages: the room's rate rises, then falls back once they stop.
        async with trio.open_nursery() as load:
            load.start_soon(_send_load, clients[1], 12, 4.0)
            await wait_js(page, "the message rate rising",
                          f"return parseFloat({_cell(ROOM, 'rate')}) >= 5")
            assert float(await page.js("return document.getElementById('n-in').textContent")
                         ) > 0
            # The room's members and last messages, live.
            await page.js(f"document.querySelector('#room-rows tr[data-room=\"{ROOM}\"]')"
                          ".click()")
            await wait_js(page, "the members", "return document.querySelectorAll("
                          "'#members li[data-author]').length === 3")
            await wait_js(page, "the last messages", "return document.querySelectorAll("
                          "'#messages li[data-id]').length >= 10")
            ARTIFACTS.mkdir(exist_ok=True)
            await _screenshot(page, 1280, 800)
        await wait_js(page, "the rate back to 0", f"return {_cell(ROOM, 'rate')} === '0.0'")
        assert await page.js("return document.querySelector('#messages li[data-id] "
                             ".content').textContent") == "load message 47"

        # A kick asks first: cancelled, nothing happens.
        kick = "document.querySelector('#members li[data-author=\"{}\"] button.kick').click()"
        await page.js(kick.format(3))
        await wait_js(page, "the dialog", "return document.getElementById('confirm').open")
        assert await page.js("return document.getElementById('confirm-title').textContent"
                             ) == "Kick #3?"
        await page.js("document.getElementById('confirm-cancel').click()")
        await wait_js(page, "the dialog closed",
                      "return !document.getElementById('confirm').open")
        # Confirmed: author 2's socket is closed with 4004, with the reason typed.
        await page.js(kick.format(2))
        await wait_js(page, "the dialog", "return document.getElementById('confirm').open")
        await page.js("document.querySelector('#confirm-fields input[name=reason]').value = "
                      "'spamming'; document.getElementById('confirm-ok').click()")
        await wait_js(page, "the kick done",
                      "return document.getElementById('toast').textContent === 'Kicked #2'")
        await only_two_kicked(page, clients, seen)
        await wait_js(page, "the kick in the members list", "return document.querySelectorAll("
                      "'#members li[data-author]').length === 2")

        await _screenshot(page, 390, 844)
        entries = await page.call(page.driver.get_log, "browser")
        errors = [e["message"] for e in entries if e.get("level") == "SEVERE"
                  and "401 (Unauthorized)" not in e["message"]]
        assert not errors, f"errors in the browser console: {errors}"


async def test_a_cancelled_kick_is_not_done_by_the_next_confirmation(
        server: Server, browser: OpenPage) -> None:  # noqa: F811
    page = await browser(f"http://127.0.0.1:{server.port}/console", "console")
    await log_in(page)
    async with open_members(server.port, 1, 2, 3) as (clients, seen):
        await wait_js(page, "3 online in the room", f"return {_cell(ROOM, 'online')} === '3'")
        await page.js(f"document.querySelector('#room-rows tr[data-room=\"{ROOM}\"]').click()")
        await wait_js(page, "the members", "return document.querySelectorAll("
                      "'#members li[data-author]').length === 3")
        # Cancel a kick of #3 and confirm one of #2 before the first dialog's close event
        # arrives (an operator quicker than a busy browser): only #2 is kicked.
        kick = "document.querySelector('#members li[data-author=\"{}\"] button.kick').click();"
        await page.js(kick.format(3) + "document.getElementById('confirm-cancel').click();"
                      + kick.format(2) + "document.getElementById('confirm-ok').click();")
        await only_two_kicked(page, clients, seen)
