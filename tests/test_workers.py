"""``trio-chat serve --workers N``: real processes sharing a real port, stopped together."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import psutil
import pytest
import trio

from .conftest import chat_frame, open_ws, recv
from .rawws import http_get, read_http_response
from .wire import free_port

REDIS = {"host": "127.0.0.1", "port": 6379}
# Generous: a loaded CI machine starts Python processes slowly.
START_TIMEOUT = 60
STOP_TIMEOUT = 30


def write_config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(sections))
    return path


def listening_on(process: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in process.net_connections(kind="tcp"))
    except psutil.NoSuchProcess:
        return False


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@attrs.define
class Cluster:
    supervisor: trio.Process
    workers: list[psutil.Process]
    port: int
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def open_cluster(tmp_path: Path, count: int = 2, redis: dict[str, object] = REDIS
                       ) -> AsyncIterator[Cluster]:
    """``serve --workers count`` in its own session (as a shell would start it), its
    output in a file; yields once every worker listens on the port."""
    port = free_port()
    config = write_config(tmp_path, redis=redis, server={"port": port, "shutdownTimeout": 5})
    log_path = tmp_path / "supervisor.log"
    workers: list[psutil.Process] = []
    with log_path.open("wb") as log_file:
        supervisor = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_chat.cli", "serve", str(config), "--workers",
             str(count), "--sqlite", str(tmp_path / "chat.db")],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        parent = psutil.Process(supervisor.pid)
        with trio.fail_after(START_TIMEOUT):
            while True:
                assert supervisor.returncode is None, log_path.read_text()
                workers = parent.children()
                if len(workers) == count and all(listening_on(w, port) for w in workers):
                    break
                await trio.sleep(0.05)
        yield Cluster(supervisor, workers, port, log_path)
    finally:
        for worker in workers:
            if not gone(worker):
                worker.kill()
        supervisor.kill()
        await supervisor.wait()


async def healthz(port: int) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = await read_http_response(stream)
    assert json.loads(body)["status"] == "ok"
    return status


async def wait_gone(workers: list[psutil.Process]) -> None:
    with trio.fail_after(STOP_TIMEOUT):
        while not all(gone(w) for w in workers):
            await trio.sleep(0.05)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trio_chat.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("redis", [None, {"host": "", "port": 6379}])
def test_workers_without_redis_is_one_line_naming_both(tmp_path: Path, redis) -> None:
    sections: dict[str, object] = {"server": {"port": free_port()}}
    if redis is not None:
        sections["redis"] = redis  # an empty host counts as no redis section
    result = _serve(str(write_config(tmp_path, **sections)), "--workers", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio-chat: error: --workers 2 ")
    assert "redis" in lines[0]
    assert "Traceback" not in result.stderr


def test_workers_on_port_0_is_one_line(tmp_path: Path) -> None:
    result = _serve(str(write_config(tmp_path, redis=REDIS)), "--workers", "3", "--port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio-chat: error: --workers 3 ") and "port" in lines[0]


def test_help_documents_workers() -> None:
    result = _serve("--help")
    assert result.returncode == 0
    assert "--workers N" in result.stdout and "Redis" in result.stdout
    assert "--supervisor" not in result.stdout  # internal


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
async def test_workers_share_the_port_and_stop_together(tmp_path: Path, how: str) -> None:
    async with open_cluster(tmp_path) as cluster:
        pids = {w.pid for w in cluster.workers}
        assert len(pids) == 2 and cluster.supervisor.pid not in pids
        for worker in cluster.workers:  # its own session: no terminal signal reaches it
            assert os.getsid(worker.pid) == worker.pid
        for _ in range(20):
            assert await healthz(cluster.port) == 200
        if how == "ctrl-c":  # a terminal signals the whole foreground process group
            os.killpg(cluster.supervisor.pid, signal.SIGINT)
        else:
            cluster.supervisor.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            assert await cluster.supervisor.wait() == 0, cluster.log
        await wait_gone(cluster.workers)
        log = cluster.log
        # Each worker stopped gracefully, on exactly one signal.
        for index in (1, 2):
            assert f"[worker {index}/2] trio_chat: SIGTERM: shutting down gracefully" in log
            assert f"[worker {index}/2] trio_chat.server: store flushed; stopped" in log
        assert "second" not in log and "killing" not in log, log


async def test_a_killed_worker_stops_the_others(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        victim, other = cluster.workers
        victim.kill()
        with trio.fail_after(STOP_TIMEOUT):
            assert await cluster.supervisor.wait() == 1, cluster.log
        await wait_gone([other])
        log = cluster.log
        assert f"(pid {victim.pid}) was killed by SIGKILL on its own: stopping the others" in log
        assert "store flushed; stopped" in log  # the other one still stopped gracefully


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        cluster.supervisor.kill()
        await cluster.supervisor.wait()
        await wait_gone(cluster.workers)
        log = cluster.log
        for index in (1, 2):
            assert f"[worker {index}/2] trio_chat: the supervisor (pid " \
                   f"{cluster.supervisor.pid}) is gone" in log


def chatting_on(process: psutil.Process, port: int) -> int:
    """Established connections of ``process`` on the shared ``port``."""
    try:
        return sum(1 for c in process.net_connections(kind="tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
    except psutil.NoSuchProcess:
        return 0


async def test_clients_on_different_workers_chat_as_one_room(tmp_path: Path) -> None:
    channel = f"trio-chat-test-{secrets.token_hex(4)}"
    redis = {**REDIS, "listeningChannelName": channel, "publishChannelName": channel}
    async with open_cluster(tmp_path, redis=redis) as cluster, AsyncExitStack() as stack:
        url = f"ws://127.0.0.1:{cluster.port}/ws/31"
        clients = []
        # The kernel picks a worker for each connection by a hash of its addresses:
        # connect until both workers hold some (16 all on one: 1 in 32768).
        while len(clients) < 16 or not all(chatting_on(w, cluster.port) for w in cluster.workers):
            assert len(clients) < 64, "SO_REUSEPORT put every connection on one worker"
            clients.append(await stack.enter_async_context(
                open_ws(f"{url}?author_id={len(clients)}")))
        for n, ws in enumerate(clients):
            await ws.send_message(chat_frame(f"from {n}", room_id=31, author_id=n))
        views = [[(m["id"], m["content"]) for m in [await recv(ws) for _ in clients]]
                 for ws in clients]
        assert all(view == views[0] for view in views), "one order on both workers"
        assert [i for i, _ in views[0]] == list(range(1, len(clients) + 1))
        assert sorted(c for _, c in views[0]) == sorted(f"from {n}" for n in range(len(clients)))
        # Either worker answers, with every author from both.
        with trio.fail_after(20):
            while True:
                status, _, body = await http_get(cluster.port, "/rooms/31/members")
                assert status == 200, body
                if json.loads(body)["members"] == list(range(len(clients))):
                    break
                await trio.sleep(0.05)
