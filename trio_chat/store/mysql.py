"""The shared-database backend: :class:`MysqlBackend`, MySQL or MariaDB.

aiomysql on the asyncio bridge, through a small connection pool. Every call has
a deadline (``timeout``): a database that stops answering fails like one that
is gone. A connection that failed is closed rather than returned to the pool,
which is how the backend reconnects after an outage. It runs no tasks of its
own; :meth:`MysqlBackend.may_refuse` tells the store's writer which errors are
one message's fault and which are transient.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import aiomysql
import attrs
import pymysql
import trio

from .. import bridge
from ..config import DbConfig
from ..protocol import Message
from .backend import SqlRooms
from .schema import (
    COLUMNS,
    MARKS,
    MIGRATIONS,
    change_sql,
    changes_in,
    message_row,
    page_sql,
    row_message,
)

T = TypeVar("T")

DUPLICATE_KEY = 1062  # MySQL's ER_DUP_ENTRY
# MySQL error codes from here up are the client's (lost connection, cannot connect).
CLIENT_ERRORS = 2000
# Server errors that pass: too many connections, shutting down, lock wait timeout,
# deadlock, read-only (a failover), connection killed.
TRANSIENT_ERRORS = frozenset({1040, 1053, 1205, 1213, 1290, 1836, 1927})
# Seconds a start-up migration may take: up to 30 s for another node's migration
# lock, then the statements themselves.
MIGRATE_TIMEOUT = 300.0


def _to_datetime(stamp: str) -> datetime:
    # Every stamp is utc_now()'s shape; fromisoformat is ~30x faster than strptime,
    # which was a third of the MySQL write path's CPU.
    return datetime.fromisoformat(stamp.removesuffix("Z"))


def _from_datetime(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@attrs.define(eq=False)
class MysqlBackend(SqlRooms):
    """MySQL or MariaDB through aiomysql, over the asyncio bridge.

    Every method is trio-flavoured; the asyncio work is in the ``_aio_*``
    helpers, which only :func:`trio_chat.bridge.call` runs.
    """

    config: DbConfig
    timeout: float = 10.0
    _pool: Any = attrs.field(init=False, default=None)
    _mark = "%s"

    async def _sql(self, sql: str, args: tuple[object, ...]) -> tuple[list[tuple[Any, ...]], int]:
        async def work(cur: Any) -> tuple[list[tuple[Any, ...]], int]:
            """Asyncio flavour."""
            count = await cur.execute(sql, args)
            return list(await cur.fetchall()), count

        return await self._run(work)

    def _stamp_in(self, stamp: str) -> object:
        return _to_datetime(stamp)

    def _stamp_out(self, value: Any) -> str:
        return _from_datetime(value)

    # aiomysql cannot escape bytes with the PyMySQL it runs on: send base64 text.
    _blob_mark = "FROM_BASE64(%s)"

    def _blob_in(self, data: bytes) -> object:
        return base64.b64encode(data).decode("ascii")

    def _is_name_clash(self, exc: Exception) -> bool:
        return (isinstance(exc, pymysql.IntegrityError) and exc.args[0] == DUPLICATE_KEY
                and "'name'" in str(exc))

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, pymysql.IntegrityError) and exc.args[0] == DUPLICATE_KEY

    def may_refuse(self, exc: Exception) -> bool:
        code = exc.args[0] if isinstance(exc, pymysql.MySQLError) and exc.args else None
        return isinstance(code, int) and code < CLIENT_ERRORS and code not in TRANSIENT_ERRORS

    async def ensure_room(self, room_id: int, created_at: str) -> None:
        await self._sql("INSERT INTO rooms (id, created_at) VALUES (%s, %s) "
                        "ON DUPLICATE KEY UPDATE id = id", (room_id, _to_datetime(created_at)))

    async def _aio_connect(self) -> Any:
        """Asyncio flavour. Create the database if needed, then a connection pool."""
        c = self.config
        conn = await aiomysql.connect(host=c.host, port=c.port, user=c.id, password=c.password,
                                      charset="utf8mb4", autocommit=True,
                                      connect_timeout=self.timeout)
        try:
            async with conn.cursor() as cur:
                # Look first: "IF NOT EXISTS" on an existing database is a warning.
                await cur.execute("SELECT 1 FROM information_schema.SCHEMATA "
                                  "WHERE SCHEMA_NAME = %s", (c.database,))
                if not await cur.fetchall():
                    await cur.execute(f"CREATE DATABASE `{c.database}` "
                                      "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        finally:
            conn.close()
        return await aiomysql.create_pool(host=c.host, port=c.port, user=c.id,
                                          password=c.password, db=c.database,
                                          charset="utf8mb4", autocommit=True, minsize=1,
                                          maxsize=4, connect_timeout=self.timeout,
                                          pool_recycle=3600)

    async def _aio_run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Asyncio flavour. Run ``work(cursor)`` on a pooled connection.

        A connection that failed is closed before it goes back, so the pool
        replaces it: that is how the backend reconnects after an outage.
        """
        async with self._pool.acquire() as conn:
            try:
                async with conn.cursor() as cur:
                    return await work(cur)
            except BaseException:
                conn.close()
                raise

    async def _run(self, work: Callable[[Any], Awaitable[T]],
                   seconds: float | None = None) -> T:
        # A database that stops answering must fail like one that is gone.
        with trio.fail_after(self.timeout if seconds is None else seconds):
            if self._pool is None:
                self._pool = await bridge.call(self._aio_connect)
            return await bridge.call(self._aio_run, work)

    async def _migrate(self, cur: Any) -> int:
        """Asyncio flavour."""
        await cur.execute("SELECT GET_LOCK('trio_chat_migrate', 30)")
        try:
            await cur.execute("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
                              "DATABASE() AND TABLE_NAME = 'schema_version'")
            if not await cur.fetchall():
                await cur.execute("CREATE TABLE schema_version (version INT NOT NULL)")
            await cur.execute("SELECT MAX(version) FROM schema_version")
            current = (await cur.fetchone())[0] or 0
            for version, _, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements["mysql"]:
                    await cur.execute(statement)
                await cur.execute("INSERT INTO schema_version (version) VALUES (%s)",
                                  (version,))
                current = version
            return current
        finally:
            # After a failure the connection may be unusable (it is closed, which releases
            # the lock too): the failure is what the caller must see, not this.
            with contextlib.suppress(Exception):
                await cur.execute("SELECT RELEASE_LOCK('trio_chat_migrate')")

    async def open(self) -> int:
        """Connect, create the database if needed and migrate; returns the schema version.

        Migrating may wait for another node's migration (the lock) and may add an
        index to a large table: it gets longer than a query.
        """
        return await self._run(self._migrate, max(self.timeout, MIGRATE_TIMEOUT))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            await bridge.call(pool.wait_closed)

    async def insert(self, messages: list[Message]) -> None:
        rows = [message_row(m, _to_datetime(m.received_at)) for m in messages]
        changes = [change_sql("%s", m) for m in changes_in(messages)]

        async def work(cur: Any) -> None:
            """Asyncio flavour."""
            await cur.execute("BEGIN")
            # Not INSERT IGNORE: it turns duplicates into warnings (and hides real errors).
            await cur.executemany(
                f"INSERT INTO messages ({COLUMNS}) VALUES ({', '.join(['%s'] * MARKS)}) "
                "ON DUPLICATE KEY UPDATE id = id", rows)
            for sql, args in changes:
                await cur.execute(sql, args)
            await cur.execute("COMMIT")

        await self._run(work)

    async def _fetch(self, sql: str, args: list[object]) -> list[tuple[Any, ...]]:
        async def work(cur: Any) -> list[tuple[Any, ...]]:
            """Asyncio flavour."""
            await cur.execute(sql, args)
            return list(await cur.fetchall())

        return await self._run(work)

    async def last_id(self, room_id: int) -> int:
        rows = await self._fetch("SELECT MAX(id) FROM messages WHERE room_id = %s", [room_id])
        return int(rows[0][0] or 0)

    async def page(self, room_id: int, *, before: int | None, after: int | None,
                   limit: int, newest_first: bool) -> list[Message]:
        sql, args = page_sql("%s", before=before, after=after, limit=limit,
                              newest_first=newest_first, room_id=room_id)
        rows = await self._fetch(sql, args)
        return [row_message(row, _from_datetime(row[6])) for row in rows]
