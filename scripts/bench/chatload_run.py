"""One run of the Go load generator ``chatload`` against one server: start the server
(fresh files; with Redis, a channel of the run's own), run chatload, sample the
server's process tree, chatload and the machine (and Redis's INFO) every 0.1 s while
it runs, stop the server, and keep what was seen as a JSON-ready record.

chatload prints one JSON line at the end and nothing while it runs, so the samples
are kept as a series and the message phase is found afterwards: chatload connects
every client (``connect_s``), sleeps 0.3 s, then sends; the window starts at the
last sample taken before its sends could begin and ends at its result line (before
it closes its connections). Memory per member is read at that first sample. Redis's
INFO is read three times only (before chatload starts, once the server holds a
descriptor per client, and at the result line), so that the readings' own output
does not count as the room's traffic.

A run that fails (the server does not start, chatload fails or hangs) is a record
with an ``error``; the sitting goes on with the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import subprocess
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import attrs

from bench import HOST
from bench.probes import wait_quiet
from bench.procstat import open_fds, process_tree, read_machine, read_stat, sample_tree
from bench.servers import ServerProcess, fanout_config, redis_cleanup, redis_client
from tests.wire import free_port

SAMPLE_S = 0.1
SETTLE_S = 0.3  # chatload's sleep between its last connect and its first send
ROOM = 1


@attrs.frozen
class Setup:
    """A server under test: ``trio-chat`` (embedded default), ``workers:N`` (``serve
    --workers N`` through Redis), ``websockets`` or ``gorilla``."""

    kind: str
    workers: int | None = None

    @property
    def label(self) -> str:
        return self.kind if self.workers is None else f"workers:{self.workers}"

    @property
    def redis(self) -> bool:
        return self.workers is not None


def parse_setup(text: str) -> Setup:
    kind, _, count = text.partition(":")
    if kind == "workers" and count.isdigit() and int(count) >= 1:
        return Setup("trio-chat", int(count))
    if text in ("trio-chat", "websockets", "gorilla"):
        return Setup(text)
    raise ValueError(f"unknown server {text!r}: trio-chat, workers:N, websockets or gorilla")


@attrs.frozen
class Load:
    """chatload's options: ``clients`` in one room, ``senders`` of them sending ``msgs``
    messages each at ``rate`` a second; ``wait_s`` for stragglers."""

    clients: int
    senders: int
    rate: float
    msgs: int
    wait_s: float = 10.0

    @property
    def offered(self) -> float:
        return self.clients * self.senders * self.rate

    @property
    def messages(self) -> int:
        return self.senders * self.msgs


@attrs.frozen
class Options:
    chatload: str
    gorilla: str | None
    server_cpus: set[int] | None  # None: nothing pinned
    load_cpus: set[int] | None
    redis_host: str = HOST
    redis_port: int = 6379
    quiet_s: float = 20.0  # wait up to this long for other work on the machine to stop
    keep_logs: Path | None = None


def _pinned(cpus: set[int] | None) -> Any:
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _server(setup: Setup, opts: Options, workdir: Path, channel: str) -> ServerProcess:
    if setup.kind == "gorilla":
        return ServerProcess("gorilla", workdir, opts.server_cpus, port=free_port(),
                             binary=opts.gorilla)
    if setup.kind == "websockets":
        server = ServerProcess("websockets", workdir, opts.server_cpus)
        server.argv += ["--ping-interval", "54"]  # trio-chat's default pingPeriod
        return server
    args = Namespace(config=None, via_redis=setup.redis, redis_host=opts.redis_host,
                     redis_port=opts.redis_port, channel=channel)
    config = workdir / "bench.json"
    config.write_text(json.dumps(fanout_config(args)))
    if setup.workers is None:
        return ServerProcess("trio-chat", workdir, opts.server_cpus, str(config))
    # Workers share one port (SO_REUSEPORT), so it must be named, not 0.
    return ServerProcess("trio-chat", workdir, None, str(config), port=free_port(),
                         workers=setup.workers)


class _Redis:
    """Redis's own CPU and traffic, and who listens on the room's channel."""

    def __init__(self, opts: Options, channel: str) -> None:
        self.args = Namespace(redis_host=opts.redis_host, redis_port=opts.redis_port,
                              channel=channel)
        self.client = redis_client(self.args)
        self.room_channel = f"{channel}:{{{ROOM}}}"

    def sample(self) -> dict[str, float]:
        info = self.client.execute_command("INFO", "cpu", "stats")
        subs = self.client.execute_command("PUBSUB", "SHARDNUMSUB", self.room_channel)
        return {"cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
                "in_bytes": int(info["total_net_input_bytes"]),
                "out_bytes": int(info["total_net_output_bytes"]),
                "subscribers": int(subs[1])}

    def payload_bytes(self) -> int | None:
        """The length of the room's last message as published (its recent list)."""
        last = self.client.lindex(f"{self.args.channel}:{{{ROOM}}}:recent", -1)
        return None if last is None else len(last)

    def close(self) -> None:
        self.client.close()
        redis_cleanup(self.args)


def _sample(t0: float, server_pids: list[int], load_pid: int | None, per_pid_fds: bool
            ) -> dict[str, Any]:
    tree = sample_tree(server_pids)
    load = read_stat(load_pid) if load_pid else None
    busy, total = read_machine()
    sample: dict[str, Any] = {
        "t": time.monotonic() - t0, "server_cpu_s": tree.cpu_s, "server_rss": tree.rss_bytes,
        "load_cpu_s": load.cpu_s if load else 0.0, "busy_s": busy, "total_s": total}
    if per_pid_fds:
        sample["fds"] = {pid: open_fds(pid) for pid in server_pids}
    return sample


def run_case(setup: Setup, load: Load, opts: Options) -> dict[str, Any]:
    """Run chatload once against a fresh ``setup``; the record of what happened."""
    record: dict[str, Any] = {"server": setup.label, **attrs.asdict(load),
                              "offered": load.offered}
    channel = f"bench-chatload-{secrets.token_hex(4)}"
    redis = None
    with tempfile.TemporaryDirectory(prefix="bench_chatload_") as tmp:
        workdir = Path(tmp)
        server = _server(setup, opts, workdir, channel)
        try:
            if setup.redis:
                redis = _Redis(opts, channel)
            server.start()
            assert server.proc is not None
            pids = process_tree(server.proc.pid)
            record["server_pids"] = pids
            record["busy_before"] = wait_quiet(opts.quiet_s)
            path = "/ws" if setup.kind == "gorilla" else f"/ws/{ROOM}"
            _drive(record, load, opts, f"ws://{HOST}:{server.port}{path}", pids, workdir,
                   redis)
            if redis is not None:
                record["redis_payload_bytes"] = redis.payload_bytes()
                record["redis_channel_bytes"] = len(redis.room_channel)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            server.stop()
            counts, samples = server.log_problems()
            record["server_exit"] = server.exit_code
            record["server_log"] = dict(counts)
            record["server_log_samples"] = samples[:5]
            if opts.keep_logs is not None:
                opts.keep_logs.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    (opts.keep_logs / f"{setup.label.replace(':', '-')}.log").write_bytes(
                        server.log_path.read_bytes())
            if redis is not None:
                redis.close()
    return record


def _drive(record: dict[str, Any], load: Load, opts: Options, url: str, pids: list[int],
           workdir: Path, redis: _Redis | None) -> None:
    """Run chatload against ``url``, sampling as it goes; fills in ``record``."""
    argv = [opts.chatload, "-url", url, "-clients", str(load.clients), "-senders",
            str(load.senders), "-rate", f"{load.rate:g}", "-msgs", str(load.msgs),
            "-wait", f"{load.wait_s:g}s"]
    record["chatload_argv"] = argv
    # With Redis, Redis's window starts once the server holds a descriptor per client
    # (the joins and their presence traffic are over): three INFO calls in all, so
    # that their own output is not counted as the room's.
    per_pid_fds = redis is not None or len(pids) > 1
    t0 = time.monotonic()
    samples = [_sample(t0, pids, None, per_pid_fds)]
    redis_samples = {} if redis is None else {"base": redis.sample()}
    # Connecting is sequential (each upgrade awaited): allow 200 a second at worst.
    deadline = t0 + 60 + load.clients / 200 + load.msgs / load.rate + 2 * load.wait_s
    stderr_path = workdir / "chatload.err"
    out = b""
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, preexec_fn=_pinned(opts.load_cpus))
    assert proc.stdout is not None
    try:
        while b"\n" not in out:
            if time.monotonic() > deadline:
                raise RuntimeError(f"chatload still running after {deadline - t0:.0f} s")
            ready, _, _ = select.select([proc.stdout], [], [], SAMPLE_S)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                out += chunk
                if not chunk:
                    break
            samples.append(now := _sample(t0, pids, proc.pid, per_pid_fds))
            if redis is not None and "start" not in redis_samples and (
                    sum(now["fds"].values()) - sum(samples[0]["fds"].values())
                    >= load.clients):
                redis_samples["start"] = redis.sample()
        if redis is not None:
            redis_samples["end"] = redis.sample()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if code != 0 or b"\n" not in out:
        tail = stderr_path.read_text("utf-8", "replace")[-500:]
        raise RuntimeError(f"chatload exited with {code}: {tail.strip()}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    record["chatload"] = result
    start = _send_start(samples, float(result["connect_s"]))
    record["samples"] = {"base": samples[0], "start": start, "end": samples[-1],
                         "peak_server_rss": max(s["server_rss"] for s in samples),
                         "count": len(samples)}
    if redis_samples:
        record["redis"] = redis_samples


def _send_start(samples: list[dict[str, Any]], connect_s: float) -> dict[str, Any]:
    """The last sample before chatload's sends could begin (samples[0] is before it
    started, so at least that one)."""
    limit = samples[0]["t"] + connect_s + SETTLE_S - SAMPLE_S / 2
    return [s for s in samples if s["t"] <= limit][-1]
