"""Shared fixtures: a real server on 127.0.0.1 port 0 with a SQLite file per test."""

from __future__ import annotations

import gc
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pymysql
import pytest
import redis
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_chat.broker import LocalBroker
from trio_chat.config import (
    AuthConfig,
    Config,
    DbConfig,
    LimitsConfig,
    RedisConfig,
    ServerConfig,
    SqliteConfig,
)
from trio_chat.outbound import PRESENCE_EVENTS
from trio_chat.server import Server

from .wire import free_port

# The Redis scripts/services starts; tests that stop Redis start their own (redis_server).
REDIS_PORT = 6379

MYSQL = {
    "host": os.environ.get("TRIO_CHAT_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("TRIO_CHAT_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("TRIO_CHAT_TEST_MYSQL_USER", "root"),
    "password": os.environ.get("TRIO_CHAT_TEST_MYSQL_PASSWORD", ""),
}


# Tests of other things send as fast as they can; the rate limit has tests of its own.
UNLIMITED = LimitsConfig(messages_per_second=1_000_000, message_burst=1_000_000,
                         identity_messages_per_second=1_000_000,
                         identity_message_burst=1_000_000)


def make_config(db_path: Path, *, db: DbConfig | None = None, limits: LimitsConfig = UNLIMITED,
                auth: AuthConfig | None = None, **server: Any) -> Config:
    return Config(server=ServerConfig(host="127.0.0.1", port=0, **server),
                  sqlite=SqliteConfig(path=str(db_path)), db=db, limits=limits,
                  auth=auth or AuthConfig())


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so a socket a test left open is reported (warnings are
    errors) by that test, not by whichever test runs when the collector comes."""
    yield
    gc.collect()


@pytest.fixture
def mysql_db() -> Iterator[DbConfig]:
    """A fresh MariaDB database for one test, dropped afterwards. MariaDB must be up."""
    name = f"trio_chat_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = pymysql.connect(**MYSQL, charset="utf8mb4", autocommit=True)
    except pymysql.MySQLError as exc:
        pytest.fail(f"MariaDB is not reachable at {MYSQL['host']}:{MYSQL['port']} ({exc}); "
                    "start it (scripts/services) or set TRIO_CHAT_TEST_MYSQL_*")
    try:
        yield DbConfig(id=MYSQL["user"], password=MYSQL["password"], host=MYSQL["host"],
                       port=MYSQL["port"], database=name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def mysql_rows(db: DbConfig, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(host=db.host, port=db.port, user=db.id, password=db.password,
                           database=db.database, charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "mysql"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def any_config(store_kind: str, db_path: Path, request: pytest.FixtureRequest
               ) -> Callable[..., Config]:
    """Build a server config on the parametrised store (SQLite file or a fresh MariaDB)."""
    db = request.getfixturevalue("mysql_db") if store_kind == "mysql" else None
    return lambda **server: make_config(db_path, db=db, **server)


async def start_server(nursery: trio.Nursery, config: Config) -> Server:
    """A started server whose background start-up work is done (so task counts settle)."""
    server = Server.build(config)
    await nursery.start(server.run)
    if isinstance(server.broker, LocalBroker):
        await server.broker.loaded.wait()
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


def task_census(root: trio.lowlevel.Task) -> Counter[str]:
    """How many tasks of each name run under ``root``, itself included."""
    census: Counter[str] = Counter()
    stack = [root]
    while stack:
        task = stack.pop()
        census[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return census


async def wait_no_tasks_beyond(root: trio.lowlevel.Task, baseline: Counter[str],
                               timeout: float = 20, *,
                               census: Callable[[], Counter[str]] | None = None) -> None:
    """Wait until no kind of task under ``root`` outnumbers ``baseline``: whatever was
    started since has ended. Compared kind by kind rather than as one total, so a task
    that was still ending when the baseline was taken cannot hide a leak nor keep the
    total from ever matching. ``census`` counts the tasks instead of
    :func:`task_census` (one that discounts tasks known to come and go)."""
    count = census or (lambda: task_census(root))
    try:
        await wait_until(lambda: not count() - baseline, timeout)
    except trio.TooSlowError:
        raise AssertionError(f"tasks beyond the baseline: {count() - baseline}") from None


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


@pytest.fixture
def channel() -> str:
    """A Redis channel prefix of this test's own, so tests never hear each other."""
    return f"trio-chat-test-{secrets.token_hex(4)}"


def node_config(db_path: Path, port: int, channel: str, **server: Any) -> Config:
    """A node sharing rooms through the Redis (or Redis Cluster node) on 127.0.0.1:``port``."""
    config = make_config(db_path, **server)
    return attrs.evolve(config, redis=RedisConfig(host="127.0.0.1", port=port,
                                                  listening_channel_name=channel,
                                                  publish_channel_name=channel))


@pytest.fixture
def redis_server() -> Iterator[Callable[[], int]]:
    """A redis-server of the test's own on its own port; call it to (re)start it."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/services installs it)"
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no"],
                                   stdout=subprocess.DEVNULL)
        processes.append(process)
        for _ in range(200):
            try:
                redis.Redis(port=port).ping()
                return port
            except redis.ConnectionError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    start.processes = processes  # type: ignore[attr-defined]
    yield start
    for process in processes:
        process.kill()
        process.wait()


async def listening_port(process: trio.Process, timeout: float = 30) -> int:
    """The port a ``trio-chat serve --port 0`` process (stderr piped) says it listens on."""
    log = b""
    with trio.fail_after(timeout):
        while not (match := re.search(rb"listening on http://127.0.0.1:(\d+)/", log)):
            chunk = await process.stderr.receive_some()
            assert chunk, log.decode()
            log += chunk
    return int(match.group(1))


async def recv_text(ws: WebSocketConnection, timeout: float = 15, *, events: bool = False
                    ) -> str:
    """The next frame as sent; presence events (chat_enter, chat_exit) are passed over
    unless ``events``."""
    with trio.fail_after(timeout):
        while True:
            text = await ws.get_message()
            if events or json.loads(text).get("message_type") not in PRESENCE_EVENTS:
                return text


async def recv(ws: WebSocketConnection, timeout: float = 15, *, events: bool = False
               ) -> dict[str, Any]:
    """The next frame, decoded; presence events are passed over unless ``events``."""
    return json.loads(await recv_text(ws, timeout, events=events))
