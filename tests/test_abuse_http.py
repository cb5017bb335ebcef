"""Hostile HTTP clients (issue 16, the HTTP side): each attack runs against a real
server while another client checks that it is still served, and the test asserts
the bound the server holds the attacker to."""

from __future__ import annotations

import gc
import io
import json
from typing import Any

import psutil
import pytest
import trio
from PIL import Image

from trio_chat.http.multipart import MAX_PARTS, file_part

from .conftest import make_config, start_server
from .hostile import LAG_BOUND, served_meanwhile
from .rawws import http_call, read_http_response
from .test_images import image_bytes


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
    assert lag.worst < LAG_BOUND, lag


async def test_a_large_json_body_is_parsed_off_the_event_loop(server) -> None:
    # A megabyte of JSON for the rooms API: refused, and parsed in a worker thread.
    body = json.dumps({"name": "x", "private": [0] * 300_000}).encode()[:1_000_000]
    body = body[:body.rfind(b",")] + b"]}"

    async def attack() -> None:
        for _ in range(5):
            status, _, answer = await raw_request(
                server.port, f"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                "\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", body)
            assert status == 422, answer

    lag = await served_meanwhile(server, attack)
    assert lag.worst < LAG_BOUND, lag


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
    assert lag.worst < LAG_BOUND, lag
