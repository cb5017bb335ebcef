"""The ``trio-chat`` command: argument parsing, logging set-up, signals.

Owns the process (``serve`` and ``migrate``): it loads the configuration
(exiting with a one-line error naming the file and key when it is wrong, or
the database when it cannot be reached), raises the file-descriptor limit,
and runs the server under ``trio.run`` with a task that turns SIGINT/SIGTERM
into a graceful shutdown (a second signal stops at once).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
from typing import TypeVar

import attrs
import pymysql
import trio

from . import __version__
from .bridge import open_bridge
from .config import Config, ConfigError, load_config
from .server import Server
from .store import make_backend

log = logging.getLogger("trio_chat")
E = TypeVar("E", bound=BaseException)

_SERVE_HELP = """\
Run the chat server.

Without CONFIG it runs the embedded default: one node on 127.0.0.1:8080,
in-process broker, SQLite history in ./trio-chat.db. CONFIG is a chatAPI
config.json (sections db, mq, redis, logger) plus an optional "server"
section; see config.json.example and the README for every key.

SIGINT or SIGTERM stops it gracefully: it stops accepting, closes every
WebSocket with 1001, stores every accepted message and exits 0 within
server.shutdownTimeout seconds. A second signal stops at once.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-chat", description="A real-time chat API server on trio.")
    parser.add_argument("--version", action="version", version=f"trio-chat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run the chat server", description=_SERVE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("config", nargs="?", metavar="CONFIG",
                       help="path to config.json (default: the embedded default)")
    serve.add_argument("--host", help="listen address, overriding server.host")
    serve.add_argument("--port", type=int, help="listen port, overriding server.port "
                       "(0 picks a free port)")
    serve.add_argument("--sqlite", metavar="PATH",
                       help="SQLite history file, overriding sqlite.path")
    migrate = commands.add_parser(
        "migrate", help="create or upgrade the history database's schema",
        description="Create the configured history database (MySQL/MariaDB with a db "
                    "section, else the SQLite file) if needed and apply every schema "
                    "migration it lacks, in order. The server does the same at start-up.")
    migrate.add_argument("config", nargs="?", metavar="CONFIG",
                         help="path to config.json (default: the embedded SQLite store)")
    migrate.add_argument("--sqlite", metavar="PATH",
                         help="SQLite history file, overriding sqlite.path")
    return parser


async def _migrate(config: Config) -> int:
    backend = make_backend(config)
    async with open_bridge(needed=config.db is not None):
        try:
            return await backend.open()
        finally:
            await backend.close()


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each connection is a descriptor."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    log.info("open-file limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)


async def _watch_signals(server: Server, stop_now: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if server.shutting_down:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                stop_now.cancel()
                return
            log.info("%s: shutting down gracefully", signal.Signals(signum).name)
            server.shutdown()


async def _serve(config: Config) -> None:
    server = Server.build(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, server, nursery.cancel_scope)
        await server.run()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"trio-chat: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port))
                     if v is not None}
        if args.port is not None and not 0 <= args.port <= 65535:
            print(f"trio-chat: error: --port: expected 0 to 65535, got {args.port}",
                  file=sys.stderr)
            return 2
        if overrides:
            config = attrs.evolve(config, server=attrs.evolve(config.server, **overrides))
    if args.sqlite:
        config = attrs.evolve(config, sqlite=attrs.evolve(config.sqlite, path=args.sqlite))
    logging.basicConfig(level=config.logger.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in config.warnings:
        log.warning("%s", warning)
    if config.mq is not None:
        log.info("%s: the mq section is accepted for compatibility and not used",
                 config.source)
    log.info("trio-chat %s, config: %s", __version__, config.source)
    try:
        if args.command == "migrate":
            version = trio.run(_migrate, config)
            where = (f"MySQL {config.db.host}:{config.db.port}/{config.db.database}"
                     if config.db else f"SQLite {config.sqlite.path}")
            print(f"{where}: schema at version {version}")
            return 0
        raise_fd_limit()
        trio.run(_serve, config)
    except Exception as exc:
        if (dberror := _find(exc, pymysql.MySQLError)) is not None and config.db:
            print(f"trio-chat: error: db: MySQL at {config.db.host}:{config.db.port} "
                  f"(user {config.db.id!r}, database {config.db.database!r}): {dberror}",
                  file=sys.stderr)
            return 1
        if (oserror := _find(exc, OSError)) is not None:
            print(f"trio-chat: error: cannot listen on {config.server.host}:"
                  f"{config.server.port}: {oserror.strerror or oserror}", file=sys.stderr)
            return 1
        if (dberror := _find(exc, sqlite3.Error)) is not None:
            print(f"trio-chat: error: sqlite.path {config.sqlite.path!r}: {dberror}",
                  file=sys.stderr)
            return 1
        raise
    return 0


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _find(inner, kind)) is not None:
            return found
    return None


if __name__ == "__main__":
    sys.exit(main())
