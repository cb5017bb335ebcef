"""One TCP connection on the chat port: HTTP requests (h11) with keep-alive and
time limits, then, if it upgrades, the WebSocket connection.

Owns the connection loop. The task that calls :func:`serve_http` (one per TCP
connection, started by the server) reads requests until the connection closes,
answers each through the router, and after a 101 becomes the chat
connection's reader (:func:`trio_chat.connection.serve_connection`).

Limits are at this edge: every connection counts against its address's limits
from its accept; request bodies are held within a per-address and a server-wide
byte budget; reading a request, running its handler and writing its answer each
have a deadline (see :func:`_serve_requests`); a graceful shutdown ends a
connection waiting for its next request at once, and a streamed answer
(server-sent events) too. Failure boundary: one request. A bug in its handler
is logged with its traceback, counted (``http_errors``) and answered 500; the
connection goes on.

At debug level the ``trio_chat.http.access`` logger writes one line per request
(upgrades included): remote address, method, path, status, body bytes and the
time from the request's arrival to its answer. The query string is never logged,
nor any header: tokens travel there.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from ..budget import ByteBudget
from ..config import UPLOAD_ENVELOPE, LimitsConfig
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


@attrs.define
class _BodyHold:
    """The bytes one request holds in the address's and the server's body budget: its
    body, its answer, and the copies its handler makes (until the handler returns)."""

    budget: ByteBudget
    ip: str
    limits: LimitsConfig
    size: int = 0
    copies: int = 0

    def take(self, size: int) -> str | None:
        refused = self.budget.reserve(self.ip, size)
        if refused is None:
            self.size += size
        return refused

    def take_copy(self, size: int) -> Response | None:
        refused = self.take(size)
        if refused is not None:
            return _over_budget(refused, self.limits)
        self.copies += size
        return None

    def release_copies(self) -> None:
        if self.copies:
            self.budget.release(self.ip, self.copies)
            self.size -= self.copies
            self.copies = 0

    def release(self) -> None:
        if self.size:
            self.budget.release(self.ip, self.size)
            self.size = self.copies = 0


def _over_budget(refused: str, limits: LimitsConfig) -> Response:
    if refused == "key":
        return error(429, "too_many_bytes", f"at most {limits.body_bytes_per_ip} bytes of "
                     "request and answer bodies (and copies of them) for one address at once",
                     (("retry-after", "1"),))
    return error(503, "server_busy", "the server holds too many request and answer bodies; "
                 "try again", (("retry-after", "1"),))


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection, remote: str,
                        services: Services, hold: _BodyHold, reading: trio.CancelScope
                        ) -> Request | Response | None:
    """The next request, an error response to send, or None at end of stream.

    Bodies are capped at :data:`MAX_BODY_BYTES`, an image upload's at
    ``media.maxImageBytes`` plus room for a multipart envelope, and held within the
    address's and the server's body budget. A body's announced length extends the
    ``reading`` deadline at ``server.minTransferRate``.
    """
    try:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        names = Counter(name.decode("latin-1") for name, _ in event.headers)
        if names["content-length"] and names["transfer-encoding"]:
            # RFC 9112 6.3: the framing is ambiguous (request smuggling); answer and close.
            return error(400, "bad_request", "Content-Length with Transfer-Encoding")
        target = urlsplit(event.target.decode("ascii", "replace"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        if names["sec-websocket-extensions"] > 1:
            # A list header may come in several copies (RFC 9110 5.3): they are one list.
            headers["sec-websocket-extensions"] = ", ".join(
                v.decode("latin-1") for k, v in event.headers
                if k == b"sec-websocket-extensions")
        body = bytearray()
        cap = MAX_BODY_BYTES
        if event.method == b"POST" and IMAGES_PATH.fullmatch(target.path):
            cap = max(cap, services.config.media.max_image_bytes + UPLOAD_ENVELOPE)
        announced = headers.get("content-length", "")
        if announced.isdigit() and int(announced) <= cap:
            reading.deadline += int(announced) / services.config.server.min_transfer_rate
        while True:
            part = await _next_event(stream, conn)
            if isinstance(part, h11.Data):
                if len(body) + len(part.data) > cap:
                    return error(413, "body_too_large", f"request body over {cap} bytes")
                refused = hold.take(len(part.data))
                if refused is not None:
                    return _over_budget(refused, services.config.limits)
                body += part.data
            elif isinstance(part, (h11.EndOfMessage, h11.ConnectionClosed)) or part is h11.PAUSED:
                break
        return Request(event.method.decode("ascii", "replace"), target.path,
                       parse_qs(target.query), headers, bytes(body), remote,
                       event.http_version.decode("ascii", "replace"),
                       frozenset(name for name, count in names.items() if count > 1),
                       hold.take_copy)
    except h11.RemoteProtocolError as exc:
        return error(exc.error_status_hint, "bad_request", str(exc) or "malformed request")


def _refusal(response: Response) -> bytes:
    """A whole HTTP answer, written before any request was read (h11 cannot)."""
    head = [f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
            f"content-type: {response.content_type}", f"content-length: {len(response.body)}",
            "connection: close", *(f"{k}: {v}" for k, v in response.headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


async def serve_http(services: Services, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one TCP connection: HTTP requests until close, or one WebSocket.

    Counted from the start against its address's limits: ``limits.connectionsPerIp``
    for its whole life, ``limits.httpConnectionsPerIp`` until it upgrades. Over either,
    it gets a 429 and is closed before anything of it is read.
    """
    ip = remote.rpartition(":")[0] or remote
    limits = services.config.limits
    if not services.ip_limiter.acquire(ip):
        await _refuse(services, stream, limits.connections_per_ip, "connections")
        return
    try:
        if not services.http_limiter.acquire(ip):
            await _refuse(services, stream, limits.http_connections_per_ip,
                          "HTTP connections not upgraded")
            return
        try:
            upgrade = await _serve_requests(services, stream, remote, ip)
        finally:
            services.http_limiter.release(ip)
        if upgrade is None:
            return
        # The request and its parser are gone by now: a connection can last for days.
        config = services.config
        await serve_connection(stream, hub=services.hub, metrics=services.metrics,
                               writers=services.writers, room_id=upgrade.room_id,
                               remote=remote, since=upgrade.since,
                               author_id=upgrade.author_id, verified=upgrade.verified,
                               rate=config.limits, trailing_data=upgrade.trailing,
                               frame_limit=config.server.max_frame_bytes,
                               expires=upgrade.expires, deflate=upgrade.deflate)
    finally:
        services.ip_limiter.release(ip)


async def _refuse(services: Services, stream: trio.abc.Stream, limit: int, what: str
                  ) -> None:
    services.metrics.ip_limit_refusals += 1
    response = error(429, "too_many_connections", f"at most {limit} {what} from one address")
    with trio.move_on_after(services.config.server.write_wait):
        await stream.send_all(_refusal(response))


async def _answer(services: Services, request: Request
                  ) -> tuple[Response | None, Upgrade | None, bool]:
    """The handler's answer, or an accepted upgrade; and whether it was an upgrade."""
    metrics = services.metrics
    upgrade = is_upgrade(request.headers)
    if upgrade and (match := WS_PATH.fullmatch(request.path)):
        response, accepted = await check_upgrade(services, request, match)
        return response, accepted, True
    metrics.http_requests += 1
    try:
        return await route(services, request), None, upgrade
    except StoreUnavailable as exc:
        return error(503, "persistence_unavailable", str(exc), (("retry-after", "1"),)), \
            None, upgrade
    except Exception:
        # One request's failure is its own: the connection goes on.
        metrics.unexpected("http_errors", log, "%s: %s %s failed", request.remote,
                           request.method, request.path)
        return error(500, "internal_error", "internal server error"), None, upgrade


async def _serve_requests(services: Services, stream: trio.abc.Stream, remote: str,
                          ip: str) -> Upgrade | None:
    """HTTP requests until the connection closes (None) or upgrades.

    Three deadlines, one per phase: reading the request (``handshakeTimeout``, plus
    its body's length at ``minTransferRate``), running its handler
    (``handlerTimeout``; over it, 503) and writing the answer (``writeWait`` plus its
    length at ``minTransferRate``); a missed read or write deadline closes the
    connection.
    """
    config = services.config.server
    metrics = services.metrics
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while not services.shutdown.begun:
        hold = _BodyHold(services.bodies, ip, services.config.limits)
        try:
            with trio.move_on_after(config.handshake_timeout) as reading:
                # Shutdown cancels this: an idle keep-alive connection must not hold it up.
                with services.shutdown.idle() as waiting:
                    request = await _read_request(stream, conn, remote, services, hold,
                                                  reading)
            if waiting.cancelled_caught:
                return None
            if reading.cancelled_caught:
                # No complete request within the time limit.
                metrics.handshake_failures += 1
                return None
            if request is None:
                return None
            started = trio.current_time()
            if isinstance(request, Response):
                metrics.handshake_failures += 1
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _write(services, _send(stream, conn, request, close=True),
                                 len(request.body))
                    _log_access(remote, None, request.status, len(request.body), started)
                return None
            with trio.move_on_after(config.handler_timeout) as handling:
                response, accepted, upgrade = await _answer(services, request)
            # The handler is over, and so are the copies it made.
            hold.release_copies()
            if handling.cancelled_caught:
                log.warning("%s: %s %s: no answer within server.handlerTimeout (%gs)",
                            remote, request.method, request.path[:200],
                            config.handler_timeout)
                response, accepted = error(503, "handler_timeout", "the request took too "
                                           "long to answer", (("retry-after", "1"),)), None
            if accepted is not None:
                if not await _write(services, accept_upgrade(stream, request,
                                                             accepted.deflate), 0):
                    return None
                _log_access(remote, request, 101, 0, started)
                return attrs.evolve(accepted, trailing=conn.trailing_data[0])
            assert response is not None
            # The answer is held until a slow reader has taken it: it counts in the same
            # budget as bodies read, else many slow downloads could hold any amount.
            refused = hold.take(len(response.body))
            if refused is not None:
                response = _over_budget(refused, services.config.limits)
            streamed = response if response.stream is not None else None
            keep_alive = conn.their_state is h11.DONE and not upgrade and \
                not handling.cancelled_caught and refused is None and streamed is None
            if not await _write(services, _send(stream, conn, response, close=not keep_alive),
                                len(response.body)):
                return None
            _log_access(remote, request, response.status, len(response.body), started)
        finally:
            hold.release()
        if streamed is not None:
            await _send_stream(services, stream, conn, streamed)
            return None
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None
        conn.start_next_cycle()
    return None


async def _write(services: Services, sending: Awaitable[None], size: int) -> bool:
    """Await ``sending`` within ``writeWait`` plus ``size`` bytes at ``minTransferRate``;
    False if the client read too slowly (the connection is then given up)."""
    config = services.config.server
    with trio.move_on_after(config.write_wait + size / config.min_transfer_rate) as scope:
        await sending
    if scope.cancelled_caught:
        services.metrics.handshake_failures += 1
        log.debug("an HTTP answer of %d bytes was not read in time", size)
        return False
    return True
