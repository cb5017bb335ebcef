"""The demo page (``GET /``) in real headless Chromium, driven by selenium.

Needs the Debian ``chromium`` and ``chromium-driver`` packages; without them the
tests fail (never skip). Selenium blocks, so every call to it runs in a worker
thread (``trio.to_thread``) while the server keeps serving in the test's trio loop.

Set ``TRIO_CHAT_SCREENSHOT=/tmp/demo.png`` to save a screenshot of the chat.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from trio_chat.config import Config, SqliteConfig
from trio_chat.server import Server

from .conftest import make_config, start_server
from .rawws import http_call

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 15.0
T = TypeVar("T")

# Every .msg element as [data-id, content text, author, whether it is the viewer's own].
_MESSAGES_JS = """
return Array.from(document.querySelectorAll('#log .msg')).map(function (e) {
  var c = e.querySelector('.content');
  return [e.getAttribute('data-id'), c ? c.textContent : e.textContent,
          e.getAttribute('data-author'), e.classList.contains('mine')];
});
"""


def _require_chromium() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"browser tests need {' and '.join(missing)}: install the Debian packages "
                    "'chromium' and 'chromium-driver' (apt-get install chromium "
                    "chromium-driver)", pytrace=False)


def _start_driver(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=900,700",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    return driver


class Page:
    """One browser showing the demo page; every method runs selenium in a thread."""

    def __init__(self, driver: webdriver.Chrome, name: str) -> None:
        self.driver = driver
        self.name = name

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args))

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def state(self) -> str:
        return await self.js("return document.getElementById('state').textContent")

    async def log_text(self) -> str:
        return await self.js("return document.getElementById('log').innerText")

    async def messages(self) -> list[tuple[str, str, str, bool]]:
        return [tuple(m) for m in await self.js(_MESSAGES_JS)]

    async def type_message(self, text: str, *, press_enter: bool) -> None:
        def type_it() -> None:
            box = self.driver.find_element(By.ID, "message")
            box.send_keys(text)
            if press_enter:
                box.send_keys(Keys.ENTER)
            else:
                self.driver.find_element(By.ID, "send").click()
        await self.call(type_it)

    async def eventually(self, what: str, check: Callable[[], Awaitable[Any]],
                         within: float = TIMEOUT) -> Any:
        """Poll ``check`` until it returns something truthy; fail after ``within`` s."""
        last: Any = None
        with trio.move_on_after(within):
            while True:
                last = await check()
                if last:
                    return last
                await trio.sleep(0.1)
        text = await self.log_text()
        pytest.fail(f"{self.name}: no {what} within {within:g} s (last: {last!r}); "
                    f"#state={await self.state()!r}; #log:\n{text}")

    async def wait_state(self, want: str) -> None:
        async def check() -> bool:
            return await self.state() == want
        await self.eventually(f"#state {want!r}", check)

    async def wait_contents(self, *wanted: str) -> list[tuple[str, str, str, bool]]:
        async def check() -> list[tuple[str, str, str, bool]] | None:
            messages = await self.messages()
            shown = [content for _, content, _, _ in messages]
            return messages if all(w in shown for w in wanted) else None
        return await self.eventually(f"messages {wanted!r}", check)

    async def assert_no_console_errors(self) -> None:
        entries = await self.call(self.driver.get_log, "browser")
        errors = [e["message"] for e in entries if e.get("level") == "SEVERE"]
        assert not errors, f"{self.name}: errors in the browser console: {errors}"

    async def assert_no_duplicates(self) -> None:
        ids = Counter(mid for mid, _, _, _ in await self.messages())
        twice = {mid: n for mid, n in ids.items() if n > 1}
        assert not twice, f"{self.name}: messages shown more than once: {twice}"
        assert None not in ids, f"{self.name}: a .msg element without data-id"


OpenPage = Callable[[str, str], Awaitable[Page]]


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[OpenPage]:
    """Opens pages, each in its own Chromium; quits them all at teardown."""
    _require_chromium()
    drivers: list[webdriver.Chrome] = []
    profiles = iter(range(1_000))

    async def open_page(url: str, name: str = "page") -> Page:
        profile = tmp_path / f"chromium-{next(profiles)}"
        profile.mkdir()
        driver = await trio.to_thread.run_sync(_start_driver, profile)
        drivers.append(driver)
        page = Page(driver, name)
        await page.call(driver.get, url)
        return page

    try:
        yield open_page
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                for driver in drivers:
                    nursery.start_soon(trio.to_thread.run_sync, driver.quit)


def on_port(config: Config, port: int) -> Config:
    return attrs.evolve(config, server=attrs.evolve(config.server, port=port))


def page_url(server: Server | int, room: int, author: int) -> str:
    port = server if isinstance(server, int) else server.port
    return f"http://127.0.0.1:{port}/?room={room}&author={author}&autoconnect=1"


async def open_pages(browser: OpenPage, *specs: tuple[str, str]) -> list[Page]:
    """Open several pages at once (each Chromium takes about a second to start)."""
    pages: dict[int, Page] = {}

    async def one(i: int, url: str, name: str) -> None:
        pages[i] = await browser(url, name)

    async with trio.open_nursery() as nursery:
        for i, (url, name) in enumerate(specs):
            nursery.start_soon(one, i, url, name)
    return [pages[i] for i in range(len(specs))]


async def _has(lines: Callable[[], Awaitable[list[str]]], text: str) -> bool:
    return any(text in line for line in await lines())


async def test_two_pages_chat(server: Server, browser: OpenPage) -> None:
    one, two = await open_pages(browser, (page_url(server, 42, 1), "page 1"),
                                (page_url(server, 42, 2), "page 2"))
    await one.wait_state("connected")
    await two.wait_state("connected")

    await one.type_message("hello from one", press_enter=True)
    await one.wait_contents("hello from one")
    await two.wait_contents("hello from one")
    await two.type_message("안녕 from two 😀", press_enter=False)
    seen_by_one = await one.wait_contents("hello from one", "안녕 from two 😀")
    seen_by_two = await two.wait_contents("hello from one", "안녕 from two 😀")

    # Same messages, same ids, same order on both pages; the sender's own is marked.
    assert [m[:3] for m in seen_by_one] == [m[:3] for m in seen_by_two] == [
        ("1", "hello from one", "1"), ("2", "안녕 from two 😀", "2")]
    assert [m[3] for m in seen_by_one] == [True, False]
    assert [m[3] for m in seen_by_two] == [False, True]
    for page in (one, two):
        await page.assert_no_duplicates()
        await page.assert_no_console_errors()
        assert await page.js("return document.getElementById('message').value") == ""
        assert await page.js("return document.querySelectorAll('#log .error').length") == 0
        assert await page.state() == "connected"

    # The page says who it is on connecting: each sees its own arrival, and the page
    # that came first sees the other's.
    for page, me in ((one, 1), (two, 2)):
        lines = partial(page.js, "return Array.from(document.querySelectorAll("
                        "'#log [data-presence=chat_enter]')).map(function (e) "
                        "{ return e.textContent; })")
        await page.eventually(f"#{me} joined", partial(_has, lines, f"#{me} joined"))
    await two.js("document.getElementById('disconnect').click()")
    lines = partial(one.js, "return Array.from(document.querySelectorAll("
                    "'#log [data-presence=chat_exit]')).map(function (e) "
                    "{ return e.textContent; })")
    await one.eventually("#2 left", partial(_has, lines, "#2 left \u00b7 1 online"))

    if shot := os.environ.get("TRIO_CHAT_SCREENSHOT"):
        await one.call(one.driver.save_screenshot, shot)


async def test_late_joiner_gets_history(server: Server, browser: OpenPage) -> None:
    one, two = await open_pages(browser, (page_url(server, 42, 1), "page 1"),
                                (page_url(server, 42, 2), "page 2"))
    await one.wait_state("connected")
    await two.wait_state("connected")
    await one.type_message("hello from one", press_enter=True)
    await two.wait_contents("hello from one")
    await two.type_message("안녕 from two 😀", press_enter=True)
    before = await one.wait_contents("hello from one", "안녕 from two 😀")

    three = await browser(page_url(server, 42, 3), "page 3")
    await three.wait_state("connected")
    history = await three.wait_contents("hello from one", "안녕 from two 😀")
    assert [m[:3] for m in history] == [m[:3] for m in before]

    # The late joiner is a full member: its message reaches the others live.
    await three.type_message("late but here", press_enter=True)
    for page in (one, two, three):
        await page.wait_contents("hello from one", "안녕 from two 😀", "late but here")
        await page.assert_no_duplicates()
        await page.assert_no_console_errors()
        assert len(await page.messages()) == 3


async def test_pages_negotiate_permessage_deflate_and_chat(server: Server,
                                                          browser: OpenPage) -> None:
    one, two = await open_pages(browser, (page_url(server, 43, 1), "page 1"),
                                (page_url(server, 43, 2), "page 2"))
    await one.wait_state("connected")
    await two.wait_state("connected")
    # Chromium offers permessage-deflate by itself; both pages' connections took it.
    assert server.writers.deflaters.connections == 2
    extensions = await one.call(one.driver.execute_async_script, """
        var done = arguments[arguments.length - 1];
        var ws = new WebSocket(arguments[0]);
        ws.onopen = function () { done(ws.extensions); ws.close(); };
        ws.onerror = function () { done('error'); };
    """, f"ws://127.0.0.1:{server.port}/ws/44")
    assert extensions == \
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    before = server.metrics.deflated_frames
    # Long enough to be compressed both ways: Chromium compresses what it sends, and the
    # server compresses the broadcast once for both pages.
    long = "a message long enough to be worth compressing, " * 3 + "from one"
    await one.type_message(long, press_enter=True)
    await two.wait_contents(long)
    await two.type_message("short from two", press_enter=True)
    for page in (one, two):
        await page.wait_contents(long, "short from two")
        await page.assert_no_duplicates()
        await page.assert_no_console_errors()
    assert server.metrics.deflated_frames > before


async def test_errors_escaping_and_other_events(server: Server, browser: OpenPage) -> None:
    page = await browser(page_url(server, 7, 5), "page")
    await page.wait_state("connected")

    markup = "<b>not bold</b> & <img src=x onerror=alert(1)>"
    await page.type_message(markup, press_enter=True)
    await page.wait_contents(markup)
    assert await page.js("return document.querySelectorAll('#log b, #log img').length") == 0

    # A frame the server refuses comes back as an error frame, shown as a red line.
    await page.js("window.trioChat.socket.send('this is not json')")
    error = await page.eventually("error line", partial(
        page.js, "var e = document.querySelector('#log .error'); return e && e.textContent"))
    assert "invalid_json" in error
    # Events the page does not know (yet) become grey system lines.
    await page.js("window.trioChat.handleFrame(arguments[0])",
                  '{"message_type":"chat_enter","author_id":77}')
    await page.js("window.trioChat.handleFrame(arguments[0])",
                  '{"message_type":"something_new","author_id":78}')
    systems = await page.js("return Array.from(document.querySelectorAll('#log .system'))"
                            ".map(function (e) { return e.textContent; })")
    assert any("77" in s for s in systems) and any("something_new" in s for s in systems)

    await page.assert_no_duplicates()
    assert await page.state() == "connected"
    await page.type_message("still works", press_enter=False)
    await page.wait_contents(markup, "still works")


async def test_reconnects_after_server_restart(tmp_path: Path, browser: OpenPage) -> None:
    db = tmp_path / "restart.db"
    # Graceful shutdown waits out its grace period (half of shutdownTimeout) for the
    # browser's idle keep-alive and preconnected sockets, so keep it short.
    config = make_config(db, shutdown_timeout=2.0)
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, config)
        port = first.port
        page = await browser(page_url(port, 9, 1), "page")
        await page.wait_state("connected")
        await page.type_message("before restart", press_enter=True)
        await page.wait_contents("before restart")
        first.shutdown()  # graceful: closes the page's socket with 1001, then returns

    async def closed_line() -> bool:
        return "connection closed (1001" in await page.log_text()
    await page.eventually("line about the closed connection", closed_line)
    assert await page.state() == "reconnecting"  # nothing listens on the port now

    async with trio.open_nursery() as nursery:
        second = await start_server(nursery, on_port(config, port))
        await page.wait_state("connected")
        await page.type_message("after restart", press_enter=True)
        shown = await page.wait_contents("before restart", "after restart")
        # The history sent again on reconnect is not shown twice.
        assert [m[:2] for m in shown] == [("1", "before restart"), ("2", "after restart")]
        await page.assert_no_duplicates()
        second.shutdown()

    # A server with no history (ids start at 1 again): the page keeps working.
    async with trio.open_nursery() as nursery:
        fresh = attrs.evolve(config, sqlite=SqliteConfig(str(tmp_path / "fresh.db")))
        third = await start_server(nursery, on_port(fresh, port))
        await page.wait_state("connected")
        await page.type_message("after reset", press_enter=True)
        shown = await page.wait_contents("before restart", "after restart", "after reset")
        assert [m[:2] for m in shown] == [
            ("1", "before restart"), ("2", "after restart"), ("1", "after reset")]
        assert "ids restarted" in await page.log_text()
        third.shutdown()


async def test_pages_resend_what_was_not_acknowledged_across_a_restart(
        tmp_path: Path, browser: OpenPage) -> None:
    config = make_config(tmp_path / "resend.db", shutdown_timeout=2.0)
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, config)
        port = first.port
        one, two = await open_pages(browser, (page_url(port, 12, 1), "page 1"),
                                    (page_url(port, 12, 2), "page 2"))
        await one.wait_state("connected")
        await two.wait_state("connected")
        await one.call(lambda: one.driver.find_element(By.ID, "message").send_keys("typ"))

        async def typing_shown() -> bool:
            return "#1 is typing" in await two.js(
                "return document.getElementById('typing').textContent")
        await two.eventually("the typing hint", typing_shown)
        await one.call(lambda: one.driver.find_element(By.ID, "message").clear())
        await one.type_message("one before", press_enter=True)
        await two.type_message("two before", press_enter=True)
        for page in (one, two):
            await page.wait_contents("one before", "two before")
        first.shutdown()

    for page in (one, two):
        await page.wait_state("reconnecting")
    # Typed while the server is down: kept in the outbox, shown as pending.
    await one.type_message("one while down", press_enter=True)
    await two.type_message("two while down", press_enter=False)
    assert await one.js("return window.trioChat.outbox.length") == 1
    assert "sending" in await one.log_text()

    expected = ["one before", "two before", "one while down", "two while down"]
    async with trio.open_nursery() as nursery:
        second = await start_server(nursery, on_port(config, port))
        shown = {}
        for page in (one, two):
            await page.wait_state("connected")
            messages = await page.wait_contents(*expected)
            await page.assert_no_duplicates()
            shown[page.name] = sorted((content, mid) for mid, content, _, _ in messages)
            assert await page.js("return window.trioChat.outbox.length") == 0
            assert "sending" not in await page.log_text()
        assert shown["page 1"] == shown["page 2"], "the same ids on both pages"
        status, body = await http_call(port, "GET", "/rooms/12/messages?order=asc")
        assert status == 200
        assert sorted(m["content"] for m in body["messages"]) == sorted(expected)
        second.shutdown()


async def test_a_page_sends_an_image_and_the_other_shows_its_thumbnail(
        server: Server, browser: OpenPage, tmp_path: Path) -> None:
    picture = tmp_path / "photo.png"
    Image.new("RGB", (800, 400), (30, 120, 200)).save(picture)
    one, two = await open_pages(browser, (page_url(server, 77, 1), "page 1"),
                                (page_url(server, 77, 2), "page 2"))
    await one.wait_state("connected")
    await two.wait_state("connected")
    await one.call(lambda: one.driver.find_element(By.ID, "image-input")
                   .send_keys(str(picture)))

    async def thumbnail() -> list[Any] | None:
        found = await two.js("""
            var img = document.querySelector('#log .msg img.thumb');
            return img && img.complete && img.naturalWidth > 0 ?
                [img.naturalWidth, img.naturalHeight, img.parentNode.getAttribute('href')] : null;
        """)
        return found
    width, height, href = await two.eventually("the image's thumbnail", thumbnail)
    assert (width, height) == (320, 160)
    assert href.startswith("/media/")
    await one.eventually("the sender's own thumbnail", lambda: one.js(
        "return document.querySelectorAll('#log .msg img.thumb').length === 1"))
    assert await one.js("return window.trioChat.outbox.length") == 0
    await one.assert_no_console_errors()
    await two.assert_no_console_errors()
