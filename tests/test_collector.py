"""The garbage collector's schedule: the freeze policy (pure) and the task that applies
it to this process's collector, on trio's mock clock."""

from __future__ import annotations

import gc
import sys
import weakref

import trio
import trio.testing

from trio_chat.collector import BURST, Action, FreezePolicy, freeze_after_joins


def _unused() -> int:
    raise AssertionError("the heap was measured without enough closes")


def test_a_burst_of_joins_is_frozen_once_per_burst() -> None:
    policy = FreezePolicy(heap=1000)
    assert policy.step(BURST - 1, BURST - 1, _unused) is Action.NOTHING
    assert policy.step(BURST, BURST, _unused) is Action.FREEZE
    assert policy.step(BURST + 10, BURST + 10, _unused) is Action.NOTHING
    # Joins alone never measure the heap, so never collect, however much it grows.
    assert policy.step(2 * BURST, 2 * BURST, _unused) is Action.FREEZE


def test_closes_and_a_quarter_more_heap_make_a_full_collection() -> None:
    policy = FreezePolicy(accepted=4000, closed=0, heap=1000)
    assert policy.step(4000, 4000 - BURST + 1, _unused) is Action.NOTHING  # one close short
    assert policy.step(4000, 4000 - BURST, lambda: 1249) is Action.NOTHING
    assert policy.step(4000, 4000 - BURST, lambda: 1250) is Action.COLLECT
    policy.collected(1100)
    # Counted again from the collection: closes since, and a quarter over 1,100.
    assert policy.step(4000, 4000 - BURST, _unused) is Action.NOTHING
    assert policy.step(4000, 4000 - 2 * BURST, lambda: 1374) is Action.NOTHING
    assert policy.step(4000, 4000 - 2 * BURST, lambda: 1375) is Action.COLLECT


def test_churn_that_frees_what_it_froze_is_never_collected() -> None:
    policy = FreezePolicy(accepted=1000, closed=0, heap=10_000)
    for n in range(1, 20):
        # 300 joined and 300 left each second; the heap stays as it was.
        assert policy.step(1000 + 300 * n, 1000, lambda: 10_000) is Action.FREEZE


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_task_freezes_after_joins_and_collects_frozen_cycles_after_churn(
        autojump_clock: trio.testing.MockClock) -> None:
    accepted, open_now = 0, 0
    assert gc.get_freeze_count() == 0
    try:
        # Virtual seconds (autojump): a task that never acts fails here, not by hanging.
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                await nursery.start(freeze_after_joins, lambda: (accepted, open_now))
                frozen_at_start = gc.get_freeze_count()
                assert frozen_at_start > 0
                # A connection's objects, alive when a burst of joins is frozen.
                cycle = _Cycle()
                gone = weakref.ref(cycle)
                held = [[] for _ in range(sys.getallocatedblocks() // 3)]  # the heap grows a third
                accepted = open_now = BURST
                while gc.get_freeze_count() == frozen_at_start:
                    await trio.sleep(0.5)
                # The connection ends; its cycle, frozen, outlives a full collection.
                del cycle
                gc.collect()
                assert gone() is not None
                open_now = 0  # a burst of closes: the task unfreezes and collects
                while gone() is not None:
                    await trio.sleep(0.5)
                assert gc.get_freeze_count() > len(held)  # what survived is frozen again
                nursery.cancel_scope.cancel()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
