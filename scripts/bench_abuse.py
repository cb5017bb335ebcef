#!/usr/bin/env python3
"""Hostile clients (issue 16), measured: is everyone else served while each attack runs,
and what does the attack make the server hold?

Starts the trio-chat of a given venv or checkout with its default configuration
(only the port and a temporary SQLite file are set; the abuse limits stay as
shipped), once per attack, and runs the attacks of scripts/bench/abuse.py one at
a time. Meanwhile a probe process from 127.0.0.2 times, every ``--interval``, a
``/healthz`` answer and a chat message's round trip (issue 16 asks for both
within 100 ms), and the server's resident memory (VmRSS) is read every 20 ms.
For each attack one line: the probe's p50/p99/max of each over the attack's
window (a probe that waited :data:`~bench.abuse.PROBE_TIMEOUT` counts as that),
the event loop's worst lag in the window from ``/metrics`` (builds that have
``triochat_event_loop_lag_seconds``; its histogram bucket, sampled every 250 ms),
the peak RSS growth over the RSS before the attack, the growth left
``--settle`` seconds after the attacker is gone, and what the server answered
the attacker (HTTP statuses, close codes; ``EOF`` closed without a close frame,
``open`` still open), and how many connections the kernel dropped at a full
accept queue meanwhile (anyone's: a probe whose SYN is dropped waits 1 s or 3 s).

The resume attack needs a history: it is written first by a server of the same
build with the message rate limits lifted (keys the build does not know are left
out), then the measured server starts on that file with the defaults.

Usage::

    .venv/bin/python scripts/bench_abuse.py --checkout /work/wt-old --label old
    .venv/bin/python scripts/bench_abuse.py --trio-chat .venv/bin/trio-chat --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio
from bench import abuse, servers
from bench.rawclient import connect_from, get

LAG = re.compile(r'^triochat_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)
FILL_LIMITS = {"messagesPerSecond": 1_000_000, "messageBurst": 1_000_000,
               "identityMessagesPerSecond": 1_000_000, "identityMessageBurst": 1_000_000}


def known_keys(exe: Path) -> str:
    """The build's config module as text, to leave out keys it does not have."""
    python = exe.parent / "python"
    where = subprocess.run([str(python), "-c", "import trio_chat.config as c; print(c.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return Path(where).read_text()


def start(exe: Path, workdir: Path, db: Path, config: dict[str, Any] | None,
          cpus: set[int] | None, tag: str) -> servers.ServerProcess:
    server = servers.ServerProcess("trio-chat", workdir, cpus, tag=tag)
    extra: list[str] = []
    if config is not None:
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps(config))
        extra = [str(path)]
    server.argv = [str(exe), "serve", *extra, "--port", "0", "--sqlite", str(db)]
    server.start()
    return server


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def listen_drops() -> int:
    """The kernel's count of connections dropped at a full accept queue (all sockets:
    a SYN dropped there is retried after 1 s, then 3 s)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenDrops"])
    return 0


def fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError("no open-file limit")


class RssSampler(threading.Thread):
    """VmRSS every 20 ms, as (monotonic time, KiB)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid)))
            except (OSError, RuntimeError):
                return


def lag_buckets(port: int) -> dict[float, float] | None:
    """The loop-lag histogram's cumulative buckets, or None without one."""
    try:
        text = trio.run(_get_text, port)
    except (OSError, ConnectionError, ValueError):
        return None
    buckets = {float(le): float(n) for le, n in LAG.findall(text)}
    return buckets or None


async def _get_text(port: int) -> str:
    stream = await connect_from(port)
    async with stream:
        await stream.send_all(get("/metrics"))
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


def worst_lag(before: dict[float, float] | None, after: dict[float, float] | None
              ) -> float | None:
    """The upper bound of the bucket that holds the worst lag observed in between."""
    if before is None or after is None:
        return None
    gained = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = max(gained.values())
    return min((le for le, n in gained.items() if n >= total), default=None) if total else 0.0


def stats(values: list[float | None]) -> dict[str, Any]:
    done = sorted(v for v in values if v is not None)
    if not done:
        return {"n": 0, "failed": len(values)}

    def at(q: float) -> float:
        return 1000 * done[min(len(done) - 1, int(q * len(done)))]

    return {"n": len(done), "failed": len(values) - len(done), "p50": at(0.5),
            "p99": at(0.99), "max": 1000 * done[-1],
            "timeouts": sum(v >= abuse.PROBE_TIMEOUT for v in done)}


def measure(name: str, exe: Path, db: Path, workdir: Path, args: argparse.Namespace,
            cpus: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    label, attack = abuse.ATTACKS[name]
    server = start(exe, workdir, db, None, cpus[0] if cpus else None, name)
    pid = server.proc.pid if server.proc else 0
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    probe = ctx.Process(target=abuse.probe_process, args=(child, server.port, args.interval),
                        daemon=True, name="bench-abuse-probe")
    sampler = RssSampler(pid)
    result: dict[str, Any] = {"attack": name, "what": label}
    try:
        probe.start()
        if not pipe.poll(30) or pipe.recv() != "ready":
            raise RuntimeError("the probe did not connect")
        sampler.start()
        time.sleep(1.0)  # the probe's first samples, and the RSS before
        base = max(kib for t, kib in sampler.samples[-10:])
        lag_before = lag_buckets(server.port)
        if name == "halfopen":  # past the server's descriptors, unless it refuses them
            attack = functools.partial(abuse.half_open_requests, most=fd_limit(pid) + 500)
        drops = listen_drops()
        started = time.monotonic()
        result["answer"] = trio.run(attack, server.port, args.hold)
        ended = time.monotonic()
        result["listen_drops"] = listen_drops() - drops
        time.sleep(args.settle)
        result["lag_max_ms"] = (None if (lag := worst_lag(lag_before, lag_buckets(server.port)))
                                is None else 1000 * lag)
        sampler.done.set()
        sampler.join()
        after = rss_kib(pid)
        pipe.send("stop")
        samples = pipe.recv() if pipe.poll(30) else []
        window = [s for s in samples if started <= s[0] <= ended]
        result.update(
            window_s=ended - started, alive=server.alive,
            healthz=stats([s[1] for s in window]), round_trip=stats([s[2] for s in window]),
            rss_base_mib=base / 1024,
            rss_peak_mib=(max(kib for t, kib in sampler.samples if t >= started) - base) / 1024,
            rss_after_mib=(after - base) / 1024)
    finally:
        sampler.done.set()
        server.stop()
        probe.join(10)
        if probe.is_alive():
            probe.kill()
    return result


def fmt(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return f"{'all ' + str(s.get('failed', 0)) + ' failed':>17}"
    text = f"{s['p50']:5.1f}/{s['p99']:5.0f}/{s['max']:5.0f}"
    return text + (f" ({s['failed']} failed)" if s["failed"] else "")


def print_row(r: dict[str, Any]) -> None:
    lag = "-" if r.get("lag_max_ms") is None else f"≤{r['lag_max_ms']:g}"
    print(f"{r['attack']:10} {fmt(r['healthz']):>17} {fmt(r['round_trip']):>17} {lag:>7} "
          f"{r['rss_peak_mib']:+8.1f} {r['rss_after_mib']:+8.1f} {r['listen_drops']:6}  "
          f"{r['answer']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    build = parser.add_mutually_exclusive_group(required=True)
    build.add_argument("--trio-chat", type=Path, help="the trio-chat executable of a venv")
    build.add_argument("--checkout", type=Path, help="a checkout with its .venv")
    parser.add_argument("--label", default="", help="names the build in the output")
    parser.add_argument("--attacks", default=",".join(abuse.ATTACKS),
                        help=f"comma-separated, of {', '.join(abuse.ATTACKS)}")
    parser.add_argument("--hold", type=float, default=4.0,
                        help="seconds each attack holds what it opened")
    parser.add_argument("--interval", type=float, default=0.025, help="probe interval, s")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after an attack before the RSS after is read")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave server and clients to the scheduler")
    args = parser.parse_args()
    exe = (args.trio_chat or args.checkout / ".venv" / "bin" / "trio-chat").absolute()
    names = [n for n in args.attacks.split(",") if n]
    unknown = set(names) - set(abuse.ATTACKS)
    if unknown:
        parser.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    cpus = servers.split_cpus(args.pin)
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_abuse_"))
    try:
        db = workdir / "chat.db"
        if "resume" in names:
            keys = known_keys(exe)
            config = {"limits": {k: v for k, v in FILL_LIMITS.items() if f'"{k}"' in keys}}
            filler = start(exe, workdir, db, config, None, "fill")
            try:
                trio.run(abuse.fill_history, filler.port)
            finally:
                filler.stop()
        print(f"# {args.label or exe}: default configuration; probe from "
              f"{abuse.PROBE_SOURCE} every {1000 * args.interval:g} ms; hold {args.hold:g} s")
        print("# healthz and round trip: p50/p99/max ms; RSS: MiB over the RSS before")
        print(f"{'attack':10} {'healthz ms':>17} {'round trip ms':>17} {'lag ms':>7} "
              f"{'RSS peak':>8} {'RSS after':>8} {'drops':>6}  answer")
        for name in names:
            result = measure(name, exe, db, workdir, args, cpus)
            results.append(result)
            print_row(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"build": args.label or str(exe), "hold": args.hold,
                                         "interval": args.interval, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
