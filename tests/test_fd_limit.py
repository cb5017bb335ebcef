"""Running out of file descriptors: the server says so, waits, and keeps accepting."""

from __future__ import annotations

import logging
import re
import resource
import sys
from pathlib import Path

import trio

from trio_chat.server import _AcceptErrorThrottle

from .conftest import wait_until

# Low enough that a few dozen idle connections exhaust it, high enough to start up.
FD_LIMIT = 64


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


async def _healthz(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    return response


async def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_chat.cli", "serve", "--port", "0",
             "--sqlite", str(tmp_path / "fd.db")],
            stderr=log_file, preexec_fn=_limit_descriptors)
    idle: list[trio.SocketStream] = []
    try:
        await wait_until(lambda: b"listening on" in log_path.read_bytes())
        log = log_path.read_text()
        assert f"open-file limit: {FD_LIMIT}" in log
        port = int(re.search(r"listening on http://127.0.0.1:(\d+)/", log).group(1))
        # Idle connections that never send a request hold a descriptor each.
        for _ in range(FD_LIMIT + 16):
            idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        await wait_until(lambda: "accept returned EMFILE" in log_path.read_text())
        for stream in idle:
            await stream.aclose()
        idle.clear()
        with trio.fail_after(20):
            response = await _healthz(port)
        assert response.startswith(b"HTTP/1.1 200")
        assert process.poll() is None
        assert "Traceback" not in log_path.read_text()
    finally:
        for stream in idle:
            await stream.aclose()
        process.kill()
        await process.wait()


def _accept_error(created: float) -> logging.LogRecord:
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        record = logging.LogRecord("trio.serve_listeners", logging.ERROR, __file__, 1,
                                   "accept returned %s (%s); retrying in %s seconds",
                                   ("EMFILE", "Too many open files", 0.1), sys.exc_info())
    record.created = created
    return record


def test_accept_errors_are_reported_once_per_interval_without_traceback() -> None:
    throttle = _AcceptErrorThrottle(10)
    first = _accept_error(100.0)
    assert throttle.filter(first)
    assert first.exc_info is None
    # trio retries every 0.1 s: those reports are held back, then counted in the next.
    assert not any(throttle.filter(_accept_error(100.0 + i / 10)) for i in range(1, 100))
    later = _accept_error(110.0)
    assert throttle.filter(later)
    assert later.getMessage() == ("accept returned EMFILE (Too many open files); retrying "
                                  "in 0.1 seconds (99 more since the last report)")
    assert throttle.filter(_accept_error(120.0))
    assert not throttle.filter(_accept_error(120.5))
