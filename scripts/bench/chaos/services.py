"""What the chaos run starts and breaks: a redis-server of its own and the trio-chat
nodes, each behind a proxy that can cut it off."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import attrs
import psutil
import pymysql
import trio

from bench.chaos.common import (
    LISTENING,
    MYSQL,
    START_TIMEOUT,
    Events,
    metrics,
    poll_until,
    redis_ping,
    spawn,
    tail,
)


@attrs.define(eq=False)
class Redis:
    """A redis-server of the run's own, on a fixed port so a restart keeps its address."""

    port: int
    workdir: Path
    events: Events
    process: trio.Process | None = None
    # Processes the run stopped on purpose: their exit is no death.
    stopped: set[trio.Process] = attrs.field(factory=set)

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    async def start(self, nursery: trio.Nursery) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is not installed (scripts/services installs it)")
        self.process = process = await spawn(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
             "--logfile", str(self.log_path)], stdout=subprocess.DEVNULL)
        nursery.start_soon(self._watch, process)
        with trio.move_on_after(START_TIMEOUT) as waiting:
            await poll_until(lambda: redis_ping(self.port))
        if waiting.cancelled_caught:
            raise SetupError(f"redis-server did not answer on port {self.port}:\n"
                             f"{tail(self.log_path)}")

    async def _watch(self, process: trio.Process) -> None:
        code = await process.wait()
        if process not in self.stopped:
            self.events.deaths.append(f"redis-server exited with {code} on its own "
                                      f"at {self.events.clock.now():.1f}s")
            self.events.note(f"redis-server exited with {code} on its own")

    async def kill(self) -> None:
        assert self.process is not None
        self.stopped.add(self.process)
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)


class SetupError(Exception):
    """The run could not start its services; nothing was checked."""


@attrs.define(eq=False)
class Node:
    """One ``trio-chat serve`` process slot: started, killed and restarted on one port."""

    index: int
    config: Path
    workdir: Path
    events: Events
    port: int = 0
    process: trio.Process | None = None
    stopped: set[trio.Process] = attrs.field(factory=set)
    # Redis's and the database proxy's ports: the node's backend connections.
    backend_ports: frozenset[int] = frozenset()
    # own_tasks() at the first start, before any client came.
    baseline_tasks: int | None = None
    restarts_after_death: int = 0
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    _log: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def _open_log(self, banner: str) -> IO[bytes]:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"===== chaos: {banner} =====\n".encode())
        self._log.flush()
        return self._log

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def start(self, nursery: trio.Nursery, why: str = "start") -> None:
        """Start the node and return once it listens (on ``port``, or a free one at first)."""
        log_file = self._open_log(f"{why} at {self.events.clock.now():.2f}s")
        self.process = process = await spawn(
            [sys.executable, "-m", "trio_chat.cli", "serve", str(self.config),
             "--port", str(self.port)], stdout=log_file, stderr=subprocess.PIPE)
        listening = trio.Event()
        nursery.start_soon(self._pump, process, log_file, listening)
        with trio.move_on_after(START_TIMEOUT):
            await listening.wait()
        if process.returncode is not None or not listening.is_set():
            self.stopped.add(process)
            process.kill()
            await process.wait()
            raise SetupError(f"{self.name} did not start ({why}):\n{tail(self.log_path)}")
        nursery.start_soon(self._watch, nursery, process)

    async def _pump(self, process: trio.Process, log_file: IO[bytes],
                    listening: trio.Event) -> None:
        """Copy the node's stderr to its log; say when it listens."""
        assert process.stderr is not None
        seen = b""
        async with process.stderr:
            while chunk := await process.stderr.receive_some(65536):
                log_file.write(chunk)
                log_file.flush()
                if not listening.is_set():
                    seen += chunk
                    if match := LISTENING.search(seen):
                        self.port = int(match.group(1))
                        listening.set()
        listening.set()  # exited before listening: start() sees the returncode

    async def _watch(self, nursery: trio.Nursery, process: trio.Process) -> None:
        code = await process.wait()
        if process in self.stopped:
            return
        self.events.deaths.append(f"{self.name} (pid {process.pid}) exited with {code} "
                                  f"on its own at {self.events.clock.now():.1f}s")
        self.events.note(f"{self.name} exited with {code} on its own")
        # Start it again so the rest of the run still checks something; the death is
        # already counted. A node that keeps dying is left down.
        if self.restarts_after_death < 3:
            self.restarts_after_death += 1
            async with self.lock:
                try:
                    await self.start(nursery, "restart after an unexpected exit")
                except SetupError as exc:
                    self.events.problems.append(str(exc))

    async def kill(self) -> None:
        assert self.process is not None
        self.stopped.add(self.process)
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self, grace: float) -> None:
        """SIGTERM (a graceful stop), SIGKILL after ``grace`` seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.stopped.add(process)
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            self.events.note(f"{self.name} still running {grace:g}s after SIGTERM: killed")
            process.kill()
            await process.wait()
        elif process.returncode != 0:
            self.events.note(f"{self.name} exited with {process.returncode} after SIGTERM")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def backend_connections(self) -> int:
        assert self.process is not None
        return sum(1 for c in psutil.Process(self.process.pid).net_connections("tcp")
                   if c.raddr and c.raddr.port in self.backend_ports
                   and c.status == psutil.CONN_ESTABLISHED)

    async def own_tasks(self) -> tuple[int, int] | None:
        """``triochat_trio_tasks`` less the node's open backend connections, and those.

        trio-asyncio runs one reader task per socket asyncio watches, and the Redis and
        MySQL pools keep the connections a busy moment opened: the raw count follows the
        pools, which is no leak. None while a connection opened or closed meanwhile.
        """
        before = self.backend_connections()
        tasks = int((await metrics(self.port))["triochat_trio_tasks"])
        after = self.backend_connections()
        return (tasks - after, after) if after == before else None


# --- the clients ----------------------------------------------------------------------------


def channel_of(workdir: Path) -> str:
    """The run's Redis channel prefix, for listening and publishing alike."""
    return f"trio-chat-chaos-{workdir.name}"


def write_config(path: Path, workdir: Path, db_port: int, database: str, redis_port: int
                 ) -> None:
    channel = channel_of(workdir)
    path.write_text(json.dumps({
        # A killed node's acked messages are written by the other within seconds.
        "server": {"host": "127.0.0.1", "port": 0, "shutdownTimeout": 5,
                   "orphanedAfter": 5},
        "sqlite": {"path": str(workdir / "unused.db")},
        "db": {"host": "127.0.0.1", "port": db_port, "id": MYSQL["user"],
               "password": MYSQL["password"], "database": database},
        "redis": {"host": "127.0.0.1", "port": redis_port,
                  "listeningChannelName": channel, "publishChannelName": channel},
        # The clients are the run's load, not abuse.
        "limits": {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                   "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000,
                   "floodLimit": 1_000_000, "connectionsPerIp": 1_000_000,
                   "httpConnectionsPerIp": 1_000_000,
                   "outboundBytesPerIp": 1 << 40, "outboundBytesTotal": 1 << 40,
                   "inboundBytesPerIp": 1 << 40, "inboundBytesTotal": 1 << 40},
        "logger": {"level": "info"}}, indent=2))


def stored_rows(database: str, rooms: list[int]) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                           password=MYSQL["password"], database=database, charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT room_id, id, author_id, client_msg_id, content FROM messages "
                        f"WHERE room_id IN ({', '.join(['%s'] * len(rooms))})", rooms)
            return list(cur.fetchall())
    finally:
        conn.close()
