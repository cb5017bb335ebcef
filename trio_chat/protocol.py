"""The chat wire format, sans-IO: what clients send, as text in and records out.
Runs no tasks.

Owns the client's half of the compatibility contract with chatAPI clients: what
a client frame may contain (:func:`parse_frame`), the records it becomes
(:class:`Draft`, :class:`Message`) and who may edit or delete what. What the
server sends is :mod:`trio_chat.outbound`'s, what nodes pass each other is
:mod:`trio_chat.payloads`', and the WebSocket framing is :mod:`trio_chat.framing`'s.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import orjson

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Messages a member reads: they get an id, are stored and replayed.
CHAT_TYPES = frozenset({"chat_txt", "chat_img"})
# Changes to an earlier message: also sequenced and stored, so a resume replays them.
CHANGE_TYPES = frozenset({"chat_edit", "chat_delete"})
# What a client may send.
CLIENT_TYPES = CHAT_TYPES | CHANGE_TYPES | {"typing"}
MAX_CLIENT_MSG_ID = 64
# Fields each client type must carry besides message_type (and author_id, unless the
# connection's author is known); create_at may always be left out.
_REQUIRED = {"chat_txt": ("content",), "chat_img": ("content",),
             "chat_edit": ("target_id", "content"), "chat_delete": ("target_id",),
             "typing": ()}

_ISO_UTC = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]00:?00)\Z", re.ASCII)
_DECIMAL = re.compile(r"-?(?:0|[1-9]\d{0,18})\Z", re.ASCII)


class FrameError(Exception):
    """A client frame that is refused; ``code`` and ``detail`` go into the error frame,
    with the frame's ``client_msg_id`` when it had a usable one."""

    def __init__(self, code: str, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_msg_id = client_msg_id


@attrs.frozen
class Draft:
    """A valid message from a client, before the server accepts it.

    ``author_id`` is None when the frame left it out (the connection's author is
    used); ``create_at`` is None when the frame left it out (the receive time is
    used). ``target_id`` is the message a ``chat_edit``/``chat_delete`` changes.
    """

    room_id: int
    author_id: int | None
    message_type: str
    content: str
    create_at: str | None
    client_msg_id: str | None = None
    target_id: int | None = None
    image: dict[str, Any] | None = attrs.field(default=None, eq=False)
    # Made through the operators' API (an edit or delete of someone else's message).
    moderated: bool = False


@attrs.frozen
class Typing:
    """A client is typing: broadcast to the room, never stored."""

    room_id: int
    author_id: int | None


@attrs.frozen
class Message:
    """A message the server accepted: a draft plus its id and receive time.

    The optional fields are on the wire only when set, so a seed client sees
    exactly the seed's fields on a plain text message.
    """

    id: int
    room_id: int
    author_id: int
    message_type: str
    content: str
    create_at: str
    received_at: str
    client_msg_id: str | None = None
    target_id: int | None = None
    # chat_img: where the stored image and its thumbnail are, and their sizes.
    image: dict[str, Any] | None = attrs.field(default=None, eq=False)
    edited_at: str | None = None
    deleted_at: str | None = None
    # A chat_edit/chat_delete made through the operators' API rather than by the author.
    moderated: bool = False

    @property
    def held_bytes(self) -> int:
        """About what this message costs in memory: its content (up to 4 bytes a
        character in a str that is not ASCII) and the record with its other fields."""
        content = self.content
        return 1024 + (len(content) if content.isascii() else 4 * len(content))

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "id": self.id,
            "message_type": self.message_type,
            "author_id": self.author_id,
            "room_id": self.room_id,
            "content": self.content,
            "create_at": self.create_at,
            "received_at": self.received_at,
        }
        if self.client_msg_id is not None:
            wire["client_msg_id"] = self.client_msg_id
        if self.target_id is not None:
            wire["target_id"] = self.target_id
        if self.image is not None:
            wire["image"] = self.image
        if self.edited_at is not None:
            wire["edited_at"] = self.edited_at
        if self.deleted_at is not None:
            wire["deleted_at"] = self.deleted_at
        if self.moderated:
            wire["moderated"] = True
        return wire


def accept(draft: Draft, message_id: int, received_at: str) -> Message:
    """``draft``, whose author is known by now, accepted as ``message_id``."""
    assert draft.author_id is not None, "the author is known before a draft is accepted"
    return Message(message_id, draft.room_id, draft.author_id, draft.message_type,
                   draft.content, draft.create_at or received_at, received_at,
                   draft.client_msg_id, draft.target_id, draft.image,
                   moderated=draft.moderated)


def apply_change(target: Message, change: Message) -> Message:
    """``target`` as it is after ``change`` (a chat_edit or chat_delete of it).

    A deleted message stays deleted: an edit that raced with the delete loses.
    """
    if target.deleted_at is not None:
        return target
    if change.message_type == "chat_edit":
        return attrs.evolve(target, content=change.content, edited_at=change.received_at)
    return attrs.evolve(target, content="", image=None, deleted_at=change.received_at)


def check_change(target: Message | None, change: Draft, author_id: int | None,
                 admin: bool = False) -> None:
    """Raise :class:`FrameError` unless ``author_id`` (or an admin) may make ``change``
    to ``target`` (None: no such message in the room)."""
    cmid = change.client_msg_id
    verb = "edit" if change.message_type == "chat_edit" else "delete"
    if target is None or target.message_type not in CHAT_TYPES:
        raise FrameError("message_not_found",
                         f"no message {change.target_id} in room {change.room_id} to {verb}",
                         cmid)
    if target.deleted_at is not None:
        raise FrameError("message_deleted", f"message {target.id} is deleted", cmid)
    if not admin and target.author_id != author_id:
        raise FrameError("forbidden", f"message {target.id} is author {target.author_id}'s; "
                                      f"only its author (or an operator) may {verb} it", cmid)
    if verb == "edit" and target.message_type != "chat_txt":
        raise FrameError("not_editable", f"message {target.id} is {target.message_type}; "
                                         "only chat_txt messages can be edited", cmid)


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


def _int64(frame: dict[str, Any], name: str, cmid: str | None = None) -> int:
    value = frame[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError("invalid_field", f"{name} must be an integer, got {json_kind(value)}",
                         cmid)
    if not INT64_MIN <= value <= INT64_MAX:
        raise FrameError("invalid_field", f"{name} is out of the 64-bit integer range", cmid)
    return value


def json_kind(value: Any) -> str:
    """How an error names the JSON type of ``value``: "a string", "null"..."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _client_msg_id(frame: dict[str, Any]) -> str | None:
    value = frame.get("client_msg_id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise FrameError("invalid_field", f"client_msg_id must be a string, got {json_kind(value)}")
    if not 0 < len(value) <= MAX_CLIENT_MSG_ID or not encodable(value):
        raise FrameError("invalid_field", f"client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} "
                                          "characters of text")
    return value


def peek_client_msg_id(message: str | bytes) -> str | None:
    """The client_msg_id of a frame refused unread (rate limited), if it has a valid one."""
    if isinstance(message, bytes) or '"client_msg_id"' not in message:
        return None
    try:
        frame = json.loads(message)
        return _client_msg_id(frame) if isinstance(frame, dict) else None
    except (ValueError, RecursionError, FrameError):
        return None


# Longer frames are decoded by json, which is as fast on one long string and holds a
# tenth of the memory (see parse_frame).
ORJSON_MAX_CHARS = 1024 * 1024


def parse_frame(text: str, url_room_id: int, *, author_known: bool = False
                ) -> Draft | Typing:
    """Validate one client text frame against the room of its connection.

    ``author_known``: the connection knows its author (from the upgrade), so the
    frame may leave ``author_id`` out. Raises :class:`FrameError` naming the
    first problem found.

    Frames are decoded by orjson (the fastest, scripts/bench_codec.py). A frame it
    refuses, or whose validation fails, is decoded again by the standard json
    module and judged on that: orjson reads integers past 64 bits as floats and
    refuses NaN and lone surrogates, and the error frames are worded from json's
    reading, as they always were. Only refused frames pay twice. A frame over
    :data:`ORJSON_MAX_CHARS` (only a chat_img data URL can be) is decoded by json
    alone: orjson's parse holds 13 times its input at once, json's once.
    """
    if len(text) <= ORJSON_MAX_CHARS:
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            try:
                return _validate(frame, text, url_room_id, author_known)
            except FrameError:
                pass
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("invalid_json", f"frame is not valid JSON: {exc}") from None
    return _validate(frame, text, url_room_id, author_known)


def _validate(frame: Any, text: str, url_room_id: int, author_known: bool
              ) -> Draft | Typing:
    if not isinstance(frame, dict):
        raise FrameError("not_an_object", f"frame must be a JSON object, got {json_kind(frame)}")
    cmid = _client_msg_id(frame)
    message_type = frame.get("message_type")
    if message_type is None:
        raise FrameError("missing_field", "missing field: message_type", cmid)
    if not isinstance(message_type, str):
        raise FrameError("invalid_field",
                         f"message_type must be a string, got {json_kind(message_type)}", cmid)
    if message_type not in CLIENT_TYPES:
        raise FrameError("unknown_message_type",
                         f"unknown message_type {message_type[:40]!r}; "
                         f"expected one of {', '.join(sorted(CLIENT_TYPES))}", cmid)
    needed = ("author_id",) if not author_known else ()
    missing = [name for name in (*needed, *_REQUIRED[message_type]) if name not in frame]
    if missing:
        raise FrameError("missing_field", f"missing field: {', '.join(missing)}", cmid)
    author_id = _int64(frame, "author_id", cmid) if "author_id" in frame else None
    if frame.get("room_id") is not None:
        room_id = _int64(frame, "room_id", cmid)
        if room_id != url_room_id:
            raise FrameError("room_mismatch",
                             f"room_id {room_id} does not match the connection's room "
                             f"{url_room_id}", cmid)
    if message_type == "typing":
        return Typing(url_room_id, author_id)
    content = ""
    if message_type != "chat_delete":
        content = frame["content"]
        if not isinstance(content, str):
            raise FrameError("invalid_field", f"content must be a string, got {json_kind(content)}",
                             cmid)
        if not content:
            raise FrameError("invalid_field", "content must not be empty", cmid)
        if ("\\ud" in text or "\\uD" in text) and not encodable(content):
            raise FrameError("invalid_field", "content holds a lone surrogate (\\ud800 to "
                                              "\\udfff not in a pair), which is not text", cmid)
    target_id = _int64(frame, "target_id", cmid) if message_type in CHANGE_TYPES else None
    create_at = frame.get("create_at")
    if create_at is not None:
        if not isinstance(create_at, str) or not _ISO_UTC.match(create_at):
            raise FrameError("invalid_field",
                             "create_at must be an ISO-8601 UTC timestamp such as "
                             "2022-06-05T12:00:00.000Z", cmid)
        try:
            # The pattern fixed the shape; this checks the ranges (strptime did the same,
            # fifty times slower).
            datetime.fromisoformat(create_at[:19])
        except ValueError:
            raise FrameError("invalid_field", "create_at is not a real date and time",
                             cmid) from None
    return Draft(url_room_id, author_id, message_type, content, create_at, cmid, target_id)


def encodable(text: str) -> bool:
    """Whether ``text`` is real Unicode text; JSON's ``\\ud800`` escapes can make a lone
    surrogate, which nothing downstream (UTF-8, the database) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def message_from_wire(obj: dict[str, Any]) -> Message:
    """Rebuild a :class:`Message` from its wire dict (history rows, broker payloads)."""
    return Message(obj["id"], obj["room_id"], obj["author_id"], obj["message_type"],
                   obj["content"], obj["create_at"], obj["received_at"],
                   obj.get("client_msg_id"), obj.get("target_id"), obj.get("image"),
                   obj.get("edited_at"), obj.get("deleted_at"), obj.get("moderated", False))

