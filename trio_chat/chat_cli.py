"""``trio-chat chat``: a room in the terminal, on the trio client.

Owns the terminal side of one chat: lines read from standard input without a
blocking thread (a non-blocking :class:`trio.lowlevel.FdStream` on a copy of fd
0, so Ctrl-C is seen at once), each sent and acknowledged before the next; every
room message printed to standard output; and one status line on standard error
while the connection is away ("reconnecting in 1.3 s…", rewritten in place on a
terminal, then "resumed after #42"). SIGINT and SIGTERM end it with status 0
and no traceback; so does the end of input, once what was sent is acknowledged.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing

import trio

from .client import Chat, ChatError, StateChange, open_chat
from .protocol import Message

# How often the countdown on the status line is redrawn.
_TICK = 0.1


class StatusLine:
    """The one line on standard error that says where the connection is. On a terminal
    it is rewritten in place and cleared before a message is printed; elsewhere
    (a pipe, a file) each new status is one line."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._text = ""

    def show(self, text: str) -> None:
        if text == self._text:
            return
        if self._tty:
            sys.stderr.write(f"\r\x1b[K{text}")
        else:
            sys.stderr.write(f"{text}\n")
        sys.stderr.flush()
        self._text = text

    def done(self, text: str) -> None:
        """A status that stays (it ends the line): resumed, connected."""
        self.clear()
        sys.stderr.write(f"{text}\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self._tty and self._text:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        self._text = ""

    def print(self, line: str) -> None:
        """A message line on standard output, with the status line kept below it."""
        text = self._text
        self.clear()
        print(line, flush=True)
        if text and self._tty:
            self.show(text)


def format_message(message: Message) -> str:
    at = message.received_at[11:19]
    who = f"#{message.author_id}"
    if message.message_type == "chat_edit":
        return f"[{at}] {who} edited #{message.target_id}: {message.content}"
    if message.message_type == "chat_delete":
        return f"[{at}] {who} deleted #{message.target_id}"
    return f"[{at}] {who}: {message.content}"


async def _lines() -> AsyncGenerator[str, None]:
    """Standard input, line by line, without a thread blocked in read()."""
    if stat.S_ISREG(os.fstat(0).st_mode):
        # A file cannot be polled for readiness, and reading it never waits for a person.
        async for line in trio.wrap_file(sys.stdin):
            yield line.rstrip("\n")
        return
    # FdStream makes its fd non-blocking. A terminal is opened anew so that the mode
    # stays off the file description stdout shares with it (a burst of output to a
    # slow terminal would otherwise fail with BlockingIOError); a pipe's copy is its own.
    fd = os.open(os.ttyname(0), os.O_RDONLY | os.O_NOCTTY) if os.isatty(0) else os.dup(0)
    async with trio.lowlevel.FdStream(fd) as stdin:
        pending = b""
        while chunk := await stdin.receive_some():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")


async def _show_states(chat: Chat, room: int, status: StatusLine) -> None:
    countdown: trio.CancelScope | None = None
    async with trio.open_nursery() as nursery:
        async for change in chat.states():
            if countdown is not None:
                countdown.cancel()
                countdown = None
            if change.state == "connecting":
                status.show(f"connecting to room {room}…")
            elif change.state == "connected":
                status.done(f"connected to room {room}")
            elif change.state == "reconnecting":
                countdown = await nursery.start(_count_down, change, status)
            elif change.state == "resumed":
                status.done("resumed" if change.since is None
                            else f"resumed after #{change.since}")
            elif change.state == "reset":
                status.done("could not catch up on everything missed: recent messages follow")


async def _count_down(change: StateChange, status: StatusLine, *,
                      task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        deadline = trio.current_time() + (change.delay or 0)
        while (left := deadline - trio.current_time()) > 0:
            status.show(f"reconnecting in {left:.1f} s…")
            await trio.sleep(min(_TICK, left))
        status.show("reconnecting…")


async def chat_in_terminal(url: str, room: int, token: str | None, author_id: int | None
                           ) -> int:
    """Run the terminal chat until the input ends or SIGINT/SIGTERM comes; returns 0."""
    status = StatusLine()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as root:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    root.cancel_scope.cancel()

            root.start_soon(stop_on_signal)
            async with open_chat(url, room, token, author_id=author_id) as chat:
                async def show_messages() -> None:
                    async for message in chat:
                        status.print(format_message(message))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(show_messages)
                    nursery.start_soon(_show_states, chat, room, status)
                    # One at a time, in order: each waits for its ack, across reconnections.
                    # Closed here, also when cancelled, so fd 0 is blocking again at exit.
                    async with aclosing(_lines()) as lines:
                        async for line in lines:
                            if line.strip():
                                try:
                                    await chat.send(line)
                                except ChatError as exc:
                                    status.print(f"-- not sent: {exc}")
                    await trio.sleep(0.2)  # let the last broadcasts be printed
                    nursery.cancel_scope.cancel()
            root.cancel_scope.cancel()
    status.clear()
    return 0


def run_chat(url: str, room: int, token: str | None, author_id: int | None) -> int:
    """The ``chat`` command: exit status 0 however it ends, Ctrl-C included."""
    try:
        return trio.run(chat_in_terminal, url, room, token, author_id)
    except KeyboardInterrupt:  # before trio took SIGINT over
        return 0
