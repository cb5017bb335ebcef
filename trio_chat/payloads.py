"""What one node may pass another through the broker, sans-IO. Runs no tasks.

Owns the check of a broker payload before use (:func:`read_payload`): a broker
carries whatever anyone publishes, so a payload that is not JSON, of an unknown
kind, malformed or for another room is refused with :class:`PayloadError`, and
the subscription drops it (see trio_chat/broker/redis_subscription.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from .protocol import (
    CHANGE_TYPES,
    CHAT_TYPES,
    INT64_MAX,
    INT64_MIN,
    Message,
    encodable,
    json_kind,
    message_from_wire,
)


class PayloadError(Exception):
    """A broker payload this node cannot use. ``kind`` names the sort of problem
    (``not_json``, ``unknown_kind``, ``malformed``, ``wrong_room``): the log is
    rate-limited per kind."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@attrs.frozen
class RelayedEvent:
    """A broker payload for a room's members that has no id (presence, typing), as sent."""

    text: str


@attrs.frozen
class RelayedCommand:
    """A broker payload for the room itself: an operator's command (see ``Room.control``)."""

    command: dict[str, Any]


# What each payload must carry (fields, and their types) besides its kind: what
# Message.to_wire, presence_event and typing_event write, and so do the Redis
# broker's scripts. Fields not named here are another version's: ignored.
_MESSAGE_FIELDS: dict[str, type] = {
    "id": int, "room_id": int, "author_id": int, "message_type": str, "content": str,
    "create_at": str, "received_at": str}
_MESSAGE_OPTIONAL: dict[str, type] = {
    "client_msg_id": str, "target_id": int, "image": dict, "edited_at": str,
    "deleted_at": str, "moderated": bool}
_PRESENCE_FIELDS: dict[str, type] = {
    "author_id": int, "room_id": int, "content": str, "create_at": str, "online": int}
_EVENT_FIELDS: dict[str, dict[str, type]] = {
    "chat_enter": _PRESENCE_FIELDS, "chat_exit": _PRESENCE_FIELDS,
    "typing": {"author_id": int, "room_id": int, "create_at": str}}
_CLOSE_FIELDS: dict[str, type] = {"code": int, "reason": str}
# A \u escape of a surrogate: a lone one decodes to a str that is not text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_payload(data: str, room_id: int) -> Message | RelayedEvent | RelayedCommand:
    """What ``data``, a payload on ``room_id``'s broker channel, carries.

    Raises :class:`PayloadError` for anything this node cannot use: not JSON
    (or not UTF-8: the broker decodes bytes with ``surrogateescape``), not an
    object, of an unknown kind, missing a field or with one of the wrong type,
    or for another room. Fields this version does not know are accepted: a
    message is rebuilt without them, an event passes on as sent.
    """
    if not data.isascii() and not encodable(data):
        raise PayloadError("not_json", "not UTF-8 text")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PayloadError("not_json", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PayloadError("not_json", f"a JSON object expected, got {json_kind(obj)}")
    if _SURROGATE_ESCAPE.search(data) and \
            not encodable(json.dumps(obj, ensure_ascii=False)):
        raise PayloadError("malformed", "holds a lone surrogate (\\ud800 to \\udfff), "
                                        "which is not text")
    if "control" in obj:
        if obj["control"] != "close":
            raise PayloadError("unknown_kind", f"unknown control {str(obj['control'])[:40]!r}")
        _check_fields(obj, _CLOSE_FIELDS, required=True)
        _check_fields(obj, {"author_id": int}, required=False)
        if not 1000 <= obj["code"] <= 4999:
            raise PayloadError("malformed", f"close code {obj['code']} is not 1000 to 4999")
        return RelayedCommand(obj)
    kind = obj.get("message_type")
    if "id" in obj:
        _check_fields(obj, _MESSAGE_FIELDS, required=True)
        _check_fields(obj, _MESSAGE_OPTIONAL, required=False)
        if kind not in CHAT_TYPES and kind not in CHANGE_TYPES:
            raise PayloadError("unknown_kind", f"unknown message_type {str(kind)[:40]!r}")
        if obj["id"] < 1:
            raise PayloadError("malformed", f"message id {obj['id']} is not positive")
        if kind in CHANGE_TYPES and obj.get("target_id") is None:
            raise PayloadError("malformed", f"a {kind} without target_id")
    elif kind in _EVENT_FIELDS:
        _check_fields(obj, _EVENT_FIELDS[kind], required=True)
    else:
        raise PayloadError("unknown_kind", f"neither a message, an event nor a command "
                                           f"(message_type {str(kind)[:40]!r})")
    if obj["room_id"] != room_id:
        raise PayloadError("wrong_room", f"for room {obj['room_id']}, on room {room_id}'s "
                                         "channel")
    return message_from_wire(obj) if "id" in obj else RelayedEvent(data)


def _check_fields(obj: dict[str, Any], fields: dict[str, type], *, required: bool) -> None:
    for name, kind in fields.items():
        value = obj.get(name)
        if value is None:
            if required:
                raise PayloadError("malformed", f"missing field: {name}")
            continue
        # bool is an int to isinstance, and a field meant as one is never a bool.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PayloadError("malformed", f"{name} must be {_KIND_NAMES[kind]}, "
                                            f"got {json_kind(value)}")
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise PayloadError("malformed", f"{name} is out of the 64-bit integer range")


_KIND_NAMES = {int: "an integer", str: "a string", bool: "a boolean", dict: "an object"}
