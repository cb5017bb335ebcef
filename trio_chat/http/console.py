"""The operator console: its page (``GET /console`` and ``/console/console.js``) and
its live feed, ``GET /console/events``.

The feed is server-sent events: one ``stats`` event a second describing this
node (connections, live rooms, messages in and out per second, the store's lag)
and its busiest rooms (connections, authors online, messages per second), read
from the counters ``/metrics`` shows and from the hub's live rooms. The page
loads without the admin key; the feed, like every action the page takes
through the rooms API, needs it.

Each reader's feed runs in its own HTTP connection's task, and nothing is ever
queued for it: the next update is made once the last one is written. A reader
that has not taken an update within :data:`SEND_WAIT` seconds is dropped (its
connection closes) rather than buffered for; the page reconnects. Runs no task
of its own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import partial
from importlib import resources
from typing import Any

import attrs
import trio

from .base import Request, Response, Route, Write
from .services import Services

log = logging.getLogger(__name__)

# Seconds between updates.
INTERVAL = 1.0
# A reader that has not taken an update within this many seconds is dropped.
SEND_WAIT = 5.0
# Rooms in an update, the most connected first; the update says how many are live.
ROOMS_SHOWN = 100

_STATIC = resources.files("trio_chat").joinpath("static")
# Read once at import: part of the package, never changed while serving.
_PAGE = _STATIC.joinpath("console.html").read_bytes()
_SCRIPT = _STATIC.joinpath("console.js").read_bytes()
# The page runs only its own script and talks only to its own node; no framing.
_PAGE_HEADERS = (("cache-control", "no-cache"), ("x-content-type-options", "nosniff"),
                 ("content-security-policy",
                  "default-src 'none'; script-src 'self'; connect-src 'self'; "
                  "style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"))


# What the feed reads, one accessor each, so a renamed counter is followed here.
def connections_open(services: Services) -> int:
    return len(services.hub.connections)


def rooms_live(services: Services) -> int:
    return len(services.hub.rooms)


def messages_received(services: Services) -> int:
    return services.metrics.messages_received


def messages_delivered(services: Services) -> int:
    return services.metrics.messages_delivered


def store_lag(services: Services) -> int:
    return services.history.lag


def unexpected_errors(services: Services) -> int:
    return services.metrics.unexpected_errors


@attrs.define
class Sampler:
    """Makes one reader's updates; rates are the change since its previous update."""

    _services: Services
    _at: float | None = attrs.field(init=False, default=None)
    _received: int = attrs.field(init=False, default=0)
    _delivered: int = attrs.field(init=False, default=0)
    # The last message id seen in each room shown, for its rate.
    _last_ids: dict[int, int] = attrs.field(init=False, factory=dict)

    def sample(self) -> dict[str, Any]:
        services, node = self._services, self._services.node
        now = trio.current_time()
        elapsed = None if self._at is None else max(now - self._at, 1e-3)

        def rate(now_count: int, before: int) -> float:
            return 0.0 if elapsed is None else round(max(now_count - before, 0) / elapsed, 2)

        received, delivered = messages_received(services), messages_delivered(services)
        live = sorted(services.hub.rooms.values(), key=lambda r: (-len(r.members), r.id))
        rooms = []
        last_ids = {}
        for room in live[:ROOMS_SHOWN]:
            authors = {m.author_id for m in room.members if m.author_id is not None}
            rooms.append({
                # A string: 64-bit ids do not fit a JavaScript number.
                "id": str(room.id), "connections": len(room.members),
                "online": len(authors), "last_id": room.last_id,
                "rate": rate(room.last_id, self._last_ids.get(room.id, room.last_id))})
            last_ids[room.id] = room.last_id
        update = {
            "node": {"id": node.id, "worker": node.worker, "host": node.host, "pid": node.pid,
                     "uptime": round(time.time() - node.started, 1)},
            "connections": connections_open(services),
            "rooms_live": rooms_live(services),
            "messages_received": received,
            "received_rate": rate(received, self._received),
            "delivered_rate": rate(delivered, self._delivered),
            "store_lag": store_lag(services),
            "unexpected_errors": unexpected_errors(services),
            "rooms": rooms,
        }
        self._at, self._received, self._delivered = now, received, delivered
        self._last_ids = last_ids
        return update


def stats_event(update: dict[str, Any]) -> bytes:
    return b"event: stats\ndata: " + json.dumps(update).encode() + b"\n\n"


async def feed(services: Services, remote: str, write: Write, *,
               interval: float = INTERVAL, send_wait: float = SEND_WAIT) -> None:
    """Write an update every ``interval`` seconds until the reader goes or falls
    ``send_wait`` seconds behind (then return: the connection closes)."""
    sampler = Sampler(services)
    next_at = trio.current_time()
    while True:
        with trio.move_on_after(send_wait) as scope:
            await write(stats_event(sampler.sample()))
        if scope.cancelled_caught:
            log.info("%s: console feed dropped: an update was not taken within %gs",
                     remote, send_wait)
            return
        # Updates missed while writing are skipped, never sent late.
        now = trio.current_time()
        next_at = max(next_at + interval, now)
        await trio.sleep_until(next_at)


async def _events(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, b"", "text/event-stream",
                    (("cache-control", "no-store"), ("x-accel-buffering", "no")),
                    stream=partial(feed, services, request.remote))


async def _page(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, _PAGE, "text/html; charset=utf-8", _PAGE_HEADERS)


async def _script(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, _SCRIPT, "text/javascript; charset=utf-8",
                    (("cache-control", "no-cache"), ("x-content-type-options", "nosniff")))


ROUTES: list[Route] = [
    Route("GET", re.compile(r"/console\Z"), _page),
    Route("GET", re.compile(r"/console/console\.js\Z"), _script),
    Route("GET", re.compile(r"/console/events\Z"), _events, "admin"),
]
