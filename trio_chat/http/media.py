"""The media API: uploading an image to a room, and serving images and their
thumbnails with caching headers (an image's id never names other bytes).

An upload takes from its identity's allowance (``limits.uploadsPerMinute`` and
``uploadBytesPerHour``; 429 over it) before it is decoded, and is deleted unless
a chat_img message names it within ``media.unsentUploadTtl``.

Runs no task; an upload is decoded in a worker thread (see :mod:`trio_chat.media`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re

import trio

from ..auth import AuthError, authenticate
from ..media import ImageError, save_image
from ..protocol import INT64_MIN
from .base import HttpError, Request, Response, Route, error, json_response, query_int, room_id_of
from .multipart import uploaded_file
from .rooms import existing_room
from .services import Services

# Its body may be an image, so the connection loop lets it be larger than others.
IMAGES_PATH = re.compile(r"/rooms/(?P<room>[^/]*)/images")


async def _upload_image(services: Services, request: Request, match: re.Match[str]
                        ) -> Response:
    room_id = room_id_of(match)
    config = services.config
    if config.server.room_policy == "strict":
        await existing_room(services, room_id)
    author_id = query_int(request, "author_id", low=INT64_MIN) or 0
    # Whose allowance the upload takes from: the token's author, else the address (a
    # query's author_id is anyone's to claim).
    identity = "address " + (request.remote.rpartition(":")[0] or request.remote)
    if config.auth.mode == "token":
        with contextlib.suppress(AuthError):  # the admin key: the query says who
            author_id = authenticate(request.query, request.headers,
                                     config.auth.secret).author_id
            identity = f"author {author_id}"
    data = await uploaded_file(request)
    refused = services.uploads.take(identity, len(data), trio.current_time())
    if refused is not None:
        kind, wait = refused
        limits = config.limits
        detail = (f"at most {limits.uploads_per_minute:g} uploads a minute" if kind == "rate"
                  else f"at most {limits.upload_bytes_per_hour} bytes of uploads an hour")
        raise HttpError(error(429, f"upload_{kind}_exceeded", detail,
                              (("retry-after", str(math.ceil(wait))),)))
    try:
        info = await save_image(services.repository, config.media, data, room_id, author_id,
                                sent=False)
    except ImageError as exc:
        raise HttpError(error(exc.status, exc.code, exc.detail)) from None
    return json_response(201, info.to_wire(), (("location", info.url),))


async def _media(services: Services, request: Request, match: re.Match[str]) -> Response:
    return await _serve_media(services, request, match.group("media"), thumbnail=False)


async def _thumbnail(services: Services, request: Request, match: re.Match[str]) -> Response:
    return await _serve_media(services, request, match.group("media"), thumbnail=True)


async def _serve_media(services: Services, request: Request, media_id: str, *,
                       thumbnail: bool) -> Response:
    found = await services.repository.media_bytes(media_id, thumbnail)
    if found is None:
        raise HttpError(error(404, "media_not_found", "no such image"))
    content_type, data = found
    # The id never names other bytes, so the bytes can be cached for good.
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = (("cache-control", "public, max-age=31536000, immutable"), ("etag", etag),
               ("x-content-type-options", "nosniff"),
               ("content-security-policy", "default-src 'none'"))
    if etag in request.headers.get("if-none-match", ""):
        return Response(304, b"", content_type, headers)
    return Response(200, data, content_type, headers)


ROUTES: list[Route] = [
    Route("POST", re.compile(IMAGES_PATH.pattern + r"\Z"), _upload_image, "reader"),
    Route("GET", re.compile(r"/media/(?P<media>[A-Za-z0-9_-]{1,64})\Z"), _media),
    Route("GET", re.compile(r"/media/(?P<media>[A-Za-z0-9_-]{1,64})/thumbnail\Z"),
          _thumbnail),
]
