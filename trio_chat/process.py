"""The serving process: start-up (waiting for services), signals, the supervisor watch.

Owns one node's process under ``trio.run``: :func:`serve` starts the server
(again, within ``server.startupWait``, while Redis or the database is
unreachable), turns SIGINT/SIGTERM into a graceful shutdown (a second signal,
or a signal before the server is up, stops at once) and, in a worker of
``--workers N``, shuts down once its supervisor is gone. Once the server is up,
it runs the garbage collector's schedule beside it
(:func:`~trio_chat.collector.freeze_after_joins`).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import attrs
import trio

from .bridge import open_bridge
from .collector import freeze_after_joins
from .config import Config
from .server import Server
from .startup import retry_startup
from .store import make_backend
from .workers import SharedMetrics

log = logging.getLogger("trio_chat")

# A worker still running this long after server.shutdownTimeout is killed.
KILL_MARGIN = 5.0
# How often a worker checks that its supervisor is still alive.
_SUPERVISOR_POLL = 0.5


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each connection is a descriptor."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    log.info("open-file limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)


async def migrate_store(config: Config) -> int:
    """Create or upgrade the history store's schema; its version."""
    backend = make_backend(config)
    async with open_bridge(needed=config.db is not None):
        try:
            return await backend.open()
        finally:
            await backend.close()


@attrs.define(eq=False)
class _Node:
    """The server being started or running, and whether a signal asked to stop."""

    server: Server | None = None
    stopping: bool = False


async def _watch_signals(node: _Node, stop_now: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if node.stopping:
                log.warning("second %s: stopping now", name)
                stop_now.cancel()
                return
            node.stopping = True
            if node.server is None:  # waiting for Redis or the database
                log.info("%s before the server was up: stopping", name)
                stop_now.cancel()
                return
            log.info("%s: shutting down gracefully", name)
            node.server.shutdown()


async def _watch_supervisor(node: _Node, pid: int, grace: float,
                            stop_now: trio.CancelScope) -> None:
    """Stop gracefully once the supervisor ``pid`` is gone (this process is reparented).

    Polling ``getppid`` rather than PR_SET_PDEATHSIG: the supervisor starts workers
    from one of trio's worker threads, and the death signal follows the thread.
    """
    while os.getppid() == pid:  # noqa: ASYNC110 (nothing to wait on portably)
        await trio.sleep(_SUPERVISOR_POLL)
    log.warning("the supervisor (pid %d) is gone: shutting down gracefully", pid)
    node.stopping = True
    if node.server is None:
        stop_now.cancel()
        return
    node.server.shutdown()
    await trio.sleep(grace + KILL_MARGIN)
    log.warning("still running %g seconds later: stopping now", grace + KILL_MARGIN)
    stop_now.cancel()


async def _run(server: Server, done: trio.CancelScope, *,
               task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
    await server.run(task_status=task_status)
    done.cancel()


async def serve(config: Config, worker: tuple[int, int] | None = None,
                supervisor: int | None = None, metrics_dir: str | None = None) -> None:
    """Trio. Run one node until a signal (or the supervisor's end) stops it."""
    node = _Node()

    def counts() -> tuple[int, int]:
        if node.server is None:
            return 0, 0
        return node.server.metrics.connections_total, len(node.server.hub.connections)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, node, nursery.cancel_scope)
        if supervisor is not None:
            nursery.start_soon(_watch_supervisor, node, supervisor,
                               config.server.drain_delay + config.server.shutdown_timeout,
                               nursery.cancel_scope)

        async def start() -> None:
            if node.stopping:  # a signal while waiting to try again
                nursery.cancel_scope.cancel()
                return
            node.server = Server.build(config,
                                       f"{worker[0]}/{worker[1]}" if worker else None)
            # A worker shares its port with the other workers.
            node.server.reuse_port = worker is not None
            if worker is not None and metrics_dir is not None:
                node.server.shared_metrics = SharedMetrics(Path(metrics_dir), worker[0],
                                                           node.server.metrics)
            try:
                await nursery.start(_run, node.server, nursery.cancel_scope)
            except BaseException:
                node.server = None
                raise

        await retry_startup(config, start)
        # After start-up, so what start-up made is frozen at once.
        nursery.start_soon(freeze_after_joins, counts)
