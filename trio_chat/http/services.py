"""What the HTTP side is given by the server: :class:`Services`, the graceful
shutdown as HTTP connections see it (:class:`Shutdown`), and what ``/readyz``
reports (:class:`Readiness`).

The server builds one :class:`Services` and passes it to every connection, so
no handler sees the ``Server`` (and this package never imports it); with it,
:class:`NodeInfo`, which node this is (the operator console shows it). Runs no
task.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

from ..auth import IpLimiter
from ..broker import Broker
from ..budget import ByteBudget
from ..config import Config
from ..hub import Hub
from ..metrics import Metrics
from ..store import Repository, Store
from ..writers import Writers
from .budget import UploadAllowance


@attrs.define(eq=False)
class Shutdown:
    """Whether a graceful shutdown has begun, and the HTTP connections waiting for
    their next request, which it ends at once (an idle keep-alive connection must
    not hold it up).

    A shutdown first drains (``server.drainDelay`` seconds: ``/readyz`` answers 503
    so load balancers stop sending clients, and everything is still served), then
    begins (accepting stops, connections close).
    """

    _draining: trio.Event = attrs.field(init=False, factory=trio.Event)
    _begun: trio.Event = attrs.field(init=False, factory=trio.Event)
    _idle: set[trio.CancelScope] = attrs.field(init=False, factory=set)

    @property
    def draining(self) -> bool:
        """A shutdown was asked for (draining, or begun)."""
        return self._draining.is_set()

    @property
    def begun(self) -> bool:
        return self._begun.is_set()

    def drain(self) -> None:
        self._draining.set()

    async def wait_draining(self) -> None:
        await self._draining.wait()

    def begin(self) -> None:
        self._draining.set()
        self._begun.set()

    async def wait(self) -> None:
        await self._begun.wait()

    @contextmanager
    def idle(self) -> Iterator[trio.CancelScope]:
        """A scope around waiting for a request, which :meth:`end_idle` cancels."""
        with trio.CancelScope() as scope:
            self._idle.add(scope)
            try:
                yield scope
            finally:
                self._idle.discard(scope)

    def end_idle(self) -> None:
        for scope in list(self._idle):
            scope.cancel()


# A readiness check: None while fine, else (reason, detail) saying why not.
ReadinessCheck = Callable[[], "tuple[str, str] | None"]


@attrs.define(eq=False)
class Readiness:
    """Whether this node should be given new clients, as far as it knows: its
    listener is up and the checks the server added (Redis, the history store) pass.
    A shutdown's draining is :class:`Shutdown`'s."""

    listening: bool = False
    _checks: list[ReadinessCheck] = attrs.field(init=False, factory=list)

    def add_check(self, check: ReadinessCheck) -> None:
        self._checks.append(check)

    def problems(self) -> list[tuple[str, str]]:
        """Every (reason, detail) that makes the node not ready; empty when ready."""
        problems = [] if self.listening else [("not_listening", "the listener is not up")]
        problems.extend(p for check in self._checks if (p := check()) is not None)
        return problems


@attrs.frozen
class NodeInfo:
    """Which node and process this is, and since when."""

    # The broker's name for this node (Redis), else "local".
    id: str = "local"
    # "2/4" for the second of ``--workers 4``; None when not a worker.
    worker: str | None = None
    host: str = attrs.field(factory=socket.gethostname)
    pid: int = attrs.field(factory=os.getpid)
    # Wall-clock time of the start (time.time()).
    started: float = attrs.field(factory=time.time)


@attrs.frozen
class Services:
    """Everything a connection or a handler may use."""

    config: Config
    metrics: Metrics
    hub: Hub
    # Rooms, bans and media, straight through to the database.
    repository: Repository
    # Message history: pages that include what is not written yet, and purges.
    history: Store
    # Closing a room's members on every node; forgetting a purged room.
    broker: Broker
    writers: Writers
    # Every connection of an address (limits.connectionsPerIp).
    ip_limiter: IpLimiter
    shutdown: Shutdown
    demo_page: bytes
    # An address's connections not upgraded (limits.httpConnectionsPerIp).
    http_limiter: IpLimiter
    # Request bodies held, per address and in all (limits.bodyBytesPerIp, bodyBytesTotal).
    bodies: ByteBudget
    # Uploads per identity (limits.uploadsPerMinute, uploadBytesPerHour).
    uploads: UploadAllowance
    node: NodeInfo = attrs.field(factory=NodeInfo)
    readiness: Readiness = attrs.field(factory=Readiness)
