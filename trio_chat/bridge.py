"""The asyncio bridge: the one place where trio-chat meets asyncio.

aiomysql (MySQL/MariaDB history) and redis-py's asyncio client have no trio
support, so they run on a trio-asyncio loop. :func:`open_bridge` opens that
loop once, under the server's root; :func:`call` runs one asyncio coroutine
function from trio. Nothing outside this module imports trio_asyncio, and
every caller of :func:`call` is a trio function: asyncio stays in here and in
the asyncio-flavoured helpers that callers pass to :func:`call`, each of which
says so in its docstring. No tasks of its own: the loop's tasks live in the
context manager's scope and end with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

T = TypeVar("T")


@asynccontextmanager
async def open_bridge(needed: bool = True) -> AsyncIterator[None]:
    """Trio flavour. Run an asyncio loop for the duration of the block, if ``needed``."""
    if not needed:
        yield
        return
    async with trio_asyncio.open_loop():
        try:
            yield
        finally:
            # A call cancelled at shutdown closes its socket without waiting: the
            # transport closes it on the loop's next turns, which must come before the
            # loop ends (else the socket is left to the garbage collector).
            with trio.move_on_after(1, shield=True):
                await call(_turns)


async def _turns() -> None:
    """Asyncio flavour. Let the loop run what is scheduled (transports closing)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Trio flavour. Await the asyncio coroutine function ``fn(*args, **kwargs)``.

    Cancelling the calling trio scope cancels the asyncio side too.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    return result
