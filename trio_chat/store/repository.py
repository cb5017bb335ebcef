"""The :class:`Repository`: rooms, bans and media, straight through to the backend.

Owns the reads and writes that need no write-behind: rooms, bans and images
are small and rare, so each call goes to the backend at once and its errors
reach the caller as they are (an HTTP request answers 500 or 503, a join is
refused). Message history stays with :class:`~.writer.Store`, whose reads merge
what is still buffered. The hub and the HTTP handlers use this, never the
backend itself. It runs no task.
"""

from __future__ import annotations

import attrs

from .backend import Backend, Ban, MediaInfo, RoomInfo, StoredMedia


@attrs.frozen
class Repository:
    _backend: Backend

    async def room(self, room_id: int) -> RoomInfo | None:
        return await self._backend.room(room_id)

    async def rooms(self, after: int | None, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with ids above ``after``, in id order."""
        return await self._backend.rooms(after, limit)

    async def create_room(self, name: str, private: bool, created_at: str) -> RoomInfo:
        """A new room; :class:`NameTaken` or :class:`NoRoomId` if it cannot be made."""
        return await self._backend.create_room(name, private, created_at)

    async def update_room(self, room_id: int, name: str | None, private: bool | None
                          ) -> RoomInfo | None:
        """The room with the fields given changed, or None if there is no such room."""
        return await self._backend.update_room(room_id, name, private)

    async def delete_room(self, room_id: int) -> bool:
        """Forget the room and its bans, keeping its messages (a purge goes through the
        :class:`~.writer.Store`, which holds messages not yet written)."""
        return await self._backend.delete_room(room_id, purge=False)

    async def ensure_room(self, room_id: int, created_at: str) -> None:
        """Create ``room_id`` unless it exists (the auto room policy)."""
        await self._backend.ensure_room(room_id, created_at)

    async def ban(self, ban: Ban) -> None:
        await self._backend.ban(ban)

    async def ban_of(self, room_id: int, author_id: int, now: str) -> Ban | None:
        """The ban of ``author_id`` in ``room_id`` in force at ``now``, if any."""
        return await self._backend.ban_of(room_id, author_id, now)

    async def save_media(self, media: StoredMedia) -> None:
        await self._backend.save_media(media)

    async def media_info(self, media_id: str) -> MediaInfo | None:
        return await self._backend.media_info(media_id)

    async def media_sent(self, media_id: str) -> None:
        """Mark an uploaded image as carried by a message, so it is kept."""
        await self._backend.media_sent(media_id)

    async def drop_unsent_media(self, before: str) -> int:
        """Delete uploads stored before ``before`` that no message carries."""
        return await self._backend.drop_unsent_media(before)

    async def media_bytes(self, media_id: str, thumbnail: bool) -> tuple[str, bytes] | None:
        """The image's (or its thumbnail's) content type and bytes, if it exists."""
        return await self._backend.media_bytes(media_id, thumbnail)
