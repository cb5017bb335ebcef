#!/usr/bin/env python
"""A chaos run: failures stay where they happen.

Starts two ``trio-chat serve`` nodes sharing a private redis-server and a fresh
MariaDB database, reached through a TCP proxy this script controls, and clients
(``trio_chat.client.open_chat``) chatting in a few rooms, each client on one of
the two nodes and each room with members on both. While they chat, a seeded
schedule breaks things in turn, with quiet periods between so recovery shows:

- ``redis-kill``: SIGKILL the redis-server, restart it on the same port;
- ``redis-pause``: SIGSTOP it for a while, then SIGCONT (a hung Redis);
- ``redis-garbage``: publish malformed payloads on every room's channel (truncated
  JSON, a message without fields, a broken control command, plain text);
- ``db-cut``: the proxy drops every database connection and refuses new ones;
- ``db-pause``: the proxy holds every byte of the database link (a dead link that
  heals before TCP gives up: nothing is lost, only late);
- ``node-kill``: SIGKILL one node, restart it on the same port (its clients
  reconnect, resume with ``since=`` and resend their outboxes);
- ``node-kill-lagging``: pause the database link, SIGKILL a node halfway through
  (its store buffer then holds messages it acked), restore, restart it.

Redis runs with ``--appendonly yes --appendfsync always`` in the run's temporary
directory, so a SIGKILLed Redis comes back with everything it acknowledged
(counters, recent lists, idempotency records): what a Redis crash tests here is
trio-chat's recovery, not Redis losing data.

Then sending stops and the run settles: it waits (under deadlines, for
conditions, never a fixed sleep) until every send was answered, every reader
caught up with its room's last acked id and both nodes wrote their store
buffers; it then checks, and prints one summary line:

- every acked message is stored once at its acked id (MariaDB, queried
  directly) and no message is stored twice;
- every reader received every acked message of its room once, in id order, and
  all readers of a room saw the same sequence;
- every send was answered, none refused for good (transient refusals the client
  resent are counted);
- after the clients leave, each node's ``triochat_trio_tasks`` is back to what it
  was before they came (for a restarted node: what the node had at its first
  start, the same configuration idle), less one task per open Redis or database
  connection: trio-asyncio watches each socket with a task, and the pools keep the
  connections a busy moment opened, which is no leak;
- no client lost its connection but to its own node's death (with Redis or the
  database down, members stay connected);
- no node or Redis process died that the schedule did not kill.

Exit status 0 on PASS, 1 on FAIL (with what failed, when the faults happened and
the tail of each log), 2 when the run could not be set up. MariaDB is
``TRIO_CHAT_TEST_MYSQL_HOST``/``_PORT``/``_USER``/``_PASSWORD`` (default root with
no password on 127.0.0.1:3306), as for the tests; the run's database is
``trio_chat_chaos_<hex>``, dropped at the end. Every process the run starts is
stopped on the way out, also on failure, Ctrl-C or SIGTERM.

    python scripts/chaos.py --duration 60 --seed 1
    python scripts/chaos.py --faults none             # the checker alone must pass
    python scripts/chaos.py --faults node-kill -v     # one kind, with the timeline
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import attrs
import psutil
import pymysql
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.proxy import Proxy  # noqa: E402
from trio_chat.client import Chat, ChatError, open_chat  # noqa: E402

FAULTS = ("redis-kill", "redis-pause", "redis-garbage", "db-cut", "db-pause", "node-kill",
          "node-kill-lagging")
# What redis-garbage publishes on each room's channel.
GARBAGE = ('{"id": 1, "room_id": ', '{"id": "one"}', '{"control": ', "not json at all")
MYSQL = {
    "host": os.environ.get("TRIO_CHAT_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("TRIO_CHAT_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("TRIO_CHAT_TEST_MYSQL_USER", "root"),
    "password": os.environ.get("TRIO_CHAT_TEST_MYSQL_PASSWORD", ""),
}
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)/")
# Deadlines of the settle phase: long enough for every backoff in play (the client's
# 2 s, the Redis broker's 5 s, the store writer's) to have fired several times.
SETTLE_SENDS = 60.0
SETTLE_READERS = 30.0
SETTLE_STORE = 30.0
# Messages still in the rooms' Redis logs (acked, not yet in MariaDB).
LOGGED = ("local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
          "n = n + redis.call('XLEN', k) end return n")
SETTLE_TASKS = 30.0
START_TIMEOUT = 30.0
HTTP_TIMEOUT = 5.0
# Seconds per fault and the quiet after it: long enough for a Redis outage to outlast
# a send's 3 s hold, and for the clients' backoff (2 s at most) to reconnect.
SLOT = 11.0
# Every process this script started, for the last-resort kill outside trio.run.
_CHILDREN: list[trio.Process] = []


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the services ---------------------------------------------------------------------------

@attrs.define(eq=False)
class Clock:
    """Seconds since the chaos phase began (negative while setting up)."""

    t0: float = attrs.field(factory=trio.current_time)

    def now(self) -> float:
        return trio.current_time() - self.t0


@attrs.define(eq=False)
class Events:
    """What happened to the services, in order, with the run's clock."""

    clock: Clock
    lines: list[tuple[float, str]] = attrs.field(factory=list)
    # (kind, target, start, healed): the faults as they were applied.
    windows: list[tuple[str, str, float, float]] = attrs.field(factory=list)
    deaths: list[str] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)
    verbose: bool = False

    def note(self, text: str) -> None:
        self.lines.append((self.clock.now(), text))
        if self.verbose:
            log(f"[{self.clock.now():7.2f}s] {text}")

    def node_down(self, name: str, t: float) -> bool:
        """Whether ``t`` falls while node ``name`` was killed (or just restarted)."""
        return any(kind.startswith("node-kill") and target == name
                   and start <= t <= healed + 2.0
                   for kind, target, start, healed in self.windows)

    def around(self, t: float) -> str:
        """The fault ``t`` fell in, or the last one before it."""
        last = "before any fault"
        for kind, target, start, healed in self.windows:
            if start <= t <= healed:
                return f"during {kind} {target} [{start:.1f}s-{healed:.1f}s]"
            if healed < t:
                last = f"{t - healed:.1f}s after {kind} {target} [{start:.1f}s-{healed:.1f}s]"
        return last


async def spawn(command: list[str], **options: Any) -> trio.Process:
    # Own session: a terminal's Ctrl-C reaches this script only, which stops them all.
    process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL,
                                               start_new_session=True, **options)
    _CHILDREN.append(process)
    return process


async def poll_until(check: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    """Poll an outside condition (a port, a metric) until it holds; the caller sets the
    deadline."""
    while not await check():  # noqa: ASYNC110 (another process's state: no event to wait on)
        await trio.sleep(interval)


async def redis_ping(port: int) -> bool:
    try:
        with trio.fail_after(1):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PING\r\n")
                # -LOADING while it replays its append-only file.
                return (await stream.receive_some(64)).startswith(b"+PONG")
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


async def redis_command(port: int, *args: str) -> bytes:
    """One command over RESP; returns the raw reply."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            return await stream.receive_some(4096)


async def http_get(port: int, path: str) -> str:
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"GET {path}: {head[:60]!r}")
    return body.decode()


async def metrics(port: int) -> dict[str, float]:
    values = {}
    for line in (await http_get(port, "/metrics")).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def complaints(path: Path, most: int = 12) -> list[str]:
    """A node log's WARNING and ERROR lines, each kind once (the first, with a count):
    what went wrong, without the tracebacks' bulk."""
    seen: dict[str, list[Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if match := re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)", line):
            # Digits vary (times, ports, ids): the kind is the rest.
            kind = re.sub(r"\d+", "#", match.group(2))[:120]
            seen.setdefault(kind, [line, 0])[1] += 1
    return [f"{line}" + (f"  [x{count}]" if count > 1 else "")
            for line, count in list(seen.values())[:most]]


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

@attrs.define(eq=False)
class Sent:
    """One ``chat.send()``: its unique content, and how the server answered it."""

    content: str
    room: int
    author: int
    node: int
    started: float
    acked_id: int | None = None
    acked_at: float | None = None
    error: str | None = None


@attrs.define(eq=False)
class Progress:
    """Wakes whoever waits for a condition on the clients' state when that state changes."""

    _changed: trio.Event = attrs.field(factory=trio.Event)

    def bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


@attrs.define(eq=False)
class Client:
    """One chat member: sends at a steady rate, reads everything its room delivers."""

    index: int
    room: int
    author: int
    node: Node
    rate: float
    clock: Clock
    progress: Progress
    sent: list[Sent] = attrs.field(factory=list)
    # (id, content, author_id) as the application received them, in order.
    delivered: list[tuple[int, str, int]] = attrs.field(factory=list)
    states: list[tuple[float, str, str]] = attrs.field(factory=list)
    # When the client resent a refused frame, and which (by content).
    resends: list[float] = attrs.field(factory=list)
    resent: set[str] = attrs.field(factory=set)
    in_flight: int = 0
    sending: bool = False
    connected: trio.Event = attrs.field(factory=trio.Event)
    chat: Chat | None = None

    @property
    def name(self) -> str:
        return f"client{self.index}(author {self.author}, room {self.room}, {self.node.name})"

    def journey(self, sent: Sent) -> str:
        """What happened to ``sent`` on the way: refusals resent, reconnections."""
        end = sent.acked_at if sent.acked_at is not None else math.inf
        drops = [f"{t:.1f}s ({detail})" for t, state, detail in self.states
                 if state == "reconnecting" and sent.started <= t <= end]
        return ((", refused and resent" if sent.content in self.resent else "")
                + (f", reconnected meanwhile: {'; '.join(drops[:2])}" if drops else ""))

    async def run(self, go: trio.Event, stop: trio.Event, close: trio.Event) -> None:
        url = f"http://127.0.0.1:{self.node.port}"
        # The default liveness window; a short backoff, so recovery fits the quiet periods.
        async with open_chat(url, self.room, author_id=self.author, backoff_first=0.2,
                             backoff_max=2) as chat:
            self.chat = chat
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, chat)
                nursery.start_soon(self._watch_states, chat)
                nursery.start_soon(self._send_steadily, chat, go, stop)
                await close.wait()
                nursery.cancel_scope.cancel()

    async def _read(self, chat: Chat) -> None:
        async for message in chat:
            self.delivered.append((message.id, message.content, message.author_id))
            self.progress.bump()

    async def _watch_states(self, chat: Chat) -> None:
        async for change in chat.states():
            self.states.append((self.clock.now(), change.state, change.detail))
            if change.state in ("connected", "resumed"):
                self.connected.set()

    async def _send_steadily(self, chat: Chat, go: trio.Event, stop: trio.Event) -> None:
        await go.wait()
        self.sending = True
        # Sends overlap (each waits for its ack), so an outage fills the outbox; the
        # limit only keeps a very long outage from growing it without bound.
        slots = trio.Semaphore(500)
        try:
            async with trio.open_nursery() as sends:
                due, seq = trio.current_time(), 0
                while not stop.is_set():
                    await slots.acquire()
                    sends.start_soon(self._send_one, chat, seq, slots)
                    seq += 1
                    due = max(due + 1 / self.rate, trio.current_time())
                    with trio.move_on_at(due):
                        await stop.wait()
        finally:
            self.sending = False
            self.progress.bump()

    async def _send_one(self, chat: Chat, seq: int, slots: trio.Semaphore) -> None:
        sent = Sent(f"r{self.room}-a{self.author}-{seq}", self.room, self.author,
                    self.node.index, self.clock.now())
        self.sent.append(sent)
        self.in_flight += 1
        try:
            sent.acked_id = await chat.send(sent.content)
            sent.acked_at = self.clock.now()
        except ChatError as exc:
            sent.error = exc.code
        except Exception as exc:  # not the client's contract: recorded, judged as refused
            sent.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            slots.release()
            self.progress.bump()


@contextmanager
def counting_resends(clients: dict[int, Client]) -> Iterator[None]:
    """Count the refusals the client resends: it schedules each with ``_send_later``
    and reports them nowhere else."""
    original = Chat._send_later

    async def counted(self: Chat, ws: Any, client_msg_id: str) -> None:
        client = clients.get(id(self))
        frame = self._core.pending_frame(client_msg_id)
        if client is not None and frame is not None:
            client.resends.append(client.clock.now())
            client.resent.add(json.loads(frame).get("content", ""))
        await original(self, ws, client_msg_id)

    Chat._send_later = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        Chat._send_later = original  # type: ignore[method-assign]


# --- the schedule ---------------------------------------------------------------------------

@attrs.frozen
class Fault:
    kind: str
    start: float
    length: float
    node: int


def schedule(duration: float, kinds: tuple[str, ...], seed: int) -> list[Fault]:
    """One fault per slot of about ``SLOT`` seconds (at least one slot per kind): broken
    for 40 to 60% of the slot, then quiet. Kinds come in turn, in a fresh order each
    round, so every kind is applied before any is applied again."""
    if not kinds:
        return []
    rng = random.Random(seed)
    warmup = min(5.0, max(2.0, duration * 0.1))
    slots = max(len(kinds), round((duration - warmup) / SLOT))
    slot = (duration - warmup) / slots
    order: list[str] = []
    while len(order) < slots:
        order += rng.sample(kinds, len(kinds))
    return [Fault(kind, warmup + i * slot, slot * rng.uniform(0.4, 0.6), rng.randrange(2))
            for i, kind in enumerate(order[:slots])]


@attrs.define(eq=False)
class Cluster:
    """The services under test and the faults applied to them."""

    redis: Redis
    db_proxy: Proxy
    nodes: list[Node]
    events: Events
    database: str
    channel: str
    rooms: list[int] = attrs.field(factory=list)

    async def apply(self, fault: Fault, nursery: trio.Nursery, until: float) -> None:
        """Break, wait until ``until`` (the run's clock), heal, and wait until healed."""
        clock, note = self.events.clock, self.events.note
        start = clock.now()
        node = self.nodes[fault.node]
        target = (node.name if fault.kind.startswith("node-") else
                  "redis" if fault.kind.startswith("redis-") else "db link")
        healed = start
        try:
            if fault.kind == "redis-kill":
                note("redis: SIGKILL")
                await self.redis.kill()
                await trio.sleep_until(clock.t0 + until)
                await self.redis.start(nursery)
                note("redis: restarted, answering")
            elif fault.kind == "redis-pause":
                note("redis: SIGSTOP")
                self.redis.pause()
                await trio.sleep_until(clock.t0 + until)
                self.redis.resume()
                note("redis: SIGCONT")
            elif fault.kind == "redis-garbage":
                await self._publish_garbage()
            elif fault.kind in ("db-cut", "db-pause"):
                note(f"db link: {fault.kind.removeprefix('db-')}")
                (self.db_proxy.cut if fault.kind == "db-cut" else self.db_proxy.pause)()
                await trio.sleep_until(clock.t0 + until)
                self.db_proxy.restore()
                note("db link: restored")
            elif fault.kind == "node-kill":
                async with node.lock:
                    note(f"{node.name}: SIGKILL")
                    await node.kill()
                    await trio.sleep_until(clock.t0 + until)
                    await self._restart(node, nursery)
                    note(f"{node.name}: restarted on port {node.port}")
            elif fault.kind == "node-kill-lagging":
                async with node.lock:
                    # The node acks what it cannot write yet: kill it with its store
                    # buffer full of acknowledged messages.
                    note("db link: pause")
                    self.db_proxy.pause()
                    await trio.sleep_until(clock.t0 + (start + until) / 2)
                    lag = await self._store_lag(node)
                    note(f"{node.name}: SIGKILL with {lag} messages not yet written")
                    await node.kill()
                    await trio.sleep_until(clock.t0 + until)
                    self.db_proxy.restore()
                    note("db link: restored")
                    await self._restart(node, nursery)
                    note(f"{node.name}: restarted on port {node.port}")
            healed = clock.now()
        except SetupError as exc:
            self.events.problems.append(f"{fault.kind}: could not heal: {exc}")
            note(f"{fault.kind}: could not heal")
        finally:
            self.events.windows.append((fault.kind, target, start, max(healed, start)))

    async def _store_lag(self, node: Node) -> str:
        try:
            return f"{(await metrics(node.port))['triochat_store_lag_messages']:g}"
        except (OSError, trio.TooSlowError, KeyError):
            return "?"

    async def _publish_garbage(self) -> None:
        """Nonsense on every room's channel, as a buggy or hostile publisher would send:
        truncated JSON, a message without its fields, a broken control command and a
        payload that is not JSON at all."""
        for room in self.rooms:
            channel = f"{self.channel}:{{{room}}}"
            for payload in GARBAGE:
                await redis_command(self.redis.port, "SPUBLISH", channel, payload)
        self.events.note(f"redis: {len(GARBAGE)} malformed payloads published to each "
                         f"room's channel")

    async def _restart(self, node: Node, nursery: trio.Nursery) -> None:
        # The port was just freed; a client's outgoing connection could hold it for a
        # moment, so a failed bind is tried again a few times.
        for attempt in range(5):
            try:
                await node.start(nursery, "restart after SIGKILL")
                return
            except SetupError:
                if attempt == 4:
                    raise
                await trio.sleep(0.5)

    async def heal_all(self, nursery: trio.Nursery) -> None:
        """Whatever a cancelled fault left broken, put right."""
        self.db_proxy.restore()
        self.redis.resume()
        if self.redis.process is None or self.redis.process.returncode is not None:
            await self.redis.start(nursery)
        for node in self.nodes:
            if not node.alive:
                async with node.lock:
                    await self._restart(node, nursery)

    async def stop(self) -> None:
        self.db_proxy.restore()
        self.redis.resume()
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                nursery.start_soon(node.stop, 10.0)
        if self.redis.process is not None and self.redis.process.returncode is None:
            await self.redis.kill()


# --- the checks -----------------------------------------------------------------------------

@attrs.define
class Verdict:
    sent: int = 0
    acked: int = 0
    stored: int = 0
    delivered: int = 0
    deliveries_expected: int = 0
    refused_and_resent: int = 0
    unsettled: int = 0
    refused: int = 0
    lost_acked: int = 0
    duplicates_stored: int = 0
    dropped_connections: int = 0
    leaked_tasks: int = 0
    unexpected_deaths: int = 0
    stored_ok: bool = True
    delivered_ok: bool = True
    # What failed, with evidence: (check, line).
    failures: list[tuple[str, str]] = attrs.field(factory=list)

    def fail(self, check: str, line: str) -> None:
        self.failures.append((check, line))

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self, duration: float, seed: int, faults: int) -> str:
        def yes(ok: bool) -> str:
            return "yes" if ok else "NO"

        return (f"chaos: duration={duration:g}s seed={seed} faults={faults} sent={self.sent} "
                f"acked={self.acked} stored={self.stored} (each once: {yes(self.stored_ok)}) "
                f"delivered={self.delivered}/{self.deliveries_expected} (each reader once, "
                f"in one order per room: {yes(self.delivered_ok)}) "
                f"refused_and_resent={self.refused_and_resent} unsettled={self.unsettled} "
                f"refused={self.refused} lost_acked={self.lost_acked} "
                f"duplicates_stored={self.duplicates_stored} "
                f"dropped_connections={self.dropped_connections} "
                f"leaked_tasks={self.leaked_tasks} "
                f"unexpected_deaths={self.unexpected_deaths} -> "
                + ("PASS" if self.passed else "FAIL"))


def check_sends(clients: list[Client], events: Events, v: Verdict) -> None:
    for client in clients:
        v.refused_and_resent += len(client.resends)
        for sent in client.sent:
            v.sent += 1
            if sent.acked_id is not None:
                v.acked += 1
            elif sent.error is not None:
                v.refused += 1
                v.fail("refused", f"{client.name} {sent.content!r} refused with "
                       f"{sent.error}, sent at {sent.started:.1f}s "
                       f"({events.around(sent.started)})")
            else:
                v.unsettled += 1
                v.fail("unsettled", f"{client.name} {sent.content!r} never answered, sent at "
                       f"{sent.started:.1f}s ({events.around(sent.started)})")
    ids: dict[tuple[int, int], list[Sent]] = defaultdict(list)
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                ids[sent.room, sent.acked_id].append(sent)
    for (room, mid), sents in ids.items():
        if len(sents) > 1:
            v.fail("one id, one message", f"room {room} id {mid} acked for "
                   f"{[s.content for s in sents]}")


def check_store(rows: list[tuple[Any, ...]], clients: list[Client], events: Events,
                v: Verdict) -> None:
    """``rows``: (room_id, id, author_id, client_msg_id, content) of the run's rooms."""
    by_key = {(room, mid): content for room, mid, _, _, content in rows}
    # Every send has its own content and client_msg_id: a second row with either is a
    # message stored twice.
    by_content: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_cmid: dict[tuple[int, int, str], list[tuple[int, int]]] = defaultdict(list)
    for room, mid, author, cmid, content in sorted(rows, key=lambda r: (r[0], r[1])):
        by_content[content].append((room, mid))
        if cmid is not None:
            by_cmid[room, author, cmid].append((room, mid))
    extra = {key for keys in (*by_content.values(), *by_cmid.values()) for key in keys[1:]}
    v.duplicates_stored = len(extra)
    sends = {s.content: s for c in clients for s in c.sent}
    for content, keys in by_content.items():
        sent = sends.get(content)
        if len(keys) > 1:
            when = (f"sent at {sent.started:.1f}s ({events.around(sent.started)})"
                    if sent else "not sent by this run")
            v.fail("duplicates_stored", f"{content!r} stored {len(keys)} times as {keys}; "
                   f"{when}")
        if sent is None:
            v.fail("stored", f"{content!r} stored as {keys} but never sent by this run")
        elif sent.acked_id is None and sent.error is not None:
            v.fail("stored", f"{content!r} stored as {keys} though refused with {sent.error}")
    for (room, author, cmid), keys in by_cmid.items():
        if len(keys) > 1 and len({by_key[k] for k in keys}) > 1:
            v.fail("duplicates_stored", f"room {room} author {author} client_msg_id {cmid} "
                   f"stored as {keys} with different contents")
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is None:
                continue
            content = by_key.get((sent.room, sent.acked_id))
            if content == sent.content and len(by_content[content]) == 1:
                v.stored += 1
                continue
            v.lost_acked += content != sent.content
            where = (f"acked at {sent.acked_at:.1f}s by {client.node.name} "
                     f"({events.around(sent.acked_at or 0.0)}), sent at {sent.started:.1f}s"
                     f"{client.journey(sent)}")
            if content is None:
                v.fail("lost_acked", f"room {sent.room} id {sent.acked_id} {sent.content!r} "
                       f"not stored; {where}")
            elif content != sent.content:
                v.fail("lost_acked", f"room {sent.room} id {sent.acked_id} acked for "
                       f"{sent.content!r} holds {content!r}; {where}")
    v.stored_ok = v.stored == v.acked and v.duplicates_stored == 0 and not any(
        check == "stored" for check, _ in v.failures)


def check_delivery(clients: list[Client], events: Events, v: Verdict) -> None:
    acked: dict[int, dict[str, int]] = defaultdict(dict)  # room -> content -> id
    sends = {s.content: s for c in clients for s in c.sent}
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                acked[sent.room][sent.content] = sent.acked_id
    ok = True
    for client in clients:
        room_acked = acked[client.room]
        v.deliveries_expected += len(room_acked)
        ids_of: dict[str, list[int]] = defaultdict(list)
        for mid, content, _ in client.delivered:
            ids_of[content].append(mid)
        missing, moved = [], []
        for content, mid in room_acked.items():
            if ids_of.get(content) == [mid]:
                v.delivered += 1
            elif content not in ids_of:
                missing.append((mid, content))
            else:
                moved.append((mid, content, ids_of[content]))
        twice = [(ids, c) for c, ids in ids_of.items() if len(ids) > 1]
        strange = [(ids, c) for c, ids in ids_of.items() if c not in room_acked]
        ids = [mid for mid, _, _ in client.delivered]
        backwards = [(a, b) for a, b in itertools.pairwise(ids) if b <= a]
        resets = [f"{t:.1f}s" for t, state, _ in client.states if state == "reset"]
        for label, items in (("missing", sorted(missing)), ("delivered at another id", moved),
                             ("delivered more than once", twice), ("not acked", strange)):
            if items:
                ok = False
                sent = sends.get(items[0][1])
                when = (f"; the first sent at {sent.started:.1f}s "
                        f"({events.around(sent.started)})" if sent else "")
                v.fail("delivered", f"{client.name}: {len(items)} {label}, e.g. "
                       f"{items[:4]}{when}" + (f"; history resets at {resets}" if resets else ""))
        if backwards:
            ok = False
            v.fail("delivered", f"{client.name}: ids out of order {backwards[:4]}")
    rooms: dict[int, list[Client]] = defaultdict(list)
    for client in clients:
        rooms[client.room].append(client)
    for room, members in rooms.items():
        first = [(mid, c) for mid, c, _ in members[0].delivered]
        for other in members[1:]:
            seq = [(mid, c) for mid, c, _ in other.delivered]
            if seq != first:
                ok = False
                at = next((i for i, (x, y) in enumerate(zip(first, seq, strict=False))
                           if x != y), min(len(first), len(seq)))
                v.fail("delivered", f"room {room}: {members[0].name} and {other.name} saw "
                       f"different sequences from position {at}: {first[at:at + 3]} vs "
                       f"{seq[at:at + 3]} (lengths {len(first)}, {len(seq)})")
    v.delivered_ok = ok and v.delivered == v.deliveries_expected


def check_connections(clients: list[Client], events: Events, v: Verdict) -> None:
    """A connection may be lost when its own node is killed, and for nothing else: with
    Redis or the database down, members stay connected (and can read)."""
    for client in clients:
        previous = ""
        for t, state, detail in client.states:
            if (state == "reconnecting" and previous in ("connected", "resumed")
                    and not events.node_down(client.node.name, t)):
                v.dropped_connections += 1
                v.fail("dropped_connections", f"{client.name} lost its connection at "
                       f"{t:.1f}s ({events.around(t)}): {detail}")
            previous = state


def check_deaths(events: Events, v: Verdict) -> None:
    v.unexpected_deaths = len(events.deaths)
    for death in events.deaths:
        v.fail("unexpected_deaths", death)
    for problem in events.problems:
        v.fail("services", problem)


# --- the run --------------------------------------------------------------------------------

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
                   "floodLimit": 1_000_000, "connectionsPerIp": 1_000_000},
        "logger": {"level": "info"}}, indent=2))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


@attrs.define
class Options:
    duration: float
    seed: int
    rooms: int
    clients: int
    rate: float
    faults: tuple[str, ...]
    keep_logs: bool
    verbose: bool


async def chaos(opts: Options, workdir: Path, database: str) -> tuple[Verdict, Events,
                                                                       list[Node], Redis]:
    events = Events(Clock(), verbose=opts.verbose)
    redis = Redis(free_port(), workdir, events)
    v = Verdict()
    nodes: list[Node] = []
    async with trio.open_nursery() as services:
        # SIGTERM stops the run as Ctrl-C does: through the cleanup below.
        services.start_soon(_stop_on_sigterm, services.cancel_scope, v)
        db_proxy = Proxy(target_port=MYSQL["port"], target_host=MYSQL["host"])
        await services.start(db_proxy.run)
        config = workdir / "node.json"
        await redis.start(services)
        write_config(config, workdir, db_proxy.port, database, redis.port)
        nodes += [Node(i, config, workdir, events) for i in range(2)]
        cluster = Cluster(redis, db_proxy, nodes, events, database, channel_of(workdir))
        try:
            for node in nodes:  # one at a time: the first creates the schema
                await node.start(services)
                node.backend_ports = frozenset({redis.port, db_proxy.port})
                readings: list[tuple[int, int]] = []

                async def steady(node: Node = node, readings: list[tuple[int, int]] = readings
                                 ) -> bool:
                    readings[:] = [r] if (r := await node.own_tasks()) else []
                    return bool(readings)

                with trio.fail_after(START_TIMEOUT):
                    await poll_until(steady)
                node.baseline_tasks = readings[0][0]
            events.note(f"nodes on ports {[n.port for n in nodes]}, redis on {redis.port}, "
                        f"db proxy on {db_proxy.port} -> {MYSQL['port']}")
            await _run_clients(opts, cluster, services, v)
        finally:
            with trio.move_on_after(30, shield=True):
                await cluster.stop()
            for node in nodes:
                node.close_log()
            services.cancel_scope.cancel()
    check_deaths(events, v)
    return v, events, nodes, redis


async def _stop_on_sigterm(scope: trio.CancelScope, v: Verdict) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log("chaos: SIGTERM: stopping")
            v.fail("interrupted", "SIGTERM before the run finished")
            scope.cancel()
            return


async def _run_clients(opts: Options, cluster: Cluster, services: trio.Nursery,
                       v: Verdict) -> None:
    events, nodes = cluster.events, cluster.nodes
    progress = Progress()
    rooms = cluster.rooms = [101 + r for r in range(opts.rooms)]
    # Client i is in room i mod R, on node (i div R) mod 2: each room has members on both.
    clients = [Client(i, rooms[i % len(rooms)], 1000 + i, nodes[(i // len(rooms)) % 2],
                      opts.rate, events.clock, progress) for i in range(opts.clients)]
    go, stop, close = trio.Event(), trio.Event(), trio.Event()
    by_chat: dict[int, Client] = {}
    with counting_resends(by_chat):
        async with trio.open_nursery() as members:
            for client in clients:
                members.start_soon(client.run, go, stop, close)
            with trio.move_on_after(START_TIMEOUT):
                for client in clients:
                    await client.connected.wait()
            if not all(c.connected.is_set() for c in clients):
                raise SetupError("clients did not connect: " + ", ".join(
                    c.name for c in clients if not c.connected.is_set()))
            by_chat.update({id(c.chat): c for c in clients})
            events.clock.t0 = trio.current_time()
            events.note(f"{len(clients)} clients in rooms {rooms}, {opts.rate:g} msg/s each")
            go.set()
            plan = schedule(opts.duration, opts.faults, opts.seed)
            try:
                for fault in plan:
                    await trio.sleep_until(events.clock.t0 + fault.start)
                    await cluster.apply(fault, services, fault.start + fault.length)
                await trio.sleep_until(events.clock.t0 + opts.duration)
            finally:
                with trio.move_on_after(START_TIMEOUT, shield=True):
                    await cluster.heal_all(services)
            stop.set()
            events.note("sending stopped; settling")
            await _settle(clients, nodes, events, progress, v, cluster.redis.port)
            close.set()
        events.note("clients closed")
    # Client-side verdicts first: the store check needs the acks.
    check_sends(clients, events, v)
    rows = await trio.to_thread.run_sync(stored_rows, cluster.database, rooms)
    check_store(rows, clients, events, v)
    check_delivery(clients, events, v)
    check_connections(clients, events, v)
    await _check_tasks(nodes, events, v)
    if opts.verbose:
        for client in clients:
            slowest = max((s for s in client.sent if s.acked_at is not None), default=None,
                          key=lambda s: (s.acked_at or 0.0) - s.started)
            waited = (f", slowest ack {(slowest.acked_at or 0.0) - slowest.started:.1f}s "
                      f"(sent at {slowest.started:.1f}s, {events.around(slowest.started)})"
                      if slowest else "")
            log(f"{client.name}: sent {len(client.sent)}, delivered {len(client.delivered)}, "
                f"resent {len(client.resends)}{waited}, states "
                f"{Counter(s for _, s, _ in client.states)}")
        per_fault = Counter(events.around(t).split(" [")[0] for c in clients
                            for t in c.resends)
        for where, count in per_fault.most_common():
            log(f"resends {where}: {count}")


async def _settle(clients: list[Client], nodes: list[Node], events: Events,
                  progress: Progress, v: Verdict, redis_port: int) -> None:
    with trio.move_on_after(SETTLE_SENDS) as waiting:
        await progress.wait_for(lambda: all(not c.sending and c.in_flight == 0
                                            for c in clients))
    if waiting.cancelled_caught:
        v.fail("settle", f"sends still unanswered after {SETTLE_SENDS:g}s: " + ", ".join(
            f"{c.name} {c.in_flight}" for c in clients if c.in_flight))
    last_acked: dict[int, int] = defaultdict(int)
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                last_acked[sent.room] = max(last_acked[sent.room], sent.acked_id)

    def caught_up(client: Client) -> bool:
        last = client.delivered[-1][0] if client.delivered else 0
        return last >= last_acked[client.room]

    with trio.move_on_after(SETTLE_READERS) as waiting:
        await progress.wait_for(lambda: all(caught_up(c) for c in clients))
    if waiting.cancelled_caught:
        v.fail("settle", f"readers behind after {SETTLE_READERS:g}s: " + ", ".join(
            f"{c.name} at {c.delivered[-1][0] if c.delivered else 0} of "
            f"{last_acked[c.room]}" for c in clients if not caught_up(c)))
    events.note("clients settled")

    async def written() -> bool:
        for node in nodes:
            try:
                m = await metrics(node.port)
            except (OSError, trio.TooSlowError):
                return False
            if m.get("triochat_store_lag_messages"):
                return False
        # And what a killed node acked but never wrote has been written from Redis's
        # logs by a surviving node (after server.orphanedAfter).
        try:
            reply = await redis_command(redis_port, "EVAL", LOGGED, "0", "*:log")
        except (OSError, trio.TooSlowError):
            return False
        return reply == b":0\r\n"

    with trio.move_on_after(SETTLE_STORE) as waiting:
        await poll_until(written, interval=0.2)
    if waiting.cancelled_caught:
        v.fail("settle", f"store buffers not written after {SETTLE_STORE:g}s")
    events.note("store buffers written")


async def _check_tasks(nodes: list[Node], events: Events, v: Verdict) -> None:
    """After the clients left, each node's own tasks come back to its idle baseline."""
    for node in nodes:
        if not node.alive or node.baseline_tasks is None:
            continue
        baseline = node.baseline_tasks
        last: list[tuple[int, int]] = []

        async def back(node: Node = node, baseline: int = baseline,
                       last: list[tuple[int, int]] = last) -> bool:
            try:
                reading = await node.own_tasks()
            except (OSError, trio.TooSlowError, KeyError, psutil.Error):
                return False
            if reading is None:
                return False
            last[:] = [reading]
            return reading[0] <= baseline

        with trio.move_on_after(SETTLE_TASKS) as waiting:
            await poll_until(back, interval=0.2)
        if waiting.cancelled_caught:
            tasks, conns = last[0] if last else (baseline, 0)
            v.leaked_tasks += max(tasks - baseline, 0)
            v.fail("leaked_tasks", f"{node.name}: {tasks} trio tasks besides its {conns} "
                   f"backend connections {SETTLE_TASKS:g}s after the clients left, "
                   f"{baseline} before they came")
        else:
            events.note(f"{node.name}: {last[0][0]} trio tasks (baseline {baseline}) and "
                        f"{last[0][1]} backend connections once the clients left")


def report(opts: Options, v: Verdict, events: Events, nodes: list[Node], redis: Redis,
           faults: int) -> None:
    if not v.passed:
        for path in [n.log_path for n in nodes] + [redis.log_path]:
            if path.suffix == ".log" and path.stem.startswith("node"):
                print(f"--- warnings and errors in {path.name} ---")
                print("\n".join(complaints(path)) or "(none)")
            print(f"--- tail of {path.name} ---")
            print(tail(path))
        print("--- timeline (seconds since sending began) ---")
        for t, text in events.lines:
            print(f"{t:8.2f}s {text}")
        print("--- what failed ---")
        shown: Counter[str] = Counter()
        for check, line in v.failures:
            shown[check] += 1
            if shown[check] <= 8:
                print(f"FAIL {check}: {line}")
        for check, count in shown.items():
            if count > 8:
                print(f"FAIL {check}: ... and {count - 8} more")
    print(v.summary(opts.duration, opts.seed, faults), flush=True)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Faults: " + ", ".join(FAULTS))
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of sending and faults (default 60)")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    p.add_argument("--rooms", type=int, default=3, help="rooms (default 3)")
    p.add_argument("--clients", type=int, default=6,
                   help="clients, spread over the rooms and both nodes (default 6)")
    p.add_argument("--rate", type=float, default=4.0,
                   help="messages per second each client sends (default 4)")
    p.add_argument("--faults", default="all",
                   help="'all', 'none' or a comma-separated list of kinds (default all)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary directory with the logs and configuration")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the timeline as it happens and per-client counts")
    args = p.parse_args(argv)
    if args.faults == "all":
        faults = FAULTS
    elif args.faults == "none":
        faults = ()
    else:
        faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
        if unknown := [f for f in faults if f not in FAULTS]:
            p.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    if args.rooms < 1 or args.clients < 2 * args.rooms:
        p.error("--clients must be at least twice --rooms: each room needs a member on "
                "each node")
    if args.duration < 5 or not math.isfinite(args.rate) or args.rate <= 0:
        p.error("--duration must be at least 5 and --rate positive")
    return Options(args.duration, args.seed, args.rooms, args.clients, args.rate, faults,
                   args.keep_logs, args.verbose)


def _kill_leftovers() -> None:
    """The last resort: whatever trio.run left running (it was interrupted) is killed."""
    for process in _CHILDREN:
        if process.returncode is None and process.poll() is None:
            with suppress(ProcessLookupError):
                process.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.poll() is None for p in _CHILDREN):
        time.sleep(0.05)


def _setup_error(exc: BaseException) -> SetupError | None:
    """The SetupError in ``exc``, also from inside the exception groups of nurseries."""
    if isinstance(exc, SetupError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _setup_error(inner)) is not None:
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    database = f"trio_chat_chaos_{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="trio-chat-chaos-"))
    try:
        admin = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                password=MYSQL["password"], charset="utf8mb4",
                                autocommit=True)
    except pymysql.MySQLError as exc:
        print(f"chaos: MariaDB is not reachable at {MYSQL['host']}:{MYSQL['port']}: {exc}")
        return 2
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        v, events, nodes, redis = trio.run(chaos, opts, workdir, database)
        faults = len(events.windows)
        report(opts, v, events, nodes, redis, faults)
        return 0 if v.passed else 1
    except Exception as exc:
        if (setup := _setup_error(exc)) is None:
            raise
        print(f"chaos: could not set up the run: {setup}")
        return 2
    finally:
        _kill_leftovers()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        if opts.keep_logs:
            print(f"chaos: logs and configuration kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, bare or as the only leaf of nurseries' exception groups."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:
        return all(_interrupted(e) for e in inner)
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("chaos: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
