"""`trio-chat chat` in a real terminal (tmux): typing sends, a server restart shows one
status line that counts down and then says where it resumed, and Ctrl-C exits at once
with status 0 and no traceback."""

from __future__ import annotations

import re
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from trio_chat.client import open_chat

from .conftest import wait_until
from .test_client import ROOM, restartable


@attrs.define
class Tmux:
    """A tmux server of the test's own (its own socket), holding one pane."""

    binary: str
    socket: str

    async def run(self, *args: str) -> str:
        done = await trio.run_process([self.binary, "-L", self.socket, "-f", "/dev/null",
                                       *args], capture_stdout=True)
        return done.stdout.decode()

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", "chat")

    async def wait_for(self, pattern: str, timeout: float = 20) -> str:
        with trio.fail_after(timeout):
            while not re.search(pattern, screen := await self.screen()):
                await trio.sleep(0.05)
        return screen


@asynccontextmanager
async def tmux_pane(command: str) -> AsyncIterator[Tmux]:
    binary = shutil.which("tmux")
    assert binary, "tmux is not installed"
    tmux = Tmux(binary, f"trio-chat-test-{secrets.token_hex(4)}")
    await tmux.run("new-session", "-d", "-s", "chat", "-x", "150", "-y", "40", command)
    try:
        yield tmux
    finally:
        with trio.move_on_after(5, shield=True):
            await tmux.run("kill-server")


async def test_the_terminal_chat_under_tmux(tmp_path: Path) -> None:
    exit_file = tmp_path / "exit-status"
    async with restartable(tmp_path) as node:
        assert node.server is not None
        url = f"http://127.0.0.1:{node.server.port}"
        command = (f"{sys.executable} -m trio_chat.cli chat {url} --room {ROOM} "
                   f"--author-id 4; echo $? > {exit_file}; sleep 60")
        async with open_chat(url, ROOM, author_id=9, backoff_max=0.5) as other, \
                tmux_pane(command) as tmux:
            await tmux.wait_for(f"connected to room {ROOM}")
            await tmux.run("send-keys", "-t", "chat", "hello from tmux", "Enter")
            with trio.fail_after(20):
                async for message in other:
                    if message.content == "hello from tmux":
                        break
            assert message.author_id == 4
            await tmux.wait_for(r"#4: hello from tmux")

            await node.stop()
            screen = await tmux.wait_for(r"reconnecting( in \d+\.\d s)?…")
            await node.start()
            screen = await tmux.wait_for(r"resumed after #\d+")
            assert f"resumed after #{message.id}" in screen, screen
            assert "reconnecting" not in screen, "the status line is replaced, not kept"
            assert "Error" not in screen and "CloseReason" not in screen, screen

            await tmux.run("send-keys", "-t", "chat", "C-c")
            with trio.fail_after(1):
                await wait_until(lambda: exit_file.exists()
                                 and exit_file.read_text().strip() != "")
            assert exit_file.read_text().strip() == "0"
            screen = await tmux.screen()
            assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen
