"""The event loop's lag: how late trio runs a task that asked to wake at a given
time. A blocked loop (a long computation, a blocking call, a full collection)
shows here before anything else does.

Owns one task, :func:`watch_loop_lag`, which sleeps :data:`INTERVAL` at a time and
observes each wake-up's delay in ``metrics.loop_lag``. It never fails on its own,
so it has no failure boundary.
"""

from __future__ import annotations

import trio

from .metrics import Metrics

# Often enough to catch stalls of a few hundred milliseconds in a scrape interval, rare
# enough to cost nothing (one wake-up).
INTERVAL = 0.25


async def watch_loop_lag(metrics: Metrics, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    task_status.started()
    while True:
        due = trio.current_time() + INTERVAL
        await trio.sleep_until(due)
        metrics.loop_lag.observe(max(0.0, trio.current_time() - due))
