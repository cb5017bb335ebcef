"""The subscription side of the Redis broker: :class:`RedisSubscription`.

A node subscribes to a room's shard channel only while the room is alive
there. Its one task, :meth:`RedisSubscription.run`, reads the subscription and
reconnects (capped, jittered backoff) when Redis goes away, then resubscribes
and delivers what its rooms missed.

The configured Redis may be one node of a Redis Cluster (``INFO cluster`` says
``cluster_enabled:1``); the broker then talks to the whole cluster. A room's
keys and its shard channel carry the room's ``{hash tag}``, so they live on one
shard and the script runs there. Subscriptions keep one connection per shard
node, each read by a task of its own below :meth:`RedisSubscription.run`; losing any
of them counts as losing Redis. So does a Redis that hangs (stopped, or a
network that drops packets): a subscription connection that has heard nothing
for half the broker's timeout sends a PING, and no answer within the timeout
counts as losing Redis.

One payload is a failure boundary: whatever anyone publishes on a room's
channel is checked (:func:`~trio_chat.payloads.read_payload`) before it reaches
the room, and one that is not JSON, malformed, of an unknown kind or for
another room is dropped, as is one whose delivery fails unexpectedly. Each drop
is counted (``broker_payloads_dropped``) and logged, at most once a minute per
kind of problem; the subscription and every other room go on.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import redis.asyncio
import redis.asyncio.cluster
import trio

from .. import bridge
from ..payloads import PayloadError, RelayedEvent, read_payload
from ..protocol import Message
from ..store import StoreUnavailable
from .base import BrokerUnavailable, Subscriber
from .redis_link import UNAVAILABLE, RedisLink

log = logging.getLogger(__name__)

RECONNECT_MAX_DELAY = 5.0
# Most messages a room recovers from the history store after a reconnection.
RECOVER_MAX = 10_000


@attrs.define
class _Quiet:
    """When a subscription connection last heard from Redis, and when it sent a PING
    not answered yet."""

    heard: float
    pinged: float | None = None


@attrs.define(eq=False)
class RedisSubscription(RedisLink):
    """Reads the subscription and hands each payload to its room here."""

    def _fail(self, exc: Exception) -> None:
        """Redis is gone or hung: sends stop waiting for it, and (if the subscription
        has not noticed yet) its reader raises, so run() reconnects."""
        if self._hold_until is None:
            self._hold_until = trio.current_time() + self.outage_hold
        if self.connected:
            self._connected = trio.Event()
            self._lost = exc

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
                    self._fail(exc)
                    self._lost = None  # noticed: run() is reconnecting
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
        if self._lost is not None:
            raise redis.ConnectionError(f"a command failed: {self._lost!r}")
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
        send, receive = trio.open_memory_channel[list[dict[str, Any]] | Exception](16)

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
            # A recovery, not a problem.
            log.info("Redis is back after %.1fs; resubscribed %d rooms",
                        trio.current_time() - self.down_since, len(self._rooms))
            self.down_since = None
        self._hold_until = None
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
