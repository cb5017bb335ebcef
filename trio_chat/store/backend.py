"""What a history database is, to the rest of the store.

Owns the :class:`Backend` protocol, the records a backend returns
(:class:`RoomInfo`, :class:`Ban`, :class:`MediaInfo`, :class:`StoredMedia`,
:class:`DeadLetter`), the store's errors, and :class:`SqlRooms`: rooms, bans,
media, dead letters and lookups by client message id in SQL both dialects
understand, on top of a backend's one ``_sql`` method. It runs no tasks; a
failing query raises to its caller.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import attrs

from ..protocol import Message, message_from_wire
from .schema import COLUMNS, MEDIA_COLUMNS, row_message


class StoreUnavailable(Exception):
    """The write-behind buffer is full: persistence cannot keep up or is down."""


class NameTaken(Exception):
    """Another room has this name."""


class NoRoomId(Exception):
    """Every id a created room may get is taken."""


# Rooms created through the API take ids below this; rooms joined by id (any int64)
# above it cannot push them to the end of the range.
CREATED_ROOM_IDS = 2**62


@attrs.frozen
class RoomInfo:
    id: int
    name: str | None
    private: bool
    created_at: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "private": self.private,
                "created_at": self.created_at}


@attrs.frozen
class Ban:
    room_id: int
    author_id: int
    until: str | None  # ISO UTC like received_at; None bans for good
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"room_id": self.room_id, "author_id": self.author_id, "until": self.until,
                "reason": self.reason}


@attrs.frozen
class MediaInfo:
    """A stored image: what a chat_img message says about it."""

    id: str
    room_id: int
    author_id: int
    content_type: str
    size: int
    width: int
    height: int
    thumbnail_type: str
    thumbnail_width: int
    thumbnail_height: int
    created_at: str

    @property
    def url(self) -> str:
        return f"/media/{self.id}"

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "thumbnail_url": f"{self.url}/thumbnail",
                "content_type": self.content_type, "size": self.size, "width": self.width,
                "height": self.height, "thumbnail_width": self.thumbnail_width,
                "thumbnail_height": self.thumbnail_height}


@attrs.frozen
class StoredMedia:
    info: MediaInfo
    data: bytes = attrs.field(repr=False)
    thumbnail: bytes = attrs.field(repr=False)
    # Whether a message carries it: an upload is not sent until a chat_img names it, and
    # is deleted if none does in time; a data URL's image is sent with its message.
    sent: bool = True


class Backend(Protocol):
    """What a history database provides; every method is a trio coroutine."""

    async def open(self) -> int:
        """Connect and migrate the schema; returns the schema version."""
    async def close(self) -> None: ...
    async def insert(self, messages: list[Message]) -> None:
        """Store ``messages``; a message whose (room_id, id) exists already is skipped."""
    async def last_id(self, room_id: int) -> int: ...
    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]: ...
    async def create_room(self, name: str, private: bool, created_at: str) -> RoomInfo:
        """A new room with the next free id; :class:`NameTaken` if the name is in use."""
    async def room(self, room_id: int) -> RoomInfo | None: ...
    async def rooms(self, after: int | None, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with ``id > after``, by id."""
    async def update_room(self, room_id: int, name: str | None, private: bool | None
                          ) -> RoomInfo | None:
        """Rename and/or change privacy (``None``: keep); :class:`NameTaken` on a clash."""
    async def delete_room(self, room_id: int, purge: bool) -> bool:
        """Forget the room (and its bans); with ``purge`` its messages and images too."""
    async def ensure_room(self, room_id: int, created_at: str) -> None:
        """Create ``room_id`` (unnamed, public) unless it exists."""
    async def ban(self, ban: Ban) -> None: ...
    async def save_media(self, media: StoredMedia) -> None: ...
    async def media_info(self, media_id: str) -> MediaInfo | None: ...
    async def media_sent(self, media_id: str) -> None:
        """Mark an image as carried by a message: it is kept for good."""
    async def drop_unsent_media(self, before: str) -> int:
        """Delete images stored before ``before`` that no message carries; how many."""
    async def media_bytes(self, media_id: str, thumbnail: bool) -> tuple[str, bytes] | None:
        """The content type and bytes of an image (or of its thumbnail), if stored."""
    async def client_message(self, room_id: int, author_id: int, client_msg_id: str,
                             since: str) -> Message | None: ...
    async def ban_of(self, room_id: int, author_id: int, now: str) -> Ban | None:
        """The ban of ``author_id`` in ``room_id`` still in force at ``now``, if any."""
    async def ping(self) -> None:
        """Raise unless the database answers."""
    def may_refuse(self, exc: Exception) -> bool:
        """Whether ``exc`` may be the database refusing what was written (a constraint,
        bad data, a trigger), rather than the database being unreachable or busy."""
    async def sent_since(self, since: str, limit: int) -> list[Message]:
        """The newest ``limit`` messages with a client_msg_id received at or after
        ``since``, oldest first."""
    async def dead_letter(self, message: Message, error: str, failed_at: str) -> None:
        """Set aside ``message``, which :meth:`insert` refused with ``error``."""
    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
    async def remove_dead_letter(self, seq: int) -> None: ...


@attrs.frozen
class DeadLetter:
    seq: int
    message: Message
    error: str
    failed_at: str



class SqlRooms:
    """Rooms, bans and lookups by client message id, in SQL both dialects understand; a
    backend supplies :meth:`_sql`."""

    _mark: str

    async def _sql(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement: (rows, rows affected)."""
        raise NotImplementedError

    def _stamp_in(self, stamp: str) -> object:
        return stamp

    def _stamp_out(self, value: Any) -> str:
        return str(value)

    _blob_mark = "?"

    def _blob_in(self, data: bytes) -> object:
        return data

    def _is_name_clash(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _is_duplicate(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _room_of(self, row: tuple[Any, ...]) -> RoomInfo:
        return RoomInfo(int(row[0]), row[1], bool(row[2]), self._stamp_out(row[3]))

    async def create_room(self, name: str, private: bool, created_at: str) -> RoomInfo:
        m = self._mark
        for _ in range(10):
            rows, _ = await self._sql(f"SELECT MAX(id) FROM rooms WHERE id < {m}",
                                      (CREATED_ROOM_IDS,))
            room = RoomInfo(max(int(rows[0][0] or 0), 0) + 1, name, private, created_at)
            if room.id >= CREATED_ROOM_IDS:
                raise NoRoomId(f"every room id below {CREATED_ROOM_IDS} is taken")
            try:
                await self._sql(f"INSERT INTO rooms (id, name, private, created_at) "
                                f"VALUES ({m}, {m}, {m}, {m})",
                                (room.id, name, private, self._stamp_in(created_at)))
            except Exception as exc:
                if self._is_name_clash(exc):
                    raise NameTaken(name) from None
                if self._is_duplicate(exc):
                    continue  # another node took this id first
                raise
            return room
        raise NoRoomId("could not find a free room id")

    async def room(self, room_id: int) -> RoomInfo | None:
        rows, _ = await self._sql(f"SELECT id, name, private, created_at FROM rooms "
                                  f"WHERE id = {self._mark}", (room_id,))
        return self._room_of(rows[0]) if rows else None

    async def rooms(self, after: int | None, limit: int) -> list[RoomInfo]:
        m = self._mark
        where, args = (f"WHERE id > {m} ", (after,)) if after is not None else ("", ())
        rows, _ = await self._sql(f"SELECT id, name, private, created_at FROM rooms {where}"
                                  f"ORDER BY id LIMIT {m}", (*args, limit))
        return [self._room_of(row) for row in rows]

    async def update_room(self, room_id: int, name: str | None, private: bool | None
                          ) -> RoomInfo | None:
        m = self._mark
        sets: list[str] = []
        args: list[object] = []
        if name is not None:
            sets.append(f"name = {m}")
            args.append(name)
        if private is not None:
            sets.append(f"private = {m}")
            args.append(private)
        if sets:
            try:
                await self._sql(f"UPDATE rooms SET {', '.join(sets)} WHERE id = {m}",
                                (*args, room_id))
            except Exception as exc:
                if self._is_name_clash(exc):
                    raise NameTaken(name) from None
                raise
        return await self.room(room_id)

    async def delete_room(self, room_id: int, purge: bool) -> bool:
        m = self._mark
        _, deleted = await self._sql(f"DELETE FROM rooms WHERE id = {m}", (room_id,))
        await self._sql(f"DELETE FROM bans WHERE room_id = {m}", (room_id,))
        if purge:
            _, messages = await self._sql(f"DELETE FROM messages WHERE room_id = {m}",
                                          (room_id,))
            await self._sql(f"DELETE FROM media WHERE room_id = {m}", (room_id,))
            deleted += messages
        return deleted > 0

    async def save_media(self, media: StoredMedia) -> None:
        i = media.info
        blob = self._blob_mark
        await self._sql(f"INSERT INTO media ({MEDIA_COLUMNS}, sent, data, thumbnail) "
                        f"VALUES ({', '.join([self._mark] * 12)}, {blob}, {blob})",
                        (i.id, i.room_id, i.author_id, i.content_type, i.size, i.width,
                         i.height, i.thumbnail_type, i.thumbnail_width, i.thumbnail_height,
                         self._stamp_in(i.created_at), int(media.sent),
                         self._blob_in(media.data), self._blob_in(media.thumbnail)))

    async def media_sent(self, media_id: str) -> None:
        await self._sql(f"UPDATE media SET sent = 1 WHERE id = {self._mark} AND sent = 0",
                        (media_id,))

    async def drop_unsent_media(self, before: str) -> int:
        _, deleted = await self._sql(f"DELETE FROM media WHERE sent = 0 AND created_at < "
                                     f"{self._mark}", (self._stamp_in(before),))
        return deleted

    async def media_info(self, media_id: str) -> MediaInfo | None:
        rows, _ = await self._sql(f"SELECT {MEDIA_COLUMNS} FROM media WHERE id = {self._mark}",
                                  (media_id,))
        if not rows:
            return None
        row = rows[0]
        return MediaInfo(row[0], int(row[1]), int(row[2]), row[3], int(row[4]), int(row[5]),
                         int(row[6]), row[7], int(row[8]), int(row[9]),
                         self._stamp_out(row[10]))

    async def media_bytes(self, media_id: str, thumbnail: bool) -> tuple[str, bytes] | None:
        columns = "thumbnail_type, thumbnail" if thumbnail else "content_type, data"
        rows, _ = await self._sql(f"SELECT {columns} FROM media WHERE id = {self._mark}",
                                  (media_id,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    async def ban(self, ban: Ban) -> None:
        m = self._mark
        args = (ban.room_id, ban.author_id)
        await self._sql(f"DELETE FROM bans WHERE room_id = {m} AND author_id = {m}", args)
        await self._sql(f"INSERT INTO bans (room_id, author_id, ends_at, reason) "
                        f"VALUES ({m}, {m}, {m}, {m})",
                        (*args, None if ban.until is None else self._stamp_in(ban.until),
                         ban.reason))

    async def client_message(self, room_id: int, author_id: int, client_msg_id: str,
                             since: str) -> Message | None:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT {COLUMNS} FROM messages WHERE room_id = {m} AND author_id = {m} "
            f"AND client_msg_id = {m} AND received_at >= {m} ORDER BY id LIMIT 1",
            (room_id, author_id, client_msg_id, self._stamp_in(since)))
        return row_message(rows[0], self._stamp_out(rows[0][6])) if rows else None

    async def ping(self) -> None:
        await self._sql("SELECT 1", ())

    async def sent_since(self, since: str, limit: int) -> list[Message]:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT {COLUMNS} FROM messages WHERE received_at >= {m} AND "
            f"client_msg_id IS NOT NULL ORDER BY received_at DESC LIMIT {m}",
            (self._stamp_in(since), limit))
        return [row_message(row, self._stamp_out(row[6])) for row in reversed(rows)]

    async def dead_letter(self, message: Message, error: str, failed_at: str) -> None:
        m = self._mark
        await self._sql(f"INSERT INTO dead_letters (room_id, message_id, message, error, "
                        f"failed_at) VALUES ({m}, {m}, {m}, {m}, {m})",
                        (message.room_id, message.id,
                         json.dumps(message.to_wire(), ensure_ascii=False), error,
                         self._stamp_in(failed_at)))

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows, _ = await self._sql(f"SELECT seq, message, error, failed_at FROM dead_letters "
                                  f"ORDER BY seq LIMIT {self._mark}", (limit,))
        return [DeadLetter(int(row[0]), message_from_wire(json.loads(row[1])), row[2],
                           self._stamp_out(row[3])) for row in rows]

    async def remove_dead_letter(self, seq: int) -> None:
        await self._sql(f"DELETE FROM dead_letters WHERE seq = {self._mark}", (seq,))

    async def ban_of(self, room_id: int, author_id: int, now: str) -> Ban | None:
        m = self._mark
        rows, _ = await self._sql(
            f"SELECT ends_at, reason FROM bans WHERE room_id = {m} AND author_id = {m} "
            f"AND (ends_at IS NULL OR ends_at > {m})",
            (room_id, author_id, self._stamp_in(now)))
        if not rows:
            return None
        until = None if rows[0][0] is None else self._stamp_out(rows[0][0])
        return Ban(room_id, author_id, until, rows[0][1])
