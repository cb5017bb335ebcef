"""A TCP proxy the test controls: forward to a real server, cut every connection,
stall them (keep the TCP connections open but forward nothing, as a dead link does),
or pause them (hold every byte until restored, as a link that heals before TCP gives
up does: nothing is lost, only late)."""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class Proxy:
    target_port: int
    port: int = 0
    down: bool = False
    # Directions that swallow bytes: "up" (client to server) and "down".
    stalled: frozenset[str] = frozenset()
    paused: bool = False
    target_host: str = "127.0.0.1"
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)
    _resumed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until :meth:`restore`."""
        self.down = True
        for scope in self._scopes:
            scope.cancel()

    def stall(self, *directions: str) -> None:
        """Swallow every byte on every connection, in both ``directions`` ("up", "down")
        unless told which, until :meth:`restore`."""
        self.stalled = frozenset(directions or ("up", "down"))

    def pause(self) -> None:
        """Forward nothing and read nothing more (TCP backpressure builds) until
        :meth:`restore`, which delivers every held byte in order."""
        if not self.paused:
            self.paused = True
            self._resumed = trio.Event()

    def restore(self) -> None:
        self.down = False
        self.stalled = frozenset()
        if self.paused:
            self.paused = False
            self._resumed.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        # Closed here, not left to the garbage collector: a cut must look like one.
        async with client:
            if self.down:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    try:
                        upstream = await trio.open_tcp_stream(self.target_host,
                                                              self.target_port)
                    except OSError:  # the server is down: so is this connection
                        return
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, "up",
                                           nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, "down",
                                           nursery.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream, direction: str,
                    both: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                if self.paused:
                    await self._resumed.wait()
                if direction not in self.stalled:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()
