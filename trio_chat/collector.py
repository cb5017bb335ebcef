"""The garbage collector's schedule, for a process holding many long-lived connections.

Owns CPython's collector settings in the serving process: the thresholds
(:func:`tune_gc`, set once before the event loop starts) and one task,
:func:`freeze_after_joins`, which :func:`trio_chat.process.serve` runs beside
its server. Tests and embedders that run a :class:`~trio_chat.server.Server`
in their own process keep their collector as it is.

A connection's objects live as long as it does. Young collections that find them
alive promote them, and the next collection of the generation they reached walks
every one of them: after 10,000 joins, a middle-generation collection stopped the
loop for 313 ms in the chat that followed (``scripts/bench_rooms.py --rate 2750``:
p99 300 ms; 8 ms with the task). So after start-up and after every second with a
burst of joins, the task moves every live object to the permanent generation
(``gc.freeze``, a splice of lists), which no collection walks.

Frozen objects are still freed when nothing refers to them, but cycles among them
are never collected. So once connections have closed and the heap has grown by a
quarter since the last full collection (CPython's own rule for a full collection:
a quarter of the long-lived objects new), the task unfreezes, runs one full
collection and freezes what survived. Joins alone never trigger one, nor does
churn that leaves no cycles behind (its frozen objects are freed as they go). The
heap's size is ``sys.getallocatedblocks()``, which visits the allocator's pools
(0.7 ms for 4 million blocks), asked only after closes. ``gc.get_freeze_count()``
would walk every frozen object (12 ms for a million on an idle core); asked every
second, it set the chat's p99 at 80 ms.

Nothing here raises, so the task has no failure boundary of its own.
"""

from __future__ import annotations

import enum
import gc
import logging
import sys
from collections.abc import Callable

import attrs
import trio

log = logging.getLogger(__name__)

# CPython's defaults (700, 10, 10) suit a process whose objects come and go. A server
# holding 10,000 connections has about a million GC-tracked objects that live as long
# as their connections, and with the defaults a full collection, which walks them all,
# came every few seconds under load and took 1 to 2.5 s each (bench_rooms at 500 msg/s:
# 11 s of 40 in gen-2 collections, p99 4.8 s, 2,382 deliveries lost). Fewer young
# collections promote fewer objects, so full collections become rare; cycles are
# still collected, later.
GC_THRESHOLDS = (50_000, 20, 100)
# Joins since the last freeze that make a burst worth freezing; closes since the last
# full collection that may have left cycles worth one.
BURST = 256
# A full collection once the heap is this much larger than after the last.
GROWTH = 1.25
CHECK_EVERY = 1.0


def tune_gc() -> None:
    """Set this process's garbage-collector thresholds for many long-lived connections."""
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("gc thresholds: %s", ", ".join(map(str, gc.get_threshold())))


class Action(enum.Enum):
    NOTHING = "nothing"
    FREEZE = "freeze"
    COLLECT = "collect"


@attrs.define
class FreezePolicy:
    """When to freeze and when to collect (sans-IO).

    :meth:`step` is given, once a second, the connections accepted so far, those
    open now and a way to measure the heap, which it calls only once enough
    connections have closed; it says what to do. After a collection,
    :meth:`collected` is given the heap's size.
    """

    accepted: int = 0
    closed: int = 0
    # The heap's size after the last full collection (or the first freeze).
    heap: int = 0

    def step(self, accepted: int, open_now: int, heap: Callable[[], int]) -> Action:
        closed = accepted - open_now
        if closed - self.closed >= BURST and heap() >= self.heap * GROWTH:
            self.accepted, self.closed = accepted, closed
            return Action.COLLECT
        if accepted - self.accepted >= BURST:
            self.accepted = accepted
            return Action.FREEZE
        return Action.NOTHING

    def collected(self, heap: int) -> None:
        self.heap = heap


async def freeze_after_joins(counts: Callable[[], tuple[int, int]], *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
    """Freeze the heap now and after bursts of joins; collect after churn and growth.

    ``counts()`` gives (connections accepted so far, connections open now). Leaves
    the collector unfrozen when cancelled.
    """
    gc.freeze()  # what start-up made: modules, configuration, the server's parts
    log.debug("heap frozen after start-up: %d objects", gc.get_freeze_count())
    accepted, open_now = counts()
    policy = FreezePolicy(accepted, accepted - open_now, sys.getallocatedblocks())
    task_status.started()
    try:
        while True:
            await trio.sleep(CHECK_EVERY)
            action = policy.step(*counts(), sys.getallocatedblocks)
            if action is Action.FREEZE:
                gc.freeze()
            elif action is Action.COLLECT:
                gc.unfreeze()
                found = gc.collect()
                gc.freeze()
                policy.collected(sys.getallocatedblocks())
                log.debug("full collection after churn: %d objects freed, %d memory "
                          "blocks in use", found, policy.heap)
    finally:
        gc.unfreeze()
