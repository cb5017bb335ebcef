"""Persistence: message history (write-behind), rooms and bans, on SQLite or MySQL/MariaDB.

Owns persistence. Rooms, bans and media are small and rare: the
:class:`Repository` reads and writes them straight through to the backend.
Message history goes through :class:`Store`: ``append``
never waits (a full buffer refuses the message instead), one writer task
(:meth:`Store.run`) moves messages to the backend in batches and retries with
backoff when it fails, and reads merge what is still buffered so a message is
visible to history the moment it is accepted. A backend only knows how to run
its queries and migrate its schema: :class:`SqliteBackend` (the embedded
default, in a worker thread) or :class:`MysqlBackend` (aiomysql over the
asyncio bridge). Neither ever sits on the fan-out path.

Who owns what:

- :mod:`.writer`: the write-behind :class:`Store` and its writer task;
- :mod:`.repository`: the :class:`Repository` of rooms, bans and media, which the
  hub and the HTTP handlers use (nothing outside this package touches a backend
  but the command line's ``migrate`` and ``dead-letters``);
- :mod:`.backend`: the :class:`Backend` protocol, its records and errors, and
  the SQL both dialects share for rooms, bans, media and dead letters;
- :mod:`.schema`: :data:`MIGRATIONS` and the messages table's SQL and rows;
- :mod:`.sqlite`: :class:`SqliteBackend`;
- :mod:`.mysql`: :class:`MysqlBackend`.
"""

from __future__ import annotations

from ..config import Config
from .backend import (
    CREATED_ROOM_IDS,
    Backend,
    Ban,
    DeadLetter,
    MediaInfo,
    NameTaken,
    NoRoomId,
    RoomInfo,
    StoredMedia,
    StoreUnavailable,
)
from .mysql import MysqlBackend
from .repository import Repository
from .schema import MIGRATIONS, SCHEMA_VERSION
from .sqlite import SqliteBackend
from .writer import Outcome, Settle, Store

__all__ = [
    "CREATED_ROOM_IDS", "MIGRATIONS", "SCHEMA_VERSION", "Backend", "Ban", "DeadLetter",
    "MediaInfo", "MysqlBackend", "NameTaken", "NoRoomId", "Outcome", "Repository", "RoomInfo",
    "Settle", "SqliteBackend", "Store", "StoreUnavailable", "StoredMedia", "make_backend",
]


def make_backend(config: Config) -> Backend:
    """The configured backend: MySQL when a ``db`` section names a host, else SQLite."""
    if config.db is not None:
        return MysqlBackend(config.db)
    return SqliteBackend(config.sqlite.path, "FULL" if config.server.ack_after == "stored"
                         else "NORMAL")
