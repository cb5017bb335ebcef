"""Hostile HTTP clients (issue 16, the HTTP side): a strict handshake, the Origin
rule with tokens on, the /metrics key, and uploads' rate, quota and expiry."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import attrs
import pytest
import trio

from trio_chat.auth import make_token, origin_allowed
from trio_chat.config import AuthConfig, MediaConfig

from .conftest import (
    UNLIMITED,
    chat_frame,
    make_config,
    open_ws,
    recv,
    start_server,
    ws_url,
)
from .rawws import http_call, http_get, open_from, read_http_response
from .test_images import image_bytes
from .wire import KEY


@pytest.fixture
async def server(nursery: trio.Nursery, db_path: Any) -> Any:
    return await start_server(nursery, make_config(db_path))


def request_head(method: str = "GET", version: str = "1.1", extra: str = "") -> bytes:
    return (f"{method} /ws/1 HTTP/{version}\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


@pytest.mark.parametrize(("head", "detail"), [
    (request_head("POST"), "must be a GET"),
    (request_head(version="1.0"), "must be a GET over HTTP/1.1"),
    (request_head(extra=f"Sec-WebSocket-Key: {KEY[::-1]}\r\n"), "sec-websocket-key must"),
    (request_head(extra="Sec-WebSocket-Version: 13\r\n"), "sec-websocket-version must"),
    (request_head(extra="Upgrade: websocket\r\n"), "upgrade must appear once"),
])
async def test_the_handshake_is_strict(server, head: bytes, detail: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(head)
        status, _, body = await read_http_response(stream)
    answer = json.loads(body)
    assert (status, answer["error"]) == (400, "bad_handshake") and detail in answer["detail"]


async def test_content_length_with_transfer_encoding_is_refused_and_closed(server) -> None:
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: "
                              + str(5 + len(smuggled)).encode()
                              + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
        status, headers, body = await read_http_response(stream)
        assert (status, json.loads(body)["error"]) == (400, "bad_request")
        assert headers["connection"] == "close"
        with trio.fail_after(5):
            rest = b""
            while chunk := await stream.receive_some(65536):
                rest += chunk
        assert rest == b""  # the hidden request was never served


async def test_uploads_have_a_rate_and_a_quota_per_identity(nursery, db_path) -> None:
    config = make_config(db_path, limits=attrs.evolve(
        UNLIMITED, uploads_per_minute=3, upload_bytes_per_hour=5 * 1024 * 1024 + 1))
    server = await start_server(nursery, config)
    path = "/rooms/1/images?author_id=5"
    small = image_bytes("PNG")
    answers = [await http_call(server.port, "POST", path, raw=small) for _ in range(4)]
    assert [status for status, _ in answers] == [201, 201, 201, 429]
    assert answers[-1][1]["error"] == "upload_rate_exceeded"
    # Another identity (another address) is not held back by the first one's.
    other = await open_from("127.0.0.2", server.port)
    async with other:
        await other.send_all(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                             f"{len(small)}\r\n\r\n".encode() + small)
        status, _, _ = await read_http_response(other)
    assert status == 201
    allowance = server.services.uploads
    assert allowance.take("author 9", 5 * 1024 * 1024, 0.0) is None
    kind, wait = allowance.take("author 9", 1024, 0.0) or ("", 0.0)
    assert kind == "quota" and 0 < wait < 3600


async def test_uploads_no_message_names_are_deleted(nursery, db_path) -> None:
    config = make_config(db_path)
    server = await start_server(nursery, attrs.evolve(
        config, media=MediaConfig(unsent_upload_ttl=1)))
    path = "/rooms/3/images?author_id=5"
    _, unsent = await http_call(server.port, "POST", path, raw=image_bytes("PNG"))
    _, sent = await http_call(server.port, "POST", path, raw=image_bytes("GIF"))
    async with open_ws(ws_url(server, 3, "?author_id=5")) as ws:
        await ws.send_message(chat_frame(sent["url"], author_id=5, room_id=3,
                                         message_type="chat_img"))
        assert (await recv(ws))["content"] == sent["url"]
    repository = server.services.repository

    async def gone() -> bool:
        return await repository.media_info(unsent["id"]) is None

    with trio.fail_after(10):
        while not await gone():
            await trio.sleep(0.05)
    # The sweep has run at least once since the upload's time was up; the sent one stays.
    await trio.sleep(0.5)
    assert await repository.media_info(sent["id"]) is not None
    status, _, _ = await http_get(server.port, sent["url"])
    assert status == 200


@pytest.mark.parametrize(("origin", "host", "tokens", "allowed"), [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True, True),
    ("http://[::1]:8080", "[::1]:8080", True, True),
    ("http://localhost:8080", "localhost:8080", True, True),
    # A DNS-rebinding page: its name, now resolving to the server, in Origin and Host.
    ("http://rebind.example:8080", "rebind.example:8080", True, False),
    ("http://rebind.example:8080", "rebind.example:8080", False, True),
    ("http://evil.example", "127.0.0.1", True, False),
])
def test_with_tokens_a_host_name_alone_does_not_prove_the_origin(
        origin: str, host: str, tokens: bool, allowed: bool) -> None:
    assert origin_allowed(origin, host, (), trust_host_names=not tokens) is allowed
    # Listing the origin is how a page served at a host name connects.
    assert origin_allowed(origin, host, (origin,), trust_host_names=False)


async def test_a_rebinding_page_cannot_upgrade_when_tokens_are_on(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, auth=AuthConfig(
        mode="token", secret="s" * 32)))
    token = make_token(7, "s" * 32)

    async def upgrade(host: str) -> int:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(request_head(extra=f"Origin: http://{host}\r\n")
                                  .replace(b"/ws/1 ", f"/ws/1?token={token} ".encode())
                                  .replace(b"Host: 127.0.0.1", f"Host: {host}".encode()))
            status, _, _ = await read_http_response(stream)
        return status

    assert await upgrade(f"rebind.example:{server.port}") == 403
    assert await upgrade(f"127.0.0.1:{server.port}") == 101


async def test_start_up_warns_when_tokens_are_on_and_no_origin_is_listed(tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auth": {"mode": "token", "secret": "s" * 32},
                                  "sqlite": {"path": str(tmp_path / "c.db")}}))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_chat.cli", "serve", str(config), "--port", "0"],
        stderr=subprocess.PIPE)
    try:
        log = b""
        with trio.fail_after(30):
            while b"listening on" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, log.decode()
                log += chunk
        assert b"auth.allowedOrigins is empty" in log
    finally:
        process.kill()
        await process.wait()
        await process.stderr.aclose()


async def test_metrics_can_be_protected_by_a_key(nursery, db_path) -> None:
    metrics_key, admin_key = "m" * 20, "a" * 20
    server = await start_server(nursery, make_config(db_path, auth=AuthConfig(
        metrics_key=metrics_key, admin_key=admin_key)))

    async def scrape(headers: str = "") -> int:
        status, _, _ = await http_get(server.port, "/metrics", headers)
        return status

    assert await scrape() == 401
    assert await scrape("Authorization: Bearer wrong-key-of-some-length\r\n") == 401
    assert await scrape(f"Authorization: Bearer {metrics_key}\r\n") == 200
    assert await scrape(f"Authorization: Bearer {admin_key}\r\n") == 200
    # Without the key configured, /metrics answers anyone, as before.
    open_server = await start_server(nursery, make_config(db_path.with_name("o.db")))
    status, _, _ = await http_get(open_server.port, "/metrics")
    assert status == 200


