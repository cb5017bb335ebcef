"""Counters, gauges and histograms, rendered in the Prometheus text format
(version 0.0.4), and how a failure boundary reports what it caught. Runs no tasks.

Counters are plain integer attributes bumped on the hot path (no locks: trio
runs one task at a time); gauges that already live elsewhere (open
connections, live rooms, trio tasks) are read when ``/metrics`` is scraped. A
:class:`Histogram` keeps its bucket counts as a list of plain ints: observing
is one ``bisect`` and one increment, and nothing is allocated per delivery (a
fan-out observes once, weighted by its members).

The exposition follows Prometheus' conventions: counters end in ``_total``,
units are in the names in base units (seconds, bytes), every family has HELP
and TYPE lines, and kinds of one thing are one family with a label
(``triochat_refusals_total{reason=...}``, ``triochat_disconnects_total{reason=...}``).
:data:`_COUNTERS` maps the Python attributes onto those families, so code keeps
bumping ``metrics.rate_limited`` while Prometheus sees a labelled series.

Why not ``prometheus_client`` at runtime: the tests use its text parser to check
this output, the server does not import it. Measured on the shared 2-core test
machine (Python 3.11, timeit): bumping a plain attribute costs 64 ns,
``prometheus_client.Counter.inc()`` 581 ns (a lock and a float per call), so the
hot path keeps plain ints either way, and prometheus_client could only render
them, through a custom collector that builds its family objects on every
scrape: 1.2 ms per scrape against 0.24 ms for :func:`render` here, same
families. A dependency that is slower at the one thing it would do is not
worth it. :meth:`Histogram.observe` costs 190 ns, once per fan-out, not per
member.

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
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence

import attrs
import trio

from .process_metrics import process_metrics

# Upper bounds, in seconds, of latency buckets: from half a millisecond (a fan-out on
# an idle node) to 10 s (a store write's deadline).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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


@attrs.define(eq=False)
class Histogram:
    """A Prometheus histogram: per-bucket counts (not cumulative until rendered) and
    the sum of what was observed."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    # counts[i] holds observations in (bounds[i-1], bounds[i]]; the last one is +Inf.
    counts: list[int] = attrs.field(init=False)
    sum: float = attrs.field(init=False, default=0.0)

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def observe(self, value: float, n: int = 1) -> None:
        """Count ``n`` observations of ``value`` (n > 1: one fan-out to n members)."""
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is <=).
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def samples(self) -> list[tuple[str, str, float]]:
        """``(suffix, labels, value)`` rows of the exposition: cumulative buckets,
        then ``_sum`` and ``_count``."""
        rows: list[tuple[str, str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            rows.append(("_bucket", f'le="{_number(float(bound))}"', total))
        rows.append(("_sum", "", self.sum))
        rows.append(("_count", "", total))
        return rows


@attrs.frozen
class Family:
    """One metric family as exposed: its name, kind, help and samples, each sample a
    ``(suffix, labels, value)`` with labels already in exposition syntax."""

    name: str
    kind: str
    help: str
    samples: Sequence[tuple[str, str, float]]


@attrs.define
class Metrics:
    connections_total: int = 0
    messages_received: int = 0
    duplicates: int = 0
    messages_delivered: int = 0
    events_delivered: int = 0
    # Members handed a large room's frames by the flusher (a write or a queue entry
    # each), and the frames those carried.
    room_flush_writes: int = 0
    room_flushed_frames: int = 0
    # permessage-deflate: frames compressed (once per message and window, never per
    # member), and their bytes before and after.
    deflated_frames: int = 0
    deflate_in_bytes: int = 0
    deflate_out_bytes: int = 0
    presence_failures: int = 0
    slow_consumer_disconnects: int = 0
    bad_frames: int = 0
    oversized_frames: int = 0
    inbound_budget_disconnects: int = 0
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
    # From a message's acceptance to its fan-out here, once per member (received_at
    # has millisecond resolution).
    delivery_latency: Histogram = attrs.field(factory=Histogram)
    # From a message's acceptance to its commit in the history store.
    store_write_lag: Histogram = attrs.field(factory=Histogram)
    # How late the event loop ran a task that asked to wake (trio_chat.lag).
    loop_lag: Histogram = attrs.field(factory=Histogram)
    # Gauges read at scrape time; the server plugs in its own readers.
    gauges: dict[str, tuple[str, Callable[[], float]]] = attrs.field(factory=dict)
    # Labels on every sample, in exposition syntax: 'worker="2"' under --workers.
    labels: str = ""
    # Under --workers: given this process's families, every worker's (trio_chat.workers).
    merge: Callable[[list[Family]], list[Family]] | None = None

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
        """``name`` without the ``triochat_`` prefix, its unit in it (``_seconds``)."""
        self.gauges[name] = (help_text, read)

    def families(self) -> list[Family]:
        """This process's metric families, each sample carrying :attr:`labels`."""
        families = []
        for name, help_text, series in _COUNTERS:
            families.append(Family(f"triochat_{name}", "counter", help_text, [
                ("", labels, getattr(self, attribute)) for attribute, labels in series]))
        for name, (help_text, read) in sorted(self.gauges.items()):
            families.append(Family(f"triochat_{name}", "gauge", help_text, [("", "", read())]))
        for name, help_text, attribute in _HISTOGRAMS:
            histogram: Histogram = getattr(self, attribute)
            families.append(Family(f"triochat_{name}", "histogram", help_text,
                                   histogram.samples()))
        families.extend(Family(name, kind, help_text, [("", "", value)])
                        for name, kind, help_text, value in process_metrics())
        if self.labels:
            families = [attrs.evolve(f, samples=[
                (suffix, f"{labels},{self.labels}" if labels else self.labels, value)
                for suffix, labels, value in f.samples]) for f in families]
        return families

    def render(self) -> str:
        """The text exposition: this process's, or every worker's under ``--workers``."""
        families = self.families()
        if self.merge is not None:
            families = self.merge(families)
        return render(families)


def render(families: Sequence[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            labelled = f"{family.name}{suffix}{{{labels}}}" if labels else family.name + suffix
            lines.append(f"{labelled} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # repr, not %g: a start time in seconds since 1970 needs all its digits.
    return repr(value)


def _reasons(**attributes: str) -> list[tuple[str, str]]:
    return [(attribute, f'reason="{reason}"') for reason, attribute in attributes.items()]


# Exposed counter families: (name without triochat_, help, [(attribute, labels)]).
_COUNTERS: Sequence[tuple[str, str, list[tuple[str, str]]]] = (
    ("connections_total", "WebSocket connections accepted.", [("connections_total", "")]),
    ("messages_received_total", "Chat messages accepted from clients.",
     [("messages_received", "")]),
    ("duplicate_messages_total", "Messages sent again with a client_msg_id already "
     "accepted (acked, not published).", [("duplicates", "")]),
    ("messages_delivered_total", "Frames queued for room members by fan-out.",
     [("messages_delivered", "")]),
    ("events_delivered_total", "Event frames (chat_enter, chat_exit, typing) queued for "
     "room members.", [("events_delivered", "")]),
    ("room_flush_writes_total", "Members handed a large room's frames by the flusher: "
     "one write or one queue entry each, however many frames.",
     [("room_flush_writes", "")]),
    ("room_flushed_frames_total", "Frames (messages and events) those writes carried; "
     "over room_flush_writes_total, the frames per write.",
     [("room_flushed_frames", "")]),
    ("deflated_frames_total", "Frames compressed for permessage-deflate connections: once "
     "per message (and window size) however many members it goes to.",
     [("deflated_frames", "")]),
    ("deflate_bytes_total", "Bytes of the frames compressed, before (stage=\"in\") and "
     "after (stage=\"out\"); per compression, not per member.",
     [("deflate_in_bytes", 'stage="in"'), ("deflate_out_bytes", 'stage="out"')]),
    ("refusals_total", "Requests, upgrades and frames refused, by reason: auth (missing, "
     "bad or insufficient token or admin key), origin, ip_limit (too many connections "
     "from the address), rate_limited (over the message rate), bad_frame (an error "
     "frame), store_full (the store's buffer full: persistence_unavailable).",
     _reasons(auth="auth_failures", origin="origin_refusals", ip_limit="ip_limit_refusals",
              rate_limited="rate_limited", bad_frame="bad_frames",
              store_full="store_refusals")),
    ("disconnects_total", "Connections the server closed for the client's behaviour, by "
     "reason: slow_consumer (4001), flood (1008), frame_too_big (1009), inbound_budget "
     "(1013: the address's or the server's inbound budget full).",
     _reasons(slow_consumer="slow_consumer_disconnects", flood="flood_disconnects",
              frame_too_big="oversized_frames",
              inbound_budget="inbound_budget_disconnects")),
    ("handshake_failures_total", "Connections that ended before or during the upgrade.",
     [("handshake_failures", "")]),
    ("http_requests_total", "Plain HTTP requests served.", [("http_requests", "")]),
    ("store_messages_written_total", "Messages written to the history store.",
     [("store_written", "")]),
    ("store_write_errors_total", "Failed store writes (each retried).",
     [("store_errors", "")]),
    ("store_dead_letters_total", "Messages the database refused, set aside in dead_letters.",
     [("store_dead_letters", "")]),
    ("unexpected_errors_total", "Exceptions caught at a failure boundary that expected "
     "none (a bug: logged with its traceback).", [("unexpected_errors", "")]),
    ("frame_failures_total", "Connections closed (1011) by an unexpected error handling "
     "one of their frames.", [("frame_failures", "")]),
    ("broker_payloads_dropped_total", "Payloads from the broker dropped: not JSON, "
     "malformed, of an unknown kind, for another room, or failing unexpectedly.",
     [("broker_payloads_dropped", "")]),
    ("room_failures_total", "Rooms ended by an unexpected error once started (their "
     "members closed with 1011).", [("room_failures", "")]),
    ("presence_failures_total", "Presence updates that failed, the broker unreachable or "
     "an unexpected error (each retried).", [("presence_failures", "")]),
    ("connection_failures_total", "Connections ended by an unexpected error.",
     [("connection_failures", "")]),
    ("http_errors_total", "HTTP requests answered 500: an unexpected error in their "
     "handler.", [("http_errors", "")]),
    ("settle_failures_total", "Errors telling a sender (or a room) what became of a "
     "message.", [("settle_failures", "")]),
    ("orphans_written_total", "Messages this node wrote to history from a room's Redis "
     "log, accepted by a node that did not write them (it died or lost its database).",
     [("orphans_written", "")]),
)

# Exposed histograms: (name without triochat_, help, attribute).
_HISTOGRAMS: Sequence[tuple[str, str, str]] = (
    ("delivery_latency_seconds", "From a message's acceptance (received_at) to its "
     "fan-out to this node's members, once per member.", "delivery_latency"),
    ("store_write_lag_seconds", "From a message's acceptance to its commit in the "
     "history store.", "store_write_lag"),
    ("event_loop_lag_seconds", "How late the event loop woke a task that asked to wake "
     "(a blocked or overloaded loop).", "loop_lag"),
)
