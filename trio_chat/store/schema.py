"""The history database's schema and the SQL both backends share.

Owns :data:`MIGRATIONS` (every schema change, per dialect, in order), the
messages table's columns and how a :class:`~trio_chat.protocol.Message` becomes
a row and back, and the statements for a page of history and for an edit or
delete. Pure: it runs no tasks and does no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from ..protocol import CHANGE_TYPES, Message

# Columns migration 3 adds to messages; older rows have none of them.
_CHANGE_COLUMNS = [("client_msg_id", "VARCHAR(64)"), ("target_id", "BIGINT"),
                   ("image", "TEXT"), ("edited_at", "VARCHAR(32)"),
                   ("deleted_at", "VARCHAR(32)")]
# Schema migrations, applied in order at start-up and by `trio-chat migrate`.
# Each is (version, what it does, statements per dialect); never edit a shipped one.
MIGRATIONS: list[tuple[int, str, dict[str, list[str]]]] = [
    (1, "rooms and messages", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS rooms (
                id INTEGER PRIMARY KEY,
                name TEXT UNIQUE,
                private INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS messages (
                room_id INTEGER NOT NULL,
                id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                message_type TEXT NOT NULL,
                content TEXT NOT NULL,
                create_at TEXT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (room_id, id)
            ) WITHOUT ROWID""",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS rooms (
                id BIGINT NOT NULL PRIMARY KEY,
                name VARCHAR(50) NULL UNIQUE,
                private BOOLEAN NOT NULL DEFAULT FALSE,
                created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
            """CREATE TABLE IF NOT EXISTS messages (
                room_id BIGINT NOT NULL,
                id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                message_type VARCHAR(32) NOT NULL,
                content MEDIUMTEXT NOT NULL,
                create_at VARCHAR(64) NOT NULL,
                received_at DATETIME(3) NOT NULL,
                PRIMARY KEY (room_id, id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (2, "bans", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS bans (
                room_id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                ends_at TEXT NULL,
                reason TEXT NOT NULL,
                PRIMARY KEY (room_id, author_id)
            ) WITHOUT ROWID""",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS bans (
                room_id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                ends_at DATETIME(3) NULL,
                reason VARCHAR(500) NOT NULL,
                PRIMARY KEY (room_id, author_id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (3, "client message ids, edits, deletes and images", {
        "sqlite": [
            *(f"ALTER TABLE messages ADD COLUMN {name} {kind} NULL"
              for name, kind in _CHANGE_COLUMNS),
            "ALTER TABLE messages ADD COLUMN moderated INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX messages_client_msg_id ON messages (room_id, author_id, client_msg_id)",
        ],
        "mysql": [
            "ALTER TABLE messages " + ", ".join(f"ADD COLUMN {name} {kind} NULL"
                                                for name, kind in _CHANGE_COLUMNS) +
            ", ADD COLUMN moderated BOOLEAN NOT NULL DEFAULT FALSE",
            "CREATE INDEX messages_client_msg_id ON messages (room_id, author_id, client_msg_id)",
        ],
    }),
    (4, "images", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS media (
                id TEXT PRIMARY KEY,
                room_id INTEGER NOT NULL,
                author_id INTEGER NOT NULL,
                content_type TEXT NOT NULL,
                size INTEGER NOT NULL,
                width INTEGER NOT NULL,
                height INTEGER NOT NULL,
                thumbnail_type TEXT NOT NULL,
                thumbnail_width INTEGER NOT NULL,
                thumbnail_height INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                data BLOB NOT NULL,
                thumbnail BLOB NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX media_room ON media (room_id)",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS media (
                id VARCHAR(64) NOT NULL PRIMARY KEY,
                room_id BIGINT NOT NULL,
                author_id BIGINT NOT NULL,
                content_type VARCHAR(32) NOT NULL,
                size INT NOT NULL,
                width INT NOT NULL,
                height INT NOT NULL,
                thumbnail_type VARCHAR(32) NOT NULL,
                thumbnail_width INT NOT NULL,
                thumbnail_height INT NOT NULL,
                created_at DATETIME(3) NOT NULL,
                data LONGBLOB NOT NULL,
                thumbnail MEDIUMBLOB NOT NULL,
                INDEX media_room (room_id)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        ],
    }),
    (5, "dead letters; messages by receive time (the idempotency window after a restart)", {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS dead_letters (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                room_id INTEGER NOT NULL,
                message_id INTEGER NOT NULL,
                message TEXT NOT NULL,
                error TEXT NOT NULL,
                failed_at TEXT NOT NULL
            )""",
            "CREATE INDEX messages_received_at ON messages (received_at)",
        ],
        "mysql": [
            """CREATE TABLE IF NOT EXISTS dead_letters (
                seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                room_id BIGINT NOT NULL,
                message_id BIGINT NOT NULL,
                message MEDIUMTEXT NOT NULL,
                error TEXT NOT NULL,
                failed_at DATETIME(3) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
            "CREATE INDEX messages_received_at ON messages (received_at)",
        ],
    }),
    # Images stored before this migration count as sent: nothing says they were not.
    (6, "whether an image was sent in a message (unsent uploads expire)", {
        "sqlite": [
            "ALTER TABLE media ADD COLUMN sent INTEGER NOT NULL DEFAULT 1",
            "CREATE INDEX media_unsent ON media (sent, created_at)",
        ],
        "mysql": [
            "ALTER TABLE media ADD COLUMN sent BOOLEAN NOT NULL DEFAULT TRUE, "
            "ADD INDEX media_unsent (sent, created_at)",
        ],
    }),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

MEDIA_COLUMNS = ("id, room_id, author_id, content_type, size, width, height, "
                  "thumbnail_type, thumbnail_width, thumbnail_height, created_at")

COLUMNS = ("id, room_id, author_id, message_type, content, create_at, received_at, "
            "client_msg_id, target_id, image, edited_at, deleted_at, moderated")
MARKS = len(COLUMNS.split(","))


def message_row(m: Message, received_at: object) -> tuple[object, ...]:
    return (m.id, m.room_id, m.author_id, m.message_type, m.content, m.create_at,
            received_at, m.client_msg_id, m.target_id,
            None if m.image is None else json.dumps(m.image, separators=(",", ":")),
            m.edited_at, m.deleted_at, m.moderated)


def row_message(row: tuple[Any, ...], received_at: str) -> Message:
    return Message(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5],
                   received_at, row[7], None if row[8] is None else int(row[8]),
                   None if row[9] is None else json.loads(row[9]), row[10], row[11],
                   bool(row[12]))


def change_sql(mark: str, change: Message) -> tuple[str, tuple[object, ...]]:
    """The UPDATE that makes a stored message show ``change`` (see protocol.apply_change)."""
    where = f" WHERE room_id = {mark} AND id = {mark} AND deleted_at IS NULL"
    if change.message_type == "chat_edit":
        return (f"UPDATE messages SET content = {mark}, edited_at = {mark}" + where,
                (change.content, change.received_at, change.room_id, change.target_id))
    return (f"UPDATE messages SET content = '', image = NULL, deleted_at = {mark}" + where,
            (change.received_at, change.room_id, change.target_id))


def changes_in(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.message_type in CHANGE_TYPES]


def page_sql(mark: str, *, before: int | None, after: int | None, limit: int,
              newest_first: bool, room_id: int) -> tuple[str, list[object]]:
    sql = f"SELECT {COLUMNS} FROM messages WHERE room_id = {mark}"
    args: list[object] = [room_id]
    if before is not None:
        sql += f" AND id < {mark}"
        args.append(before)
    if after is not None:
        sql += f" AND id > {mark}"
        args.append(after)
    sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT {mark}"
    args.append(limit)
    return sql, args
