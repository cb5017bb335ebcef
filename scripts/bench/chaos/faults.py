"""The faults: a seeded schedule of them, and the cluster that injects each one
(kill or pause Redis, publish garbage, cut or pause MariaDB, kill a node)."""

from __future__ import annotations

import random

import attrs
import trio

from bench.chaos.common import Events, metrics, redis_command
from bench.chaos.services import Node, Redis, SetupError
from tests.proxy import Proxy

FAULTS = ("redis-kill", "redis-pause", "redis-garbage", "db-cut", "db-pause", "node-kill",
          "node-kill-lagging")
# What redis-garbage publishes on each room's channel.
GARBAGE = ('{"id": 1, "room_id": ', '{"id": "one"}', '{"control": ', "not json at all")

# Seconds per fault and the quiet after it: long enough for a Redis outage to outlast
# a send's 3 s hold, and for the clients' backoff (2 s at most) to reconnect.
SLOT = 11.0


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
