"""The broker that lets several nodes serve the same rooms: :class:`RedisBroker`.

A Lua script (``publish.lua``) increments the room's counter, appends the
message to the room's recent list and publishes it on the room's shard channel
in one atomic step, so every node sees one order and the same ids; every node
hears it back through its subscription (:mod:`.redis_subscription`), which
runs on :mod:`.redis_link`'s connection.

Its tasks: :meth:`RedisBroker.run` (the subscription's) and, when a message is
durable once published (``log``), :meth:`RedisBroker.sweep_logs`, whose
failure boundary is one sweep: it writes to the history store what a node
logged in Redis and did not write (it died, or cannot write).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Any

import attrs
import trio

from .. import bridge
from ..protocol import Draft, Message, accept, apply_change, message_from_wire, utc_now
from ..store import StoreUnavailable
from .base import BrokerUnavailable, sent_to_store
from .redis_link import UNAVAILABLE
from .redis_subscription import RedisSubscription

log = logging.getLogger(__name__)

KEY_TTL = 7 * 24 * 3600
# A node registers a room whose log it writes to at most this often; the sweep
# forgets a room registered less recently than twice this whose log is empty.
LOG_REGISTER_EVERY = 60.0
# Rooms and entries one sweep looks at, at most.
SWEEP_ROOMS = 10_000
SWEEP_ENTRIES = 1000


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@attrs.define(eq=False)
class RedisBroker(RedisSubscription):
    recent_size: int = 100
    # Seconds a room's recent list outlives its last message (server.recentTtl).
    recent_ttl: float = 86400.0
    # Keep each message in its room's Redis log until this node (or, if it dies,
    # another) has written it to the history store: it is durable once published.
    log: bool = False
    # Seconds after which a logged message not yet written is any node's to write.
    orphaned_after: float = 30.0
    # Log entry of each message this node published and has not written yet.
    _log_entries: dict[tuple[int, int], str] = attrs.field(init=False, factory=dict)
    # When this node last registered each room in the log registry (wall clock).
    _log_registered: dict[int, float] = attrs.field(init=False, factory=dict)

    @property
    def durable_on_publish(self) -> bool:
        return self.log

    def _log_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:log"

    @property
    def _logs_key(self) -> str:
        """The rooms whose log may hold messages, scored by when a node last said so."""
        return f"{self._config.publish_channel_name}:logs"

    def _seq_key(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}:seq"

    def _sent_key(self, draft: Draft) -> str:
        return (f"{self._config.publish_channel_name}:{{{draft.room_id}}}:sent:"
                f"{draft.author_id}:{draft.client_msg_id}")

    def _presence_keys(self, room_id: int) -> list[str]:
        prefix = f"{self._config.publish_channel_name}:{{{room_id}}}"
        return [f"{prefix}:presence", f"{prefix}:online"]

    def _publish_channel(self, room_id: int) -> str:
        return f"{self._config.publish_channel_name}:{{{room_id}}}"

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
            # the send until the reconnection, within reason. The hold is one for
            # all: the connection's reader (and its pings) waits on this send.
            with trio.move_on_at(self._hold_until or trio.current_time() + self.outage_hold):
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
                          "1" if self.log else "", max(1, round(self.recent_ttl))])
        except UNAVAILABLE as exc:
            self._fail(exc)
            raise BrokerUnavailable(f"Redis is unreachable: {exc!r}; the message may have "
                                    "been accepted: send it again with its "
                                    "client_msg_id") from exc
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
            self._fail(exc)
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
