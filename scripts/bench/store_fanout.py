"""The history store benchmark's fan-out part: ``bench_fanout.py`` run against
trio-chat with each store, and what a store costs the fan-out."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.store_load import fmt, reset_mysql

FANOUT = ROOT / "scripts" / "bench_fanout.py"
FANOUT_DATABASE = "trio_chat_bench_fanout"
FANOUT_TIMEOUT = 300.0  # one fixed-rate bench_fanout.py run
FANOUT_SEARCH_TIMEOUT = 1800.0  # one bench_fanout.py search


def run_fanout(args: argparse.Namespace, config: str | None, search: bool) -> dict[str, Any]:
    """One ``bench_fanout.py`` run against trio-chat; its output is echoed, its JSON parsed."""
    label = "mysql" if config else "embedded"
    cmd = [sys.executable, str(FANOUT), "--server", "trio-chat", "--json"]
    if search:
        cmd += ["--quick"] if args.quick else []
    else:
        cmd += ["--rate", f"{args.fanout_rate:g}", "--duration", f"{args.fanout_duration:g}"]
    if config:
        cmd += ["--config", config]
    print(f"# fanout ({label}): {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    found: list[Any] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
                continue
            if line.startswith(("# fan-out:", "# latency:", "# srv/gen")):
                continue  # the same preamble every time
            print(f"  | {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timeout = FANOUT_SEARCH_TIMEOUT if search else FANOUT_TIMEOUT
    error = None
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        error = f"bench_fanout.py did not finish within {timeout:g} s"
        proc.send_signal(signal.SIGTERM)  # it stops its server on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    out: dict[str, Any] = {"store": label, "search": search, "exit": proc.returncode,
                           "error": error}
    outcome = found[-1]["results"].get("trio-chat", {}) if found else {}
    if not outcome:
        out["error"] = error or f"no results (exit code {proc.returncode})"
        return out
    if outcome.get("error"):
        out["error"] = outcome["error"]
    if search:
        best = outcome.get("best")
        out.update(best_rate=best["rate"] if best else None,
                   best_deliveries=best["offered"] if best else None,
                   p99=best["p99"] if best else None)
        return out
    step = outcome["steps"][-1] if outcome.get("steps") else {}
    cpu = step.get("cpu") or {}
    out.update(rate=step.get("rate"), achieved=step.get("achieved"), p50=step.get("p50"),
               p99=step.get("p99"), lost=step.get("lost"), server_cpu=cpu.get("server"))
    if step.get("error"):
        out["error"] = step["error"]
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def bench_fanout(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"rate": args.fanout_rate, "runs": [], "search": []}
    with tempfile.TemporaryDirectory(prefix="bench_store_fanout_") as tmp:
        config = Path(tmp) / "mysql.json"
        config.write_text(json.dumps({"db": {
            "host": args.mysql_host, "port": args.mysql_port, "id": args.mysql_user,
            "password": args.mysql_password, "database": FANOUT_DATABASE}}))
        # Alternate the two stores so drift on a shared machine hits both alike.
        for _ in range(args.fanout_repeats):
            for use_mysql in (False, True):
                if use_mysql:
                    reset_mysql(args, FANOUT_DATABASE)
                result["runs"].append(run_fanout(args, str(config) if use_mysql else None,
                                                 search=False))
        if args.fanout_search:
            for use_mysql in (False, True):
                if use_mysql:
                    reset_mysql(args, FANOUT_DATABASE)
                result["search"].append(run_fanout(args, str(config) if use_mysql else None,
                                                   search=True))
    for label in ("embedded", "mysql"):
        runs = [r for r in result["runs"] if r["store"] == label and not r["error"]]
        result[label] = {
            "achieved": _mean([r["achieved"] for r in runs]),
            "p99": _mean([r["p99"] for r in runs]),
            "server_cpu": _mean([r["server_cpu"] for r in runs]),
            "lost": sum(r["lost"] or 0 for r in runs), "runs": len(runs)}
    e, m = result["embedded"]["achieved"], result["mysql"]["achieved"]
    result["change_pct"] = 100 * (m / e - 1) if e and m else None
    searched = {r["store"]: r for r in result["search"]}
    se = (searched.get("embedded") or {}).get("best_deliveries")
    sm = (searched.get("mysql") or {}).get("best_deliveries")
    result["search_change_pct"] = 100 * (sm / se - 1) if se and sm else None
    return result


def print_fanout(f: dict[str, Any]) -> None:
    print(f"{'fanout':>8} {'msg/s':>6} {'deliveries/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'lost':>6} {'srv cpu':>7}", flush=True)
    for r in f["runs"]:
        if r["error"]:
            print(f"{r['store']:>8} {fmt(r.get('rate'), '.0f'):>6} error: {r['error']}")
            continue
        print(f"{r['store']:>8} {r['rate']:>6.0f} {r['achieved']:>12.0f} {fmt(r['p50'], '.2f'):>7} "
              f"{fmt(r['p99'], '.2f'):>7} {r['lost']:>6} {fmt(r['server_cpu'], '.0f'):>6}%",
              flush=True)
    for label in ("embedded", "mysql"):
        s = f[label]
        print(f"{label:>8} mean of {s['runs']}: {fmt(s['achieved'], '.0f')} deliveries/s, "
              f"p99 {fmt(s['p99'], '.1f')} ms, server cpu {fmt(s['server_cpu'], '.0f')}%",
              flush=True)
    for r in f["search"]:
        print(f"{r['store']:>8} search: "
              + (f"error: {r['error']}" if r["error"] and not r.get("best_rate") else
                 f"max {fmt(r['best_deliveries'], '.0f')} deliveries/s "
                 f"({fmt(r['best_rate'], '.0f')} msg/s), p99 {fmt(r['p99'], '.1f')} ms"),
              flush=True)
