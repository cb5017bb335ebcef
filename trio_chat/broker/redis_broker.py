"""The broker that lets several nodes serve the same rooms: :class:`RedisBroker`.

A Lua script (``publish.lua``) increments the room's counter, appends the
message to the room's recent list and publishes it on the room's shard channel
in one atomic step, so every node sees one order and the same ids. A node
subscribes to a room's channel only while the room is alive there. Its one
task, :meth:`RedisBroker.run`, reads the subscription and reconnects (capped,
jittered backoff) when Redis goes away, then resubscribes and delivers what its
rooms missed. redis-py's asyncio client runs on the asyncio bridge.

The configured Redis may be one node of a Redis Cluster (``INFO cluster`` says
``cluster_enabled:1``); the broker then talks to the whole cluster. A room's
keys and its shard channel carry the room's ``{hash tag}``, so they live on one
shard and the script runs there. Subscriptions keep one connection per shard
node, each read by a task of its own below :meth:`RedisBroker.run`; losing any
of them counts as losing Redis. So does a Redis that hangs (stopped, or a
network that drops packets): a subscription connection that has heard nothing
for half the broker's timeout sends a PING, and no answer within the timeout
counts as losing Redis.

One payload is a failure boundary: whatever anyone publishes on a room's
channel is checked (:func:`~trio_chat.protocol.read_payload`) before it reaches
the room, and one that is not JSON, malformed, of an unknown kind or for
another room is dropped, as is one whose delivery fails unexpectedly. Each drop
is counted (``broker_payloads_dropped``) and logged, at most once a minute per
kind of problem; the subscription and every other room go on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from importlib.resources import files
from typing import Any

import attrs
import redis.asyncio
import redis.asyncio.cluster
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import bridge
from ..config import RedisConfig
from ..metrics import LogThrottle, Metrics
from ..protocol import (
    Draft,
    Message,
    PayloadError,
    RelayedEvent,
    accept,
    apply_change,
    message_from_wire,
    read_payload,
    utc_now,
)
from ..store import Store, StoreUnavailable
from .base import BrokerUnavailable, Subscriber, sent_to_store

log = logging.getLogger(__name__)


def _lua(name: str) -> str:
    """A script of this package; its comment block says what it takes and returns."""
    return files("trio_chat.broker").joinpath(name).read_text(encoding="utf-8")


_PUBLISH = _lua("publish.lua")
_PRESENCE = _lua("presence.lua")
_RELAY = _lua("relay.lua")

KEY_TTL = 7 * 24 * 3600
# A node registers a room whose log it writes to at most this often; the sweep
# forgets a room registered less recently than twice this whose log is empty.
LOG_REGISTER_EVERY = 60.0
# Rooms and entries one sweep looks at, at most.
SWEEP_ROOMS = 10_000
SWEEP_ENTRIES = 1000
RECONNECT_MAX_DELAY = 5.0
# Most messages a room recovers from the history store after a reconnection.
RECOVER_MAX = 10_000
# What an unreachable (or refusing) Redis raises. redis-py's cluster client raises
# RedisClusterException, which is not a RedisError, when no node answers.
UNAVAILABLE = (redis.RedisError, redis.exceptions.RedisClusterException, OSError,
               trio.TooSlowError)
# Commands in flight to one cluster node at once (redis-py refuses more, it does not wait).
CLUSTER_NODE_CONNECTIONS = 1000


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@attrs.define
class _Quiet:
    """When a subscription connection last heard from Redis, and when it sent a PING
    not answered yet."""

    heard: float
    pinged: float | None = None


@attrs.define(eq=False)
class RedisBroker:
    _config: RedisConfig
    _store: Store
    recent_size: int = 100
    timeout: float = 5.0
    # How long a send waits for a lost Redis to come back before it is refused.
    outage_hold: float = 3.0
    idempotency_window: float = 600.0
    node: str = attrs.field(factory=lambda: secrets.token_hex(4))
    _metrics: Metrics = attrs.field(factory=Metrics)
    # Bad payloads are logged at most once a minute per kind of problem.
    _throttle: LogThrottle = attrs.field(init=False, factory=LogThrottle)
    _rooms: dict[int, list[Subscriber]] = attrs.field(init=False, factory=dict)
    _confirmations: dict[str, trio.Event] = attrs.field(init=False, factory=dict)
    _client: Any = attrs.field(init=False, default=None)
    _pubsub: Any = attrs.field(init=False, default=None)
    _script: Any = attrs.field(init=False, default=None)
    _presence_script: Any = attrs.field(init=False, default=None)
    _relay_script: Any = attrs.field(init=False, default=None)
    _connected: trio.Event = attrs.field(init=False, factory=trio.Event)
    down_since: float | None = attrs.field(init=False, default=None)
    # Cluster mode: whether the last connection found a Redis Cluster, and the
    # cluster's nodes as last seen (tried when the configured node is down).
    cluster: bool = attrs.field(init=False, default=False)
    _cluster_nodes: list[tuple[str, int]] = attrs.field(init=False, factory=list)
    # Cluster mode, while connected: the shard nodes whose subscription connection
    # has a reader task, the nursery of those tasks and what they feed run().
    _readers: set[str] = attrs.field(init=False, factory=set)
    _reader_nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _batches: trio.MemorySendChannel[Any] | None = attrs.field(init=False, default=None)
    # Cluster mode: SUNSUBSCRIBEs sent and not yet confirmed, per channel. Any other
    # sunsubscribe is the cluster dropping a subscription (its slot moved).
    _leaving: dict[str, int] = attrs.field(init=False, factory=dict)
    _reconnected: list[Callable[[], None]] = attrs.field(init=False, factory=list)
    # Until then a client_msg_id Redis does not know is looked up in the store too:
    # Redis may have lost its records (a restart) while this node was away from it.
    _check_store_until: float = attrs.field(init=False, default=attrs.Factory(
        lambda self: time.monotonic() + self.idempotency_window, takes_self=True))
    # Keep each message in its room's Redis log until this node (or, if it dies,
    # another) has written it to the history store: it is durable once published.
    log: bool = False
    # Seconds after which a logged message not yet written is any node's to write.
    orphaned_after: float = 30.0
    # Log entry of each message this node published and has not written yet.
    _log_entries: dict[tuple[int, int], str] = attrs.field(init=False, factory=dict)
    # When this node last registered each room in the log registry (wall clock).
    _log_registered: dict[int, float] = attrs.field(init=False, factory=dict)
    # The token Redis held when this node last saw it: a different one (or none)
    # means Redis lost its data meanwhile, sent-id records included.
    _epoch: str | None = attrs.field(init=False, default=None)

    @property
    def durable_on_publish(self) -> bool:
        return self.log

    def _log_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:log"

    @property
    def _logs_key(self) -> str:
        """The rooms whose log may hold messages, scored by when a node last said so."""
        return f"{self._config.publish_channel_name}:logs"

    @property
    def _epoch_key(self) -> str:
        return f"{self._config.publish_channel_name}:epoch"

    def _seq_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:seq"

    def _recent_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:recent"

    def _sent_key(self, draft: Draft) -> str:
        return (f"{self._config.publish_channel_name}:{{{draft.room_id}}}:sent:"
                f"{draft.author_id}:{draft.client_msg_id}")

    def _presence_keys(self, room_id: int) -> list[str]:
        prefix = f"{self._config.publish_channel_name}:{{{room_id}}}"
        return [f"{prefix}:presence", f"{prefix}:online"]

    def _publish_channel(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}"

    def _listen_channel(self, room_id: int) -> str:
        return f"{self._config.listening_channel_name}:{{{room_id}}}"

    def _room_of(self, channel: str) -> int | None:
        prefix = f"{self._config.listening_channel_name}:{{"
        if channel.startswith(prefix) and channel.endswith("}"):
            try:
                return int(channel[len(prefix):-1])
            except ValueError:
                return None
        return None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def _aio_connect(self) -> int:
        """Asyncio flavour. A client, a subscription connection and the script.

        The configured node decides the mode: a Redis Cluster node (``INFO cluster``)
        makes this a cluster client whose subscriptions keep one connection per
        shard node. Returns how many channels it subscribed to (each will be
        confirmed).
        """
        c = self._config
        # Every node listens on its own channel too, so the subscription connection
        # exists (and is read) even before any room is alive here.
        channels = [f"{c.listening_channel_name}:node:{self.node}",
                    *(self._listen_channel(room_id) for room_id in self._rooms)]
        if not await self._aio_connect_node():
            await self._aio_connect_cluster()
        self._script = self._client.register_script(_PUBLISH)
        self._presence_script = self._client.register_script(_PRESENCE)
        self._relay_script = self._client.register_script(_RELAY)
        # In cluster mode ClusterPubSub sends one SSUBSCRIBE per channel, each to its
        # slot's node (one command may not name channels of different slots).
        await self._pubsub.ssubscribe(*channels)
        return len(channels)

    def _client_options(self) -> dict[str, Any]:
        c = self._config
        return dict(
            username=c.id or None, password=c.password or None,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            client_name=f"{c.listening_channel_name}:{self.node}",
            # No silent retries: a reconnection must go through run(), which
            # resubscribes and recovers what was missed; redis-py's own would not.
            retry=Retry(NoBackoff(), 0), decode_responses=True,
            # Bytes that are not UTF-8 must not fail the read they arrive in (and every
            # payload read with them): read_payload refuses them.
            encoding_errors="surrogateescape")

    async def _aio_connect_node(self) -> bool:
        """Asyncio flavour. Connect to the configured node as a single Redis.

        Returns False, with nothing left open, if it is a Redis Cluster node, or
        if it is unreachable and the last connection found a cluster (whose
        other nodes may be up).
        """
        c = self._config
        # A blocking pool: a burst of publishes waits for a connection rather than
        # failing with "Too many connections" (which would read as Redis being down).
        self._client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool(
            host=c.host, port=c.port, db=c.database, max_connections=CLUSTER_NODE_CONNECTIONS,
            timeout=None, **self._client_options()))
        try:
            cluster = bool((await self._client.info("cluster")).get("cluster_enabled"))
        except redis.ResponseError as exc:
            if "cluster" not in str(exc).lower():
                raise
            # SELECT (redis.database) on a cluster node.
            raise redis.exceptions.RedisClusterException(
                f"redis.database is {c.database}, but {c.host}:{c.port} is a Redis Cluster "
                "node, and a cluster has only database 0") from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if not (self.cluster and self._cluster_nodes):
                raise
            cluster = True
        if cluster:
            client, self._client = self._client, None
            await client.aclose()
            return False
        self.cluster = False
        self._pubsub = self._client.pubsub()
        return True

    async def _aio_connect_cluster(self) -> None:
        """Asyncio flavour. A cluster client and its sharded pub/sub, no connection yet."""
        c = self._config
        cluster = redis.asyncio.cluster
        if not hasattr(cluster, "ClusterPubSub"):
            raise redis.exceptions.RedisClusterException(
                f"{c.host}:{c.port} is a Redis Cluster node; trio-chat needs redis-py 8.0 or "
                f"newer for it (asyncio sharded pub/sub), this is {redis.__version__}")
        seeds = dict.fromkeys([(c.host, c.port), *self._cluster_nodes])
        self._client = cluster.RedisCluster(
            startup_nodes=[cluster.ClusterNode(host, port) for host, port in seeds],
            max_connections=CLUSTER_NODE_CONNECTIONS, **self._client_options())
        await self._client.initialize()
        self.cluster = True
        self._cluster_nodes = [(node.host, int(node.port))
                               for node in self._client.get_nodes()]
        self._pubsub = self._client.pubsub()

    async def _aio_close(self) -> None:
        """Asyncio flavour."""
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        if pubsub is not None:
            await pubsub.aclose()
        if client is not None:
            await client.aclose()

    async def _aio_read(self) -> list[dict[str, Any]]:
        """Asyncio flavour. Wait up to a second for messages, then take what is there."""
        batch = []
        message = await self._pubsub.get_message(timeout=1.0)
        while message is not None and len(batch) < 1000:
            batch.append(message)
            message = await self._pubsub.get_message(timeout=0.0)
        return batch

    async def _aio_read_shard(self, name: str) -> list[dict[str, Any]]:
        """Asyncio flavour. :meth:`_aio_read` for the subscription connection to one shard node.

        Returns nothing at once if that connection is gone (redis-py closes it
        when its last channel is unsubscribed) or not open yet.
        """
        node = self._client.get_node(node_name=name)
        if node is None:
            raise redis.ConnectionError(f"{name} left the cluster")
        batch: list[dict[str, Any]] = []
        timeout = 1.0
        while len(batch) < 1000:
            pubsub = self._pubsub.node_pubsub_mapping.get(name)
            if pubsub is None or pubsub.connection is None:
                break
            try:
                message = await self._pubsub.get_sharded_message(target_node=node,
                                                                 timeout=timeout)
            except RuntimeError as exc:  # "pubsub connection not set": closed under us
                raise redis.ConnectionError(f"subscription to {name} closed: {exc}") from exc
            if message is None:
                break
            batch.append(message)
            timeout = 0.0
        return batch

    async def _aio_ping_shard(self, name: str) -> None:
        """Asyncio flavour. PING on the subscription connection to one shard node, if open."""
        pubsub = self._pubsub.node_pubsub_mapping.get(name)
        if pubsub is not None and pubsub.connection is not None:
            await pubsub.ping()

    def _shards(self) -> set[str]:
        """Either flavour (awaits nothing). Shard nodes with an open subscription connection."""
        if self._pubsub is None or not self.cluster:
            return set()
        return {name for name, pubsub in self._pubsub.node_pubsub_mapping.items()
                if pubsub.connection is not None}

    async def _connect(self) -> int:
        self._leaving.clear()
        with trio.fail_after(self.timeout):
            return await bridge.call(self._aio_connect)

    async def _close(self) -> None:
        with trio.move_on_after(2, shield=True):
            await bridge.call(self._aio_close)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Connect, report ready, then read the subscription until cancelled.

        When Redis goes away it reconnects with capped, jittered backoff; rooms
        stay subscribed here and are resubscribed there.
        """
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            channels = await self._connect()
            delay = 0.1
            while True:
                try:
                    await self._read_until_error(channels, ready)
                except UNAVAILABLE as exc:
                    if self.down_since is None:
                        self.down_since = trio.current_time()
                        log.warning("lost Redis (%s); reconnecting", exc)
                    self._connected = trio.Event()
                    for confirmation in self._confirmations.values():
                        confirmation.set()  # its waiter sees that we are not connected
                    self._confirmations.clear()
                    await self._close()
                while True:
                    await trio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
                    try:
                        channels = await self._connect()
                        break
                    except UNAVAILABLE:
                        await self._close()
                delay = 0.1
        finally:
            await self._close()

    async def _watch(self, batch: list[dict[str, Any]], quiet: _Quiet,
                     ping: Callable[[], Awaitable[Any]]) -> None:
        """After each read of a subscription connection: is Redis still answering?

        A quiet subscription looks like a hung Redis (a read returns nothing
        either way): after ``timeout / 2`` seconds with nothing read, ``ping``
        sends a PING, whose answer is read like any message. No message within
        ``timeout`` seconds of it raises, which is losing Redis.
        """
        now = trio.current_time()
        if batch:
            quiet.heard, quiet.pinged = now, None
        elif quiet.pinged is not None:
            if now - quiet.pinged > self.timeout:
                raise redis.TimeoutError(f"no answer to PING within {self.timeout:g}s")
        elif now - quiet.heard >= self.timeout / 2:
            with trio.fail_after(self.timeout):
                await ping()
            quiet.pinged = now

    async def _read_until_error(self, channels: int, ready: Callable[[], None]) -> None:
        if not self.cluster:
            quiet = _Quiet(trio.current_time())

            async def read() -> list[dict[str, Any]]:
                batch = await bridge.call(self._aio_read)
                await self._watch(batch, quiet, lambda: bridge.call(self._pubsub.ping))
                return batch

            await self._follow(channels, ready, read)
            return
        # Cluster: one subscription connection per shard node, each read by a task
        # of its own (ClusterPubSub.get_sharded_message without a target node asks
        # the nodes in turn, waiting out the timeout on each), all feeding the one
        # loop in _follow, in order per shard, so in order per room.
        send: trio.MemorySendChannel[Any]
        send, receive = trio.open_memory_channel(16)

        async def next_batch() -> list[dict[str, Any]]:
            item = await receive.receive()
            if isinstance(item, Exception):
                raise item  # a shard's connection failed
            return item

        error: Exception | None = None
        self._readers = set()
        async with trio.open_nursery() as readers:
            self._reader_nursery, self._batches = readers, send
            try:
                self._start_readers()
                await self._follow(channels, ready, next_batch)
            except UNAVAILABLE as exc:
                error = exc  # raised below, not from the nursery (an ExceptionGroup there)
            finally:
                self._reader_nursery = self._batches = None
                readers.cancel_scope.cancel()
        assert error is not None, "_follow returns only by raising"
        raise error

    def _start_readers(self) -> None:
        """Cluster mode: a reader task for every open shard subscription connection."""
        if self._reader_nursery is None or self._batches is None:
            return
        for name in self._shards() - self._readers:
            self._readers.add(name)
            self._reader_nursery.start_soon(self._read_shard, name, self._batches)

    async def _read_shard(self, name: str, send: trio.MemorySendChannel[Any]) -> None:
        """Cluster mode: read one shard node's subscription connection while it is open."""
        quiet = _Quiet(trio.current_time())
        try:
            # No checkpoint between this test and the finally clause: a subscription
            # that opens the connection again afterwards starts a new reader.
            while name in self._shards():
                batch = await bridge.call(self._aio_read_shard, name)
                await self._watch(batch, quiet, lambda: bridge.call(self._aio_ping_shard, name))
                if batch:
                    await send.send(batch)
                # redis-py may have opened connections by itself (slot moves).
                self._start_readers()
        except UNAVAILABLE as exc:
            await send.send(exc)
        finally:
            self._readers.discard(name)

    def _lose(self, exc: Exception) -> None:
        """Cluster mode: a subscription command failed on a shard's connection that no
        reader may be watching; have run() treat it as losing Redis."""
        if self.cluster and self._reader_nursery is not None and self._batches is not None:
            self._reader_nursery.start_soon(self._batches.send, exc)

    def _unsubscribed(self, channel: str) -> None:
        """Cluster mode: account for a sunsubscribe; one we did not ask for is the
        cluster dropping the subscription (its slot moved), so reconnect."""
        left = self._leaving.pop(channel, 0)
        if left > 1:
            self._leaving[channel] = left - 1
        elif not left:
            raise redis.ConnectionError(f"the cluster dropped the subscription to {channel}")

    async def _follow(self, channels: int, ready: Callable[[], None],
                      next_batch: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        # After a (re)connection: once Redis confirms every subscription, deliver
        # what the rooms missed meanwhile (from each room's recent list), then
        # what arrived since; rooms drop the ids they already have.
        early: list[dict[str, Any]] = []
        while channels:
            for message in await next_batch():
                if message["type"] == "ssubscribe":
                    channels -= 1
                elif message["type"] == "smessage":
                    early.append(message)
                elif message["type"] == "sunsubscribe" and self.cluster:
                    self._unsubscribed(message["channel"])
        for room_id in list(self._rooms):
            await self._recover(room_id)
        for message in early:
            self._dispatch(message["channel"], message["data"])
        back = self.down_since is not None
        if not await self._kept_data():
            # Its sent-id records are gone: until they would have expired, the
            # store is asked about a client_msg_id Redis does not know.
            self._check_store_until = time.monotonic() + self.idempotency_window
        elif not back:
            self._check_store_until = -math.inf
        if self.down_since is not None:
            log.warning("Redis is back after %.1fs; resubscribed %d rooms",
                        trio.current_time() - self.down_since, len(self._rooms))
            self.down_since = None
        self._connected.set()
        for callback in self._reconnected if back else ():
            callback()
        ready()
        while True:
            for message in await next_batch():
                kind = message["type"]
                if kind == "smessage":
                    self._dispatch(message["channel"], message["data"])
                elif kind == "ssubscribe" and (
                        event := self._confirmations.pop(message["channel"], None)) is not None:
                    event.set()
                elif kind == "sunsubscribe" and self.cluster:
                    self._unsubscribed(message["channel"])

    def _dispatch(self, channel: str, data: str) -> None:
        """Hand one payload to its room here: the failure boundary of one payload."""
        room_id = self._room_of(channel)
        subscribers = self._rooms.get(room_id) if room_id is not None else None
        if not subscribers:
            return
        assert room_id is not None
        try:
            payload = read_payload(data, room_id)
            if isinstance(payload, Message):
                for subscriber in subscribers:
                    subscriber.deliver(payload)
            elif isinstance(payload, RelayedEvent):
                for subscriber in subscribers:
                    subscriber.deliver_event(payload.text)
            else:
                for subscriber in list(subscribers):
                    subscriber.control(payload.command)
        except PayloadError as exc:
            self._drop(room_id, exc)
        except Exception:
            self._metrics.unexpected("broker_payloads_dropped", log,
                                     "room %d: delivering a broker payload failed; dropped",
                                     room_id, throttle=self._throttle)

    def _drop(self, room_id: int, exc: PayloadError) -> None:
        self._metrics.broker_payloads_dropped += 1
        held = self._throttle.allow(exc.kind)
        if held is not None:
            log.warning("room %d: dropped a broker payload (%s): %s%s", room_id, exc.kind, exc,
                        f" ({held} more since the last report)" if held else "")

    def _messages(self, room_id: int, listed: list[str]) -> list[Message]:
        """The messages of a room's recent list; an entry that is not one is dropped."""
        messages = []
        for data in listed:
            try:
                payload = read_payload(data, room_id)
                if not isinstance(payload, Message):
                    raise PayloadError("unknown_kind", "not a message, in the recent list")
            except PayloadError as exc:
                self._drop(room_id, exc)
            else:
                messages.append(payload)
        return messages

    async def _kept_data(self) -> bool:
        """Whether Redis still holds what it held when this node last saw it (at the
        first connection: whether it holds anything a node put there)."""
        if self.cluster:
            return False  # one shard may have lost its keys and not another
        with trio.fail_after(self.timeout):
            epoch = await bridge.call(self._client.get, self._epoch_key)
            if epoch is None:
                self._epoch = secrets.token_hex(8)
                await bridge.call(self._client.set, self._epoch_key, self._epoch, nx=True)
                self._epoch = await bridge.call(self._client.get, self._epoch_key)
                return False
        kept = self._epoch is None or epoch == self._epoch
        self._epoch = epoch
        return kept

    async def _recover(self, room_id: int) -> None:
        subscribers = self._rooms.get(room_id)
        if not subscribers:
            return
        last = min(s.last_id for s in subscribers)
        with trio.fail_after(self.timeout):
            listed = await bridge.call(self._client.lrange, self._recent_key(room_id), 0, -1)
        missed = [m for m in self._messages(room_id, listed) if m.id > last]
        if missed and missed[0].id > last + 1:
            # More was published meanwhile than the recent list keeps: the rest is in
            # the history store, if the nodes share one.
            try:
                older = await self._store.page(room_id, after=last, before=missed[0].id,
                                               limit=min(missed[0].id - last - 1, RECOVER_MAX),
                                               newest_first=False)
            except StoreUnavailable as exc:
                log.warning("room %d: %s", room_id, exc)
                older = []
            missed = older + missed
            if missed[0].id > last + 1:
                log.warning("room %d: messages %d to %d are in no shared history; members "
                            "here miss them", room_id, last + 1, missed[0].id - 1)
        for message in missed:
            for subscriber in subscribers:
                subscriber.deliver(message)

    async def subscribe(self, room_id: int, subscriber: Subscriber) -> None:
        subscribers = self._rooms.setdefault(room_id, [])
        subscribers.append(subscriber)
        if len(subscribers) > 1:
            return
        if not self.connected:
            subscribers.remove(subscriber)
            del self._rooms[room_id]
            raise BrokerUnavailable("Redis is unreachable")
        channel = self._listen_channel(room_id)
        confirmed = self._confirmations.setdefault(channel, trio.Event())
        try:
            with trio.fail_after(self.timeout):
                await bridge.call(self._pubsub.ssubscribe, channel)
                # In cluster mode this may have opened a shard's connection: read it.
                self._start_readers()
                # Only once Redis confirms is every later message ours to see.
                await confirmed.wait()
            if not self.connected:
                raise BrokerUnavailable("Redis is unreachable")
        except UNAVAILABLE as exc:
            await self.unsubscribe(room_id, subscriber)
            self._lose(exc)
            raise BrokerUnavailable(f"Redis is unreachable: {exc!r}") from exc
        except BaseException:
            await self.unsubscribe(room_id, subscriber)
            raise

    async def unsubscribe(self, room_id: int, subscriber: Subscriber) -> None:
        subscribers = self._rooms.get(room_id)
        if subscribers is None or subscriber not in subscribers:
            return
        subscribers.remove(subscriber)
        if subscribers:
            return
        del self._rooms[room_id]
        if self.connected and self._pubsub is not None:
            channel = self._listen_channel(room_id)
            if self.cluster:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
            try:
                with trio.move_on_after(self.timeout) as scope:
                    await bridge.call(self._pubsub.sunsubscribe, channel)
                if scope.cancelled_caught:
                    self._lose(trio.TooSlowError(f"SUNSUBSCRIBE {channel} timed out"))
            except UNAVAILABLE as exc:
                # A reconnection resubscribes only live rooms anyway; in cluster
                # mode only a reconnection notices a shard's connection failing here.
                self._lose(exc)

    async def _command(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            with trio.fail_after(self.timeout):
                return await bridge.call(getattr(self._client, name), *args, **kwargs)
        except UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc

    async def tail(self, room_id: int, limit: int) -> tuple[list[Message], int]:
        # The counter first: whatever is published after it is in the list read next.
        seq = int(await self._command("get", self._seq_key(room_id)) or 0)
        listed = await self._command("lrange", self._recent_key(room_id), -max(limit, 1), -1)
        recent = self._messages(room_id, listed)
        try:
            stored_last = await self._store.last_id(room_id)
        except StoreUnavailable as exc:
            if not seq:
                raise  # Redis has nothing of this room either: its last id is unknown
            # Redis numbers the messages; the store only adds older history.
            log.warning("room %d starts without the history store: %s", room_id, exc)
            stored_last = 0
        last = max(seq, stored_last, *(m.id for m in recent), 0)
        if len(recent) < limit and stored_last:
            # Redis lost the list (a restart, an expiry): the store has the rest.
            merged = {m.id: m for m in await self._store.recent(room_id, limit)}
            merged.update((m.id, m) for m in recent)
            recent = sorted(merged.values(), key=lambda m: m.id)[-limit:]
        return (recent if limit > 0 else []), last

    async def history(self, room_id: int, after: int, before: int) -> list[Message]:
        listed = await self._command("lrange", self._recent_key(room_id), 0, -1)
        merged = {m.id: m for m in self._messages(room_id, listed) if after < m.id < before}
        if len(merged) < before - after - 1:
            stored = await self._store.page(room_id, after=after, before=before,
                                            limit=before - after - 1, newest_first=False)
            merged.update((m.id, m) for m in stored if m.id not in merged)
        return sorted(merged.values(), key=lambda m: m.id)

    async def _sent_after_reconnect(self, draft: Draft) -> Message | None:
        """After a reconnection Redis may have lost its sent keys: the store knows."""
        if draft.client_msg_id is not None and time.monotonic() < self._check_store_until:
            return await sent_to_store(self._store, draft, self.idempotency_window)
        return None

    async def sent_before(self, draft: Draft) -> Message | None:
        if (sent := await self._sent_after_reconnect(draft)) is not None:
            return sent
        if not self.connected:
            # Only a look ahead: publish holds the send for the reconnection and checks.
            return None
        value = await self._command("get", self._sent_key(draft))
        return None if value is None else message_from_wire(json.loads(value))

    async def publish(self, draft: Draft, target: Message | None = None, *,
                      deliver: bool = True) -> tuple[Message, bool]:
        if not self.connected:
            # A blip (a Redis restart, a failover) should not reach the users: hold
            # the send until the reconnection, within reason.
            with trio.move_on_after(self.outage_hold):
                await self._connected.wait()
            if not self.connected:
                raise BrokerUnavailable("Redis is unreachable")
        if (sent := await self._sent_after_reconnect(draft)) is not None:
            return sent, False
        subscribers = self._rooms.get(draft.room_id, ())
        floor = max((s.last_id for s in subscribers), default=0)
        received_at = utc_now()
        unsent = accept(draft, 0, received_at)
        wire = unsent.to_wire()
        del wire["id"]
        body = _json(wire)[1:]
        changed = "" if target is None else _json(apply_change(target, unsent).to_wire())
        keys = [self._seq_key(draft.room_id), self._recent_key(draft.room_id),
                self._log_key(draft.room_id)]
        if draft.client_msg_id is not None:
            keys.append(self._sent_key(draft))
        try:
            with trio.fail_after(self.timeout):
                if self.log:
                    await self._register_log(draft.room_id)
                fresh, value, *entry = await bridge.call(
                    self._script, keys=keys,
                    args=[self._publish_channel(draft.room_id), floor, body,
                          self.recent_size, KEY_TTL, max(1, round(self.idempotency_window)),
                          "" if target is None else target.id, changed,
                          "1" if self.log else ""])
        except UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc
        if not int(fresh):
            return message_from_wire(json.loads(value)), False
        if entry and entry[0]:
            self._log_entries[draft.room_id, int(value)] = entry[0]
        # Delivery comes back through the subscription, like everyone else's.
        return accept(draft, int(value), received_at), True

    def deliver(self, message: Message) -> None:
        pass  # every message comes back through the subscription

    def forget_sent(self, message: Message) -> None:
        pass  # what Redis accepted is durable in its log: it is never refused later

    async def _register_log(self, room_id: int) -> None:
        """Put ``room_id`` in the log registry (before its first entry), at most once a
        :data:`LOG_REGISTER_EVERY`; a sweep only forgets rooms registered long before."""
        now = time.time()
        if now - self._log_registered.get(room_id, -math.inf) < LOG_REGISTER_EVERY:
            return
        await bridge.call(self._client.zadd, self._logs_key, {str(room_id): now})
        if len(self._log_registered) >= SWEEP_ROOMS:
            self._log_registered.clear()
        self._log_registered[room_id] = now

    async def written(self, messages: list[Message]) -> None:
        """The store wrote ``messages``: drop this node's log entries for them."""
        by_room: dict[int, list[str]] = {}
        for message in messages:
            entry = self._log_entries.pop((message.room_id, message.id), None)
            if entry is not None:
                by_room.setdefault(message.room_id, []).append(entry)
        for room_id, entries in by_room.items():
            await self._command("xdel", self._log_key(room_id), *entries)

    async def sweep_logs(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Write to the history store every logged message older than ``orphaned_after``
        (its node died, or cannot write), then drop it from the log.

        Failure boundary: one sweep. Whatever fails (Redis, the store) is logged
        and the next sweep tries again; writing a message twice changes nothing.
        """
        task_status.started()
        failing = False
        while True:
            await trio.sleep(max(0.1, self.orphaned_after / 3))
            if not self.connected:
                continue
            try:
                await self._sweep()
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("sweeping the Redis logs failed (retrying): %r", exc)
                failing = True

    async def _sweep(self) -> None:
        seconds, micros = await self._command("time")
        cutoff = int(seconds) * 1000 + int(micros) // 1000 - round(self.orphaned_after * 1000)
        rooms = await self._command("zrange", self._logs_key, 0, SWEEP_ROOMS - 1,
                                    withscores=True)
        for member, registered in rooms:
            room_id = int(member)
            key = self._log_key(room_id)
            entries = await self._command("xrange", key, "-", str(cutoff),
                                          count=SWEEP_ENTRIES)
            if entries:
                messages = self._messages(room_id, [fields["m"] for _, fields in entries])
                await self._store.write_now(messages)
                await self._command("xdel", key, *(entry for entry, _ in entries))
                self._metrics.orphans_written += len(messages)
                log.info("room %d: wrote %d messages another node had logged but not "
                         "stored", room_id, len(messages))
            elif registered < time.time() - 2 * LOG_REGISTER_EVERY and \
                    not await self._command("xlen", key):
                await self._command("zrem", self._logs_key, member)


    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnected.append(callback)

    async def forget(self, room_id: int) -> None:
        await self._command("delete", self._seq_key(room_id), self._recent_key(room_id),
                            self._log_key(room_id))
        for key in [key for key in self._log_entries if key[0] == room_id]:
            del self._log_entries[key]

    async def control(self, room_id: int, command: dict[str, Any]) -> None:
        data = _json(command)
        assert data.startswith('{"control":'), "the command's first key is control"
        await self._relay(room_id, data)

    async def event(self, room_id: int, text: str) -> None:
        await self._relay(room_id, text)

    async def _relay(self, room_id: int, data: str) -> None:
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            with trio.fail_after(self.timeout):
                await bridge.call(self._relay_script, keys=[self._seq_key(room_id)],
                                  args=[self._publish_channel(room_id), data])
        except UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc

    async def presence(self, room_id: int, add: Collection[int], remove: Collection[int],
                       ttl: float) -> list[int]:
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        args = [self._publish_channel(room_id), self.node, max(1, round(ttl * 1000)),
                utc_now(), room_id, len(remove), *remove, *add]
        try:
            with trio.fail_after(self.timeout):
                online = await bridge.call(self._presence_script,
                                           keys=self._presence_keys(room_id), args=args)
        except UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc
        return sorted(int(author_id) for author_id in online)
