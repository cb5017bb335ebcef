"""Images: validation by decoding (sans-IO) and the round trip over real sockets: upload,
serving and caching, chat_img frames with data URLs or uploaded URLs, on both stores."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import attrs
import pytest
import trio
from PIL import Image

from trio_chat.config import MediaConfig
from trio_chat.media import ImageError, validate_image

from .conftest import chat_frame, open_ws, recv, start_server, ws_url
from .rawws import http_call, http_get

ROOM = 44
CONFIG = MediaConfig()
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif",
           "WEBP": "image/webp"}


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), **save: Any) -> bytes:
    image = Image.new("RGB", size, (200, 30, 90))
    for x in range(0, size[0], 7):  # something to compress, not one flat colour
        image.putpixel((x, x % size[1]), (x % 256, 10, 250))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def noisy_png(side: int) -> bytes:
    """A PNG that does not compress: its size grows with its pixels."""
    noise = random.Random(side).randbytes(side * side * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), noise).save(out, "PNG")
    return out.getvalue()


def jpeg_with_gps() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (37.0, 33.0, 59.0)
    gps[3], gps[4] = "E", (126.0, 58.0, 40.0)
    return image_bytes("JPEG", exif=exif.tobytes())


def bomb() -> bytes:
    """A single-colour 20000x20000 PNG: a few KiB that would decode to 1.2 GB."""
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_comes_out_clean_with_a_thumbnail(fmt: str) -> None:
    image = validate_image(image_bytes(fmt, (800, 600)), CONFIG)
    assert (image.content_type, image.width, image.height) == (FORMATS[fmt], 800, 600)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == fmt and decoded.size == (800, 600)
    thumb = Image.open(io.BytesIO(image.thumbnail))
    assert thumb.size == (image.thumbnail_width, image.thumbnail_height) == (320, 240)


@pytest.mark.parametrize(("data", "code", "status"), [
    (b"just some text, named cat.png", "unsupported_image", 415),
    (image_bytes("PNG")[:-40], "invalid_image", 400),
    (image_bytes("BMP"), "unsupported_image", 415),
    (image_bytes("PNG", (10_001, 2)), "image_too_big", 422),
    (bomb(), "image_too_big", 422),
    (image_bytes("PNG") + b"PK\x03\x04 a zip archive follows", "polyglot_image", 422),
    (image_bytes("GIF") + b"<html><script>alert(1)</script>", "polyglot_image", 422),
    (image_bytes("JPEG") + b"<?php echo 1; ?>", "polyglot_image", 422),
])
def test_what_is_refused(data: bytes, code: str, status: int) -> None:
    with pytest.raises(ImageError) as info:
        validate_image(data, CONFIG)
    assert (info.value.code, info.value.status) == (code, status)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    with pytest.raises(ImageError) as info:
        validate_image(noisy_png(100), attrs.evolve(CONFIG, max_image_bytes=1024))
    assert (info.value.code, info.value.status) == ("image_too_large", 413)


def test_exif_location_is_gone() -> None:
    original = jpeg_with_gps()
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825)
    cleaned = validate_image(original, CONFIG)
    exif = Image.open(io.BytesIO(cleaned.data)).getexif()
    assert not exif.get_ifd(0x8825) and 0x010F not in exif
    assert b"TestCam" not in cleaned.data and b"Exif" not in cleaned.data


@pytest.fixture
async def server(nursery: trio.Nursery, any_config: Any) -> Any:
    return await start_server(nursery, any_config())


async def upload(server: Any, data: bytes, **headers: str) -> tuple[int, Any]:
    return await http_call(server.port, "POST", f"/rooms/{ROOM}/images?author_id=5", raw=data,
                           headers=headers)


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_upload_and_serve_round_trip(server, fmt: str) -> None:
    status, info = await upload(server, image_bytes(fmt, (640, 480)),
                                **{"Content-Type": "application/octet-stream"})
    assert status == 201, info
    assert (info["content_type"], info["width"], info["height"]) == (FORMATS[fmt], 640, 480)
    assert info["url"] == f"/media/{info['id']}" and len(info["id"]) >= 16
    status, headers, body = await http_get(server.port, info["url"])
    assert status == 200 and headers["content-type"] == FORMATS[fmt]
    assert int(headers["content-length"]) == len(body) == info["size"]
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(body)).size == (640, 480)
    status, headers, thumb = await http_get(server.port, info["thumbnail_url"])
    assert status == 200
    assert Image.open(io.BytesIO(thumb)).size == (info["thumbnail_width"],
                                                   info["thumbnail_height"]) == (320, 240)
    # Caches revalidate for free.
    _, again, _ = await http_get(server.port, info["url"])
    status, _, body = await http_get(server.port, info["url"],
                                     f"If-None-Match: {again['etag']}\r\n")
    assert (status, body) == (304, b"")


async def test_multipart_upload_and_refusals_over_http(server) -> None:
    data = jpeg_with_gps()
    form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    status, info = await upload(server, form,
                                **{"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert status == 201, info
    _, _, served = await http_get(server.port, info["url"])
    assert b"TestCam" not in served and not Image.open(io.BytesIO(served)).getexif()
    for body, expected in [(b"hello, named x.png", (415, "unsupported_image")),
                           (image_bytes("PNG")[:-40], (400, "invalid_image")),
                           (bomb(), (422, "image_too_big")),
                           (image_bytes("PNG") + b"<html>", (422, "polyglot_image")),
                           (b"x" * (5 * 1024 * 1024 + 1000), (413, "image_too_large"))]:
        status, answer = await upload(server, body)
        assert (status, answer["error"]) == expected
    status, answer = await http_call(server.port, "GET", "/media/AAAAAAAAAAAAAAAAAAAAAA")
    assert (status, answer["error"]) == (404, "media_not_found")


async def test_a_data_url_frame_is_stored_once_and_broadcast_as_a_reference(server) -> None:
    small, large = image_bytes("PNG", (100, 80)), noisy_png(600)
    assert len(large) > 1_000_000
    url = ws_url(server, ROOM, "?author_id=5")
    frames = []
    async with open_ws(url) as sender, open_ws(url) as other:
        for data in (small, large):
            content = "data:image/png;base64," + base64.b64encode(data).decode()
            await sender.send_message(chat_frame(content, room_id=ROOM, author_id=5,
                                                 message_type="chat_img"))
            frames.append(await other.get_message())
            while json.loads(frames[-1])["message_type"] != "chat_img":
                frames[-1] = await other.get_message()
    messages = [json.loads(f) for f in frames]
    assert [(m["image"]["width"], m["image"]["height"]) for m in messages] == [
        (100, 80), (600, 600)]
    assert all(m["content"] == m["image"]["url"] for m in messages)
    # The broadcast does not grow with the image (only its numbers have more digits).
    assert len(frames[1].encode()) < 1024
    assert abs(len(frames[1]) - len(frames[0])) < 16
    _, _, body = await http_get(server.port, messages[1]["content"])
    assert Image.open(io.BytesIO(body)).size == (600, 600)
    stored = (await http_call(server.port, "GET", f"/rooms/{ROOM}/messages"))[1]["messages"]
    assert [m["image"] for m in reversed(stored)] == [m["image"] for m in messages]


async def test_frames_naming_uploads_and_bad_images(server) -> None:
    status, info = await upload(server, image_bytes("WEBP"))
    assert status == 201
    async with open_ws(ws_url(server, ROOM, "?author_id=5")) as ws:
        await ws.send_message(chat_frame(f"http://example.test{info['url']}", room_id=ROOM,
                                         message_type="chat_img"))
        message = await recv(ws)
        assert (message["content"], message["image"]) == (info["url"], info)
        for content, code in [("data:image/png;base64,!!!", "invalid_image"),
                              ("data:image/png;base64," + base64.b64encode(b"text").decode(),
                               "unsupported_image"),
                              ("/media/AAAAAAAAAAAAAAAAAAAAAA", "invalid_image"),
                              ("a cat", "invalid_image")]:
            await ws.send_message(chat_frame(content, room_id=ROOM, message_type="chat_img",
                                             client_msg_id="img-1"))
            error = await recv(ws)
            assert (error["message_type"], error["code"], error["client_msg_id"]) == (
                "error", code, "img-1")
    async with open_ws(ws_url(server, ROOM + 1)) as ws:  # another room's upload
        await ws.send_message(chat_frame(info["url"], room_id=ROOM + 1,
                                         message_type="chat_img"))
        assert (await recv(ws))["code"] == "invalid_image"


async def test_only_chat_img_frames_may_exceed_the_text_limit(server) -> None:
    async with open_ws(ws_url(server, ROOM)) as ws:
        await ws.send_message(chat_frame("x" * 100_000, room_id=ROOM))
        with pytest.raises(Exception) as info, trio.fail_after(15):
            while True:
                await ws.get_message()
    assert getattr(info.value, "reason", None) is not None and info.value.reason.code == 1009
    assert server.metrics.oversized_frames == 1


async def test_a_resent_data_url_frame_stores_its_image_once(server, monkeypatch) -> None:
    backend_class = type(server.store.backend)
    saved = []
    original = backend_class.save_media

    async def save_media(self: Any, media: Any) -> None:
        saved.append(media.info.id)
        await original(self, media)

    monkeypatch.setattr(backend_class, "save_media", save_media)
    content = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", (40, 30))).decode()
    frame = chat_frame(content, room_id=ROOM, author_id=5, message_type="chat_img",
                       client_msg_id="img-again")
    acks = []
    async with open_ws(ws_url(server, ROOM, "?author_id=5")) as sender:
        for _ in range(2):
            await sender.send_message(frame)
            while (reply := json.loads(await sender.get_message()))["message_type"] != "ack":
                pass
            acks.append(reply)
    assert acks[0] == acks[1]
    assert len(saved) == 1, "the resend stored its image again"
    assert server.metrics.duplicates == 1
