"""Counters and gauges, rendered in the Prometheus text format, and how a failure
boundary reports what it caught. Runs no tasks.

Counters are plain integer attributes bumped on the hot path (no locks: trio
runs one task at a time); gauges that already live elsewhere (open
connections, live rooms, trio tasks) are read when ``/metrics`` is scraped.

A failure boundary (one frame, one broker payload, one room, presence, one
connection, one HTTP request) catches ``Exception``, never ``BaseException``,
so cancellation passes through, and calls :meth:`Metrics.unexpected`: the
failure is counted and logged once with its traceback, so a bug is seen
without being fatal. :class:`LogThrottle` keeps a failure that repeats (a
stream of bad payloads) from flooding the log.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable

import attrs
import trio


def count_tasks(root: trio.lowlevel.Task | None = None) -> int:
    """Every task in the tree under ``root`` (default: the run's root task), itself included."""
    stack = [root or trio.lowlevel.current_root_task()]
    count = 0
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


@attrs.define
class LogThrottle:
    """Lets one log record per key through every ``interval`` seconds and counts the
    ones it holds back, which the next record reports."""

    interval: float = 60.0
    _next: dict[str, float] = attrs.field(init=False, factory=dict)
    _held: Counter[str] = attrs.field(init=False, factory=Counter)

    def allow(self, key: str) -> int | None:
        """None: hold this record back. Else log it, saying how many were held back."""
        now = time.monotonic()
        if now < self._next.get(key, -math.inf):
            self._held[key] += 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)


@attrs.define
class Metrics:
    connections_total: int = 0
    messages_received: int = 0
    duplicates: int = 0
    messages_delivered: int = 0
    events_delivered: int = 0
    presence_failures: int = 0
    slow_consumer_disconnects: int = 0
    bad_frames: int = 0
    oversized_frames: int = 0
    handshake_failures: int = 0
    http_requests: int = 0
    store_refusals: int = 0
    store_written: int = 0
    store_errors: int = 0
    store_dead_letters: int = 0
    unexpected_errors: int = 0
    auth_failures: int = 0
    origin_refusals: int = 0
    ip_limit_refusals: int = 0
    rate_limited: int = 0
    flood_disconnects: int = 0
    frame_failures: int = 0
    broker_payloads_dropped: int = 0
    room_failures: int = 0
    connection_failures: int = 0
    http_errors: int = 0
    settle_failures: int = 0
    orphans_written: int = 0
    # Gauges read at scrape time; the server plugs in its own readers.
    gauges: dict[str, tuple[str, Callable[[], float]]] = attrs.field(factory=dict)

    def unexpected(self, counter: str, logger: logging.Logger, message: str, *args: object,
                   throttle: LogThrottle | None = None) -> None:
        """At a failure boundary, in its ``except Exception`` clause: count the failure
        in ``counter`` and log ``message`` once, at error level, with the traceback.

        ``throttle`` limits the log (never the count) per kind of exception.
        """
        setattr(self, counter, getattr(self, counter) + 1)
        self.unexpected_errors += 1
        if throttle is not None:
            held = throttle.allow(f"{counter}:{type(sys.exc_info()[1]).__name__}")
            if held is None:
                return
            if held:
                message += " (%d more since the last report)"
                args = (*args, held)
        logger.error(message, *args, exc_info=True)

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []

        def emit(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")

        for name, help_text in _COUNTERS:
            emit(f"triochat_{name}", "counter", help_text, getattr(self, name))
        for name, (help_text, read) in sorted(self.gauges.items()):
            emit(f"triochat_{name}", "gauge", help_text, read())
        return "\n".join(lines) + "\n"


_COUNTERS: Iterable[tuple[str, str]] = (
    ("connections_total", "WebSocket connections accepted since start."),
    ("messages_received", "Chat messages accepted from clients."),
    ("duplicates", "Messages sent again with a client_msg_id already accepted (acked, "
                   "not published)."),
    ("messages_delivered", "Frames queued for room members by fan-out."),
    ("events_delivered", "Event frames (chat_enter, chat_exit, typing) queued for room members."),
    ("presence_failures", "Presence updates that failed, the broker unreachable or an "
                          "unexpected error (each retried)."),
    ("slow_consumer_disconnects", "Connections closed because they could not keep up."),
    ("bad_frames", "Client frames refused with an error frame."),
    ("oversized_frames", "Connections closed for a frame over the size limit (1009)."),
    ("handshake_failures", "Connections that ended before or during the upgrade."),
    ("http_requests", "Plain HTTP requests served."),
    ("store_refusals", "Messages refused because the store's buffer was full."),
    ("store_written", "Messages written to the message store."),
    ("store_errors", "Failed store writes (each retried)."),
    ("store_dead_letters", "Messages the database refused, set aside in dead_letters."),
    ("unexpected_errors", "Exceptions caught at a failure boundary that expected none "
                          "(a bug: logged with its traceback)."),
    ("auth_failures", "Requests and upgrades refused for a missing, bad or insufficient "
                      "token or admin key."),
    ("origin_refusals", "WebSocket upgrades refused for their Origin."),
    ("ip_limit_refusals", "WebSocket upgrades refused: too many connections from the address."),
    ("rate_limited", "Client frames refused for going over the message rate."),
    ("flood_disconnects", "Connections closed (1008) for flooding past the rate limit."),
    ("frame_failures", "Connections closed (1011) by an unexpected error handling one of "
                       "their frames."),
    ("broker_payloads_dropped", "Payloads from the broker dropped: not JSON, malformed, of "
                                "an unknown kind, for another room, or failing unexpectedly."),
    ("room_failures", "Rooms ended by an unexpected error once started (their members "
                      "closed with 1011)."),
    ("connection_failures", "Connections ended by an unexpected error."),
    ("http_errors", "HTTP requests answered 500: an unexpected error in their handler."),
    ("settle_failures", "Errors telling a sender (or a room) what became of a message."),
    ("orphans_written", "Messages this node wrote to history from a room's Redis log, "
                        "accepted by a node that did not write them (it died or lost "
                        "its database)."),
)
