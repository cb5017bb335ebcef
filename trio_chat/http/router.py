"""The routing table and dispatch: which handler answers a method and path, after
the route's access check; 405 with ``Allow`` for a known path and another
method, 404 for an unknown path.

Each resource module keeps its own ``ROUTES``; a new resource adds its list
here. Runs no task.
"""

from __future__ import annotations

from . import console, media, messages, operations, rooms
from .access import authorize
from .base import HttpError, Request, Response, Route, error
from .services import Services

# No two modules serve the same path, so the order of the lists does not matter; within
# one path the order of its methods is the order of the Allow header.
ROUTES: list[Route] = [*operations.ROUTES, *rooms.ROUTES, *messages.ROUTES, *media.ROUTES,
                       *console.ROUTES]


async def route(services: Services, request: Request) -> Response:
    """The answer to a plain (not upgrading) request."""
    allowed = []
    for candidate in ROUTES:
        match = candidate.pattern.match(request.path)
        if match is None:
            continue
        if candidate.method == request.method:
            try:
                await authorize(services, request, candidate.access, match)
                return await candidate.handler(services, request, match)
            except HttpError as exc:
                return exc.response
        allowed.append(candidate.method)
    if allowed:
        return error(405, "method_not_allowed", f"{request.method} is not allowed here",
                     (("allow", ", ".join(allowed)),))
    return error(404, "not_found", f"no such path: {request.path[:200]}")

