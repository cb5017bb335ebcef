"""The servers under test as processes: trio-chat nodes, a ``serve --workers N``
supervisor or a comparison server (``websockets``, or the gorilla/websocket chat
example built elsewhere), each started, pinned to its CPUs, watched and stopped; and
how the CPUs are split between server and load generator."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # CPU columns are left empty without it.
    psutil = None

from bench import HOST, ROOT
from tests.wire import free_port

SERVERS = ("trio-chat", "websockets")
SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0

_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)/")


class ServerProcess:
    """One server process: a trio-chat node, a ``serve --workers N`` supervisor, the
    ``websockets`` comparison server, or the gorilla chat example (``binary``, on
    ``port``). ``tag`` names its log and SQLite files."""

    def __init__(self, name: str, workdir: Path, cpus: set[int] | None,
                 config: str | None = None, *, tag: str | None = None, port: int = 0,
                 workers: int | None = None, binary: str | None = None) -> None:
        self.name = name
        self.tag = tag or name
        self.log_path = workdir / f"{self.tag}.log"
        self.cpus = cpus
        self.workers = workers
        if name == "trio-chat":
            exe = Path(sys.executable).parent / "trio-chat"
            cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trio_chat.cli"]
            db = workdir / ("bench.db" if tag is None else f"{tag}.db")
            self.argv = [*cmd, "serve", *([config] if config else []), "--port", str(port),
                         "--sqlite", str(db),
                         *(["--workers", str(workers)] if workers is not None else [])]
        elif name == "gorilla":
            # One hub at /ws; it says nothing when it listens, so start() tries the port.
            self.argv = [str(binary), "-addr", f"{HOST}:{port}"]
        else:
            self.argv = [sys.executable, str(ROOT / "scripts" / "bench_fanout.py"),
                         "--websockets-server", "0"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[Any] = []  # psutil.Process of each worker, with --workers
        self.port = port if name == "gorilla" else 0
        self.exit_code: int | None = None
        self.killed = False

    def start(self) -> None:
        # Pinned before it runs, so every thread and child inherits the CPUs (and Go's
        # runtime sizes GOMAXPROCS to them).
        cpus = self.cpus
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.name == "gorilla":
                if _accepts(self.port):
                    break
            # Every worker of a supervisor says it is listening.
            elif len(ports := _LISTENING.findall(self.log_path.read_bytes())) >= (
                    self.workers or 1):
                self.port = int(ports[0])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                   f"before listening:\n{self.log_tail()}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.name} did not listen within {SERVER_START_TIMEOUT:g} "
                               f"s:\n{self.log_tail()}")
        if self.name == "trio-chat":
            status = _http_get_status(self.port, "/healthz")
            if status != 200:
                raise RuntimeError(f"GET /healthz answered {status}")
        if self.workers and psutil is not None:
            with contextlib.suppress(psutil.Error):
                self.children = psutil.Process(self.proc.pid).children(recursive=True)

    @property
    def alive(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None
                and all(c.is_running() for c in self.children))

    def pids(self) -> list[int]:
        return ([self.proc.pid] if self.proc else []) + [c.pid for c in self.children]

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                proc.kill()
                proc.wait(5)
        self.exit_code = proc.returncode
        # Workers run in sessions of their own: make sure none outlives its supervisor.
        if self.children:
            _gone, alive = psutil.wait_procs(self.children, timeout=5)
            for child in alive:
                self.killed = True
                with contextlib.suppress(psutil.Error):
                    child.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self, limit: int = 25) -> tuple[Counter[str], list[str]]:
        """Counts of notable log lines, and the first few of them."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return counts, samples
        for line in text.splitlines():
            kind = None
            if "slow consumer" in line or "write blocked" in line:
                kind = "slow consumer"
            elif "Traceback" in line:
                kind = "traceback"
            elif " ERROR " in line or " CRITICAL " in line:
                kind = "error"
            elif " WARNING " in line or "skipped broadcast" in line:
                kind = "warning"
            elif " closed " in line:
                kind = "closed"
            if kind:
                counts[kind] += 1
                if len(samples) < limit:
                    samples.append(line)
        return counts, samples


class Nodes:
    """The server under test: one process, or several trio-chat nodes sharing rooms
    through Redis (each client connects to ``ports[client % len(ports)]``)."""

    def __init__(self, label: str, procs: list[ServerProcess]) -> None:
        self.name = label
        self.procs = procs

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.procs]

    @property
    def alive(self) -> bool:
        return all(p.alive for p in self.procs)

    def pids(self) -> list[int]:
        return [pid for p in self.procs for pid in p.pids()]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def exit_note(self) -> str:
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is not None:
                who = "server" if len(self.procs) == 1 else p.tag
                return f"{who} exited with {p.proc.returncode}"
        return "a worker exited"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def _http_get_status(port: int, path: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            conn.close()


def split_cpus(pin: bool) -> tuple[set[int], set[int]] | None:
    """The server's CPUs (the first) and the load generator's (the others); None leaves
    both to the scheduler (``pin`` off, or fewer than two CPUs)."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def start_server(name: str, workdir: Path, cpus: set[int] | None,
                 server_config: dict[str, Any] | None = None,
                 ping_interval: float = 54.0) -> ServerProcess:
    """Start trio-chat (``server_config`` overrides its ``server`` section; the limits
    meant for people are lifted) or the ``websockets`` comparison server, which pings
    every ``ping_interval`` seconds like trio-chat's default pingPeriod."""
    config = None
    if name == "trio-chat":
        path = workdir / "bench.json"
        path.write_text(json.dumps({
            "server": server_config or {},
            "limits": {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                       "identityMessagesPerSecond": 1_000_000,
                       "identityMessageBurst": 1_000_000, "connectionsPerIp": 1_000_000,
                       "httpConnectionsPerIp": 1_000_000,
                       "outboundBytesPerIp": 1 << 40, "outboundBytesTotal": 1 << 40,
                       "inboundBytesPerIp": 1 << 40, "inboundBytesTotal": 1 << 40}}))
        config = str(path)
    server = ServerProcess(name, workdir, cpus, config)
    if name != "trio-chat":
        server.argv += ["--ping-interval", str(ping_interval)]
    server.start()
    return server


def fanout_servers(kind: str, args: argparse.Namespace, workdir: Path, cpus: set[int] | None
             ) -> Nodes:
    """The processes that make up the server under test (not started yet)."""
    if kind != "trio-chat":
        return Nodes(kind, [ServerProcess(kind, workdir, cpus)])
    config = workdir / "bench.json"
    config.write_text(json.dumps(fanout_config(args)))
    if not args.via_redis:
        return Nodes(kind, [ServerProcess(kind, workdir, cpus, config=str(config))])
    if args.server_workers:
        return Nodes(args.label, [ServerProcess(kind, workdir, None, str(config),
                                                port=free_port(),
                                                workers=args.server_workers)])
    return Nodes(args.label, [
        ServerProcess(kind, workdir, cpus, str(config),
                      tag=f"node{i}" if args.nodes > 1 else None)
        for i in range(1, args.nodes + 1)])


def fanout_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--config`` (if any); senders here are load generators, not people, so the
    per-connection rate limit is lifted unless that file sets it; with Redis, a redis
    section on a channel of this run's own."""
    config: dict[str, Any] = {}
    if args.config:
        config = json.loads(Path(args.config).read_text())
    config["limits"] = {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
                        "identityMessagesPerSecond": 1_000_000,
                        "identityMessageBurst": 1_000_000, "connectionsPerIp": 1_000_000,
                        "httpConnectionsPerIp": 1_000_000,
                        "outboundBytesPerIp": 1 << 40, "outboundBytesTotal": 1 << 40,
                        "inboundBytesPerIp": 1 << 40, "inboundBytesTotal": 1 << 40,
                        **config.get("limits", {})}
    if not args.via_redis:
        return config
    config["redis"] = {**config.get("redis", {}), "host": args.redis_host,
                       "port": args.redis_port, "listeningChannelName": args.channel,
                       "publishChannelName": args.channel}
    return config


def redis_client(args: argparse.Namespace) -> Any:
    import redis

    return redis.Redis(host=args.redis_host, port=args.redis_port, socket_timeout=5,
                       socket_connect_timeout=5)


def redis_cleanup(args: argparse.Namespace) -> None:
    """Delete the keys this run left behind (they would expire in a week anyway)."""
    try:
        client = redis_client(args)
        keys = list(client.scan_iter(match=f"{args.channel}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:  # the results are printed already; say why and go on
        print(f"# could not delete this run's Redis keys ({args.channel}:*): {exc}",
              file=sys.stderr, flush=True)
