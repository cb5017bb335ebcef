"""The supervisor of ``serve --workers N``: checks, starts and stops the workers.

Owns the worker processes. Before starting any it checks, once, what every
worker would otherwise fail on by itself (the history store's schema, Redis,
the port), so a start-up failure is one line from the supervisor rather than
one per worker (within ``server.startupWait``, as a single node waits). Then it
starts N worker processes (``trio_chat.cli`` again, with the hidden
``--worker I/N`` and ``--supervisor PID`` options), each a node binding the
shared port with SO_REUSEPORT. Workers run in their own session, so only the
supervisor sees a terminal's Ctrl-C; it forwards one SIGTERM to each, waits,
and kills stragglers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import attrs
import redis
import trio

from .config import Config
from .process import migrate_store
from .server import open_shared_listeners
from .startup import EXIT_FAILURE, EXIT_LISTEN, EXIT_OK, EXIT_SERVICE, retry_startup

log = logging.getLogger("trio_chat")

# Seconds for the supervisor's check of Redis to connect and answer.
_PROBE_TIMEOUT = 5.0


def _ping_redis(config: Config) -> None:
    """Blocking (a worker thread). Connect to Redis as the nodes will and PING it."""
    r = config.redis
    assert r is not None
    client = redis.Redis(host=r.host, port=r.port, db=r.database, username=r.id or None,
                         password=r.password or None, socket_timeout=_PROBE_TIMEOUT,
                         socket_connect_timeout=_PROBE_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


async def check_services(config: Config) -> bool:
    """Trio. What every worker needs, checked once: the store (migrated here, not racing
    in every worker), Redis and the shared port; raises what start-up would. False if
    SIGINT or SIGTERM came first (while waiting for a service, say)."""
    async def attempt() -> None:
        await migrate_store(config)
        if config.redis is not None:
            await trio.to_thread.run_sync(_ping_redis, config)
        for listener in await open_shared_listeners(config.server.host, config.server.port):
            await listener.aclose()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s before the workers started: stopping",
                         signal.Signals(signum).name)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        await retry_startup(config, attempt)
        nursery.cancel_scope.cancel()
        return True
    return False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@attrs.define(eq=False)
class Supervisor:
    """The parent of ``--workers N``: starts the workers, stops them all together."""

    command: list[str]
    count: int
    grace: float
    workers: list[trio.Process] = attrs.field(factory=list)
    stopping: bool = False
    failed: bool = False
    # The exit status once failed: a worker's own start-up failure (3, 4) if that was
    # the first thing to go wrong, else 1.
    status: int = EXIT_FAILURE
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> int:
        # Signals first: a Ctrl-C while starting the workers must still stop them.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                for index in range(1, self.count + 1):
                    if self.stopping:
                        break
                    try:
                        # Own session: a terminal's Ctrl-C reaches only the supervisor,
                        # which forwards exactly one SIGTERM.
                        process = await trio.lowlevel.open_process(
                            [*self.command, "--worker", f"{index}/{self.count}",
                             "--supervisor", str(os.getpid())],
                            start_new_session=True)
                    except OSError as exc:
                        log.error("cannot start worker %d/%d: %s", index, self.count, exc)
                        self.failed = True
                        self.stop()
                        break
                    self.workers.append(process)
                    log.info("started worker %d/%d (pid %d)", index, self.count, process.pid)
                    if self.stopping:  # a signal came while it was starting
                        process.send_signal(signal.SIGTERM)
                    nursery.start_soon(self._watch_worker, index, process)
                await self._reap()
                nursery.cancel_scope.cancel()
        return self.status if self.failed else EXIT_OK

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stopped.set()
        for process in self.workers:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def _reap(self) -> None:
        """Once stopping, wait for every worker; kill those past the grace period."""
        await self._stopped.wait()
        with trio.move_on_after(self.grace):
            for process in self.workers:
                await process.wait()
        for index, process in enumerate(self.workers, 1):
            if process.returncode is None:
                log.error("worker %d/%d (pid %d) still running after %g seconds: killing it",
                          index, self.count, process.pid, self.grace)
                self.failed = True
                process.kill()
            await process.wait()
        log.info("all %d workers stopped", len(self.workers))

    async def _watch_worker(self, index: int, process: trio.Process) -> None:
        code = await process.wait()
        if self.stopping:
            # -SIGTERM: stopped before it had installed its signal handlers.
            if code not in (0, -signal.SIGTERM):
                self.failed = True
                log.error("worker %d/%d (pid %d) %s", index, self.count, process.pid,
                          describe_exit(code))
            return
        if not self.failed and code in (EXIT_SERVICE, EXIT_LISTEN):
            self.status = code
        self.failed = True
        log.error("worker %d/%d (pid %d) %s on its own: stopping the others",
                  index, self.count, process.pid, describe_exit(code))
        self.stop()

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.stopping:
                log.info("%s: stopping %d workers gracefully", name, len(self.workers))
                self.stop()
                continue
            log.warning("second %s: stopping the workers now", name)
            for process in self.workers:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)


def worker_command(config_path: str | None, options: list[str]) -> list[str]:
    """The supervisor's ``serve`` command line, for one worker (its hidden options added
    by :meth:`Supervisor.run`)."""
    command = [sys.executable, "-m", "trio_chat.cli", "serve"]
    if config_path is not None:
        command.append(os.path.abspath(config_path))
    return command + options
