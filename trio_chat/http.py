"""HTTP on the chat port: request parsing (h11), routing, the upgrade to WebSocket.

Owns everything a TCP connection does before it is a chat connection: reading
requests with keep-alive and time limits, answering plain HTTP routes (the
demo page, ``/healthz``, ``/metrics``; JSON errors for everything else), and
validating ``GET /ws/{room_id}`` before switching protocols. The task that
calls :func:`serve_http` (one per TCP connection) runs it all, then becomes
the connection's reader.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.parser
import email.policy
import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from .auth import AuthError, Claims, authenticate, check_admin, check_origin
from .broker import BrokerUnavailable
from .connection import serve_connection
from .framing import BANNED, KICKED, ROOM_DELETED
from .hub import RoomUnavailable
from .media import ImageError, save_image
from .protocol import (
    CHAT_TYPES,
    INT64_MAX,
    INT64_MIN,
    Draft,
    FrameError,
    encodable,
    parse_frame,
    parse_room_id,
    utc_after,
    utc_now,
)
from .store import Ban, NameTaken, NoRoomId, RoomInfo, StoreUnavailable

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

RECEIVE_BYTES = 16 * 1024
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    remote: str


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                    headers=headers)


def error(status: int, code: str, detail: str,
          headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"error": code, "detail": detail}, headers)


class HttpError(Exception):
    """Raised by a handler to answer with ``response`` (a 4xx with a JSON body)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


Handler = Callable[["Server", Request, re.Match[str]], Awaitable[Response]]


@attrs.frozen
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    # "public"; "reader": a room's data (a user token for it, or the admin key, when
    # tokens are on); "admin": management (the admin key).
    access: str = "public"


_WS_PATH = re.compile(r"/ws/(?P<room>[^/]*)")
_IMAGES_PATH = re.compile(r"/rooms/(?P<room>[^/]*)/images")
_DEMO_PAGE = resources.files("trio_chat").joinpath("static/index.html")


async def _demo_page(server: Server, request: Request, match: re.Match[str]) -> Response:
    return Response(200, server.demo_page, "text/html; charset=utf-8",
                    (("cache-control", "no-cache"),))


# The JavaScript client module (docs/clients.md), read once at import like the OpenAPI
# document. Browsers revalidate it on every use, so a new version is picked up at once.
_JS_CLIENT = resources.files("trio_chat").joinpath("static/trio-chat.js").read_bytes()
_JS_CLIENT_ETAG = '"' + hashlib.sha256(_JS_CLIENT).hexdigest()[:32] + '"'


async def _js_client(server: Server, request: Request, match: re.Match[str]) -> Response:
    headers = (("cache-control", "no-cache"), ("etag", _JS_CLIENT_ETAG),
               ("x-content-type-options", "nosniff"))
    if _JS_CLIENT_ETAG in request.headers.get("if-none-match", ""):
        return Response(304, b"", "text/javascript; charset=utf-8", headers)
    return Response(200, _JS_CLIENT, "text/javascript; charset=utf-8", headers)


# Read once at import: it is part of the package and never changes while serving.
_OPENAPI = resources.files("trio_chat").joinpath("static/openapi.json").read_bytes()


async def _openapi(server: Server, request: Request, match: re.Match[str]) -> Response:
    return Response(200, _OPENAPI)


async def _healthz(server: Server, request: Request, match: re.Match[str]) -> Response:
    return json_response(200, {"status": "ok", "connections": len(server.hub.connections),
                               "rooms": len(server.hub.rooms)})


async def _metrics(server: Server, request: Request, match: re.Match[str]) -> Response:
    return Response(200, server.metrics.render().encode(),
                    "text/plain; version=0.0.4; charset=utf-8")


HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 500


def _query_int(request: Request, name: str, *, low: int, high: int = INT64_MAX) -> int | None:
    """An integer query parameter, or None if absent; :class:`HttpError` if malformed."""
    values = request.query.get(name)
    if not values:
        return None
    value = parse_room_id(values[-1])
    if value is None or not low <= value <= high:
        raise HttpError(error(400, "bad_parameter",
                              f"{name} must be an integer from {low} to {high}, "
                              f"got {values[-1][:40]!r}"))
    return value


def _room_id(match: re.Match[str]) -> int:
    room_id = parse_room_id(match.group("room"))
    if room_id is None:
        raise HttpError(error(400, "bad_room_id", "room id must be a 64-bit integer, "
                              f"got {match.group('room')[:40]!r}"))
    return room_id


async def _history(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    before = _query_int(request, "before", low=0)
    after = _query_int(request, "after", low=0)
    limit = _query_int(request, "limit", low=1, high=HISTORY_LIMIT_MAX) or HISTORY_LIMIT_DEFAULT
    order = (request.query.get("order") or ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise HttpError(error(400, "bad_parameter", f"order must be asc or desc, got "
                              f"{order[:40]!r}"))
    messages = await server.store.page(room_id, before=before, after=after, limit=limit,
                                       newest_first=order == "desc")
    next_page = None
    if len(messages) == limit:
        edge = messages[-1].id
        cursor = f"before={edge}" if order == "desc" else f"after={edge}"
        bound = (f"&after={after}" if after is not None and order == "desc" else
                 f"&before={before}" if before is not None and order == "asc" else "")
        next_page = f"/rooms/{room_id}/messages?{cursor}{bound}&limit={limit}&order={order}"
    return json_response(200, {"room_id": room_id,
                                "messages": [m.to_wire() for m in messages],
                                "next": next_page})


async def _members(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    try:
        members = await server.hub.presence.members(room_id)
    except BrokerUnavailable as exc:
        raise HttpError(error(503, "sync_unavailable", str(exc),
                              (("retry-after", "1"),))) from None
    return json_response(200, {"room_id": room_id, "online": len(members),
                                "members": members})


ROOMS_LIMIT_DEFAULT = 50
ROOMS_LIMIT_MAX = 500
ROOM_NAME_MAX = 50
REASON_MAX = 500
BAN_MAX_SECONDS = 10 * 365 * 86400


def _json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The request body as a JSON object with only ``allowed`` keys, or a 400/422."""
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):
        raise HttpError(error(400, "bad_json", "the body must be a JSON object")) from None
    if not isinstance(body, dict):
        raise HttpError(error(400, "bad_json", "the body must be a JSON object"))
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(invalid(unknown[0], "is not a field of this request"))
    for field, value in body.items():
        if isinstance(value, str) and not encodable(value):
            raise HttpError(invalid(field, "holds a lone surrogate, which is not text"))
    return body


def invalid(field: str, detail: str) -> Response:
    return json_response(422, {"error": "invalid_field", "field": field,
                               "detail": f"{field} {detail}"})


def _room_name(body: dict[str, Any], *, required: bool) -> str | None:
    if "name" not in body:
        if required:
            raise HttpError(invalid("name", "is required"))
        return None
    name = body["name"]
    if not isinstance(name, str):
        raise HttpError(invalid("name", "must be a string"))
    if not name.strip() or len(name) > ROOM_NAME_MAX:
        raise HttpError(invalid("name", f"must be 1 to {ROOM_NAME_MAX} characters, "
                                        "not only spaces"))
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise HttpError(invalid("name", "must not contain control characters"))
    return name


def _flag(body: dict[str, Any], field: str) -> bool | None:
    if field not in body:
        return None
    if not isinstance(body[field], bool):
        raise HttpError(invalid(field, "must be true or false"))
    return body[field]


def _author(body: dict[str, Any]) -> int:
    value = body.get("author_id")
    if isinstance(value, bool) or not isinstance(value, int) or \
            not INT64_MIN <= value <= INT64_MAX:
        raise HttpError(invalid("author_id", "must be a 64-bit integer"))
    return value


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > REASON_MAX:
        raise HttpError(invalid("reason", f"must be a string of at most {REASON_MAX} "
                                          "characters"))
    return reason


async def _existing_room(server: Server, room_id: int) -> RoomInfo:
    room = await server.store.backend.room(room_id)
    if room is None:
        raise HttpError(error(404, "room_not_found", f"no room {room_id}"))
    return room


async def _online(server: Server, room_id: int) -> int | None:
    try:
        return len(await server.hub.presence.members(room_id))
    except BrokerUnavailable:
        return None


async def _create_room(server: Server, request: Request, match: re.Match[str]) -> Response:
    body = _json_object(request, {"name", "private"})
    name = _room_name(body, required=True)
    assert name is not None
    try:
        room = await server.store.backend.create_room(name, bool(_flag(body, "private")),
                                                      utc_now())
    except NameTaken:
        raise HttpError(error(409, "name_taken", f"a room is already named {name!r}")) from None
    except NoRoomId as exc:
        raise HttpError(error(503, "no_room_id", str(exc))) from None
    return json_response(201, {**room.to_wire(), "online": 0},
                         (("location", f"/rooms/{room.id}"),))


async def _list_rooms(server: Server, request: Request, match: re.Match[str]) -> Response:
    after = _query_int(request, "after", low=INT64_MIN)
    limit = _query_int(request, "limit", low=1, high=ROOMS_LIMIT_MAX) or ROOMS_LIMIT_DEFAULT
    rooms = await server.store.backend.rooms(after, limit)
    next_page = f"/rooms?after={rooms[-1].id}&limit={limit}" if len(rooms) == limit else None
    return json_response(200, {"rooms": [r.to_wire() for r in rooms], "next": next_page})


async def _get_room(server: Server, request: Request, match: re.Match[str]) -> Response:
    room = await _existing_room(server, _room_id(match))
    return json_response(200, {**room.to_wire(), "online": await _online(server, room.id)})


async def _patch_room(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    body = _json_object(request, {"name", "private"})
    name, private = _room_name(body, required=False), _flag(body, "private")
    try:
        room = await server.store.backend.update_room(room_id, name, private)
    except NameTaken:
        raise HttpError(error(409, "name_taken", f"a room is already named {name!r}")) from None
    if room is None:
        raise HttpError(error(404, "room_not_found", f"no room {room_id}"))
    return json_response(200, {**room.to_wire(), "online": await _online(server, room.id)})


async def _close_members(server: Server, room_id: int, author_id: int | None, code: int,
                         reason: str) -> None:
    try:
        await server.broker.control(room_id, {"control": "close", "author_id": author_id,
                                              "code": code, "reason": reason})
    except BrokerUnavailable as exc:
        raise HttpError(error(503, "sync_unavailable", str(exc),
                              (("retry-after", "1"),))) from None


async def _delete_room(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    purge = (request.query.get("purge") or ["false"])[-1]
    if purge not in ("true", "false"):
        raise HttpError(error(400, "bad_parameter", f"purge must be true or false, got "
                              f"{purge[:40]!r}"))
    await _existing_room(server, room_id)
    await _close_members(server, room_id, None, ROOM_DELETED, "room deleted")
    if purge == "true":
        with trio.fail_after(30):
            await server.store.purge(room_id)
        await server.broker.forget(room_id)
    else:
        await server.store.backend.delete_room(room_id, purge=False)
    # Once deleted: a join that made sure of the room meanwhile must not count.
    server.hub.forget_room(room_id)
    return json_response(200, {"id": room_id, "deleted": True, "purged": purge == "true"})


async def _kick(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    body = _json_object(request, {"author_id", "reason"})
    author_id, reason = _author(body), _reason(body)
    await _close_members(server, room_id, author_id, KICKED, reason or "kicked")
    return json_response(200, {"room_id": room_id, "author_id": author_id, "kicked": True})


async def _ban(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    body = _json_object(request, {"author_id", "reason", "duration"})
    author_id, reason = _author(body), _reason(body)
    duration = body.get("duration")
    if duration is not None and (isinstance(duration, bool) or
                                 not isinstance(duration, (int, float)) or
                                 not 0 < duration <= BAN_MAX_SECONDS):
        raise HttpError(invalid("duration", f"must be a number of seconds from 1 to "
                                            f"{BAN_MAX_SECONDS}, or null for good"))
    until = None if duration is None else utc_after(duration)
    ban = Ban(room_id, author_id, until, reason)
    await server.store.backend.ban(ban)
    await _close_members(server, room_id, author_id, BANNED, reason or "banned")
    return json_response(200, ban.to_wire())


# How a refused change (an operator's edit or delete) maps to an HTTP status.
_CHANGE_STATUS = {"message_not_found": 404, "message_deleted": 409, "not_editable": 409}


async def _publish(server: Server, draft: Draft, status: int) -> Response:
    try:
        message = await server.hub.announce(draft)
    except FrameError as exc:
        raise HttpError(error(_CHANGE_STATUS.get(exc.code, 422), exc.code, exc.detail)
                        ) from None
    except StoreUnavailable as exc:
        raise HttpError(error(503, "persistence_unavailable", str(exc))) from None
    except BrokerUnavailable as exc:
        raise HttpError(error(503, "sync_unavailable", str(exc))) from None
    except RoomUnavailable as exc:
        raise HttpError(error(503, "room_unavailable", str(exc),
                              (("retry-after", "1"),))) from None
    return json_response(status, message.to_wire())


def _frame(text: str, room_id: int, *, author_known: bool = False) -> Draft:
    """A frame given to the HTTP API, validated exactly as over the WebSocket."""
    try:
        frame = parse_frame(text, room_id, author_known=author_known)
    except FrameError as exc:
        status = 400 if exc.code in ("invalid_json", "not_an_object") else 422
        raise HttpError(error(status, exc.code, exc.detail)) from None
    if not isinstance(frame, Draft) or frame.message_type not in CHAT_TYPES:
        raise HttpError(error(422, "unknown_message_type",
                              "message_type must be chat_txt or chat_img here; edit or delete "
                              "with PATCH or DELETE /rooms/{room_id}/messages/{id}"))
    return frame


async def _announce(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    if server.config.server.room_policy == "strict":
        await _existing_room(server, room_id)
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(error(400, "bad_json", "the body must be UTF-8 JSON")) from None
    return await _publish(server, _frame(text, room_id), 201)


def _message_id(match: re.Match[str]) -> int:
    message_id = parse_room_id(match.group("message"))
    if message_id is None or message_id < 1:
        raise HttpError(error(400, "bad_message_id", "message id must be a positive 64-bit "
                              f"integer, got {match.group('message')[:40]!r}"))
    return message_id


async def _edit_message(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id, message_id = _room_id(match), _message_id(match)
    body = _json_object(request, {"content"})
    if "content" not in body:
        raise HttpError(invalid("content", "is required"))
    if not isinstance(body["content"], str) or not body["content"]:
        raise HttpError(invalid("content", "must be a non-empty string"))
    draft = attrs.evolve(_frame(json.dumps({"message_type": "chat_txt",
                                            "content": body["content"]}),
                                room_id, author_known=True),
                         message_type="chat_edit", target_id=message_id)
    return await _publish(server, draft, 200)


async def _delete_message(server: Server, request: Request, match: re.Match[str]) -> Response:
    draft = Draft(_room_id(match), None, "chat_delete", "", None, target_id=_message_id(match))
    return await _publish(server, draft, 200)


def _upload(request: Request) -> bytes:
    """The uploaded file: the body itself, or the one file part of a multipart form."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        return request.body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {kind}\r\n\r\n".encode("latin-1", "replace") + request.body)
    files = [part for part in message.iter_parts() if part.get_filename() is not None] \
        if message.is_multipart() else []
    if len(files) != 1:
        raise HttpError(error(400, "bad_upload", "a multipart upload must hold exactly one "
                              "file part"))
    return files[0].get_payload(decode=True) or b""


async def _upload_image(server: Server, request: Request, match: re.Match[str]) -> Response:
    room_id = _room_id(match)
    if server.config.server.room_policy == "strict":
        await _existing_room(server, room_id)
    author_id = _query_int(request, "author_id", low=INT64_MIN) or 0
    if server.config.auth.mode == "token":
        with contextlib.suppress(AuthError):  # the admin key: the query says who
            author_id = authenticate(request.query, request.headers,
                                     server.config.auth.secret).author_id
    try:
        info = await save_image(server.store.backend, server.config.media, _upload(request),
                                room_id, author_id)
    except ImageError as exc:
        raise HttpError(error(exc.status, exc.code, exc.detail)) from None
    return json_response(201, info.to_wire(), (("location", info.url),))


async def _media(server: Server, request: Request, match: re.Match[str]) -> Response:
    return await _serve_media(server, request, match.group("media"), thumbnail=False)


async def _thumbnail(server: Server, request: Request, match: re.Match[str]) -> Response:
    return await _serve_media(server, request, match.group("media"), thumbnail=True)


async def _serve_media(server: Server, request: Request, media_id: str, *, thumbnail: bool
                       ) -> Response:
    found = await server.store.backend.media_bytes(media_id, thumbnail)
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


async def _ws_without_upgrade(server: Server, request: Request,
                              match: re.Match[str]) -> Response:
    return error(426, "upgrade_required", "this endpoint speaks WebSocket only",
                 (("upgrade", "websocket"),))


ROUTES: list[Route] = [
    Route("GET", re.compile(r"/\Z"), _demo_page),
    Route("GET", re.compile(r"/static/trio-chat\.js\Z"), _js_client),
    Route("GET", re.compile(r"/healthz\Z"), _healthz),
    Route("GET", re.compile(r"/metrics\Z"), _metrics),
    Route("GET", re.compile(r"/openapi\.json\Z"), _openapi),
    Route("GET", re.compile(r"/ws/(?P<room>[^/]*)\Z"), _ws_without_upgrade),
    Route("GET", re.compile(r"/rooms/(?P<room>[^/]*)/messages\Z"), _history, "reader"),
    Route("GET", re.compile(r"/rooms/(?P<room>[^/]*)/members\Z"), _members, "reader"),
    Route("POST", re.compile(_IMAGES_PATH.pattern + r"\Z"), _upload_image, "reader"),
    Route("GET", re.compile(r"/media/(?P<media>[A-Za-z0-9_-]{1,64})\Z"), _media),
    Route("GET", re.compile(r"/media/(?P<media>[A-Za-z0-9_-]{1,64})/thumbnail\Z"),
          _thumbnail),
    Route("POST", re.compile(r"/rooms\Z"), _create_room, "admin"),
    Route("GET", re.compile(r"/rooms\Z"), _list_rooms, "admin"),
    Route("GET", re.compile(r"/rooms/(?P<room>[^/]*)\Z"), _get_room, "reader"),
    Route("PATCH", re.compile(r"/rooms/(?P<room>[^/]*)\Z"), _patch_room, "admin"),
    Route("DELETE", re.compile(r"/rooms/(?P<room>[^/]*)\Z"), _delete_room, "admin"),
    Route("POST", re.compile(r"/rooms/(?P<room>[^/]*)/kick\Z"), _kick, "admin"),
    Route("POST", re.compile(r"/rooms/(?P<room>[^/]*)/ban\Z"), _ban, "admin"),
    Route("POST", re.compile(r"/rooms/(?P<room>[^/]*)/messages\Z"), _announce, "admin"),
    Route("PATCH", re.compile(r"/rooms/(?P<room>[^/]*)/messages/(?P<message>[^/]*)\Z"),
          _edit_message, "admin"),
    Route("DELETE", re.compile(r"/rooms/(?P<room>[^/]*)/messages/(?P<message>[^/]*)\Z"),
          _delete_message, "admin"),
]


def load_demo_page() -> bytes:
    return _DEMO_PAGE.read_bytes()


def _auth_error(server: Server, exc: AuthError) -> HttpError:
    server.metrics.auth_failures += 1
    return HttpError(error(exc.status, exc.code, exc.detail, exc.headers))


async def _authorize(server: Server, request: Request, access: str,
                     match: re.Match[str]) -> None:
    """Raise :class:`HttpError` (401/403) unless the request may use a route of ``access``."""
    auth = server.config.auth
    tokens = auth.mode == "token"
    if access == "public" or not (auth.admin_key or tokens):
        return  # development: no key and no identities, open as the seed was
    if access == "admin":
        if not auth.admin_key:
            raise _auth_error(server, AuthError(401, "admin_key_required",
                                                "management needs auth.adminKey, and none "
                                                "is configured"))
        try:
            check_admin(request.headers, auth.admin_key, auth.secret if tokens else None)
        except AuthError as exc:
            raise _auth_error(server, exc) from None
        return
    if not tokens:
        return
    if auth.admin_key:
        try:
            check_admin(request.headers, auth.admin_key, auth.secret)
            return
        except AuthError:
            pass  # not the admin: a user token, then
    try:
        claims = authenticate(request.query, request.headers, auth.secret)
    except AuthError as exc:
        raise _auth_error(server, exc) from None
    await _check_room_access(server, _room_id(match), claims)


async def _check_room_access(server: Server, room_id: int, claims: Claims) -> None:
    """A private room needs the room in the token's claims."""
    if room_id in claims.rooms:
        return
    room = await server.store.backend.room(room_id)
    if room is not None and room.private:
        server.metrics.auth_failures += 1
        raise HttpError(error(403, "room_forbidden", f"room {room_id} is private and the "
                              "token does not grant it"))


async def _route(server: Server, request: Request) -> Response:
    allowed = []
    for route in ROUTES:
        match = route.pattern.match(request.path)
        if match is None:
            continue
        if route.method == request.method:
            try:
                await _authorize(server, request, route.access, match)
                return await route.handler(server, request, match)
            except HttpError as exc:
                return exc.response
        allowed.append(route.method)
    if allowed:
        return error(405, "method_not_allowed", f"{request.method} is not allowed here",
                     (("allow", ", ".join(allowed)),))
    return error(404, "not_found", f"no such path: {request.path[:200]}")


def _is_upgrade(headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "upgrade" in tokens and headers.get("upgrade", "").lower() == "websocket"


def _check_handshake(headers: dict[str, str]) -> Response | None:
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


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        conn.receive_data(data)


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: Response,
                close: bool) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body))), *response.headers]
    if response.content_type == "application/json":
        headers.append(("cache-control", "no-store"))
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                  reason=HTTPStatus(response.status).phrase))
    data += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection,
                        remote: str, image_bytes: int) -> Request | Response | None:
    """The next request, an error response to send, or None at end of stream.

    Bodies are capped at :data:`MAX_BODY_BYTES`, an image upload's at
    ``image_bytes`` plus room for a multipart envelope.
    """
    try:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        target = urlsplit(event.target.decode("ascii", "replace"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        body = bytearray()
        cap = MAX_BODY_BYTES
        if event.method == b"POST" and _IMAGES_PATH.fullmatch(target.path):
            cap = max(cap, image_bytes + 64 * 1024)
        while True:
            part = await _next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > cap:
                    return error(413, "body_too_large", f"request body over {cap} bytes")
            elif isinstance(part, (h11.EndOfMessage, h11.ConnectionClosed)) or part is h11.PAUSED:
                break
        return Request(event.method.decode("ascii", "replace"), target.path,
                       parse_qs(target.query), headers, bytes(body), remote)
    except h11.RemoteProtocolError as exc:
        return error(exc.error_status_hint, "bad_request", str(exc) or "malformed request")


@attrs.frozen
class _Upgrade:
    """An accepted WebSocket upgrade: what the connection needs of its request."""

    room_id: int
    since: int | None
    author_id: int | None
    verified: bool
    trailing: bytes


async def serve_http(server: Server, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one TCP connection: HTTP requests until close, or one WebSocket."""
    ip = remote.rpartition(":")[0] or remote
    upgrade = await _serve_requests(server, stream, remote, ip)
    if upgrade is None:
        return
    # Counted against the per-address limit from the upgrade until the connection ends.
    # The request and its parser are gone by now: a connection can last for days.
    try:
        await serve_connection(stream, hub=server.hub, metrics=server.metrics,
                               writers=server.writers, room_id=upgrade.room_id,
                               remote=remote, since=upgrade.since,
                               author_id=upgrade.author_id, verified=upgrade.verified,
                               rate=server.config.limits, trailing_data=upgrade.trailing,
                               frame_limit=server.config.server.max_frame_bytes)
    finally:
        server.ip_limiter.release(ip)


async def _serve_requests(server: Server, stream: trio.abc.Stream, remote: str,
                          ip: str) -> _Upgrade | None:
    """HTTP requests until the connection closes (None) or upgrades; an upgrade
    returned holds one of ``ip``'s connections in the per-address limit."""
    config = server.config.server
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while not server.shutting_down:
        with trio.move_on_after(config.handshake_timeout) as scope:
            # Shutdown cancels this: an idle keep-alive connection must not hold it up.
            with trio.CancelScope() as waiting:
                server.waiting_for_request.add(waiting)
                try:
                    request = await _read_request(stream, conn, remote,
                                                  server.config.media.max_image_bytes)
                finally:
                    server.waiting_for_request.discard(waiting)
            # Cancelled by a shutdown: there is no request (the name is unbound).
            if waiting.cancelled_caught or request is None:
                return None
            if isinstance(request, Response):
                server.metrics.handshake_failures += 1
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, conn, request, close=True)
                return None
            upgrade = _is_upgrade(request.headers)
            if upgrade and (match := _WS_PATH.fullmatch(request.path)):
                response, accepted = await _upgrade(server, request, match, ip)
                if accepted is not None:
                    try:
                        await _accept_upgrade(stream, request)
                    except BaseException:
                        server.ip_limiter.release(ip)
                        raise
                    return attrs.evolve(accepted, trailing=conn.trailing_data[0])
            else:
                server.metrics.http_requests += 1
                try:
                    response = await _route(server, request)
                except StoreUnavailable as exc:
                    response = error(503, "persistence_unavailable", str(exc),
                                     (("retry-after", "1"),))
                except Exception:
                    # One request's failure is its own: the connection goes on.
                    server.metrics.unexpected("http_errors", log, "%s: %s %s failed", remote,
                                              request.method, request.path)
                    response = error(500, "internal_error", "internal server error")
            assert response is not None
            keep_alive = conn.their_state is h11.DONE and not upgrade
            await _send(stream, conn, response, close=not keep_alive)
        if scope.cancelled_caught:
            # No complete request (or no room for our answer) within the time limit.
            server.metrics.handshake_failures += 1
            return None
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None
        conn.start_next_cycle()
    return None


async def _upgrade(server: Server, request: Request, match: re.Match[str], ip: str
                   ) -> tuple[Response | None, _Upgrade | None]:
    """Check an upgrade request: the refusal, or the upgrade (holding one of ``ip``'s
    connections)."""
    try:
        room_id = _room_id(match)
        since = _query_int(request, "since", low=0)
        author_id = _query_int(request, "author_id", low=INT64_MIN)
        response = _check_handshake(request.headers)
    except HttpError as exc:
        response = exc.response
    if response is None:
        response, author_id, verified = await _admit(server, request, room_id, author_id)
    if response is None and not server.ip_limiter.acquire(ip):
        server.metrics.ip_limit_refusals += 1
        response = error(429, "too_many_connections",
                         f"at most {server.config.limits.connections_per_ip} "
                         f"connections from one address")
    if response is not None:
        server.metrics.handshake_failures += 1
        return response, None
    return None, _Upgrade(room_id, since, author_id, verified, b"")


async def _admit(server: Server, request: Request, room_id: int, author_id: int | None
                 ) -> tuple[Response | None, int | None, bool]:
    """Origin, identity, room policy and bans, before the upgrade: an error response or
    None, the author (a token's subject wins over ``?author_id``) and whether it was
    verified (then every frame must carry it)."""
    auth = server.config.auth
    try:
        check_origin(request.headers.get("origin"), request.headers.get("host"),
                     auth.allowed_origins)
    except AuthError as exc:
        server.metrics.origin_refusals += 1
        return error(exc.status, exc.code, exc.detail), None, False
    verified = auth.mode == "token"
    try:
        if verified:
            try:
                claims = authenticate(request.query, request.headers, auth.secret)
            except AuthError as exc:
                raise _auth_error(server, exc) from None
            author_id = claims.author_id
            await _check_room_access(server, room_id, claims)
        if server.config.server.room_policy == "strict" and \
                await server.store.backend.room(room_id) is None:
            return error(404, "room_not_found", f"no room {room_id}"), None, False
        if author_id is not None:
            ban = await server.hub.ban_of(room_id, author_id)
            if ban is not None:
                return json_response(403, {"error": "banned", "until": ban.until,
                                           "detail": f"author {author_id} is banned from "
                                                     f"room {room_id}" +
                                                     (f": {ban.reason}" if ban.reason else "")}
                                     ), None, False
    except HttpError as exc:
        return exc.response, None, False
    except Exception as exc:
        log.warning("cannot check room %d for a join: %r", room_id, exc)
        return error(503, "store_unavailable", "room data is unavailable, try again later",
                     (("retry-after", "1"),)), None, False
    return None, author_id, verified


async def _accept_upgrade(stream: trio.abc.Stream, request: Request) -> None:
    # Written by hand, not through h11: its connection is dropped after the upgrade.
    # RFC 6455 4.2.2: the accept token is the key and the protocol's GUID, hashed.
    key = request.headers["sec-websocket-key"].encode("ascii") + \
        b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                          b"connection: Upgrade\r\nsec-websocket-accept: " +
                          base64.b64encode(hashlib.sha1(key).digest()) + b"\r\n\r\n")
