"""The protocol half of trio-chat's Python clients, without any I/O (sans-IO).

Owns what the trio client (:mod:`trio_chat.client`) and the asyncio client
(:mod:`trio_chat.aio_client`) must agree on, so there is one copy of it: the
connection URL (who, ``?since=``), the outbox of frames sent but not yet
acknowledged and the order they are sent again in after a reconnection, how a
frame from the server is read (deliver once and in id order, settle a pending
send, retry a refusal that passes, a history reset, an id-less event), resume
bookkeeping (the last id delivered to the application), the capped, jittered
exponential backoff between attempts, and the ping timing that tells a stalled
connection from a quiet one.

A shell feeds it text frames and connection events and does what the returned
actions say; it never sees a socket, a clock or a task, so it is tested alone.
"""

from __future__ import annotations

import base64
import inspect
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs

from .protocol import CHANGE_TYPES, CHAT_TYPES, Message, message_from_wire

# Refusals that pass: the frame stays in the outbox and is sent again after RETRY_AFTER s.
TRANSIENT = frozenset({"sync_unavailable", "persistence_unavailable", "rate_limited"})
RETRY_AFTER = 1.0
# How long leaving a chat waits for the WebSocket's closing handshake.
CLOSE_TIMEOUT = 1.0
# Frames from the server can carry a data-URL image of up to 5 MiB, base64-encoded.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))

# A user token, or a function returning one (plain or async), called before every
# connection attempt so an expiring token can be refreshed.
TokenSource = str | Callable[[], str | Awaitable[str]] | None


class ChatError(Exception):
    """The server refused a frame: ``code`` and ``detail`` from its error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@attrs.frozen
class StateChange:
    """The connection's state: ``connecting`` (the first time), ``connected``,
    ``reconnecting`` (lost; ``detail`` says why, ``delay`` is the wait in seconds
    before the next attempt), ``resumed`` (connected again; ``since`` is the id the
    missed messages follow), ``reset`` (the server could not replay everything
    missed; what follows is the room's recent history) or ``closed``."""

    state: str
    detail: str = ""
    delay: float | None = None
    since: int | None = None


@attrs.frozen
class Deliver:
    """Hand ``message`` to the application, then call :meth:`ClientCore.delivered`."""

    message: Message


@attrs.frozen
class Settled:
    """The send of ``client_msg_id`` is over: the message's id, or the refusal."""

    client_msg_id: str
    result: int | ChatError


@attrs.frozen
class RetryLater:
    """A refusal that passes: send ``client_msg_id`` again after :data:`RETRY_AFTER`
    seconds if :meth:`ClientCore.pending_frame` still has it."""

    client_msg_id: str


@attrs.frozen
class Reset:
    """The server could not resume: what follows is the room's recent history."""

    detail: str


@attrs.frozen
class Event:
    """A frame without an id (chat_enter, chat_exit, typing, an error naming no send)."""

    frame: dict[str, Any]


Action = Deliver | Settled | RetryLater | Reset | Event


def text_frame(text: str) -> dict[str, Any]:
    return {"message_type": "chat_txt", "content": text}


def edit_frame(target_id: int, text: str) -> dict[str, Any]:
    return {"message_type": "chat_edit", "target_id": target_id, "content": text}


def delete_frame(target_id: int) -> dict[str, Any]:
    return {"message_type": "chat_delete", "target_id": target_id}


def image_frame(image: bytes) -> dict[str, Any]:
    """A chat_img frame carrying ``image`` as a data URL (the server checks the format)."""
    kind = next((t for magic, t in _IMAGE_TYPES if image.startswith(magic)),
                "image/webp" if image[8:12] == b"WEBP" else "application/octet-stream")
    content = f"data:{kind};base64,{base64.b64encode(image).decode('ascii')}"
    return {"message_type": "chat_img", "content": content}


def backoff_delay(attempt: int, first: float, cap: float,
                  rng: Callable[[], float] = random.random) -> float:
    """The wait before attempt ``attempt + 1``: doubling from ``first`` up to ``cap``, then
    a random point in its upper half, so clients dropped together do not return together."""
    delay: float = min(cap, first * 2 ** min(attempt, 62))
    return delay / 2 + rng() * delay / 2


async def resolve_token(source: TokenSource) -> str | None:
    """The token for the next attempt (runs under trio and asyncio alike)."""
    if source is None or isinstance(source, str):
        return source
    value = source()
    if inspect.isawaitable(value):
        value = await value
    return value


def describe(exc: BaseException) -> str:
    """Why a connection ended, in one line (an exception group of one is unwrapped)."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and len(inner) == 1:
        return describe(inner[0])
    # An attribute of the instance (trio-websocket's close reason), never a property
    # (websockets deprecates its ``reason``).
    reason = vars(exc).get("reason")
    return f"{type(exc).__name__}: {reason or exc}"


@attrs.define
class ClientCore:
    """One client's protocol state in one room; see the module docstring."""

    url: str
    room_id: int
    author_id: int | None = None
    # The last message delivered to the application: the next connection resumes after it.
    last_id: int | None = None
    dead_after: float = 10.0
    backoff_first: float = 0.25
    backoff_max: float = 10.0
    rng: Callable[[], float] = random.random
    state: str = attrs.field(init=False, default="connecting")
    # client_msg_id -> frame text, in the order sent: resent in that order.
    _outbox: dict[str, str] = attrs.field(init=False, factory=dict)
    _attempt: int = attrs.field(init=False, default=0)
    _connected_before: bool = attrs.field(init=False, default=False)

    @property
    def ping_interval(self) -> float:
        """Ping this often; a pong later than :attr:`dead_after` means the link is dead."""
        return self.dead_after / 3

    def connect_url(self, token: str | None = None) -> str:
        """The WebSocket URL of the next attempt: who, and ``since`` the last delivered id."""
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        query: dict[str, str | int] = {}
        if self.author_id is not None:
            query["author_id"] = self.author_id
        if self.last_id is not None:
            query["since"] = self.last_id
        if token is not None:
            query["token"] = token
        path = f"{parts.path.rstrip('/')}/ws/{self.room_id}"
        return f"{scheme}://{parts.netloc}{path}" + (f"?{urlencode(query)}" if query else "")

    def outgoing(self, frame: dict[str, Any]) -> tuple[str, str]:
        """Put ``frame`` in the outbox under a new ``client_msg_id``; returns the id and
        the text to send. Raises :class:`ChatError` once the chat is closed."""
        if self.state == "closed":
            raise ChatError("closed", "the chat is closed")
        cmid = uuid.uuid4().hex
        if self.author_id is not None:
            frame = {**frame, "author_id": self.author_id}
        text = json.dumps({**frame, "client_msg_id": cmid})
        self._outbox[cmid] = text
        return cmid, text

    def forget(self, client_msg_id: str) -> None:
        """The sender stopped waiting (settled or cancelled): never send it again."""
        self._outbox.pop(client_msg_id, None)

    def pending_frames(self) -> list[str]:
        """Every unacknowledged frame, oldest first: sent again on each new connection."""
        return list(self._outbox.values())

    def pending_frame(self, client_msg_id: str) -> str | None:
        return self._outbox.get(client_msg_id)

    def typing_frame(self) -> str:
        frame: dict[str, Any] = {"message_type": "typing"}
        if self.author_id is not None:
            frame["author_id"] = self.author_id
        return json.dumps(frame)

    def connected(self) -> StateChange:
        """A connection is open: the backoff starts over."""
        self._attempt = 0
        if self._connected_before:
            self.state = "resumed"
            return StateChange("resumed", since=self.last_id)
        self._connected_before = True
        self.state = "connected"
        return StateChange("connected")

    def lost(self, reason: str) -> StateChange:
        """The connection (or the attempt) ended: wait ``delay`` seconds, then try again."""
        delay = backoff_delay(self._attempt, self.backoff_first, self.backoff_max, self.rng)
        self._attempt += 1
        self.state = "reconnecting"
        return StateChange("reconnecting", reason, delay=delay)

    def close(self) -> list[Settled]:
        """The chat ends: every send still waiting is refused with ``closed``."""
        self.state = "closed"
        refused = ChatError("closed", "the chat was closed before the server "
                                      "acknowledged this message")
        settled = [Settled(cmid, refused) for cmid in self._outbox]
        self._outbox.clear()
        return settled

    def receive(self, text: str | bytes) -> list[Action]:
        """What to do about one frame from the server."""
        frame = json.loads(text)
        kind = frame.get("message_type")
        if kind in CHAT_TYPES or kind in CHANGE_TYPES:
            message = message_from_wire(frame)
            actions: list[Action] = []
            cmid = message.client_msg_id
            if cmid in self._outbox and message.author_id == self.author_id:
                actions.append(self._settle(cmid, message.id))
            if self.last_id is None or message.id > self.last_id:
                actions.append(Deliver(message))
            return actions
        if kind == "ack":
            cmid = frame.get("client_msg_id")
            return [self._settle(cmid, frame["id"])] if cmid is not None and cmid in self._outbox \
                else []
        cmid = frame.get("client_msg_id")
        if kind == "error" and cmid is not None and cmid in self._outbox:
            if frame.get("code") in TRANSIENT:
                return [RetryLater(cmid)]
            return [self._settle(cmid, ChatError(frame.get("code", "error"),
                                                 frame.get("detail", "")))]
        if kind == "history_reset":
            # What follows is the room's recent history, whatever its ids.
            self.last_id = None
            self.state = "reset"
            return [Reset(frame.get("detail", ""))]
        if kind == "typing" and self.author_id is not None \
                and frame.get("author_id") == self.author_id:
            return []  # the room relays typing to the typist too
        return [Event(frame)]

    def delivered(self, message: Message) -> None:
        """The application has ``message``: a resume starts after it. Called only once it
        was handed over, so a connection lost mid-handover replays it."""
        if self.last_id is None or message.id > self.last_id:
            self.last_id = message.id

    def _settle(self, cmid: str, result: int | ChatError) -> Settled:
        del self._outbox[cmid]
        return Settled(cmid, result)
