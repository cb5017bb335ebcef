"""The ``trio-chat`` command: argument parsing, configuration, exit codes.

Owns ``main``: it parses the command line, loads the configuration (the file
with the ``TRIO_CHAT_*`` environment and the options over it; a bad setting is
one line naming the file or variable, exit 2), sets up logging, and runs the
command: ``serve`` (one node, see :mod:`trio_chat.process`, or with
``--workers N`` a :mod:`trio_chat.supervisor`), ``migrate``, ``dead-letters``,
``check-config`` and ``token`` (:mod:`trio_chat.cli_tools`) and ``chat``. A
start-up failure the operator can fix is one line on stderr with its exit code
(:mod:`trio_chat.startup`), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import attrs
import trio

from . import __version__
from .bridge import open_bridge
from .chat_cli import run_chat
from .cli_tools import add_commands, check_config, print_token
from .collector import tune_gc
from .config import LOG_LEVELS, Config, ConfigError, load_config
from .logs import setup_logging
from .process import KILL_MARGIN, migrate_store, raise_fd_limit, serve
from .startup import EXIT_CONFIG, explain
from .store import make_backend
from .supervisor import Supervisor, check_services, worker_command

log = logging.getLogger("trio_chat")

_SERVE_HELP = """\
Run the chat server.

Without CONFIG it runs the embedded default: one node on 127.0.0.1:8080,
in-process broker, SQLite history in ./trio-chat.db. CONFIG is a chatAPI
config.json (sections db, mq, redis, logger) plus optional "server", "sqlite",
"auth" and "limits" sections; see config.json.example and the README for every key.

SIGINT or SIGTERM stops it gracefully: after server.drainDelay seconds (default
0) of answering /readyz with 503, it stops accepting, closes every WebSocket
with 1001, stores every accepted message and exits 0 within
server.shutdownTimeout seconds. A second signal stops at once.

With --workers N (N > 1) it runs N worker processes sharing the port
(SO_REUSEPORT: the kernel spreads connections), each a node coordinated
through Redis, so the config needs a redis section and a fixed port. The
parent supervises: SIGINT or SIGTERM is forwarded to every worker as one
SIGTERM (each stops gracefully as above); workers still running
server.drainDelay + server.shutdownTimeout + 5 seconds later are killed. It exits 0 when every
worker exited 0. If a worker exits on its own (a crash, a kill), the others
are stopped and it exits 1 (or 3 or 4, that worker's start-up failure).
Workers stop by themselves if the parent dies.

Every setting can come from the environment, over the file: TRIO_CHAT_<SECTION>_<KEY>
(server.port is TRIO_CHAT_SERVER_PORT, db.password TRIO_CHAT_DB_PASSWORD; see
`trio-chat check-config --env`). Options win over both.

Exit status: 0 stopped as asked; 1 any other failure; 2 a bad configuration,
variable or option; 3 Redis or the history database unreachable or refusing
at start-up (after server.startupWait); 4 cannot listen on the address.
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _worker_spec(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        spec = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}") from None
    if not 1 <= spec[0] <= spec[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return spec


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
    serve.add_argument("--log-level", choices=sorted(LOG_LEVELS), type=str.lower,
                       help="overriding logger.level")
    serve.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="run N worker processes sharing the port, coordinated through "
                       "Redis (needs a redis section and a fixed port; default 1)")
    # Internal: how the supervisor starts a worker.
    serve.add_argument("--worker", type=_worker_spec, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    migrate = commands.add_parser(
        "migrate", help="create or upgrade the history database's schema",
        description="Create the configured history database (MySQL/MariaDB with a db "
                    "section, else the SQLite file) if needed and apply every schema "
                    "migration it lacks, in order. The server does the same at start-up.")
    migrate.add_argument("config", nargs="?", metavar="CONFIG",
                         help="path to config.json (default: the embedded SQLite store)")
    migrate.add_argument("--sqlite", metavar="PATH",
                         help="SQLite history file, overriding sqlite.path")
    dead = commands.add_parser(
        "dead-letters", help="list, or write again, the messages the database refused",
        description="Messages the history database refused (while it accepted the others) "
                    "are kept in its dead_letters table. List them, or with --replay try "
                    "to write each again: a message written is removed from the table, one "
                    "still refused stays. Exits 1 if any is still refused.")
    dead.add_argument("config", nargs="?", metavar="CONFIG",
                      help="path to config.json (default: the embedded SQLite store)")
    dead.add_argument("--sqlite", metavar="PATH",
                      help="SQLite history file, overriding sqlite.path")
    dead.add_argument("--replay", action="store_true",
                      help="write them to history again (after fixing the cause)")
    add_commands(commands)
    chat = commands.add_parser(
        "chat", help="chat in a room from the terminal",
        description="Join a room and chat: each line read is sent, every message of the room "
                    "is printed as [HH:MM:SS] #author: text. Reconnects and resumes on its own, "
                    "with one status line on stderr while away. Ends at end of input, once "
                    "what was sent is acknowledged, or at Ctrl-C (exit status 0).")
    chat.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8080")
    chat.add_argument("--room", type=int, required=True, metavar="ID", help="room id")
    chat.add_argument("--token", help="a user token (when the server requires tokens)")
    chat.add_argument("--author-id", type=int, metavar="ID", help="who you are (without tokens)")
    return parser


async def _dead_letters(config: Config, replay: bool) -> int:
    backend = make_backend(config)
    refused = 0
    async with open_bridge(needed=config.db is not None):
        await backend.open()
        try:
            letters = await backend.dead_letters(DEAD_LETTERS_MAX)
            for letter in letters:
                m = letter.message
                print(f"#{letter.seq} room {m.room_id} message {m.id} by {m.author_id} "
                      f"at {m.received_at}: {letter.error}")
                if not replay:
                    continue
                try:
                    await backend.insert([m])
                except Exception as exc:
                    refused += 1
                    print(f"  still refused: {exc!r}")
                    continue
                await backend.remove_dead_letter(letter.seq)
                print("  written")
            print(f"{len(letters)} dead letters" + (f", {len(letters) - refused} written, "
                                                    f"{refused} still refused" if replay else ""))
        finally:
            await backend.close()
    return 1 if refused else 0


# What one dead-letters command looks at; run it again for more.
DEAD_LETTERS_MAX = 10_000


def _options(args: argparse.Namespace, config: Config) -> Config:
    """The command-line options over the configuration."""
    server = {k: v for k, v in (("host", getattr(args, "host", None)),
                                ("port", getattr(args, "port", None))) if v is not None}
    if server:
        config = attrs.evolve(config, server=attrs.evolve(config.server, **server))
    if getattr(args, "sqlite", None):
        config = attrs.evolve(config, sqlite=attrs.evolve(config.sqlite, path=args.sqlite))
    if getattr(args, "log_level", None):
        config = attrs.evolve(config, logger=attrs.evolve(
            config.logger, level=LOG_LEVELS[args.log_level]))
    return config


def _refuse(message: str) -> int:
    print(f"trio-chat: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _serve_options(args: argparse.Namespace) -> list[str]:
    """The options a worker gets from its supervisor's command line."""
    options = []
    for option, value in (("--host", args.host), ("--port", args.port),
                          ("--sqlite", args.sqlite), ("--log-level", args.log_level)):
        if value is not None:
            options += [option, str(value)]
    return options


def _start_up_log(args: argparse.Namespace, config: Config) -> None:
    for warning in config.warnings:
        log.warning("%s", warning)
    if config.mq is not None:
        log.info("%s: the mq section is accepted for compatibility and not used",
                 config.source)
    log.info("trio-chat %s, config: %s", __version__, config.source)
    if args.command == "serve" and config.auth.mode == "off" and not config.auth.admin_key:
        log.warning("development mode: any client may claim any author_id and the rooms "
                    "API needs no key; set auth.mode and auth.adminKey in production")
    if args.command == "serve" and config.auth.mode == "token" and \
            not config.auth.allowed_origins:
        log.warning("auth.allowedOrigins is empty: browsers may open WebSockets only from "
                    "pages served at an IP address or localhost (a page at a host name "
                    "could be DNS rebinding); list your app's origins, such as "
                    '"https://chat.example.com"')


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "chat":
        return run_chat(args.url, args.room, args.token, args.author_id)
    if getattr(args, "port", None) is not None and not 0 <= args.port <= 65535:
        return _refuse(f"--port: expected 0 to 65535, got {args.port}")
    try:
        config = _options(args, load_config(args.config))
    except ConfigError as exc:
        return _refuse(str(exc))
    if args.command == "check-config":
        return check_config(config, args.env)
    if args.command == "token":
        return print_token(config, args)
    workers = args.workers if args.command == "serve" else 1
    worker = args.worker if args.command == "serve" else None
    if workers > 1 and config.redis is None:
        return _refuse(f"--workers {workers} needs a redis section in the config: each "
                       "worker is a node, and nodes share rooms through Redis")
    if workers > 1 and config.server.port == 0:
        return _refuse(f"--workers {workers} needs a fixed port, not 0: the workers share "
                       "one port")
    setup_logging(config.logger.level, config.logger.format,
                  f"{worker[0]}/{worker[1]}" if worker else None)
    if worker is None:  # the supervisor already said it
        _start_up_log(args, config)
    try:
        if args.command == "dead-letters":
            return trio.run(_dead_letters, config, args.replay)
        if args.command == "migrate":
            version = trio.run(migrate_store, config)
            where = (f"MySQL {config.db.host}:{config.db.port}/{config.db.database}"
                     if config.db else f"SQLite {config.sqlite.path}")
            print(f"{where}: schema at version {version}")
            return 0
        if workers > 1:
            if not trio.run(check_services, config):
                return 0
        else:
            raise_fd_limit()
            tune_gc()
            trio.run(serve, config, worker, args.supervisor if worker else None,
                     args.metrics_dir)
            return 0
    except Exception as exc:
        if (failure := explain(exc, config)) is None:
            raise
        print(f"trio-chat: error: {failure.message}", file=sys.stderr)
        return failure.code
    log.info("starting %d workers on %s:%d", workers, config.server.host, config.server.port)
    # Where the workers publish their metrics to each other (trio_chat.workers).
    with tempfile.TemporaryDirectory(prefix="trio-chat-metrics-") as metrics_dir:
        command = worker_command(args.config, [*_serve_options(args), "--metrics-dir",
                                               metrics_dir])
        supervisor = Supervisor(command, workers, config.server.drain_delay
                                + config.server.shutdown_timeout + KILL_MARGIN)
        return trio.run(supervisor.run)


def entry() -> None:
    """The ``trio-chat`` console script (and ``python -m trio_chat.cli``).

    Once ``main`` is done nothing is left to run, but CPython would still tear down
    every module it imported (trio, redis, aiomysql, Pillow...) with several garbage
    collections over what they hold: 0.2 to 0.4 s on an idle machine, seconds on a
    loaded one, between the log's "stopped" and the exit an orchestrator waits for.
    So the process flushes its output and exits at once. A bug still raises (and
    finalizes) as usual.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
