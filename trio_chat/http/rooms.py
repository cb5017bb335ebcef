"""The rooms API: create, list, read, rename and delete rooms, who is online in
one, and an operator's kick and ban (which close the author's connections on
every node through the broker).

Runs no task; a purge waits for the store under a 30 s deadline.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import trio

from ..broker import BrokerUnavailable
from ..framing import BANNED, KICKED, ROOM_DELETED
from ..protocol import INT64_MAX, INT64_MIN, utc_after, utc_now
from ..store import Ban, NameTaken, NoRoomId, RoomInfo
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
from .services import Services

ROOMS_LIMIT_DEFAULT = 50
ROOMS_LIMIT_MAX = 500
ROOM_NAME_MAX = 50
REASON_MAX = 500
BAN_MAX_SECONDS = 10 * 365 * 86400


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
    value = body[field]
    if not isinstance(value, bool):
        raise HttpError(invalid(field, "must be true or false"))
    return value


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


async def existing_room(services: Services, room_id: int) -> RoomInfo:
    """The room, or a 404 :class:`HttpError`."""
    room = await services.repository.room(room_id)
    if room is None:
        raise HttpError(error(404, "room_not_found", f"no room {room_id}"))
    return room


async def _online(services: Services, room_id: int) -> int | None:
    try:
        return len(await services.hub.presence.members(room_id))
    except BrokerUnavailable:
        return None


async def _members(services: Services, request: Request, match: re.Match[str]) -> Response:
    room_id = room_id_of(match)
    try:
        members = await services.hub.presence.members(room_id)
    except BrokerUnavailable as exc:
        raise HttpError(error(503, "sync_unavailable", str(exc),
                              (("retry-after", "1"),))) from None
    return json_response(200, {"room_id": room_id, "online": len(members),
                                "members": members})


async def _create_room(services: Services, request: Request, match: re.Match[str]
                       ) -> Response:
    body = json_object(request, {"name", "private"})
    name = _room_name(body, required=True)
    assert name is not None
    try:
        room = await services.repository.create_room(name, bool(_flag(body, "private")),
                                                     utc_now())
    except NameTaken:
        raise HttpError(error(409, "name_taken", f"a room is already named {name!r}")) from None
    except NoRoomId as exc:
        raise HttpError(error(503, "no_room_id", str(exc))) from None
    return json_response(201, {**room.to_wire(), "online": 0},
                         (("location", f"/rooms/{room.id}"),))


async def _list_rooms(services: Services, request: Request, match: re.Match[str]
                      ) -> Response:
    after = query_int(request, "after", low=INT64_MIN)
    limit = query_int(request, "limit", low=1, high=ROOMS_LIMIT_MAX) or ROOMS_LIMIT_DEFAULT
    rooms = await services.repository.rooms(after, limit)
    next_page = f"/rooms?after={rooms[-1].id}&limit={limit}" if len(rooms) == limit else None
    return json_response(200, {"rooms": [r.to_wire() for r in rooms], "next": next_page})


async def _get_room(services: Services, request: Request, match: re.Match[str]) -> Response:
    room = await existing_room(services, room_id_of(match))
    return json_response(200, {**room.to_wire(), "online": await _online(services, room.id)})


async def _patch_room(services: Services, request: Request, match: re.Match[str]
                      ) -> Response:
    room_id = room_id_of(match)
    body = json_object(request, {"name", "private"})
    name, private = _room_name(body, required=False), _flag(body, "private")
    try:
        room = await services.repository.update_room(room_id, name, private)
    except NameTaken:
        raise HttpError(error(409, "name_taken", f"a room is already named {name!r}")) from None
    if room is None:
        raise HttpError(error(404, "room_not_found", f"no room {room_id}"))
    return json_response(200, {**room.to_wire(), "online": await _online(services, room.id)})


async def _close_members(services: Services, room_id: int, author_id: int | None, code: int,
                         reason: str) -> None:
    try:
        await services.broker.control(room_id, {"control": "close", "author_id": author_id,
                                                "code": code, "reason": reason})
    except BrokerUnavailable as exc:
        raise HttpError(error(503, "sync_unavailable", str(exc),
                              (("retry-after", "1"),))) from None


async def _delete_room(services: Services, request: Request, match: re.Match[str]
                       ) -> Response:
    room_id = room_id_of(match)
    purge = (request.query.get("purge") or ["false"])[-1]
    if purge not in ("true", "false"):
        raise HttpError(error(400, "bad_parameter", f"purge must be true or false, got "
                              f"{purge[:40]!r}"))
    await existing_room(services, room_id)
    await _close_members(services, room_id, None, ROOM_DELETED, "room deleted")
    if purge == "true":
        with trio.fail_after(30):
            await services.history.purge(room_id)
        await services.broker.forget(room_id)
    else:
        await services.repository.delete_room(room_id)
    # Once deleted: a join that made sure of the room meanwhile must not count.
    services.hub.forget_room(room_id)
    return json_response(200, {"id": room_id, "deleted": True, "purged": purge == "true"})


async def _kick(services: Services, request: Request, match: re.Match[str]) -> Response:
    room_id = room_id_of(match)
    body = json_object(request, {"author_id", "reason"})
    author_id, reason = _author(body), _reason(body)
    await _close_members(services, room_id, author_id, KICKED, reason or "kicked")
    return json_response(200, {"room_id": room_id, "author_id": author_id, "kicked": True})


async def _ban(services: Services, request: Request, match: re.Match[str]) -> Response:
    room_id = room_id_of(match)
    body = json_object(request, {"author_id", "reason", "duration"})
    author_id, reason = _author(body), _reason(body)
    duration = body.get("duration")
    if duration is not None and (isinstance(duration, bool) or
                                 not isinstance(duration, (int, float)) or
                                 not 0 < duration <= BAN_MAX_SECONDS):
        raise HttpError(invalid("duration", f"must be a number of seconds from 1 to "
                                            f"{BAN_MAX_SECONDS}, or null for good"))
    until = None if duration is None else utc_after(duration)
    ban = Ban(room_id, author_id, until, reason)
    await services.repository.ban(ban)
    await _close_members(services, room_id, author_id, BANNED, reason or "banned")
    return json_response(200, ban.to_wire())


_ROOM = r"/rooms/(?P<room>[^/]*)"

ROUTES: list[Route] = [
    Route("GET", re.compile(_ROOM + r"/members\Z"), _members, "reader"),
    Route("POST", re.compile(r"/rooms\Z"), _create_room, "admin"),
    Route("GET", re.compile(r"/rooms\Z"), _list_rooms, "admin"),
    Route("GET", re.compile(_ROOM + r"\Z"), _get_room, "reader"),
    Route("PATCH", re.compile(_ROOM + r"\Z"), _patch_room, "admin"),
    Route("DELETE", re.compile(_ROOM + r"\Z"), _delete_room, "admin"),
    Route("POST", re.compile(_ROOM + r"/kick\Z"), _kick, "admin"),
    Route("POST", re.compile(_ROOM + r"/ban\Z"), _ban, "admin"),
]
