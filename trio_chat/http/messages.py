"""The messages API: a room's history by pages, and an operator's messages, edits
and deletes, which are validated as a WebSocket frame would be and published
through the hub like any member's.

Runs no task.
"""

from __future__ import annotations

import json
import re

import attrs

from ..broker import BrokerUnavailable
from ..hub import RoomUnavailable
from ..protocol import CHAT_TYPES, Draft, FrameError, parse_frame, parse_room_id
from ..store import StoreUnavailable
from .base import (
    HttpError,
    Request,
    Response,
    Route,
    error,
    invalid,
    json_object,
    json_response,
    query_int,
    room_id_of,
)
from .rooms import existing_room
from .services import Services

HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 500

# How a refused change (an operator's edit or delete) maps to an HTTP status.
_CHANGE_STATUS = {"message_not_found": 404, "message_deleted": 409, "not_editable": 409}


async def _history(services: Services, request: Request, match: re.Match[str]) -> Response:
    room_id = room_id_of(match)
    before = query_int(request, "before", low=0)
    after = query_int(request, "after", low=0)
    limit = query_int(request, "limit", low=1, high=HISTORY_LIMIT_MAX) or HISTORY_LIMIT_DEFAULT
    order = (request.query.get("order") or ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise HttpError(error(400, "bad_parameter", f"order must be asc or desc, got "
                              f"{order[:40]!r}"))
    messages = await services.history.page(room_id, before=before, after=after, limit=limit,
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


async def _publish(services: Services, draft: Draft, status: int) -> Response:
    try:
        message = await services.hub.announce(draft)
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


async def _announce(services: Services, request: Request, match: re.Match[str]) -> Response:
    room_id = room_id_of(match)
    if services.config.server.room_policy == "strict":
        await existing_room(services, room_id)
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(error(400, "bad_json", "the body must be UTF-8 JSON")) from None
    return await _publish(services, _frame(text, room_id), 201)


def _message_id(match: re.Match[str]) -> int:
    message_id = parse_room_id(match.group("message"))
    if message_id is None or message_id < 1:
        raise HttpError(error(400, "bad_message_id", "message id must be a positive 64-bit "
                              f"integer, got {match.group('message')[:40]!r}"))
    return message_id


async def _edit_message(services: Services, request: Request, match: re.Match[str]
                        ) -> Response:
    room_id, message_id = room_id_of(match), _message_id(match)
    body = json_object(request, {"content"})
    if "content" not in body:
        raise HttpError(invalid("content", "is required"))
    if not isinstance(body["content"], str) or not body["content"]:
        raise HttpError(invalid("content", "must be a non-empty string"))
    draft = attrs.evolve(_frame(json.dumps({"message_type": "chat_txt",
                                            "content": body["content"]}),
                                room_id, author_known=True),
                         message_type="chat_edit", target_id=message_id)
    return await _publish(services, draft, 200)


async def _delete_message(services: Services, request: Request, match: re.Match[str]
                          ) -> Response:
    draft = Draft(room_id_of(match), None, "chat_delete", "", None,
                  target_id=_message_id(match))
    return await _publish(services, draft, 200)


_MESSAGES = r"/rooms/(?P<room>[^/]*)/messages"

ROUTES: list[Route] = [
    Route("GET", re.compile(_MESSAGES + r"\Z"), _history, "reader"),
    Route("POST", re.compile(_MESSAGES + r"\Z"), _announce, "admin"),
    Route("PATCH", re.compile(_MESSAGES + r"/(?P<message>[^/]*)\Z"), _edit_message, "admin"),
    Route("DELETE", re.compile(_MESSAGES + r"/(?P<message>[^/]*)\Z"), _delete_message,
          "admin"),
]
