"""The JavaScript client module (``/static/trio-chat.js``) in real headless Chromium.

Clients are ``ChatClient`` objects made in a page of the server's origin; what each
one delivers is recorded in the page and read back. Network faults come from the TCP
proxy in ``tests/proxy.py``. The scenario list is the table "Client scenarios" in
docs/clients.md. Screenshots of the demo page go to ``artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from trio_chat.config import AuthConfig, Config
from trio_chat.server import Server

from .conftest import make_config, start_server
from .proxy import Proxy
from .rawws import http_call
from .test_browser import (  # noqa: F401 (browser is a fixture)
    OpenPage,
    Page,
    browser,
    on_port,
    open_pages,
    page_url,
)

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
ROOM = 31
# Short timeouts so a stall is noticed within a test's patience.
FAST = {"backoffFirst": 200, "backoffMax": 1000, "ackTimeout": 2000, "openTimeout": 2000}

# Makes a ChatClient named arguments[0] with options arguments[1] and records what it
# delivers in window.clients[name].
_MAKE_CLIENT = """
const [name, options, tokens, done] = arguments;
import('/static/trio-chat.js').then((m) => {
  const rec = {states: [], message: [], edit: [], delete: [], typing: [], presence: [],
               error: [], reset: [], results: {}, tokenCalls: 0};
  if (tokens !== null) {
    options.token = () => {
      rec.tokenCalls += 1;
      return Promise.resolve(tokens[Math.min(rec.tokenCalls, tokens.length) - 1]);
    };
  }
  const client = new m.ChatClient(options);
  for (const type of ['message', 'edit', 'delete', 'typing', 'presence', 'error', 'reset']) {
    client.addEventListener(type, (e) => rec[type].push(e.detail));
  }
  client.addEventListener('state', (e) => rec.states.push(e.detail));
  window.clients = window.clients || {};
  window.clients[name] = {client, rec};
  client.connect();
  done(true);
}, (e) => done(String(e)));
"""

# Starts a call on client arguments[0]; its outcome lands in rec.results[arguments[1]].
_CALL = """
const [name, key, method, args] = arguments;
const {client, rec} = window.clients[name];
client[method](...args).then((v) => { rec.results[key] = {ok: v}; },
                             (e) => { rec.results[key] = {error: e.code || String(e)}; });
"""


class Clients:
    """ChatClients living in one page."""

    def __init__(self, page: Page) -> None:
        self.page = page

    async def make(self, name: str, tokens: list[str] | None = None, **options: Any) -> None:
        options.setdefault("room", ROOM)
        result = await self.page.call(self.page.driver.execute_async_script, _MAKE_CLIENT,
                                      name, {**FAST, **options}, tokens)
        assert result is True, result

    async def rec(self, name: str, what: str) -> Any:
        return await self.page.js(
            f"return window.clients[arguments[0]].rec[{json.dumps(what)}]", name)

    async def start(self, name: str, key: str, method: str, *args: Any) -> None:
        await self.page.js(_CALL, name, key, method, list(args))

    async def result(self, name: str, key: str) -> Any:
        async def check() -> Any:
            return (await self.rec(name, "results")).get(key)
        return await self.wait(f"{name}: the outcome of {key}", check)

    async def send(self, name: str, text: str, **options: Any) -> int:
        await self.start(name, text, "send", text, options)
        outcome = await self.result(name, text)
        assert "ok" in outcome, outcome
        return outcome["ok"]["id"]

    async def contents(self, name: str) -> list[tuple[int, str]]:
        return [(m["id"], m["content"]) for m in await self.rec(name, "message")]

    async def wait(self, what: str, check: Callable[[], Awaitable[Any]],
                   within: float = 20) -> Any:
        last: Any = None
        with trio.move_on_after(within):
            while not (last := await check()):
                await trio.sleep(0.05)
            return last
        states = await self.page.js("return Object.fromEntries(Object.entries("
                                    "window.clients).map(([n, c]) => [n, c.rec.states]))")
        pytest.fail(f"no {what} within {within:g} s (last: {last!r}); states: {states}")

    async def wait_state(self, name: str, state: str, after: int = 0) -> int:
        """Wait until ``name`` has reported ``state`` after its first ``after`` states;
        returns how many it has reported by then."""
        async def check() -> int:
            states = await self.rec(name, "states")
            return next((i + 1 for i, s in enumerate(states)
                         if i >= after and s["state"] == state), 0)
        return await self.wait(f"{name}: state {state!r}", check)

    async def wait_contents(self, name: str, *wanted: str) -> list[tuple[int, str]]:
        async def check() -> list[tuple[int, str]] | None:
            got = await self.contents(name)
            return got if all(w in [c for _, c in got] for w in wanted) else None
        return await self.wait(f"{name}: messages {wanted!r}", check)

    async def state_count(self, name: str) -> int:
        return len(await self.rec(name, "states"))


def open_config(db: Path, **server: Any) -> Config:
    # The page comes from the proxy or the server; either may open sockets to the other.
    return make_config(db, auth=AuthConfig(allowed_origins=("*",)), shutdown_timeout=2.0,
                       **server)


class Node:
    """One server on a port that stays the same across :meth:`stop` and :meth:`start`."""

    def __init__(self, nursery: trio.Nursery, config: Config) -> None:
        self._nursery = nursery
        self._config = config
        self.port = 0
        self._server: Server | None = None
        self._stopped = trio.Event()

    async def start(self) -> None:
        config = on_port(self._config, self.port)
        self._stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
                      ) -> None:
            try:
                async with trio.open_nursery() as nursery:
                    task_status.started(await start_server(nursery, config))
            finally:
                self._stopped.set()
        self._server = await self._nursery.start(run)
        self.port = self._server.port

    async def stop(self) -> None:
        """A graceful shutdown (members are closed with 1001); returns once it is over."""
        assert self._server is not None
        self._server.shutdown()
        await self._stopped.wait()
        self._server = None


@pytest.fixture
async def clients(browser: OpenPage, nursery: trio.Nursery, tmp_path: Path  # noqa: F811
                  ) -> AsyncIterator[tuple[Clients, Node, Proxy]]:
    """One page of a server (behind a proxy) for ChatClients: "a" goes through the proxy
    in the scenarios that cut the network, the others straight to the server."""
    node = Node(nursery, open_config(tmp_path / "chat.db"))
    await node.start()
    proxy = await nursery.start(Proxy(node.port).run)
    page = await browser(f"http://127.0.0.1:{node.port}/?room=0", "clients")
    yield Clients(page), node, proxy
    await page.js("Object.values(window.clients || {}).forEach((c) => c.client.close())")
    await assert_no_script_errors(page)
    if node._server is not None:
        await node.stop()


async def assert_no_script_errors(page: Page) -> None:
    """No error in the console but the browser's own notes on connections that failed
    (which the faults these tests make cause on purpose)."""
    entries = await page.call(page.driver.get_log, "browser")
    errors = [e["message"] for e in entries if e.get("level") == "SEVERE"
              and not re.search(r"WebSocket connection to '\S+' failed", e["message"])]
    assert not errors, f"{page.name}: errors in the browser console: {errors}"


def via(proxy: Proxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


async def history(port: int, room: int = ROOM) -> list[dict[str, Any]]:
    status, body = await http_call(port, "GET", f"/rooms/{room}/messages?order=asc")
    assert status == 200, body
    return body["messages"]


async def assert_once_in_order(c: Clients, port: int, *names: str) -> None:
    """Every client delivered exactly the room's stored messages, each once, in order."""
    stored = [(m["id"], m["content"]) for m in await history(port)
              if m["message_type"] in ("chat_txt", "chat_img")]
    for name in names:
        assert await c.contents(name) == stored, name


# ---- the scenarios (docs/clients.md, "Client scenarios") -------------------------------

async def scenario_server_restart(c: Clients, node: Node, proxy: Proxy) -> None:
    for name, author in (("a", 1), ("b", 2)):
        await c.make(name, author=author)
        await c.wait_state(name, "open")
    await c.send("a", "before restart")
    await c.wait_contents("b", "before restart")
    seen = {name: await c.state_count(name) for name in "ab"}
    await node.stop()
    for name in "ab":
        count = await c.wait_state(name, "reconnecting", after=seen[name])
        assert (await c.rec(name, "states"))[count - 1]["code"] == 1001
    # Sent while the server is down: it waits in the outbox.
    await c.start("b", "while down", "send", "while down", {})
    await node.start()
    assert "ok" in await c.result("b", "while down")
    await c.send("a", "after restart")
    for name in "ab":
        await c.wait_contents(name, "before restart", "while down", "after restart")
    await assert_once_in_order(c, node.port, "a", "b")


async def scenario_network_cut(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", url=via(proxy), author=1)
    await c.make("b", author=2)
    await c.wait_state("a", "open")
    await c.wait_state("b", "open")
    await c.send("a", "before the cut")
    seen = await c.state_count("a")
    proxy.cut()
    await c.wait_state("a", "reconnecting", after=seen)
    await c.send("b", "during the cut")
    await c.start("a", "while cut", "send", "while cut", {})
    assert (await c.page.js("return window.clients.a.client.outbox.length")) == 1
    proxy.restore()
    await c.result("a", "while cut")
    for name in ("a", "b"):
        await c.wait_contents(name, "before the cut", "during the cut", "while cut")
    await assert_once_in_order(c, node.port, "a", "b")
    resumed = [s for s in await c.rec("a", "states") if s["state"] == "open"][-1]
    assert resumed["resumed"] is True and resumed["since"] >= 1


async def scenario_stalled_network(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", url=via(proxy), author=1)
    await c.make("b", author=2)
    await c.wait_state("a", "open")
    await c.wait_state("b", "open")
    seen = await c.state_count("a")
    proxy.stall()  # the link stays open and forwards nothing
    await c.start("a", "into the stall", "send", "into the stall", {})
    # No ack within ackTimeout: the client gives the connection up by itself.
    count = await c.wait_state("a", "reconnecting", after=seen)
    state = (await c.rec("a", "states"))[count - 1]
    assert "stalled" in state["reason"], state
    proxy.restore()
    assert "ok" in await c.result("a", "into the stall")
    for name in ("a", "b"):
        await c.wait_contents(name, "into the stall")
    await assert_once_in_order(c, node.port, "a", "b")


async def scenario_lost_ack(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", url=via(proxy), author=1)
    await c.wait_state("a", "open")
    seen = await c.state_count("a")
    proxy.stall("down")  # the frame reaches the server; its ack and broadcast do not
    await c.start("a", "ack lost", "send", "ack lost", {})

    async def stored() -> bool:
        return any(m["content"] == "ack lost" for m in await history(node.port))
    await c.wait("the message in the server's history", stored)
    proxy.cut()
    await c.wait_state("a", "reconnecting", after=seen)
    proxy.restore()
    outcome = await c.result("a", "ack lost")
    [message] = [m for m in await history(node.port) if m["content"] == "ack lost"]
    assert outcome["ok"]["id"] == message["id"]
    await c.wait_contents("a", "ack lost")
    await assert_once_in_order(c, node.port, "a")


async def scenario_resend_idempotent(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", author=1)
    await c.wait_state("a", "open")
    first = await c.send("a", "only once", clientMsgId="fixed-id-1")
    await c.wait_contents("a", "only once")
    # The same client_msg_id again (as after a reconnect): the same ack, nothing stored.
    await c.start("a", "again", "send", "only once", {"clientMsgId": "fixed-id-1"})
    again = await c.result("a", "again")
    assert again["ok"]["id"] == first
    assert [m["content"] for m in await history(node.port)] == ["only once"]
    await c.send("a", "next")
    await c.wait_contents("a", "only once", "next")
    await assert_once_in_order(c, node.port, "a")


async def scenario_edit_delete_applied(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", author=1)
    await c.make("b", author=2)
    await c.wait_state("a", "open")
    await c.wait_state("b", "open")
    kept = await c.send("a", "tyop")
    gone = await c.send("a", "regret")
    await c.start("a", "edit", "edit", kept, "typo fixed")
    await c.start("a", "delete", "delete", gone)
    assert "ok" in await c.result("a", "edit")
    assert "ok" in await c.result("a", "delete")
    # Someone else's message cannot be edited: the promise says why.
    theirs = await c.send("b", "mine")
    await c.start("a", "forbidden", "edit", theirs, "not yours")
    assert await c.result("a", "forbidden") == {"error": "forbidden"}
    for name in ("a", "b"):
        edits = await c.wait(f"{name}: the edit", lambda n=name: c.rec(n, "edit"))
        deletes = await c.wait(f"{name}: the delete", lambda n=name: c.rec(n, "delete"))
        assert [(e["target_id"], e["content"]) for e in edits] == [(kept, "typo fixed")]
        assert [d["target_id"] for d in deletes] == [gone]
    # A client joining later gets the messages as they are now.
    await c.make("late", author=3)

    async def replayed() -> dict[int, Any]:
        # History may come in several frames: wait for all three messages.
        by_id = {m["id"]: m for m in await c.rec("late", "message")}
        return by_id if {kept, gone, theirs} <= by_id.keys() else {}
    by_id = await c.wait("late: the three messages of history", replayed)
    assert by_id[kept]["content"] == "typo fixed" and by_id[kept]["edited_at"]
    assert by_id[gone]["content"] == "" and by_id[gone]["deleted_at"]


async def scenario_typing_shown(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", author=1)
    await c.make("b", author=2)
    await c.wait_state("a", "open")
    await c.wait_state("b", "open")
    assert await c.page.js("return window.clients.a.client.typing()") is True
    # Throttled on the client: the server would drop it anyway.
    assert await c.page.js("return window.clients.a.client.typing()") is False
    hints = await c.wait("b: a typing hint", lambda: c.rec("b", "typing"))
    assert [str(h["author_id"]) for h in hints] == ["1"]
    await c.send("a", "after typing")  # the hint came before this: a has none of its own
    await c.wait_contents("a", "after typing")
    assert await c.rec("a", "typing") == []


async def scenario_presence_shown(c: Clients, node: Node, proxy: Proxy) -> None:
    await c.make("a", author=1)
    await c.wait_state("a", "open")
    await c.make("b", author=2)
    await c.wait_state("b", "open")

    async def seen(kind: str, author: str) -> list[Any]:
        events = await c.rec("a", "presence")
        return [e for e in events if e["event"] == kind and str(e["author_id"]) == author]
    [enter] = await c.wait("a: b's arrival", lambda: seen("enter", "2"))
    assert enter["online"] == 2
    assert (await c.page.js("return window.clients.a.client.members()"
                            ".then((m) => m.members)")) == [1, 2]
    await c.page.js("window.clients.b.client.close()")
    [leave] = await c.wait("a: b's departure", lambda: seen("exit", "2"))
    assert leave["online"] == 1


SCENARIOS = {
    "server restart": scenario_server_restart,
    "network cut": scenario_network_cut,
    "stalled network": scenario_stalled_network,
    "lost ack": scenario_lost_ack,
    "resend idempotent": scenario_resend_idempotent,
    "edit/delete applied": scenario_edit_delete_applied,
    "typing shown": scenario_typing_shown,
    "presence shown": scenario_presence_shown,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_scenario(scenario: str, clients: tuple[Clients, Node, Proxy]) -> None:
    await SCENARIOS[scenario](*clients)


async def test_a_token_function_is_asked_on_every_connection(
        browser: OpenPage, nursery: trio.Nursery, tmp_path: Path) -> None:  # noqa: F811
    secret = "a-secret-of-at-least-32-bytes-for-tests"
    config = make_config(tmp_path / "tokens.db", shutdown_timeout=2.0, auth=AuthConfig(
        mode="token", secret=secret, allowed_origins=("*",)))
    node = Node(nursery, config)
    await node.start()
    page = await browser(f"http://127.0.0.1:{node.port}/?room=0", "clients")
    c = Clients(page)
    tokens = [jwt.encode({"sub": "7", "name": "Ada", "n": n}, secret, algorithm="HS256")
              for n in range(2)]
    await c.make("a", tokens=tokens)
    await c.wait_state("a", "open")
    assert await page.js("const c = window.clients.a.client; return [c.author, c.name]") == [
        "7", "Ada"]
    await c.send("a", "signed")
    seen = await c.state_count("a")
    await node.stop()
    await node.start()
    await c.wait_state("a", "open", after=seen)
    assert await c.rec("a", "tokenCalls") >= 2
    await c.send("a", "signed again")
    messages = await c.wait_contents("a", "signed", "signed again")
    assert [str(m["author_id"]) for m in await c.rec("a", "message")] == ["7", "7"]
    assert len(messages) == 2
    await page.js("window.clients.a.client.close()")
    await assert_no_script_errors(page)
    await node.stop()


async def _demo_state(page: Page) -> dict[str, Any]:
    return await page.js("""
        const $ = (id) => document.getElementById(id);
        return {room: $('room').disabled, author: $('author').disabled,
                connect: $('connect').disabled, connectClass: $('connect').className,
                notices: Array.from(document.querySelectorAll('#log .notice'))
                    .map((e) => e.textContent),
                days: document.querySelectorAll('#log .day').length};
    """)


async def test_two_demo_pages_across_a_restart_show_every_message_once_in_order(
        browser: OpenPage, nursery: trio.Nursery, tmp_path: Path) -> None:  # noqa: F811
    node = Node(nursery, open_config(tmp_path / "demo.db"))
    await node.start()
    one, two = await open_pages(
        browser, (page_url(node.port, ROOM, 1) + "&name=Ada", "page 1"),
        (page_url(node.port, ROOM, 2), "page 2"))
    for page in (one, two):
        await page.wait_state("connected")
        # Locked while connected, and Connect is not the highlighted button.
        state = await _demo_state(page)
        assert state["room"] and state["author"] and state["connect"]
        assert state["connectClass"] == "secondary"
    await one.type_message("hello before", press_enter=True)
    await two.wait_contents("hello before")
    await two.type_message("reply before", press_enter=True)
    await one.wait_contents("hello before", "reply before")

    for restart in range(2):
        await node.stop()
        for page in (one, two):
            await page.wait_state("reconnecting")
        await one.type_message(f"one while down {restart}", press_enter=True)
        await node.start()
        for page in (one, two):
            await page.wait_state("connected")
        await two.type_message(f"two after {restart}", press_enter=True)
        for page in (one, two):
            await page.wait_contents(f"one while down {restart}", f"two after {restart}")

    stored = [(str(m["id"]), m["content"]) for m in await history(node.port)]
    assert len(stored) == 6
    for page in (one, two):
        assert [m[:2] for m in await page.messages()] == stored
        await page.assert_no_duplicates()
        state = await _demo_state(page)
        # One line per outage, each ending with where it resumed.
        assert len(state["notices"]) == 2, state["notices"]
        assert all("connection closed (1001" in n and "resumed after #" in n
                   for n in state["notices"]), state["notices"]
        assert state["days"] == 1
        assert await page.js("return document.querySelectorAll('#log [data-presence]')"
                             ".length") <= 3, "arrivals after a resume are folded in"
        await assert_no_script_errors(page)
    # The name given with ?name= labels the author's own messages on that page.
    authors = await one.js("return Array.from(document.querySelectorAll('#log .msg .author'))"
                           ".map((e) => e.textContent)")
    assert authors[:2] == ["Ada", "#2"]

    # Screenshots, with an older day's message fed in to show a date separator.
    await one.js("window.trioChat.handleFrame(JSON.stringify({message_type: 'chat_edit', "
                 "id: 1000, target_id: 1, content: 'hello before (edited)', author_id: 1}))")
    ARTIFACTS.mkdir(exist_ok=True)
    for width, height in ((1280, 800), (390, 844)):
        for page in (one, two):
            await page.call(page.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1,
                             "mobile": width < 600})
            await page.js("document.activeElement && document.activeElement.blur()")
            name = page.name.replace(" ", "")
            await page.call(page.driver.save_screenshot,
                            str(ARTIFACTS / f"demo-{name}-{width}x{height}.png"))
    await node.stop()
