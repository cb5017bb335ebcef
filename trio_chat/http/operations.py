"""Routes for running the server and its pages: the demo page, ``/healthz``
(alive: the process answers), ``/readyz`` (ready for clients: 503 with the
reasons while not), ``/metrics``, ``/openapi.json``, the packaged static files, and the answer to a
plain ``GET /ws/{room_id}`` without an upgrade.

Runs no task.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from .base import Request, Response, Route, error, json_response
from .services import Services

_STATIC = resources.files("trio_chat").joinpath("static")

# Files of trio_chat/static/ served at /static/{name}, with their content types: only
# these, so nothing else in the package is ever served. trio-chat.js is the JavaScript
# client module (docs/clients.md).
STATIC_FILES: dict[str, str] = {"trio-chat.js": "text/javascript; charset=utf-8"}


def _tagged(name: str) -> tuple[bytes, str]:
    data = _STATIC.joinpath(name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


# Read once at import, like the OpenAPI document. Browsers revalidate them on every use,
# so a new version is picked up at once.
_STATIC_BYTES = {name: _tagged(name) for name in STATIC_FILES}


def load_demo_page() -> bytes:
    return _STATIC.joinpath("index.html").read_bytes()


async def _demo_page(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, services.demo_page, "text/html; charset=utf-8",
                    (("cache-control", "no-cache"),))


# Read once at import: it is part of the package and never changes while serving.
_OPENAPI = _STATIC.joinpath("openapi.json").read_bytes()


async def _openapi(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, _OPENAPI)


async def _healthz(services: Services, request: Request, match: re.Match[str]) -> Response:
    return json_response(200, {"status": "ok", "connections": len(services.hub.connections),
                               "rooms": len(services.hub.rooms)})


async def _readyz(services: Services, request: Request, match: re.Match[str]) -> Response:
    problems = services.readiness.problems()
    if services.shutdown.draining:
        problems.insert(0, ("draining", "the node is shutting down"))
    if not problems:
        return json_response(200, {"status": "ready"})
    return json_response(503, {"status": "not_ready",
                               "reasons": [reason for reason, _ in problems],
                               "detail": "; ".join(detail for _, detail in problems)},
                         (("retry-after", "1"),))


async def _metrics(services: Services, request: Request, match: re.Match[str]) -> Response:
    return Response(200, services.metrics.render().encode(),
                    "text/plain; version=0.0.4; charset=utf-8")


async def _static(services: Services, request: Request, match: re.Match[str]) -> Response:
    name = match.group(0).removeprefix("/static/")
    data, etag = _STATIC_BYTES[name]
    headers = (("cache-control", "no-cache"), ("etag", etag),
               ("x-content-type-options", "nosniff"))
    if etag in request.headers.get("if-none-match", ""):
        return Response(304, b"", STATIC_FILES[name], headers)
    return Response(200, data, STATIC_FILES[name], headers)


async def _ws_without_upgrade(services: Services, request: Request,
                              match: re.Match[str]) -> Response:
    return error(426, "upgrade_required", "this endpoint speaks WebSocket only",
                 (("upgrade", "websocket"),))


ROUTES: list[Route] = [
    Route("GET", re.compile(r"/\Z"), _demo_page),
    Route("GET", re.compile(r"/healthz\Z"), _healthz),
    Route("GET", re.compile(r"/readyz\Z"), _readyz),
    Route("GET", re.compile(r"/metrics\Z"), _metrics, "metrics"),
    Route("GET", re.compile(r"/openapi\.json\Z"), _openapi),
    *(Route("GET", re.compile(rf"/static/{re.escape(name)}\Z"), _static)
      for name in STATIC_FILES),
    Route("GET", re.compile(r"/ws/(?P<room>[^/]*)\Z"), _ws_without_upgrade),
]
