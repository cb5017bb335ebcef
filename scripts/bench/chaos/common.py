"""The chaos run's plumbing: its clock and timeline of events, processes it spawns
(kept for a last-resort kill), and small Redis and HTTP probes with deadlines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

MYSQL = {
    "host": os.environ.get("TRIO_CHAT_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("TRIO_CHAT_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("TRIO_CHAT_TEST_MYSQL_USER", "root"),
    "password": os.environ.get("TRIO_CHAT_TEST_MYSQL_PASSWORD", ""),
}
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)/")

START_TIMEOUT = 30.0
HTTP_TIMEOUT = 5.0

# Every process this script started, for the last-resort kill outside trio.run.
CHILDREN: list[trio.Process] = []


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the services ---------------------------------------------------------------------------

@attrs.define(eq=False)
class Clock:
    """Seconds since the chaos phase began (negative while setting up)."""

    t0: float = attrs.field(factory=trio.current_time)

    def now(self) -> float:
        return trio.current_time() - self.t0


@attrs.define(eq=False)
class Events:
    """What happened to the services, in order, with the run's clock."""

    clock: Clock
    lines: list[tuple[float, str]] = attrs.field(factory=list)
    # (kind, target, start, healed): the faults as they were applied.
    windows: list[tuple[str, str, float, float]] = attrs.field(factory=list)
    deaths: list[str] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)
    verbose: bool = False

    def note(self, text: str) -> None:
        self.lines.append((self.clock.now(), text))
        if self.verbose:
            log(f"[{self.clock.now():7.2f}s] {text}")

    def node_down(self, name: str, t: float) -> bool:
        """Whether ``t`` falls while node ``name`` was killed (or just restarted)."""
        return any(kind.startswith("node-kill") and target == name
                   and start <= t <= healed + 2.0
                   for kind, target, start, healed in self.windows)

    def around(self, t: float) -> str:
        """The fault ``t`` fell in, or the last one before it."""
        last = "before any fault"
        for kind, target, start, healed in self.windows:
            if start <= t <= healed:
                return f"during {kind} {target} [{start:.1f}s-{healed:.1f}s]"
            if healed < t:
                last = f"{t - healed:.1f}s after {kind} {target} [{start:.1f}s-{healed:.1f}s]"
        return last


async def spawn(command: list[str], **options: Any) -> trio.Process:
    # Own session: a terminal's Ctrl-C reaches this script only, which stops them all.
    process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL,
                                               start_new_session=True, **options)
    CHILDREN.append(process)
    return process


async def poll_until(check: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    """Poll an outside condition (a port, a metric) until it holds; the caller sets the
    deadline."""
    while not await check():  # noqa: ASYNC110 (another process's state: no event to wait on)
        await trio.sleep(interval)


async def redis_ping(port: int) -> bool:
    try:
        with trio.fail_after(1):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PING\r\n")
                # -LOADING while it replays its append-only file.
                return (await stream.receive_some(64)).startswith(b"+PONG")
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


async def redis_command(port: int, *args: str) -> bytes:
    """One command over RESP; returns the raw reply."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            return await stream.receive_some(4096)


async def http_get(port: int, path: str) -> str:
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"GET {path}: {head[:60]!r}")
    return body.decode()


async def metrics(port: int) -> dict[str, float]:
    values = {}
    for line in (await http_get(port, "/metrics")).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def complaints(path: Path, most: int = 12) -> list[str]:
    """A node log's WARNING and ERROR lines, each kind once (the first, with a count):
    what went wrong, without the tracebacks' bulk."""
    seen: dict[str, list[Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if match := re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)", line):
            # Digits vary (times, ports, ids): the kind is the rest.
            kind = re.sub(r"\d+", "#", match.group(2))[:120]
            seen.setdefault(kind, [line, 0])[1] += 1
    return [f"{line}" + (f"  [x{count}]" if count > 1 else "")
            for line, count in list(seen.values())[:most]]
