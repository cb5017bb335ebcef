"""The WebSocket upgrade: checking a ``GET /ws/{room_id}`` that asks to upgrade
(method and version, parameters, handshake headers, Origin, identity, room
policy and bans) and writing the 101 that accepts it. The per-address limits are
the connection loop's: every TCP connection counts from its accept. Runs no task.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re

import attrs
import trio

from ..auth import AuthError, authenticate, check_origin
from ..deflate import Deflate, negotiate
from ..protocol import INT64_MIN
from .access import auth_error, check_room_access
from .base import HttpError, Request, Response, error, json_response, query_int, room_id_of
from .services import Services

log = logging.getLogger(__name__)

WS_PATH = re.compile(r"/ws/(?P<room>[^/]*)")


@attrs.frozen
class Upgrade:
    """An accepted WebSocket upgrade: what the connection needs of its request."""

    room_id: int
    since: int | None
    author_id: int | None
    verified: bool
    trailing: bytes
    # The token's exp (seconds since the epoch): the connection is closed then.
    expires: float | None = None
    # permessage-deflate as agreed (server.compression "deflate" and the client offered
    # it), answered in the 101; None: no extension.
    deflate: Deflate | None = None


def is_upgrade(headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "upgrade" in tokens and headers.get("upgrade", "").lower() == "websocket"


# Headers whose second copy would make the handshake ambiguous (RFC 6455 4.2.1): which
# key is answered, which version agreed to. Refused rather than picking one.
_SINGLE = ("sec-websocket-key", "sec-websocket-version", "upgrade")


def _check_handshake(request: Request) -> Response | None:
    headers = request.headers
    if request.method != "GET" or request.http_version < "1.1":
        return error(400, "bad_handshake", "a WebSocket upgrade must be a GET over HTTP/1.1 "
                     f"or later, not {request.method[:16]} over HTTP/{request.http_version}")
    repeated = [name for name in _SINGLE if name in request.repeated]
    if repeated:
        return error(400, "bad_handshake", f"{repeated[0]} must appear once")
    if headers.get("sec-websocket-version") != "13":
        return error(426, "unsupported_websocket_version", "Sec-WebSocket-Version must be 13",
                     (("sec-websocket-version", "13"),))
    try:
        key = base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 16:
        return error(400, "bad_handshake", "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


async def check_upgrade(services: Services, request: Request, match: re.Match[str]
                        ) -> tuple[Response | None, Upgrade | None]:
    """Check an upgrade request: the refusal, or the upgrade."""
    try:
        room_id = room_id_of(match)
        since = query_int(request, "since", low=0)
        author_id = query_int(request, "author_id", low=INT64_MIN)
        response = _check_handshake(request)
    except HttpError as exc:
        response = exc.response
    if response is None:
        response, author_id, verified, expires = await _admit(services, request, room_id,
                                                              author_id)
    if response is not None:
        services.metrics.handshake_failures += 1
        return response, None
    deflate = None
    if services.config.server.compression == "deflate":
        deflate = negotiate(request.headers.get("sec-websocket-extensions"))
    return None, Upgrade(room_id, since, author_id, verified, b"", expires, deflate)


async def _admit(services: Services, request: Request, room_id: int, author_id: int | None
                 ) -> tuple[Response | None, int | None, bool, float | None]:
    """Origin, identity, room policy and bans, before the upgrade: an error response or
    None, the author (a token's subject wins over ``?author_id``), whether it was
    verified (then every frame must carry it) and when its token expires."""
    auth = services.config.auth
    try:
        check_origin(request.headers.get("origin"), request.headers.get("host"),
                     auth.allowed_origins, trust_host_names=auth.mode != "token")
    except AuthError as exc:
        services.metrics.origin_refusals += 1
        return error(exc.status, exc.code, exc.detail), None, False, None
    verified = auth.mode == "token"
    expires = None
    try:
        if verified:
            try:
                claims = authenticate(request.query, request.headers, auth.secret)
            except AuthError as exc:
                raise auth_error(services, exc) from None
            author_id, expires = claims.author_id, claims.expires
            await check_room_access(services, room_id, claims)
        if services.config.server.room_policy == "strict" and \
                await services.repository.room(room_id) is None:
            return error(404, "room_not_found", f"no room {room_id}"), None, False, None
        if author_id is not None:
            ban = await services.hub.ban_of(room_id, author_id)
            if ban is not None:
                return json_response(403, {"error": "banned", "until": ban.until,
                                           "detail": f"author {author_id} is banned from "
                                                     f"room {room_id}" +
                                                     (f": {ban.reason}" if ban.reason else "")}
                                     ), None, False, None
    except HttpError as exc:
        return exc.response, None, False, None
    except Exception as exc:
        log.warning("cannot check room %d for a join: %r", room_id, exc)
        return error(503, "store_unavailable", "room data is unavailable, try again later",
                     (("retry-after", "1"),)), None, False, None
    return None, author_id, verified, expires


async def accept_upgrade(stream: trio.abc.Stream, request: Request,
                         deflate: Deflate | None = None) -> None:
    """Write the 101 that switches ``stream`` to the WebSocket protocol (with
    permessage-deflate as agreed, if it was)."""
    # Written by hand, not through h11: its connection is dropped after the upgrade.
    # RFC 6455 4.2.2: the accept token is the key and the protocol's GUID, hashed.
    key = request.headers["sec-websocket-key"].encode("ascii") + \
        b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    extension = b"" if deflate is None else \
        b"sec-websocket-extensions: " + deflate.header.encode("ascii") + b"\r\n"
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                          b"connection: Upgrade\r\nsec-websocket-accept: " +
                          base64.b64encode(hashlib.sha1(key).digest()) + b"\r\n" +
                          extension + b"\r\n")
