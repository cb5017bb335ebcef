"""What the HTTP side is given by the server: :class:`Services`, and the graceful
shutdown as HTTP connections see it (:class:`Shutdown`).

The server builds one :class:`Services` and passes it to every connection, so
no handler sees the ``Server`` (and this package never imports it). Runs no task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

from ..auth import IpLimiter
from ..broker import Broker
from ..config import Config
from ..hub import Hub
from ..metrics import Metrics
from ..store import Repository, Store
from ..websocket import Writers
from .budget import ByteBudget, UploadAllowance


@attrs.define(eq=False)
class Shutdown:
    """Whether a graceful shutdown has begun, and the HTTP connections waiting for
    their next request, which it ends at once (an idle keep-alive connection must
    not hold it up)."""

    _begun: trio.Event = attrs.field(init=False, factory=trio.Event)
    _idle: set[trio.CancelScope] = attrs.field(init=False, factory=set)

    @property
    def begun(self) -> bool:
        return self._begun.is_set()

    def begin(self) -> None:
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
