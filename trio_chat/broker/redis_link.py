"""One node's link to Redis: :class:`RedisLink`, the base of the Redis broker.

Owns the connection: the client (to a single Redis, or to a whole Redis Cluster
when the configured node says ``cluster_enabled:1``), the subscription
connection (one per shard node in a cluster), the Lua scripts (``publish.lua``,
``presence.lua``, ``relay.lua``, package data), and the names of the keys and
channels every node shares. It also declares the state the two layers above
keep, so that the broker is built with one list of fields.

It runs no tasks: :mod:`.redis_subscription` reads the subscription and
reconnects, :mod:`.redis_broker` publishes. The ``_aio_*`` methods are
asyncio-flavoured and run only through :func:`trio_chat.bridge.call`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
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
from ..store import Store
from .base import Subscriber


def _lua(name: str) -> str:
    """A script of this package; its comment block says what it takes and returns."""
    return files("trio_chat.broker").joinpath(name).read_text(encoding="utf-8")


_PUBLISH = _lua("publish.lua")
_PRESENCE = _lua("presence.lua")
_RELAY = _lua("relay.lua")

# What an unreachable (or refusing) Redis raises. redis-py's cluster client raises
# RedisClusterException, which is not a RedisError, when no node answers.
UNAVAILABLE = (redis.RedisError, redis.exceptions.RedisClusterException, OSError,
               trio.TooSlowError)
# Commands in flight to one cluster node at once (redis-py refuses more, it does not wait).
CLUSTER_NODE_CONNECTIONS = 1000
# Clients (with their subscriptions) whose close a hung Redis held up, kept to close later.
UNCLOSED_MAX = 8


@attrs.define(eq=False)
class RedisLink:
    """The connection to Redis, and the state of the layers above (see the module)."""

    _config: RedisConfig
    _store: Store
    timeout: float = 5.0
    idempotency_window: float = 600.0
    # How long a send waits for a lost Redis to come back before it is refused.
    outage_hold: float = 3.0
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
    # The token Redis held when this node last saw it: a different one (or none)
    # means Redis lost its data meanwhile, sent-id records included.
    _epoch: str | None = attrs.field(init=False, default=None)
    # (subscription, client) pairs whose close has not finished (a hung Redis).
    _unclosed: list[tuple[Any, Any]] = attrs.field(init=False, factory=list)
    _last_closed: tuple[Any, Any] = attrs.field(init=False, default=(None, None))
    # Set when a send finds Redis gone or hung before the subscription does: the
    # reader raises it, so run() reconnects.
    _lost: Exception | None = attrs.field(init=False, default=None)
    # Sends wait for Redis until then (outage_hold after it was found lost), then
    # are refused at once: one frame after another must not each wait the hold.
    _hold_until: float | None = attrs.field(init=False, default=None)

    @property
    def _epoch_key(self) -> str:
        return f"{self._config.publish_channel_name}:epoch"

    def _recent_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:recent"

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
        """Asyncio flavour. Close the client and the subscription, and any a hung Redis
        kept from closing before (see :meth:`_close`)."""
        pair, self._pubsub, self._client = (self._pubsub, self._client), None, None
        self._unclosed.append(pair)
        # A Redis hung for hours fails a reconnection every few seconds: keep the
        # newest few, the rest are left to the garbage collector.
        del self._unclosed[:-UNCLOSED_MAX]
        while self._unclosed:
            pubsub, client = self._unclosed[0]
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
            self._unclosed.pop(0)
            self._last_closed = (pubsub, client)

    async def _aio_read(self) -> list[dict[str, Any]]:
        """Asyncio flavour. Wait up to a second for messages, then take what is there."""
        batch: list[dict[str, Any]] = []
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

    async def close_late(self) -> None:
        """Close the last client again, once every task that used it has ended (one
        cancelled mid-command may have opened a connection after it was closed)."""
        pubsub, client = self._last_closed
        self._unclosed.append((pubsub, client))
        with trio.move_on_after(2, shield=True):
            await bridge.call(self._aio_close)

    async def _close(self) -> None:
        # A stopped Redis may keep its sockets from closing within the deadline: they
        # stay in _unclosed, and the next close (after a reconnection, or at shutdown)
        # closes them, so none is left to the garbage collector.
        with trio.move_on_after(2, shield=True):
            await bridge.call(self._aio_close)
