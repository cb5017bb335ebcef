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
p99 300 ms; 8 ms with the task). So after every second with a burst of joins,
the task moves every live object to the permanent generation (``gc.freeze``, a
splice of lists), which no collection walks. Cycles among frozen objects are never
collected, so once a quarter of the connections frozen have closed, the task
unfreezes, runs one full collection (about when CPython's own rule, a full
collection once a quarter of the long-lived objects are new, would run it) and
freezes what survived.

Nothing here raises, so the task has no failure boundary of its own.
"""

from __future__ import annotations

import enum
import gc
import logging
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
# Joins since the last freeze that make a burst worth freezing, and the fewest closed
# connections worth a full collection.
BURST = 256
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
    """When to freeze and when to collect, from connection counts alone (sans-IO).

    ``step`` is given the connections accepted so far and those open now, once a
    second, and says what to do; ``accepted`` and ``closed`` start at the counts
    of the first freeze.
    """

    accepted: int = 0
    closed: int = 0
    # Connections open at the last collection (or the first freeze).
    held: int = 0

    def step(self, accepted: int, open_now: int) -> Action:
        closed = accepted - open_now
        if closed - self.closed >= max(BURST, self.held // 4):
            self.accepted, self.closed, self.held = accepted, closed, open_now
            return Action.COLLECT
        if accepted - self.accepted >= BURST:
            self.accepted = accepted
            return Action.FREEZE
        return Action.NOTHING


async def freeze_after_joins(counts: Callable[[], tuple[int, int]], *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
    """Freeze the heap now and after bursts of joins; collect after churn.

    ``counts()`` gives (connections accepted so far, connections open now). Leaves
    the collector unfrozen when cancelled.
    """
    gc.freeze()  # what start-up made: modules, configuration, the server's parts
    log.debug("heap frozen after start-up: %d objects", gc.get_freeze_count())
    accepted, open_now = counts()
    policy = FreezePolicy(accepted, accepted - open_now, open_now)
    task_status.started()
    try:
        while True:
            await trio.sleep(CHECK_EVERY)
            action = policy.step(*counts())
            if action is Action.FREEZE:
                gc.freeze()
            elif action is Action.COLLECT:
                gc.unfreeze()
                found = gc.collect()
                gc.freeze()
                log.debug("full collection after churn (%d connections closed so far): "
                          "%d objects freed", policy.closed, found)
    finally:
        gc.unfreeze()
