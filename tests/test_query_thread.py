"""The SQLite backend's query thread: calls in order, errors to their caller, a
cancelled caller waiting for its call, and the thread ending after stop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_chat.store.sqlite import QueryThread, SqliteBackend


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


async def test_calls_run_in_order_and_errors_reach_their_caller() -> None:
    worker = QueryThread("test query thread order")
    try:
        seen: list[int] = []
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(worker.call, seen.append, n)
                await trio.lowlevel.checkpoint()
        assert seen == list(range(20))
        with pytest.raises(ZeroDivisionError):
            await worker.call(lambda: 1 / 0)
        # The thread goes on after a call that raised.
        assert await worker.call(sum, [1, 2, 3]) == 6
        assert await worker.call(threading.current_thread) is not threading.current_thread()
    finally:
        worker.stop()


async def test_a_cancelled_caller_gets_its_calls_result_then_is_cancelled() -> None:
    worker = QueryThread("test query thread cancel")
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(30)
        finished.append("done")
        return "done"

    scope = trio.CancelScope()

    async def caller() -> None:
        with scope:
            finished.append(await worker.call(slow))
            await trio.lowlevel.checkpoint()
            finished.append("not cancelled")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, 30)
            scope.cancel()
            # Cancelled, yet the caller still waits for its call.
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            release.set()
        # The call's result, then the cancellation at the caller's next checkpoint.
        assert scope.cancelled_caught
        assert finished == ["done", "done"]
    finally:
        release.set()
        worker.stop()


async def test_the_thread_ends_after_stop_and_the_calls_before_it() -> None:
    name = "test query thread stop"
    worker = QueryThread(name)
    [thread] = _threads(name)
    assert await worker.call(lambda: 42) == 42
    worker.stop()
    await trio.to_thread.run_sync(thread.join, 30)
    assert not thread.is_alive()


def test_a_backend_used_by_a_later_run_gets_a_thread_of_that_run(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "chat.db"))
    # Opened in one run and never closed there: the next run must not wait on a
    # thread that answers a loop which is gone.
    assert trio.run(backend.open) >= 1
    assert trio.run(backend.last_id, 1) == 0
    trio.run(backend.close)
