#!/usr/bin/env python3
"""Where the event loop's time goes during one of bench_abuse's attacks.

Runs a trio-chat server in this process (the default configuration and garbage
collector settings of ``trio-chat serve``, SQLite in a temporary directory) and
one attack of scripts/bench/abuse.py from a child process, and times, in CPU
time of the loop's thread (a step preempted by another process does not count):

- each task step, and each iteration of trio's loop (the steps run between two
  waits for IO: a task woken meanwhile waits for all of them, so the loop's lag
  is an iteration's time, however short each step);
- how late a task sleeping 10 ms at a time wakes, as tests/hostile.py measures
  it for the suite's hostile tests (wall clock and CPU).

It prints the attack's answer, the worst iterations (CPU, steps, the worst step
in it), the worst steps and, with ``--profile``, cProfile's view of the steps
over ``--slow`` ms. bench_abuse measures a separate server from outside; this
says what ran. ``--checkout`` runs another checkout's ``trio_chat/`` (with this
venv's dependencies).

Usage::

    .venv/bin/python scripts/trace_steps.py --attack fragspread
    .venv/bin/python scripts/trace_steps.py --attack fragments --profile --slow 2
    .venv/bin/python scripts/trace_steps.py --attack fragspread --checkout /work/wt-old
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio
from bench import ROOT, abuse

ATTACKER = "import sys, trio; from bench import abuse; " \
           "print(trio.run(abuse.ATTACKS[sys.argv[1]][1], int(sys.argv[2]), float(sys.argv[3])))"


class Steps(trio.abc.Instrument):
    """CPU time of each task step and of each loop iteration."""

    def __init__(self, profile_over: float | None) -> None:
        self.steps: list[tuple[float, str]] = []
        # (CPU of the iteration, steps in it, its worst step)
        self.iterations: list[tuple[float, int, float]] = []
        self._step_start: float | None = None
        self._run_start = 0.0
        self._count, self._worst = 0, 0.0
        self._over = profile_over
        self._profile: cProfile.Profile | None = None
        self.profiled: pstats.Stats | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._over is not None:
            self._profile = cProfile.Profile(time.thread_time)
            self._profile.enable()
        self._step_start = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._step_start is None:  # the step that added the instrument
            return
        cpu = time.thread_time() - self._step_start
        if self._profile is not None:
            self._profile.disable()
            if self._over is not None and cpu > self._over:
                if self.profiled is None:
                    self.profiled = pstats.Stats(self._profile)
                else:
                    self.profiled.add(self._profile)
        self.steps.append((cpu, task.name))
        self._count += 1
        self._worst = max(self._worst, cpu)

    def after_io_wait(self, timeout: float) -> None:
        self._run_start, self._count, self._worst = time.thread_time(), 0, 0.0

    def before_io_wait(self, timeout: float) -> None:
        if self._run_start:
            self.iterations.append((time.thread_time() - self._run_start, self._count,
                                    self._worst))


async def watch_lag(lag: list[float]) -> None:
    """tests/hostile.py's lag_monitor: the worst wall-clock and CPU lag of a 10 ms sleep."""
    while True:
        asked, cpu = trio.current_time(), time.thread_time()
        await trio.sleep(0.01)
        lag[0] = max(lag[0], trio.current_time() - asked - 0.01)
        lag[1] = max(lag[1], time.thread_time() - cpu)


async def measure(attack: str, hold: float, workdir: Path, steps: Steps
                  ) -> tuple[str, list[float]]:
    from trio_chat.config import load_config  # once --checkout is on the path
    from trio_chat.server import Server

    defaults = load_config(None)
    config = attrs.evolve(
        defaults, server=attrs.evolve(defaults.server, host="127.0.0.1", port=0),
        sqlite=attrs.evolve(defaults.sqlite, path=str(workdir / "trace.db")))
    server = Server.build(config)
    lag = [0.0, 0.0]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        nursery.start_soon(watch_lag, lag)
        trio.lowlevel.add_instrument(steps)
        result = await trio.run_process(
            [sys.executable, "-c", ATTACKER, attack, str(server.port), str(hold)],
            capture_stdout=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}"})
        # What closing the attacker's connections costs.
        await trio.sleep(2)
        trio.lowlevel.remove_instrument(steps)
        nursery.cancel_scope.cancel()
    return result.stdout.decode().strip(), lag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attack", default="fragments", choices=sorted(abuse.ATTACKS))
    p.add_argument("--hold", type=float, default=4.0, help="seconds the attack holds")
    p.add_argument("--profile", action="store_true", help="cProfile the slow steps")
    p.add_argument("--slow", type=float, default=5.0, help="a slow step, in ms of CPU")
    p.add_argument("--checkout", type=Path, help="run this checkout's trio_chat/")
    args = p.parse_args(argv)
    if args.checkout:
        sys.path.insert(0, str(args.checkout.resolve()))
    from trio_chat.collector import tune_gc  # once --checkout is on the path

    tune_gc()
    steps = Steps(args.slow / 1000 if args.profile else None)
    with tempfile.TemporaryDirectory(prefix="trace_steps_") as tmp:
        answer, lag = trio.run(measure, args.attack, args.hold, Path(tmp), steps)
    import trio_chat

    print(f"# {args.attack} ({abuse.ATTACKS[args.attack][0]}), {trio_chat.__file__}: {answer}")
    print(f"10 ms sleeper's worst lag: {1000 * lag[0]:.1f} ms wall, {1000 * lag[1]:.1f} ms CPU")
    print(f"{len(steps.iterations)} loop iterations; the worst (CPU ms, steps, worst step ms):")
    for cpu, count, worst in sorted(steps.iterations, reverse=True)[:5]:
        print(f"  {1000 * cpu:7.1f} {count:5d} {1000 * worst:7.1f}")
    print(f"{len(steps.steps)} task steps; the worst (CPU ms, task):")
    for cpu, name in sorted(steps.steps, reverse=True)[:5]:
        print(f"  {1000 * cpu:7.1f}  {name}")
    if steps.profiled is not None:
        steps.profiled.sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
