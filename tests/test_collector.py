"""The garbage collector's schedule: the freeze policy (pure) and the task that applies
it to this process's collector, on trio's mock clock."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from trio_chat.collector import BURST, Action, FreezePolicy, freeze_after_joins


def test_a_burst_of_joins_is_frozen_once_per_burst() -> None:
    policy = FreezePolicy()
    assert policy.step(BURST - 1, BURST - 1) is Action.NOTHING
    assert policy.step(BURST, BURST) is Action.FREEZE
    assert policy.step(BURST + 10, BURST + 10) is Action.NOTHING
    assert policy.step(2 * BURST, 2 * BURST) is Action.FREEZE


def test_a_quarter_of_the_held_connections_closing_is_collected() -> None:
    policy = FreezePolicy(accepted=4000, closed=0, held=4000)
    # 999 closed of 4,000 held: not yet a quarter.
    assert policy.step(4000, 3001) is Action.NOTHING
    assert policy.step(4000, 3000) is Action.COLLECT
    # Counted again from the collection: a quarter of the 3,000 then open.
    assert policy.step(4000, 2251) is Action.NOTHING
    assert policy.step(4000, 2250) is Action.COLLECT


def test_few_connections_need_a_burst_of_closes_before_a_collection() -> None:
    policy = FreezePolicy(accepted=10, closed=0, held=10)
    assert policy.step(10, 0) is Action.NOTHING
    assert policy.step(BURST + 10, BURST) is Action.FREEZE
    assert policy.step(BURST + 10, 0) is Action.COLLECT


def test_churn_without_growth_is_collected_not_frozen() -> None:
    policy = FreezePolicy(accepted=1000, closed=0, held=1000)
    # 300 joined and 300 left: the closes decide first.
    assert policy.step(1300, 1000) is Action.COLLECT
    assert policy.step(1300, 1000) is Action.NOTHING


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_task_freezes_after_joins_and_collects_frozen_cycles_after_churn(
        autojump_clock: trio.testing.MockClock) -> None:
    accepted, open_now = 0, 0
    assert gc.get_freeze_count() == 0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(freeze_after_joins, lambda: (accepted, open_now))
            frozen_at_start = gc.get_freeze_count()
            assert frozen_at_start > 0
            # A connection's objects, alive when a burst of joins is frozen.
            cycle = _Cycle()
            gone = weakref.ref(cycle)
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
            assert gc.get_freeze_count() > 0  # what survived is frozen again
            nursery.cancel_scope.cancel()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
