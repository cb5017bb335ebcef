"""Start-up as an operator meets it: real ``trio-chat serve`` processes that cannot
start say why in one line with a documented exit status, also under ``--workers``;
``server.startupWait`` waits for a Redis that comes up late; shutdown exits as soon
as it says it stopped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import redis
import trio

from trio_chat.startup import EXIT_CONFIG, EXIT_LISTEN, EXIT_SERVICE

from .conftest import MYSQL, node_config, start_server
from .wire import free_port

EXIT_TIMEOUT = 120


def serve(tmp_path: Path, sections: dict[str, object], *options: str,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(sections))
    return subprocess.run([sys.executable, "-m", "trio_chat.cli", "serve", str(path),
                           "--sqlite", str(tmp_path / "chat.db"), *options],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT, env=env)


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one error line of a failed start-up, checked to be the only one."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("trio-chat: error: ")
    assert len(result.stderr.splitlines()) < 12, result.stderr
    return errors[0]


@pytest.fixture
def redis_with_password() -> Iterator[int]:
    """A redis-server of this test's own that requires a password."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/services installs it)"
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                "", "--appendonly", "no", "--requirepass", "right-password"],
                               stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="right-password")
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        client.close()
        yield port
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("workers", [1, 2])
def test_unreachable_redis_is_one_line(tmp_path: Path, workers: int) -> None:
    port = free_port()
    result = serve(tmp_path, {"redis": {"host": "127.0.0.1", "port": port},
                              "server": {"port": free_port()}}, "--workers", str(workers))
    line = one_error(result, EXIT_SERVICE)
    assert f"redis: Redis at 127.0.0.1:{port} is unreachable" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_wrong_redis_password_is_one_line(tmp_path: Path, redis_with_password: int,
                                          workers: int) -> None:
    result = serve(tmp_path, {"redis": {"host": "127.0.0.1", "port": redis_with_password,
                                        "password": "wrong"},
                              "server": {"port": free_port()}}, "--workers", str(workers))
    line = one_error(result, EXIT_SERVICE)
    assert f"Redis at 127.0.0.1:{redis_with_password} refused the default user" in line
    assert "redis.password" in line


def test_refused_database_is_one_line(tmp_path: Path) -> None:
    db = {"host": MYSQL["host"], "port": MYSQL["port"], "id": "trio_chat_nobody",
          "password": "nope", "database": "x"}
    line = one_error(serve(tmp_path, {"db": db}, "--port", "0"), EXIT_SERVICE)
    assert "db: MySQL at" in line and "trio_chat_nobody" in line and "1045" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_is_one_line(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, {"redis": {"host": "127.0.0.1", "port": 6379}},
                       "--port", str(port), "--workers", str(workers))
    line = one_error(result, EXIT_LISTEN)
    assert line == f"trio-chat: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_bad_variable_is_one_line_naming_it(tmp_path: Path) -> None:
    env = {**_environ(), "TRIO_CHAT_SERVER_PORT": "70000"}
    line = one_error(serve(tmp_path, {}, env=env), EXIT_CONFIG)
    assert line == ('trio-chat: error: TRIO_CHAT_SERVER_PORT (server.port): expected an '
                    'integer from 0 to 65535, got "70000"')


def test_channels_that_differ_are_refused_unless_a_relay_is_stated(tmp_path: Path) -> None:
    redis_section = {"host": "127.0.0.1", "port": 6379, "listeningChannelName": "chat-in",
                     "publishChannelName": "chat-out"}
    line = one_error(serve(tmp_path, {"redis": redis_section}, "--port", "0"), EXIT_CONFIG)
    assert "'chat-in' differs from redis.publishChannelName 'chat-out'" in line
    assert "give both the same value" in line and "redis.relay" in line


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}


async def _read_until(process: trio.Process, log: bytearray, needle: bytes,
                      timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while needle not in log:
            chunk = await process.stderr.receive_some()
            assert chunk, log.decode()
            log += chunk


async def test_startup_wait_waits_for_a_late_redis(tmp_path: Path) -> None:
    redis_port = free_port()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"redis": {"host": "127.0.0.1", "port": redis_port},
                                "server": {"startupWait": 60}}))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(path), "--port", "0",
         "--sqlite", str(tmp_path / "chat.db")], stderr=subprocess.PIPE)
    late: trio.Process | None = None
    log = bytearray()
    try:
        await _read_until(process, log, b"trying again in")
        assert b"is unreachable" in log and b"server.startupWait 60s" in log
        binary = shutil.which("redis-server")
        assert binary
        late = await trio.lowlevel.open_process(
            [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        await _read_until(process, log, b"listening on")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        if late is not None:
            late.kill()
            await late.wait()


@pytest.mark.parametrize("store", ["sqlite", "mysql+redis"])
async def test_exit_follows_stopped_at_once(tmp_path: Path, store: str, mysql_db) -> None:
    sections: dict[str, object] = {}
    if store != "sqlite":
        sections = {"redis": {"host": "127.0.0.1", "port": 6379,
                              "listeningChannelName": "t-exit", "publishChannelName": "t-exit"},
                    "db": {"host": mysql_db.host, "port": mysql_db.port, "id": mysql_db.id,
                           "password": mysql_db.password, "database": mysql_db.database}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(sections))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(path), "--port", "0",
         "--sqlite", str(tmp_path / "chat.db")], stderr=subprocess.PIPE)
    log = bytearray()
    try:
        await _read_until(process, log, b"listening on")
        process.send_signal(signal.SIGTERM)
        await _read_until(process, log, b"stopped")
        stopped = trio.current_time()
        # Nothing is left to wait for once it says so: no thread, no loop, no
        # teardown of the interpreter's modules (that took 0.2 s to seconds).
        with trio.fail_after(1):
            assert await process.wait() == 0
        exit_delay = trio.current_time() - stopped
    finally:
        process.kill()
        await process.wait()
    # Well under what an interpreter takes to unload trio-chat's modules on this
    # machine at this moment (which is what the exit used to wait for).
    teardown = min([await trio.to_thread.run_sync(_teardown_time) for _ in range(3)])
    assert exit_delay < teardown / 2, (exit_delay, teardown)


def _teardown_time() -> float:
    """How long after its last line a process that imported trio-chat takes to exit."""
    result = subprocess.run([sys.executable, "-c", "import time, trio_chat.cli, "
                             "trio_chat.store.mysql; print(time.monotonic())"],
                            capture_output=True, text=True, timeout=60, check=True)
    return time.monotonic() - float(result.stdout)


def test_unknown_database_user_is_not_waited_for(tmp_path: Path) -> None:
    # A refusal is final: startupWait only waits for a service that is unreachable.
    db = {"host": MYSQL["host"], "port": MYSQL["port"], "id": "trio_chat_nobody",
          "password": "nope", "database": "x"}
    started = time.monotonic()
    result = serve(tmp_path, {"db": db, "server": {"startupWait": 60}}, "--port", "0")
    one_error(result, EXIT_SERVICE)
    assert time.monotonic() - started < 30


async def test_nothing_is_left_waiting_after_the_server_returns(tmp_path: Path,
                                                               mysql_db) -> None:
    # What could hold the exit up after "stopped": a thread that is not a daemon (a
    # thread pool's worker, the SQLite writer) or the asyncio loop still running.
    config = attrs.evolve(node_config(tmp_path / "chat.db", 6379, "t-left"), db=mysql_db)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, config)
        server.shutdown()
    assert server.task is not None and not server.task.child_nurseries
    assert [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon] == []
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_signal_while_waiting_for_redis_stops_at_once(tmp_path: Path,
                                                              workers: int) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"redis": {"host": "127.0.0.1", "port": free_port()},
                                "server": {"startupWait": 600, "port": free_port()}}))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(path), "--workers",
         str(workers), "--sqlite", str(tmp_path / "chat.db")], stderr=subprocess.PIPE)
    log = bytearray()
    try:
        await _read_until(process, log, b"trying again in")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert b"Traceback" not in log
    finally:
        process.kill()
        await process.wait()
