"""One TCP connection on the chat port: HTTP requests (h11) with keep-alive and
time limits, then, if it upgrades, the WebSocket connection.

Owns the connection loop. The task that calls :func:`serve_http` (one per TCP
connection, started by the server) reads requests until the connection closes,
answers each through the router, and after a 101 becomes the chat
connection's reader (:func:`trio_chat.connection.serve_connection`).

Timeouts are at this edge: a request (head and body) and the room to answer it
must come within ``server.handshakeTimeout``; a graceful shutdown ends a
connection waiting for its next request at once, and a streamed answer
(server-sent events) too. Failure boundary: one request.
A bug in its handler is logged with its traceback, counted (``http_errors``)
and answered 500; the connection goes on.

At debug level the ``trio_chat.http.access`` logger writes one line per request
(upgrades included): remote address, method, path, status, body bytes and the
time from the request's arrival to its answer. The query string is never logged,
nor any header: tokens travel there.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from ..connection import serve_connection
from ..store import StoreUnavailable
from .base import MAX_BODY_BYTES, Request, Response, error
from .media import IMAGES_PATH
from .router import route
from .services import Services
from .upgrade import WS_PATH, Upgrade, accept_upgrade, check_upgrade, is_upgrade

log = logging.getLogger(__name__)
access_log = logging.getLogger("trio_chat.http.access")

RECEIVE_BYTES = 16 * 1024
MAX_HEAD_BYTES = 16 * 1024


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        conn.receive_data(bytes(data))


def _log_access(remote: str, request: Request | None, status: int, size: int,
                started: float) -> None:
    if access_log.isEnabledFor(logging.DEBUG):
        method, path = (request.method, request.path[:200]) if request else ("-", "-")
        access_log.debug('%s "%s %s" %d %d %.1fms', remote, method, path, status, size,
                         (trio.current_time() - started) * 1000)


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: Response,
                close: bool) -> None:
    """Send ``response``, or only its head if its body is streamed (chunked)."""
    headers = [("content-type", response.content_type), *response.headers]
    if response.stream is None:
        headers.append(("content-length", str(len(response.body))))
    if response.content_type == "application/json":
        headers.append(("cache-control", "no-store"))
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                  reason=HTTPStatus(response.status).phrase))
    if response.stream is None:
        data += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _send_stream(services: Services, stream: trio.abc.Stream, conn: h11.Connection,
                       response: Response) -> None:
    """A streamed body, outside the request's time limit, until it ends, the client goes
    or a graceful shutdown begins (which ends it at once, like an idle connection)."""
    assert response.stream is not None
    # A write cut off (a slow reader given up, a shutdown) leaves a chunk half sent:
    # then the connection just closes.
    cut_off = False

    async def write(data: bytes) -> None:
        nonlocal cut_off
        cut_off = True
        await stream.send_all(conn.send(h11.Data(data=data)))
        cut_off = False

    with services.shutdown.idle():
        if not services.shutdown.begun:
            await response.stream(write)
    if not cut_off:
        with trio.move_on_after(1):
            await stream.send_all(conn.send(h11.EndOfMessage()))


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
        if event.method == b"POST" and IMAGES_PATH.fullmatch(target.path):
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


async def serve_http(services: Services, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one TCP connection: HTTP requests until close, or one WebSocket."""
    ip = remote.rpartition(":")[0] or remote
    upgrade = await _serve_requests(services, stream, remote, ip)
    if upgrade is None:
        return
    # Counted against the per-address limit from the upgrade until the connection ends.
    # The request and its parser are gone by now: a connection can last for days.
    config = services.config
    try:
        await serve_connection(stream, hub=services.hub, metrics=services.metrics,
                               writers=services.writers, room_id=upgrade.room_id,
                               remote=remote, since=upgrade.since,
                               author_id=upgrade.author_id, verified=upgrade.verified,
                               rate=config.limits, trailing_data=upgrade.trailing,
                               frame_limit=config.server.max_frame_bytes)
    finally:
        services.ip_limiter.release(ip)


async def _serve_requests(services: Services, stream: trio.abc.Stream, remote: str,
                          ip: str) -> Upgrade | None:
    """HTTP requests until the connection closes (None) or upgrades; an upgrade
    returned holds one of ``ip``'s connections in the per-address limit."""
    config = services.config.server
    metrics = services.metrics
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while not services.shutdown.begun:
        streamed: Response | None = None
        with trio.move_on_after(config.handshake_timeout) as scope:
            # Shutdown cancels this: an idle keep-alive connection must not hold it up.
            with services.shutdown.idle() as waiting:
                request = await _read_request(stream, conn, remote,
                                              services.config.media.max_image_bytes)
            # Cancelled by a shutdown: there is no request (the name is unbound).
            if waiting.cancelled_caught or request is None:
                return None
            started = trio.current_time()
            if isinstance(request, Response):
                metrics.handshake_failures += 1
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, conn, request, close=True)
                    _log_access(remote, None, request.status, len(request.body), started)
                return None
            upgrade = is_upgrade(request.headers)
            if upgrade and (match := WS_PATH.fullmatch(request.path)):
                response, accepted = await check_upgrade(services, request, match, ip)
                if accepted is not None:
                    try:
                        await accept_upgrade(stream, request)
                    except BaseException:
                        services.ip_limiter.release(ip)
                        raise
                    _log_access(remote, request, 101, 0, started)
                    return attrs.evolve(accepted, trailing=conn.trailing_data[0])
            else:
                metrics.http_requests += 1
                try:
                    response = await route(services, request)
                except StoreUnavailable as exc:
                    response = error(503, "persistence_unavailable", str(exc),
                                     (("retry-after", "1"),))
                except Exception:
                    # One request's failure is its own: the connection goes on.
                    metrics.unexpected("http_errors", log, "%s: %s %s failed", remote,
                                       request.method, request.path)
                    response = error(500, "internal_error", "internal server error")
            assert response is not None
            streamed = response if response.stream is not None else None
            keep_alive = conn.their_state is h11.DONE and not upgrade and streamed is None
            await _send(stream, conn, response, close=not keep_alive)
            _log_access(remote, request, response.status, len(response.body), started)
        if scope.cancelled_caught:
            # No complete request (or no room for our answer) within the time limit.
            metrics.handshake_failures += 1
            return None
        if streamed is not None:
            await _send_stream(services, stream, conn, streamed)
            return None
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None
        conn.start_next_cycle()
    return None
