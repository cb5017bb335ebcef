"""Failure boundaries, one fault-injection test each: what fails there stays there.

Each test makes one unit fail (a request, a connection) and checks that the
node logs it once with its traceback, counts it, and goes on serving.
"""

from __future__ import annotations

import logging

import pytest
import trio

import trio_chat.server
from trio_chat.store import SqliteBackend

from .conftest import chat_frame, open_ws, recv, ws_url
from .rawws import http_call


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


async def test_a_failing_http_handler_answers_500_and_is_counted(server, monkeypatch,
                                                                 caplog) -> None:
    async def broken(self, after, limit):
        raise RuntimeError("a bug in listing rooms")

    monkeypatch.setattr(SqliteBackend, "rooms", broken)
    status, answer = await http_call(server.port, "GET", "/rooms")
    assert (status, answer["error"]) == (500, "internal_error")
    assert server.metrics.http_errors == 1
    assert [r.exc_info[1].args for r in tracebacks(caplog)] == [("a bug in listing rooms",)]
    assert (await http_call(server.port, "GET", "/healthz"))[0] == 200


async def test_a_failing_connection_is_counted_and_ends_alone(server, monkeypatch,
                                                             caplog) -> None:
    original = trio_chat.server.serve_http
    calls = 0

    async def fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in serving a connection")
        await original(*args)

    monkeypatch.setattr(trio_chat.server, "serve_http", fails_once)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            assert await stream.receive_some() == b"", "closed without an answer"
    assert server.metrics.connection_failures == 1
    assert [r.exc_info[1].args for r in tracebacks(caplog)] == [
        ("a bug in serving a connection",)]
    async with open_ws(ws_url(server, 7)) as ws:
        await ws.send_message(chat_frame("still serving", room_id=7))
        assert (await recv(ws))["content"] == "still serving"
