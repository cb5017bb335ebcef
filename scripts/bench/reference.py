"""The comparison server: a minimal broadcast server on ``websockets``, run as a
subprocess (``bench_fanout.py --websockets-server PORT``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from datetime import datetime, timezone
from typing import Any

from bench import HOST
from bench.loadgen import raise_nofile


def run_websockets_server(port: int, ping_interval: float = 20.0) -> None:
    """A minimal broadcast server on ``websockets``: one set of clients per path.
    It pings every ``ping_interval`` seconds, as trio-chat does every pingPeriod."""
    raise_nofile()
    from websockets.asyncio.server import broadcast, serve

    rooms: dict[str, set[Any]] = {}
    last_ids: dict[str, int] = {}

    def utc_now() -> str:
        now = datetime.now(timezone.utc)
        return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"

    async def handler(websocket: Any) -> None:
        path = websocket.request.path.partition("?")[0]
        members = rooms.setdefault(path, set())
        members.add(websocket)
        try:
            async for text in websocket:
                last_ids[path] = message_id = last_ids.get(path, 0) + 1
                message = {"id": message_id, **json.loads(text), "received_at": utc_now()}
                broadcast(members, json.dumps(message, separators=(",", ":")))
        finally:
            members.discard(websocket)
            if not members:
                del rooms[path]

    async def main() -> None:
        # No permessage-deflate, like trio-chat (the benchmark's clients don't offer it).
        # The listen backlog trio uses (asyncio's default, 100, stalls connection bursts).
        async with serve(handler, HOST, port, compression=None, ping_interval=ping_interval,
                         backlog=socket.SOMAXCONN) as server:
            bound = server.sockets[0].getsockname()[1]
            print(f"websockets {HOST}: listening on http://{HOST}:{bound}/", file=sys.stderr,
                  flush=True)
            await server.serve_forever()

    # SIGINT stops it (asyncio.run turns it into cancellation), even if our parent ignored it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
