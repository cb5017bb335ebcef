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
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from wsproto.utilities import generate_accept_token

from .broker import BrokerUnavailable
from .connection import serve_connection
from .protocol import INT64_MAX, INT64_MIN, parse_room_id

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


_WS_PATH = re.compile(r"/ws/(?P<room>[^/]*)")
_DEMO_PAGE = resources.files("trio_chat").joinpath("static/index.html")


async def _demo_page(server: Server, request: Request, match: re.Match[str]) -> Response:
    return Response(200, server.demo_page, "text/html; charset=utf-8",
                    (("cache-control", "no-cache"),))


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


async def _ws_without_upgrade(server: Server, request: Request,
                              match: re.Match[str]) -> Response:
    return error(426, "upgrade_required", "this endpoint speaks WebSocket only",
                 (("upgrade", "websocket"),))


ROUTES: list[Route] = [
    Route("GET", re.compile(r"/\Z"), _demo_page),
    Route("GET", re.compile(r"/healthz\Z"), _healthz),
    Route("GET", re.compile(r"/metrics\Z"), _metrics),
    Route("GET", re.compile(r"/ws/(?P<room>[^/]*)\Z"), _ws_without_upgrade),
    Route("GET", re.compile(r"/rooms/(?P<room>[^/]*)/messages\Z"), _history),
    Route("GET", re.compile(r"/rooms/(?P<room>[^/]*)/members\Z"), _members),
]


def load_demo_page() -> bytes:
    return _DEMO_PAGE.read_bytes()


async def _route(server: Server, request: Request) -> Response:
    allowed = []
    for route in ROUTES:
        match = route.pattern.match(request.path)
        if match is None:
            continue
        if route.method == request.method:
            try:
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
                        remote: str) -> Request | Response | None:
    """The next request, an error response to send, or None at end of stream."""
    try:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        target = urlsplit(event.target.decode("ascii", "replace"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        body = bytearray()
        while True:
            part = await _next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    return error(413, "body_too_large",
                                 f"request body over {MAX_BODY_BYTES} bytes")
            elif isinstance(part, (h11.EndOfMessage, h11.ConnectionClosed)) or part is h11.PAUSED:
                break
        return Request(event.method.decode("ascii", "replace"), target.path,
                       parse_qs(target.query), headers, bytes(body), remote)
    except h11.RemoteProtocolError as exc:
        return error(exc.error_status_hint, "bad_request", str(exc) or "malformed request")


async def serve_http(server: Server, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one TCP connection: HTTP requests until close, or one WebSocket."""
    config = server.config.server
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while not server.shutting_down:
        upgrade_to: int | None = None
        with trio.move_on_after(config.handshake_timeout) as scope:
            # Shutdown cancels this: an idle keep-alive connection must not hold it up.
            with trio.CancelScope() as waiting:
                server.waiting_for_request.add(waiting)
                try:
                    request = await _read_request(stream, conn, remote)
                finally:
                    server.waiting_for_request.discard(waiting)
            if request is None or waiting.cancelled_caught:
                return
            if isinstance(request, Response):
                server.metrics.handshake_failures += 1
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, conn, request, close=True)
                return
            upgrade = _is_upgrade(request.headers)
            if upgrade and (match := _WS_PATH.fullmatch(request.path)):
                try:
                    room_id = _room_id(match)
                    since = _query_int(request, "since", low=0)
                    author_id = _query_int(request, "author_id", low=INT64_MIN)
                    response = _check_handshake(request.headers)
                except HttpError as exc:
                    response = exc.response
                if response is None:
                    upgrade_to = room_id
                    await _accept_upgrade(stream, conn, request)
                else:
                    server.metrics.handshake_failures += 1
            else:
                server.metrics.http_requests += 1
                try:
                    response = await _route(server, request)
                except Exception:
                    log.exception("%s: %s %s failed", remote, request.method, request.path)
                    response = error(500, "internal_error", "internal server error")
            if response is not None:
                keep_alive = conn.their_state is h11.DONE and not upgrade
                await _send(stream, conn, response, close=not keep_alive)
        if scope.cancelled_caught:
            # No complete request (or no room for our answer) within the time limit.
            server.metrics.handshake_failures += 1
            return
        if upgrade_to is not None:
            trailing, _ = conn.trailing_data
            await serve_connection(stream, hub=server.hub, metrics=server.metrics,
                                   limits=server.limits, room_id=upgrade_to, remote=remote,
                                   since=since, author_id=author_id,
                                   trailing_data=trailing)
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _accept_upgrade(stream: trio.abc.Stream, conn: h11.Connection,
                          request: Request) -> None:
    key = request.headers["sec-websocket-key"].encode("ascii")
    data = conn.send(h11.InformationalResponse(status_code=101, headers=[
        ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-accept", generate_accept_token(key))]))
    await stream.send_all(data)
