"""A TCP proxy the test controls: forward to a real server, or cut every connection."""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class Proxy:
    target_port: int
    port: int = 0
    down: bool = False
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

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

    def restore(self) -> None:
        self.down = False

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.down:
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)

    @staticmethod
    async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream,
                    both: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()
