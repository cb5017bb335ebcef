"""Start-up failures: what each means in one line, its exit code, and the bounded wait.

Owns the exit codes of ``trio-chat`` and :func:`retry_startup`, which keeps
trying a start-up that failed because Redis or the database is unreachable for
up to ``server.startupWait`` seconds (0, the default: fail at once).
Orchestrators (compose, Kubernetes) start a node together with its services, so
waiting briefly there beats a crash loop; a refusal (a wrong password, an
unknown database) is final and never waited on. Runs no tasks of its own.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import pymysql
import redis
import trio

from .config import Config

log = logging.getLogger("trio_chat")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

EXIT_OK = 0
# Anything else: a bug, a worker that died, a shutdown past its deadline.
EXIT_FAILURE = 1
# A bad configuration file, variable or option.
EXIT_CONFIG = 2
# Redis or the history database unreachable, or refusing us, at start-up.
EXIT_SERVICE = 3
# The listen address: the port is in use, the address is not local, no permission.
EXIT_LISTEN = 4

# MySQL client errors that mean "not reachable (yet)", as opposed to a refusal.
_MYSQL_UNREACHABLE = {2003, 2005, 2006, 2013}
# Between tries while waiting for a service: from the first to the most.
_RETRY_FIRST = 0.5
_RETRY_MAX = 5.0


@attrs.frozen
class StartupFailure:
    """Why start-up failed, for the operator: one line and the exit code."""

    message: str
    code: int
    # Worth trying again (within server.startupWait): the service may come up.
    transient: bool = False


def find(exc: BaseException, kind: type[E] | tuple[type[E], ...]) -> E | None:
    """The first ``kind`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := find(inner, kind)) is not None:
            return found
    return None


def explain(exc: BaseException, config: Config) -> StartupFailure | None:
    """A start-up failure the operator can fix, or ``None`` for anything else (a bug)."""
    if config.redis is not None and (failure := _redis(exc, config)) is not None:
        return failure
    if (dberror := find(exc, pymysql.MySQLError)) is not None and config.db:
        db = config.db
        code = dberror.args[0] if dberror.args and isinstance(dberror.args[0], int) else 0
        return StartupFailure(f"db: MySQL at {db.host}:{db.port} (user {db.id!r}, database "
                              f"{db.database!r}): {dberror}", EXIT_SERVICE,
                              transient=code in _MYSQL_UNREACHABLE)
    if (oserror := find(exc, OSError)) is not None:
        s = config.server
        return StartupFailure(f"cannot listen on {s.host}:{s.port}: "
                              f"{oserror.strerror or oserror}", EXIT_LISTEN)
    if (sqlerror := find(exc, sqlite3.Error)) is not None:
        return StartupFailure(f"sqlite.path {config.sqlite.path!r}: {sqlerror}", EXIT_SERVICE)
    return None


def _redis(exc: BaseException, config: Config) -> StartupFailure | None:
    r = config.redis
    assert r is not None
    where = f"redis: Redis at {r.host}:{r.port}"
    user = f"user {r.id!r}" if r.id else "the default user"
    if (auth := find(exc, redis.AuthenticationError)) is not None:
        return StartupFailure(f"{where} refused {user} (check redis.id and redis.password): "
                              f"{auth}", EXIT_SERVICE)
    if (error := find(exc, redis.ResponseError)) is not None and "AUTH" in str(error):
        return StartupFailure(f"{where} refused {user} (check redis.id and redis.password): "
                              f"{error}", EXIT_SERVICE)
    unreachable = find(exc, (redis.ConnectionError, redis.TimeoutError,
                             redis.exceptions.RedisClusterException, trio.TooSlowError))
    if unreachable is not None:
        detail = str(unreachable) or "no answer in time"
        return StartupFailure(f"{where} is unreachable: {detail}", EXIT_SERVICE,
                              transient=True)
    if (failure := find(exc, redis.RedisError)) is not None:
        return StartupFailure(f"{where}: {failure}", EXIT_SERVICE)
    return None


async def retry_startup(config: Config, attempt: Callable[[], Awaitable[T]]) -> T:
    """Trio. Await ``attempt()``; while it fails because a service is unreachable and
    ``server.startupWait`` has not run out, log one line and try again."""
    deadline = trio.current_time() + config.server.startup_wait
    delay = _RETRY_FIRST
    while True:
        try:
            return await attempt()
        except Exception as exc:
            failure = explain(exc, config)
            if (failure is None or not failure.transient
                    or trio.current_time() + delay > deadline):
                raise
            log.warning("%s; trying again in %gs (server.startupWait %gs)",
                        failure.message, delay, config.server.startup_wait)
        await trio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX)
