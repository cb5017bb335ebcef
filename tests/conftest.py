"""Shared fixtures: a real server on 127.0.0.1 port 0 with a SQLite file per test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_chat.config import Config, ServerConfig, SqliteConfig
from trio_chat.server import Server


def make_config(db_path: Path, **server: Any) -> Config:
    return Config(server=ServerConfig(host="127.0.0.1", port=0, **server),
                  sqlite=SqliteConfig(path=str(db_path)))


async def start_server(nursery: trio.Nursery, config: Config) -> Server:
    server = Server.build(config)
    await nursery.start(server.run)
    return server


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
async def server(nursery: trio.Nursery, db_path: Path) -> Server:
    return await start_server(nursery, make_config(db_path))


async def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def ws_url(server: Server, room: int | str, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/ws/{room}{query}"


def chat_frame(content: Any = "hello", *, author_id: Any = 11, room_id: Any = 123,
               message_type: Any = "chat_txt", create_at: Any = "2022-06-05T12:00:00.000Z",
               **extra: Any) -> str:
    """A frame exactly as the seed's JavaScript example builds it (room_id=None omits it)."""
    frame: dict[str, Any] = {"message_type": message_type, "author_id": author_id}
    if room_id is not None:
        frame["room_id"] = room_id
    frame.update(content=content, create_at=create_at, **extra)
    return json.dumps(frame)


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's client, closing its socket also when the server closed first.

    trio-websocket 0.12's ``aclose`` returns early once the peer has closed and
    leaves the socket to the garbage collector (a ResourceWarning, an error here).
    """
    connection: WebSocketConnection | None = None
    try:
        async with open_websocket_url(url, **kwargs) as connection:
            yield connection
    finally:
        if connection is not None:
            await trio.aclose_forcefully(connection._stream)
