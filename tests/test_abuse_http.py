"""Hostile HTTP clients (issue 16, the HTTP side): each attack runs against a real
server while another client checks that it is still served, and the test asserts
the bound the server holds the attacker to."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import socket
from typing import Any

import attrs
import psutil
import pytest
import trio
from PIL import Image

from trio_chat.config import MediaConfig
from trio_chat.http.multipart import MAX_PARTS, file_part
from trio_chat.store import Repository

from .conftest import (
    UNLIMITED,
    chat_frame,
    make_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .hostile import LAG_BOUND, SERVED_WITHIN, served_meanwhile
from .rawws import http_call, http_get, open_from, read_http_response
from .test_images import image_bytes, noisy_png


@pytest.fixture
async def server(nursery: trio.Nursery, db_path: Any) -> Any:
    return await start_server(nursery, make_config(db_path))


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str],
                                                                         bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.encode("latin-1") + body)
        return await read_http_response(stream)


def form(*parts: bytes, boundary: str = "B") -> bytes:
    return b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts) \
        + b"--" + boundary.encode() + b"--\r\n"


def test_the_multipart_parser_finds_the_one_file_and_refuses_the_rest() -> None:
    png = image_bytes("PNG")
    file = b'Content-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n' + png
    field = b'Content-Disposition: form-data; name="note"\r\n\r\nhello'
    kind = "multipart/form-data; boundary=B"
    assert file_part(b"preamble\r\n" + form(field, file), kind) == png
    assert file_part(form(file, boundary="a b"), 'multipart/form-data; boundary="a b"') == png
    refusals = {
        "no boundary": (form(file), "multipart/form-data"),
        "no file": (form(field), kind),
        "two files": (form(file, file), kind),
        "unclosed": (form(file)[:-20], kind),
        "huge head": (b"--B\r\n" + b"X-A: " + b"a" * 10_000 + b"\r\n\r\nx\r\n--B--", kind),
    }
    for name, (body, content_type) in refusals.items():
        with pytest.raises(Exception, match="400") as info:
            file_part(body, content_type)
        assert info.value.response.status == 400, name  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="413"):
        file_part(form(*[field] * (MAX_PARTS + 1), file), kind)


async def test_a_form_of_150000_empty_parts_never_stalls_the_server(server) -> None:
    body = b"--B\r\n\r\n\r\n" * 150_000 + b"--B--\r\n"
    assert len(body) > 1_000_000
    answers: list[tuple[int, Any]] = []

    async def attack() -> None:
        head = (f"POST /rooms/1/images?author_id=5 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary=B\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        for _ in range(3):
            status, _, answer = await raw_request(server.port, head, body)
            answers.append((status, json.loads(answer)["error"]))

    lag = await served_meanwhile(server, attack)
    assert answers == [(413, "too_many_parts")] * 3
    assert lag.worst_cpu < LAG_BOUND, lag


async def test_a_large_json_object_is_refused_before_it_is_parsed(server) -> None:
    # A megabyte of JSON for the rooms API: refused unparsed (parsing holds the GIL,
    # in a worker thread too).
    body = json.dumps({"name": "x", "private": [0] * 300_000}).encode()[:1_000_000]
    body = body[:body.rfind(b",")] + b"]}"

    async def attack() -> None:
        for _ in range(5):
            status, _, answer = await raw_request(
                server.port, f"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                "\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", body)
            assert (status, json.loads(answer)["error"]) == (413, "body_too_large")

    lag = await served_meanwhile(server, attack)
    assert lag.worst_cpu < LAG_BOUND, lag


def big_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


async def test_image_decodes_are_bounded_and_their_memory_returns(server) -> None:
    # Four uploads of a 25-megapixel image at once: one decode at a time
    # (media.decodeConcurrency 1), each holding the image once (4 bytes a pixel).
    data = big_png(5000)
    path = "/rooms/1/images?author_id=5"
    status, _ = await http_call(server.port, "POST", path, raw=image_bytes("PNG"))
    assert status == 201
    gc.collect()
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline

    async def attack() -> None:
        async def one() -> None:
            status, answer = await http_call(server.port, "POST", path, raw=data)
            assert status == 201, answer

        async with trio.open_nursery() as uploads:
            for _ in range(4):
                uploads.start_soon(one)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        lag = await served_meanwhile(server, attack)
        nursery.cancel_scope.cancel()
    one_decode = 5000 * 5000 * 4
    assert peak - baseline < 1.6 * one_decode, (peak - baseline) >> 20
    assert process.memory_info().rss - baseline < 48 * 1024 * 1024
    assert lag.worst_cpu < LAG_BOUND, lag


async def test_half_open_requests_from_one_address_never_starve_another(nursery,
                                                                         db_path) -> None:
    server = await start_server(nursery, make_config(db_path, limits=attrs.evolve(
        UNLIMITED, http_connections_per_ip=8, connections_per_ip=12)))
    async with open_ws(ws_url(server, 5, "?author_id=1")) as member, \
            contextlib.AsyncExitStack() as stack:
        idle: list[trio.SocketStream] = []
        refused = []
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            stack.push_async_callback(trio.aclose_forcefully, stream)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            idle.append(stream)
        for stream in idle:
            with trio.move_on_after(0.3):
                status, _, body = await read_http_response(stream)
                refused.append((status, json.loads(body)["error"]))
        # Eight half-open requests wait for their end; the rest were refused at once.
        assert refused == [(429, "too_many_connections")] * 12
        assert server.services.http_limiter.count("127.0.0.1") == 8
        # The upgraded member counts against connectionsPerIp (12 in all), not as HTTP.
        assert server.services.ip_limiter.count("127.0.0.1") == 9
        other = await open_from("127.0.0.2", server.port)
        async with other:
            with trio.fail_after(SERVED_WITHIN):
                await other.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, _ = await read_http_response(other)
            assert status == 200
        with trio.fail_after(SERVED_WITHIN):
            await member.send_message(chat_frame("still here", author_id=1, room_id=5))
            assert (await recv(member))["content"] == "still here"
    await wait_until(lambda: len(server.services.http_limiter) == 0)


async def test_request_bodies_in_flight_are_held_to_the_address_budget(nursery,
                                                                        db_path) -> None:
    config = make_config(db_path, limits=attrs.evolve(
        UNLIMITED, body_bytes_per_ip=2 * 1024 * 1024 + 128 * 1024))
    config = attrs.evolve(config, media=MediaConfig(max_image_bytes=1024 * 1024))
    server = await start_server(nursery, config)
    chunk = b"\0" * (900 * 1024)
    head = (f"POST /rooms/1/images HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {1024 * 1024}\r\n\r\n").encode()
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            stack.push_async_callback(trio.aclose_forcefully, stream)
            await stream.send_all(head + chunk)
            streams.append(stream)
        await wait_until(lambda: server.services.bodies.held("127.0.0.1") == 2 * len(chunk))
        third = await trio.open_tcp_stream("127.0.0.1", server.port)
        stack.push_async_callback(trio.aclose_forcefully, third)
        # One byte over the budget, and no more: the server reads all of it before it
        # answers, so closing after the answer resets nothing the answer needs.
        over = config.limits.body_bytes_per_ip - 2 * len(chunk) + 1
        with trio.fail_after(10):
            await third.send_all(head + chunk[:over])
            status, _, body = await read_http_response(third)
        assert (status, json.loads(body)["error"]) == (429, "too_many_bytes")
        with trio.fail_after(SERVED_WITHIN):
            status, _, _ = await http_get(server.port, "/healthz")
        assert status == 200
    # The bodies' bytes are given back when their connections go.
    await wait_until(lambda: server.services.bodies.held() == 0)


async def test_a_slow_reader_above_the_minimum_rate_gets_the_whole_download(
        nursery, db_path) -> None:
    server = await start_server(nursery, make_config(
        db_path, handshake_timeout=1, write_wait=1, min_transfer_rate=500_000))
    status, info = await http_call(server.port, "POST", "/rooms/1/images?author_id=5",
                                   raw=noisy_png(1100))
    assert status == 201 and info["size"] > 3_000_000, info
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    stream = trio.SocketStream(sock)
    async with stream:
        await sock.connect(("127.0.0.1", server.port))
        started = trio.current_time()
        await stream.send_all(f"GET {info['url']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while len(received) < info["size"]:
            # About 1 MB/s, twice the minimum rate: longer than the old fixed deadline.
            chunk = await stream.receive_some(16 * 1024)
            assert chunk, f"cut after {len(received)} bytes"
            received += chunk
            await trio.sleep(len(chunk) / 1_000_000)
    assert trio.current_time() - started > 2


async def test_a_stalled_download_is_held_in_the_budget_and_dropped_at_its_deadline(
        nursery, db_path) -> None:
    server = await start_server(nursery, make_config(
        db_path, write_wait=0.5, min_transfer_rate=1_000_000,
        limits=attrs.evolve(UNLIMITED, body_bytes_per_ip=6 * 1024 * 1024)))
    status, info = await http_call(server.port, "POST", "/rooms/1/images?author_id=5",
                                   raw=noisy_png(1100))
    assert status == 201, info
    bodies = server.services.bodies
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled = trio.SocketStream(sock)
    async with stalled:
        await sock.connect(("127.0.0.1", server.port))
        await stalled.send_all(f"GET {info['url']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await stalled.receive_some(4096)  # then it reads no more
        await wait_until(lambda: bodies.held("127.0.0.1") >= info["size"])
        started = trio.current_time()
        # A second download from the address would hold more than its budget.
        status, _, body = await http_get(server.port, info["url"])
        assert (status, json.loads(body)["error"]) == (429, "too_many_bytes")
        # Given up after writeWait plus the answer's size at minTransferRate (4.1 s).
        await wait_until(lambda: bodies.held() == 0, timeout=30)
        assert 2 < trio.current_time() - started < 10


async def test_a_handler_that_hangs_is_answered_503_at_its_deadline(nursery, db_path,
                                                                      monkeypatch) -> None:
    server = await start_server(nursery, make_config(db_path, handler_timeout=0.5))

    async def hung(self: Any, media_id: str, thumbnail: bool) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Repository, "media_bytes", hung)
    started = trio.current_time()
    status, headers, body = await http_get(server.port, "/media/AAAAAAAAAAAAAAAAAAAAAA")
    assert (status, json.loads(body)["error"]) == (503, "handler_timeout")
    assert headers["connection"] == "close" and trio.current_time() - started < 5


async def test_a_multipart_uploads_copy_counts_in_the_addresss_body_budget(
        nursery, db_path) -> None:
    budget = 1024 * 1024
    server = await start_server(nursery, make_config(
        db_path, limits=attrs.evolve(UNLIMITED, body_bytes_per_ip=budget)))
    png = noisy_png(480)
    file = b'Content-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n' + png
    body = form(file)
    # The body fits in the budget; the body and the file copied out of it do not.
    assert len(body) < budget < 2 * len(body)
    status, answer = await http_call(server.port, "POST", "/rooms/1/images?author_id=5",
                                     raw=body, headers={
                                         "Content-Type": "multipart/form-data; boundary=B"})
    assert (status, answer["error"]) == (429, "too_many_bytes"), answer
    # The same file as the body itself needs no copy.
    status, answer = await http_call(server.port, "POST", "/rooms/1/images?author_id=5",
                                     raw=png)
    assert status == 201, answer
    assert server.services.bodies.held() == 0
