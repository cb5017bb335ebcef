"""The ``trio-chat`` command: argument parsing, logging set-up, signals.

Owns the process (``serve`` and ``migrate``): it loads the configuration
(exiting with a one-line error naming the file and key when it is wrong, or
the database when it cannot be reached), raises the file-descriptor limit,
and runs the server under ``trio.run`` with a task that turns SIGINT/SIGTERM
into a graceful shutdown (a second signal stops at once).

With ``serve --workers N`` the process is instead a supervisor: it migrates
the store once, then starts N worker processes (this module again, with the
hidden ``--worker I/N`` and ``--supervisor PID`` options), each a node that
binds the shared port with SO_REUSEPORT. Workers run in their own session, so
only the supervisor sees a terminal's Ctrl-C; it forwards one SIGTERM to each,
waits, and kills stragglers. A worker shuts down when its supervisor is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from typing import TypeVar

import attrs
import pymysql
import trio

from . import __version__
from .bridge import open_bridge
from .chat_cli import run_chat
from .config import Config, ConfigError, load_config
from .server import Server, tune_gc
from .store import make_backend

log = logging.getLogger("trio_chat")
E = TypeVar("E", bound=BaseException)

_SERVE_HELP = """\
Run the chat server.

Without CONFIG it runs the embedded default: one node on 127.0.0.1:8080,
in-process broker, SQLite history in ./trio-chat.db. CONFIG is a chatAPI
config.json (sections db, mq, redis, logger) plus optional "server", "sqlite",
"auth" and "limits" sections; see config.json.example and the README for every key.

SIGINT or SIGTERM stops it gracefully: it stops accepting, closes every
WebSocket with 1001, stores every accepted message and exits 0 within
server.shutdownTimeout seconds. A second signal stops at once.

With --workers N (N > 1) it runs N worker processes sharing the port
(SO_REUSEPORT: the kernel spreads connections), each a node coordinated
through Redis, so the config needs a redis section and a fixed port. The
parent supervises: SIGINT or SIGTERM is forwarded to every worker as one
SIGTERM (each stops gracefully as above); workers still running
server.shutdownTimeout + 5 seconds later are killed. It exits 0 when every
worker exited 0. If a worker exits on its own (a crash, a kill), the others
are stopped and it exits 1. Workers stop by themselves if the parent dies.
"""

# A worker still running this long after server.shutdownTimeout is killed.
_KILL_MARGIN = 5.0
# How often a worker checks that its supervisor is still alive.
_SUPERVISOR_POLL = 0.5


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
    serve.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="run N worker processes sharing the port, coordinated through "
                       "Redis (needs a redis section and a fixed port; default 1)")
    # Internal: how the supervisor starts a worker.
    serve.add_argument("--worker", type=_worker_spec, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
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


async def _migrate(config: Config) -> int:
    backend = make_backend(config)
    async with open_bridge(needed=config.db is not None):
        try:
            return await backend.open()
        finally:
            await backend.close()


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


async def _watch_supervisor(server: Server, pid: int, stop_now: trio.CancelScope) -> None:
    """Stop gracefully once the supervisor ``pid`` is gone (this process is reparented).

    Polling ``getppid`` rather than PR_SET_PDEATHSIG: the supervisor starts workers
    from one of trio's worker threads, and the death signal follows the thread.
    """
    while os.getppid() == pid:  # noqa: ASYNC110 (nothing to wait on portably)
        await trio.sleep(_SUPERVISOR_POLL)
    log.warning("the supervisor (pid %d) is gone: shutting down gracefully", pid)
    server.shutdown()
    await trio.sleep(server.config.server.shutdown_timeout + _KILL_MARGIN)
    log.warning("still running %g seconds later: stopping now",
                server.config.server.shutdown_timeout + _KILL_MARGIN)
    stop_now.cancel()


async def _serve(config: Config, worker: bool = False, supervisor: int | None = None
                 ) -> None:
    server = Server.build(config)
    # A worker shares its port with the other workers.
    server.reuse_port = worker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, server, nursery.cancel_scope)
        if supervisor is not None:
            nursery.start_soon(_watch_supervisor, server, supervisor, nursery.cancel_scope)
        await server.run()
        nursery.cancel_scope.cancel()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@attrs.define(eq=False)
class _Supervisor:
    """The parent of ``--workers N``: starts the workers, stops them all together."""

    command: list[str]
    count: int
    grace: float
    workers: list[trio.Process] = attrs.field(factory=list)
    stopping: bool = False
    failed: bool = False
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> int:
        # Signals first: a Ctrl-C while starting the workers must still stop them.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                for index in range(1, self.count + 1):
                    if self.stopping:
                        break
                    try:
                        # Own session: a terminal's Ctrl-C reaches only the supervisor,
                        # which forwards exactly one SIGTERM.
                        process = await trio.lowlevel.open_process(
                            [*self.command, "--worker", f"{index}/{self.count}",
                             "--supervisor", str(os.getpid())],
                            start_new_session=True)
                    except OSError as exc:
                        log.error("cannot start worker %d/%d: %s", index, self.count, exc)
                        self.failed = True
                        self.stop()
                        break
                    self.workers.append(process)
                    log.info("started worker %d/%d (pid %d)", index, self.count, process.pid)
                    if self.stopping:  # a signal came while it was starting
                        process.send_signal(signal.SIGTERM)
                    nursery.start_soon(self._watch_worker, index, process)
                await self._reap()
                nursery.cancel_scope.cancel()
        return 1 if self.failed else 0

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stopped.set()
        for process in self.workers:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def _reap(self) -> None:
        """Once stopping, wait for every worker; kill those past the grace period."""
        await self._stopped.wait()
        with trio.move_on_after(self.grace):
            for process in self.workers:
                await process.wait()
        for index, process in enumerate(self.workers, 1):
            if process.returncode is None:
                log.error("worker %d/%d (pid %d) still running after %g seconds: killing it",
                          index, self.count, process.pid, self.grace)
                self.failed = True
                process.kill()
            await process.wait()
        log.info("all %d workers stopped", len(self.workers))

    async def _watch_worker(self, index: int, process: trio.Process) -> None:
        code = await process.wait()
        if self.stopping:
            # -SIGTERM: stopped before it had installed its signal handlers.
            if code not in (0, -signal.SIGTERM):
                self.failed = True
                log.error("worker %d/%d (pid %d) %s", index, self.count, process.pid,
                          _describe_exit(code))
            return
        self.failed = True
        log.error("worker %d/%d (pid %d) %s on its own: stopping the others",
                  index, self.count, process.pid, _describe_exit(code))
        self.stop()

    async def _watch_signals(self, signals: trio.abc.ReceiveChannel[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.stopping:
                log.info("%s: stopping %d workers gracefully", name, len(self.workers))
                self.stop()
                continue
            log.warning("second %s: stopping the workers now", name)
            for process in self.workers:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)


def _worker_command(args: argparse.Namespace) -> list[str]:
    """This same ``serve`` command line, for one worker."""
    command = [sys.executable, "-m", "trio_chat.cli", "serve"]
    if args.config is not None:
        command.append(os.path.abspath(args.config))
    for option, value in (("--host", args.host), ("--port", args.port),
                          ("--sqlite", args.sqlite)):
        if value is not None:
            command += [option, str(value)]
    return command


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "chat":
        return run_chat(args.url, args.room, args.token, args.author_id)
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
    workers = args.workers if args.command == "serve" else 1
    worker = args.worker if args.command == "serve" else None
    if workers > 1 and config.redis is None:
        print(f"trio-chat: error: --workers {workers} needs a redis section in the config: "
              "each worker is a node, and nodes share rooms through Redis", file=sys.stderr)
        return 2
    if workers > 1 and config.server.port == 0:
        print(f"trio-chat: error: --workers {workers} needs a fixed port, not 0: the workers "
              "share one port", file=sys.stderr)
        return 2
    prefix = f"[worker {worker[0]}/{worker[1]}] " if worker else ""
    logging.basicConfig(level=config.logger.level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    if worker is None:  # the supervisor already said it
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
    try:
        if args.command == "dead-letters":
            return trio.run(_dead_letters, config, args.replay)
        if args.command == "migrate":
            version = trio.run(_migrate, config)
            where = (f"MySQL {config.db.host}:{config.db.port}/{config.db.database}"
                     if config.db else f"SQLite {config.sqlite.path}")
            print(f"{where}: schema at version {version}")
            return 0
        if workers > 1:
            # Once here, not racing in every worker.
            trio.run(_migrate, config)
        else:
            raise_fd_limit()
            tune_gc()
            trio.run(_serve, config, worker is not None,
                     args.supervisor if worker else None)
            return 0
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
    supervisor = _Supervisor(_worker_command(args), workers,
                             config.server.shutdown_timeout + _KILL_MARGIN)
    log.info("starting %d workers on %s:%d", workers, config.server.host, config.server.port)
    return trio.run(supervisor.run)


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
