"""A chaos run: failures stay where they happen.

One run from the command line (``scripts/chaos.py``): set up MariaDB, Redis and
the nodes, run the clients through the fault schedule, settle, check and report."""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from contextlib import suppress
from pathlib import Path

import attrs
import psutil
import pymysql
import trio

from bench.chaos.checks import (
    Verdict,
    check_connections,
    check_deaths,
    check_delivery,
    check_sends,
    check_store,
)
from bench.chaos.clients import Client, Progress, counting_resends
from bench.chaos.common import (
    CHILDREN,
    MYSQL,
    START_TIMEOUT,
    Clock,
    Events,
    complaints,
    log,
    metrics,
    poll_until,
    redis_command,
    tail,
)
from bench.chaos.faults import FAULTS, Cluster, schedule
from bench.chaos.services import Node, Redis, SetupError, channel_of, stored_rows, write_config
from tests.proxy import Proxy
from tests.wire import free_port

# Deadlines of the settle phase: long enough for every backoff in play (the client's
# 2 s, the Redis broker's 5 s, the store writer's) to have fired several times.
SETTLE_SENDS = 60.0
SETTLE_READERS = 30.0
SETTLE_STORE = 30.0
# Messages still in the rooms' Redis logs (acked, not yet in MariaDB).
LOGGED = ("local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
          "n = n + redis.call('XLEN', k) end return n")
SETTLE_TASKS = 30.0


@attrs.define
class Options:
    duration: float
    seed: int
    rooms: int
    clients: int
    rate: float
    faults: tuple[str, ...]
    keep_logs: bool
    verbose: bool


async def chaos(opts: Options, workdir: Path, database: str) -> tuple[Verdict, Events,
                                                                       list[Node], Redis]:
    events = Events(Clock(), verbose=opts.verbose)
    redis = Redis(free_port(), workdir, events)
    v = Verdict()
    nodes: list[Node] = []
    async with trio.open_nursery() as services:
        # SIGTERM stops the run as Ctrl-C does: through the cleanup below.
        services.start_soon(_stop_on_sigterm, services.cancel_scope, v)
        db_proxy = Proxy(target_port=MYSQL["port"], target_host=MYSQL["host"])
        await services.start(db_proxy.run)
        config = workdir / "node.json"
        await redis.start(services)
        write_config(config, workdir, db_proxy.port, database, redis.port)
        nodes += [Node(i, config, workdir, events) for i in range(2)]
        cluster = Cluster(redis, db_proxy, nodes, events, database, channel_of(workdir))
        try:
            for node in nodes:  # one at a time: the first creates the schema
                await node.start(services)
                node.backend_ports = frozenset({redis.port, db_proxy.port})
                readings: list[tuple[int, int]] = []

                async def steady(node: Node = node, readings: list[tuple[int, int]] = readings
                                 ) -> bool:
                    readings[:] = [r] if (r := await node.own_tasks()) else []
                    return bool(readings)

                with trio.fail_after(START_TIMEOUT):
                    await poll_until(steady)
                node.baseline_tasks = readings[0][0]
            events.note(f"nodes on ports {[n.port for n in nodes]}, redis on {redis.port}, "
                        f"db proxy on {db_proxy.port} -> {MYSQL['port']}")
            await _run_clients(opts, cluster, services, v)
        finally:
            with trio.move_on_after(30, shield=True):
                await cluster.stop()
            for node in nodes:
                node.close_log()
            services.cancel_scope.cancel()
    check_deaths(events, v)
    return v, events, nodes, redis


async def _stop_on_sigterm(scope: trio.CancelScope, v: Verdict) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log("chaos: SIGTERM: stopping")
            v.fail("interrupted", "SIGTERM before the run finished")
            scope.cancel()
            return


async def _run_clients(opts: Options, cluster: Cluster, services: trio.Nursery,
                       v: Verdict) -> None:
    events, nodes = cluster.events, cluster.nodes
    progress = Progress()
    rooms = cluster.rooms = [101 + r for r in range(opts.rooms)]
    # Client i is in room i mod R, on node (i div R) mod 2: each room has members on both.
    clients = [Client(i, rooms[i % len(rooms)], 1000 + i, nodes[(i // len(rooms)) % 2],
                      opts.rate, events.clock, progress) for i in range(opts.clients)]
    go, stop, close = trio.Event(), trio.Event(), trio.Event()
    by_chat: dict[int, Client] = {}
    with counting_resends(by_chat):
        async with trio.open_nursery() as members:
            for client in clients:
                members.start_soon(client.run, go, stop, close)
            with trio.move_on_after(START_TIMEOUT):
                for client in clients:
                    await client.connected.wait()
            if not all(c.connected.is_set() for c in clients):
                raise SetupError("clients did not connect: " + ", ".join(
                    c.name for c in clients if not c.connected.is_set()))
            by_chat.update({id(c.chat): c for c in clients})
            events.clock.t0 = trio.current_time()
            events.note(f"{len(clients)} clients in rooms {rooms}, {opts.rate:g} msg/s each")
            go.set()
            plan = schedule(opts.duration, opts.faults, opts.seed)
            try:
                for fault in plan:
                    await trio.sleep_until(events.clock.t0 + fault.start)
                    await cluster.apply(fault, services, fault.start + fault.length)
                await trio.sleep_until(events.clock.t0 + opts.duration)
            finally:
                with trio.move_on_after(START_TIMEOUT, shield=True):
                    await cluster.heal_all(services)
            stop.set()
            events.note("sending stopped; settling")
            await _settle(clients, nodes, events, progress, v, cluster.redis.port)
            close.set()
        events.note("clients closed")
    # Client-side verdicts first: the store check needs the acks.
    check_sends(clients, events, v)
    rows = await trio.to_thread.run_sync(stored_rows, cluster.database, rooms)
    check_store(rows, clients, events, v)
    check_delivery(clients, events, v)
    check_connections(clients, events, v)
    await _check_tasks(nodes, events, v)
    if opts.verbose:
        for client in clients:
            slowest = max((s for s in client.sent if s.acked_at is not None), default=None,
                          key=lambda s: (s.acked_at or 0.0) - s.started)
            waited = (f", slowest ack {(slowest.acked_at or 0.0) - slowest.started:.1f}s "
                      f"(sent at {slowest.started:.1f}s, {events.around(slowest.started)})"
                      if slowest else "")
            log(f"{client.name}: sent {len(client.sent)}, delivered {len(client.delivered)}, "
                f"resent {len(client.resends)}{waited}, states "
                f"{Counter(s for _, s, _ in client.states)}")
        per_fault = Counter(events.around(t).split(" [")[0] for c in clients
                            for t in c.resends)
        for where, count in per_fault.most_common():
            log(f"resends {where}: {count}")


async def _settle(clients: list[Client], nodes: list[Node], events: Events,
                  progress: Progress, v: Verdict, redis_port: int) -> None:
    with trio.move_on_after(SETTLE_SENDS) as waiting:
        await progress.wait_for(lambda: all(not c.sending and c.in_flight == 0
                                            for c in clients))
    if waiting.cancelled_caught:
        v.fail("settle", f"sends still unanswered after {SETTLE_SENDS:g}s: " + ", ".join(
            f"{c.name} {c.in_flight}" for c in clients if c.in_flight))
    last_acked: dict[int, int] = defaultdict(int)
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                last_acked[sent.room] = max(last_acked[sent.room], sent.acked_id)

    def caught_up(client: Client) -> bool:
        last = client.delivered[-1][0] if client.delivered else 0
        return last >= last_acked[client.room]

    with trio.move_on_after(SETTLE_READERS) as waiting:
        await progress.wait_for(lambda: all(caught_up(c) for c in clients))
    if waiting.cancelled_caught:
        v.fail("settle", f"readers behind after {SETTLE_READERS:g}s: " + ", ".join(
            f"{c.name} at {c.delivered[-1][0] if c.delivered else 0} of "
            f"{last_acked[c.room]}" for c in clients if not caught_up(c)))
    events.note("clients settled")

    async def written() -> bool:
        for node in nodes:
            try:
                m = await metrics(node.port)
            except (OSError, trio.TooSlowError):
                return False
            if m.get("triochat_store_lag_messages"):
                return False
        # And what a killed node acked but never wrote has been written from Redis's
        # logs by a surviving node (after server.orphanedAfter).
        try:
            reply = await redis_command(redis_port, "EVAL", LOGGED, "0", "*:log")
        except (OSError, trio.TooSlowError):
            return False
        return reply == b":0\r\n"

    with trio.move_on_after(SETTLE_STORE) as waiting:
        await poll_until(written, interval=0.2)
    if waiting.cancelled_caught:
        v.fail("settle", f"store buffers not written after {SETTLE_STORE:g}s")
    events.note("store buffers written")


async def _check_tasks(nodes: list[Node], events: Events, v: Verdict) -> None:
    """After the clients left, each node's own tasks come back to its idle baseline."""
    for node in nodes:
        if not node.alive or node.baseline_tasks is None:
            continue
        baseline = node.baseline_tasks
        last: list[tuple[int, int]] = []

        async def back(node: Node = node, baseline: int = baseline,
                       last: list[tuple[int, int]] = last) -> bool:
            try:
                reading = await node.own_tasks()
            except (OSError, trio.TooSlowError, KeyError, psutil.Error):
                return False
            if reading is None:
                return False
            last[:] = [reading]
            return reading[0] <= baseline

        with trio.move_on_after(SETTLE_TASKS) as waiting:
            await poll_until(back, interval=0.2)
        if waiting.cancelled_caught:
            tasks, conns = last[0] if last else (baseline, 0)
            v.leaked_tasks += max(tasks - baseline, 0)
            v.fail("leaked_tasks", f"{node.name}: {tasks} trio tasks besides its {conns} "
                   f"backend connections {SETTLE_TASKS:g}s after the clients left, "
                   f"{baseline} before they came")
        else:
            events.note(f"{node.name}: {last[0][0]} trio tasks (baseline {baseline}) and "
                        f"{last[0][1]} backend connections once the clients left")


def report(opts: Options, v: Verdict, events: Events, nodes: list[Node], redis: Redis,
           faults: int) -> None:
    if not v.passed:
        for path in [n.log_path for n in nodes] + [redis.log_path]:
            if path.suffix == ".log" and path.stem.startswith("node"):
                print(f"--- warnings and errors in {path.name} ---")
                print("\n".join(complaints(path)) or "(none)")
            print(f"--- tail of {path.name} ---")
            print(tail(path))
        print("--- timeline (seconds since sending began) ---")
        for t, text in events.lines:
            print(f"{t:8.2f}s {text}")
        print("--- what failed ---")
        shown: Counter[str] = Counter()
        for check, line in v.failures:
            shown[check] += 1
            if shown[check] <= 8:
                print(f"FAIL {check}: {line}")
        for check, count in shown.items():
            if count > 8:
                print(f"FAIL {check}: ... and {count - 8} more")
    print(v.summary(opts.duration, opts.seed, faults), flush=True)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Faults: " + ", ".join(FAULTS))
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of sending and faults (default 60)")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    p.add_argument("--rooms", type=int, default=3, help="rooms (default 3)")
    p.add_argument("--clients", type=int, default=6,
                   help="clients, spread over the rooms and both nodes (default 6)")
    p.add_argument("--rate", type=float, default=4.0,
                   help="messages per second each client sends (default 4)")
    p.add_argument("--faults", default="all",
                   help="'all', 'none' or a comma-separated list of kinds (default all)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary directory with the logs and configuration")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the timeline as it happens and per-client counts")
    args = p.parse_args(argv)
    if args.faults == "all":
        faults = FAULTS
    elif args.faults == "none":
        faults = ()
    else:
        faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
        if unknown := [f for f in faults if f not in FAULTS]:
            p.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    if args.rooms < 1 or args.clients < 2 * args.rooms:
        p.error("--clients must be at least twice --rooms: each room needs a member on "
                "each node")
    if args.duration < 5 or not math.isfinite(args.rate) or args.rate <= 0:
        p.error("--duration must be at least 5 and --rate positive")
    return Options(args.duration, args.seed, args.rooms, args.clients, args.rate, faults,
                   args.keep_logs, args.verbose)


def _kill_leftovers() -> None:
    """The last resort: whatever trio.run left running (it was interrupted) is killed."""
    for process in CHILDREN:
        if process.returncode is None and process.poll() is None:
            with suppress(ProcessLookupError):
                process.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.poll() is None for p in CHILDREN):
        time.sleep(0.05)


def _setup_error(exc: BaseException) -> SetupError | None:
    """The SetupError in ``exc``, also from inside the exception groups of nurseries."""
    if isinstance(exc, SetupError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _setup_error(inner)) is not None:
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    database = f"trio_chat_chaos_{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="trio-chat-chaos-"))
    try:
        admin = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                password=MYSQL["password"], charset="utf8mb4",
                                autocommit=True)
    except pymysql.MySQLError as exc:
        print(f"chaos: MariaDB is not reachable at {MYSQL['host']}:{MYSQL['port']}: {exc}")
        return 2
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        v, events, nodes, redis = trio.run(chaos, opts, workdir, database)
        faults = len(events.windows)
        report(opts, v, events, nodes, redis, faults)
        return 0 if v.passed else 1
    except Exception as exc:
        if (setup := _setup_error(exc)) is None:
            raise
        print(f"chaos: could not set up the run: {setup}")
        return 2
    finally:
        _kill_leftovers()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        if opts.keep_logs:
            print(f"chaos: logs and configuration kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, bare or as the only leaf of nurseries' exception groups."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:
        return all(interrupted(e) for e in inner)
    return isinstance(exc, KeyboardInterrupt)
