"""What every HTTP handler shares: the request and response records, the error a
handler raises to answer, and the parsing of path and query parameters and of
JSON bodies, each refusal a 4xx with a JSON body.

Sans-IO; runs no task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..protocol import INT64_MAX, encodable, parse_room_id

if TYPE_CHECKING:
    from .services import Services

MAX_BODY_BYTES = 1024 * 1024
# The rooms API's JSON objects are a few short fields. Parsing JSON holds the GIL (a
# worker thread would not free the event loop), so its cost is bounded by refusing
# larger objects before parsing: 64 KiB parse in well under a millisecond.
MAX_JSON_OBJECT_BYTES = 64 * 1024

# Writes one piece of a streamed body; it waits while the client does not read.
Write = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    remote: str
    http_version: str = "1.1"
    # Lower-case names of the headers that came more than once (``headers`` keeps the last).
    repeated: frozenset[str] = frozenset()
    # Holds ``size`` more bytes in the address's body budget until the handler returns
    # (for a copy the handler makes of the body): None, or the answer refusing it.
    hold: Callable[[int], Response | None] = lambda size: None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # A body sent as it is made (server-sent events) instead of ``body``: called with a
    # :data:`Write` once the head is sent, it returns when the body is over; then the
    # connection closes. It decides how long a slow reader may hold a write up.
    stream: Callable[[Write], Awaitable[None]] | None = None


def json_response(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                    headers=headers)


def error(status: int, code: str, detail: str,
          headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"error": code, "detail": detail}, headers)


def invalid(field: str, detail: str) -> Response:
    return json_response(422, {"error": "invalid_field", "field": field,
                               "detail": f"{field} {detail}"})


class HttpError(Exception):
    """Raised by a handler to answer with ``response`` (a 4xx with a JSON body)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


Handler = Callable[["Services", Request, re.Match[str]], Awaitable[Response]]


@attrs.frozen
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    # "public"; "reader": a room's data (a user token for it, or the admin key, when
    # tokens are on); "admin": management (the admin key); "metrics": auth.metricsKey
    # (or the admin key) when it is set.
    access: str = "public"


def query_int(request: Request, name: str, *, low: int, high: int = INT64_MAX) -> int | None:
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


def room_id_of(match: re.Match[str]) -> int:
    """The ``room`` group of a route's match as a room id; 400 if it is not one."""
    room_id = parse_room_id(match.group("room"))
    if room_id is None:
        raise HttpError(error(400, "bad_room_id", "room id must be a 64-bit integer, "
                              f"got {match.group('room')[:40]!r}"))
    return room_id


def json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The request body as a JSON object with only ``allowed`` keys, or a 400/413/422."""
    if len(request.body) > MAX_JSON_OBJECT_BYTES:
        raise HttpError(error(413, "body_too_large", f"a JSON object over "
                              f"{MAX_JSON_OBJECT_BYTES} bytes is not parsed"))
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
