"""The chat wire format, sans-IO: text in, records out, bytes out. Runs no tasks.

Owns the compatibility contract with chatAPI clients: what a client frame may
contain, how a stored message and an error look on the wire, and how a server
frame is laid out in WebSocket framing (so a broadcast is encoded once and the
same bytes go to every member).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

CHAT_TYPES = frozenset({"chat_txt", "chat_img"})

_ISO_UTC = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]00:?00)\Z", re.ASCII)
_DECIMAL = re.compile(r"-?(?:0|[1-9]\d{0,18})\Z", re.ASCII)


class FrameError(Exception):
    """A client frame that is refused; ``code`` and ``detail`` go into the error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@attrs.frozen
class Draft:
    """A valid chat message from a client, before the server accepts it."""

    room_id: int
    author_id: int
    message_type: str
    content: str
    create_at: str


@attrs.frozen
class Message:
    """A message the server accepted: a draft plus its id and receive time."""

    id: int
    room_id: int
    author_id: int
    message_type: str
    content: str
    create_at: str
    received_at: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_type": self.message_type,
            "author_id": self.author_id,
            "room_id": self.room_id,
            "content": self.content,
            "create_at": self.create_at,
            "received_at": self.received_at,
        }


def accept(draft: Draft, message_id: int, received_at: str) -> Message:
    return Message(message_id, draft.room_id, draft.author_id, draft.message_type,
                   draft.content, draft.create_at, received_at)


def utc_now() -> str:
    """The server's receive time, in the same shape as JavaScript's ``toISOString()``."""
    return _iso(datetime.now(timezone.utc))


def utc_after(seconds: float) -> str:
    """:func:`utc_now` plus ``seconds``."""
    return _iso(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_room_id(text: str) -> int | None:
    """The room id in ``/ws/{room_id}``, or ``None`` if it is not an int64."""
    if not _DECIMAL.match(text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _int64(frame: dict[str, Any], name: str) -> int:
    value = frame[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError("invalid_field", f"{name} must be an integer, got {_kind(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise FrameError("invalid_field", f"{name} is out of the 64-bit integer range")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def parse_chat_frame(text: str, url_room_id: int) -> Draft:
    """Validate one client text frame against the room of its connection.

    Raises :class:`FrameError` naming the first problem found.
    """
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("invalid_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("not_an_object", f"frame must be a JSON object, got {_kind(frame)}")
    missing = [name for name in ("message_type", "author_id", "content", "create_at")
               if name not in frame]
    if missing:
        raise FrameError("missing_field", f"missing field: {', '.join(missing)}")
    message_type = frame["message_type"]
    if not isinstance(message_type, str):
        raise FrameError("invalid_field",
                         f"message_type must be a string, got {_kind(message_type)}")
    if message_type not in CHAT_TYPES:
        raise FrameError("unknown_message_type",
                         f"unknown message_type {message_type[:40]!r}; "
                         f"expected one of {', '.join(sorted(CHAT_TYPES))}")
    author_id = _int64(frame, "author_id")
    if "room_id" in frame and frame["room_id"] is not None:
        room_id = _int64(frame, "room_id")
        if room_id != url_room_id:
            raise FrameError("room_mismatch",
                             f"room_id {room_id} does not match the connection's room "
                             f"{url_room_id}")
    content = frame["content"]
    if not isinstance(content, str):
        raise FrameError("invalid_field", f"content must be a string, got {_kind(content)}")
    if not content:
        raise FrameError("invalid_field", "content must not be empty")
    if ("\\ud" in text or "\\uD" in text) and not encodable(content):
        raise FrameError("invalid_field", "content holds a lone surrogate (\\ud800 to "
                                          "\\udfff not in a pair), which is not text")
    create_at = frame["create_at"]
    if not isinstance(create_at, str) or not _ISO_UTC.match(create_at):
        raise FrameError("invalid_field",
                         "create_at must be an ISO-8601 UTC timestamp such as "
                         "2022-06-05T12:00:00.000Z")
    try:
        datetime.strptime(create_at[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise FrameError("invalid_field", "create_at is not a real date and time") from None
    return Draft(url_room_id, author_id, message_type, content, create_at)


def encodable(text: str) -> bool:
    """Whether ``text`` is real Unicode text; JSON's ``\\ud800`` escapes can make a lone
    surrogate, which nothing downstream (UTF-8, the database) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode_message(message: Message) -> str:
    return _dumps(message.to_wire())


def encode_error(code: str, detail: str) -> str:
    return _dumps({"message_type": "error", "code": code, "detail": detail})


def encode_event(message_type: str, **fields: Any) -> str:
    return _dumps({"message_type": message_type, **fields})


PRESENCE_EVENTS = ("chat_enter", "chat_exit")


def presence_event(kind: str, room_id: int, author_id: int, online: int, at: str) -> str:
    """A ``chat_enter``/``chat_exit`` event: the seed's message fields (``content`` empty)
    without an ``id``, plus how many authors are online in the room after it.

    The Redis broker's presence script writes the same shape; keep them in step.
    """
    return _dumps({"message_type": kind, "author_id": author_id, "room_id": room_id,
                   "content": "", "create_at": at, "online": online})


def text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (server to client)."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def message_from_wire(obj: dict[str, Any]) -> Message:
    """Rebuild a :class:`Message` from its wire dict (history rows, broker payloads)."""
    return Message(obj["id"], obj["room_id"], obj["author_id"], obj["message_type"],
                   obj["content"], obj["create_at"], obj["received_at"])
