"""What the server sends, sans-IO: messages, acks, errors and events as JSON text,
and a message as the bytes of its WebSocket frame. Runs no tasks.

Owns the server's half of the compatibility contract with chatAPI clients: how
a stored message, an ack, an error and an event look on the wire. A room
encodes and frames a message once (:func:`message_frame`) and hands the same
bytes to every member; what clients may send is :mod:`trio_chat.protocol`'s.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .framing import utf8_frame
from .protocol import Message


def to_json(obj: dict[str, Any]) -> bytes:
    """``obj`` as compact UTF-8 JSON, non-ASCII as is."""
    # orjson writes what json.dumps(obj, ensure_ascii=False, separators=(",", ":")) does,
    # four times faster (tests/test_protocol.py compares them); json takes what orjson
    # cannot, as before (integers past 64 bits; a lone surrogate fails in either).
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _dumps(obj: dict[str, Any]) -> str:
    return to_json(obj).decode("utf-8")


def encode_message(message: Message) -> str:
    return _dumps(message.to_wire())


def encode_error(code: str, detail: str, client_msg_id: str | None = None) -> str:
    error = {"message_type": "error", "code": code, "detail": detail}
    if client_msg_id is not None:
        error["client_msg_id"] = client_msg_id
    return _dumps(error)


def encode_ack(client_msg_id: str, message: Message, durable: bool = True) -> str:
    """The sender's receipt for a frame with ``client_msg_id``: the same message however
    often the frame is sent again within the idempotency window. ``durable`` is false
    while the message is only in the server's memory (or the server acks on acceptance)."""
    return _dumps({"message_type": "ack", "client_msg_id": client_msg_id, "id": message.id,
                   "room_id": message.room_id, "received_at": message.received_at,
                   "durable": durable})


def typing_event(room_id: int, author_id: int, at: str) -> str:
    return _dumps({"message_type": "typing", "author_id": author_id, "room_id": room_id,
                   "create_at": at})


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


def message_frame(message: Message) -> bytes:
    """``text_frame(encode_message(message))``, without the detour through str."""
    return utf8_frame(to_json(message.to_wire()))
