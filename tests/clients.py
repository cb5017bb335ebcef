"""The two Python clients behind one trio-side interface, so one scenario runs on both.

The trio client runs in the test's own trio run. The asyncio client runs in a
real asyncio event loop (``asyncio.run``) in a thread of its own, as an asyncio
application would run it; each call is handed to that loop and its result
handed back to trio, and leaving the block stops the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, Protocol, TypeVar

import trio

from trio_chat import aio_client, client
from trio_chat.protocol import Message

T = TypeVar("T")


class Driver(Protocol):
    """What a scenario does with a client, whichever it is."""

    @property
    def state(self) -> str: ...
    async def send(self, text: str) -> int: ...
    async def edit(self, target_id: int, text: str) -> int: ...
    async def delete(self, target_id: int) -> int: ...
    async def typing(self) -> None: ...
    async def next_message(self) -> Message: ...
    async def next_event(self) -> dict[str, Any]: ...


OpenClient = Callable[..., AbstractAsyncContextManager[Driver]]


def _unwrapped(exc: BaseException) -> BaseException:
    inner = getattr(exc, "exceptions", None)
    return _unwrapped(inner[0]) if isinstance(inner, tuple) and len(inner) == 1 else exc


class TrioDriver:
    def __init__(self, chat: client.Chat) -> None:
        self._chat = chat

    @property
    def state(self) -> str:
        return self._chat.state

    async def send(self, text: str) -> int:
        return await self._chat.send(text)

    async def edit(self, target_id: int, text: str) -> int:
        return await self._chat.edit(target_id, text)

    async def delete(self, target_id: int) -> int:
        return await self._chat.delete(target_id)

    async def typing(self) -> None:
        await self._chat.typing()

    async def next_message(self) -> Message:
        return await self._chat.__aiter__().__anext__()

    async def next_event(self) -> dict[str, Any]:
        return await self._chat.events().receive()


@asynccontextmanager
async def trio_client(url: str, room_id: int, **options: Any) -> AsyncIterator[Driver]:
    async with client.open_chat(url, room_id, **options) as chat:
        yield TrioDriver(chat)


class AsyncioDriver:
    def __init__(self, chat: aio_client.Chat, loop: asyncio.AbstractEventLoop) -> None:
        self._chat = chat
        self._loop = loop
        self._trio = trio.lowlevel.current_trio_token()

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work()`` on the asyncio loop; cancelling the trio caller cancels it."""
        async def run() -> T:
            return await work()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        done = trio.Event()

        def wake(_: object) -> None:
            with suppress(trio.RunFinishedError):
                self._trio.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            future.cancel()
        return future.result()

    @property
    def state(self) -> str:
        return self._chat.state

    async def send(self, text: str) -> int:
        return await self._call(lambda: self._chat.send(text))

    async def edit(self, target_id: int, text: str) -> int:
        return await self._call(lambda: self._chat.edit(target_id, text))

    async def delete(self, target_id: int) -> int:
        return await self._call(lambda: self._chat.delete(target_id))

    async def typing(self) -> None:
        await self._call(self._chat.typing)

    async def next_message(self) -> Message:
        return await self._call(self._chat.__aiter__().receive)

    async def next_event(self) -> dict[str, Any]:
        return await self._call(self._chat.events().receive)


@asynccontextmanager
async def asyncio_client(url: str, room_id: int, **options: Any) -> AsyncIterator[Driver]:
    ready = trio.Event()
    token = trio.lowlevel.current_trio_token()
    running: dict[str, Any] = {}

    async def application() -> None:
        stop = asyncio.Event()
        async with aio_client.open_chat(url, room_id, **options) as chat:
            running.update(chat=chat, loop=asyncio.get_running_loop(), stop=stop)
            token.run_sync_soon(ready.set)
            await stop.wait()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, asyncio.run, application())
            await ready.wait()
            try:
                yield AsyncioDriver(running["chat"], running["loop"])
            finally:
                running["loop"].call_soon_threadsafe(running["stop"].set)
    except BaseException as exc:
        raise _unwrapped(exc) from None


CLIENTS: dict[str, OpenClient] = {"trio": trio_client, "asyncio": asyncio_client}
