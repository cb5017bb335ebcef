"""The fan-out benchmark's statistics and report: latency histograms (fine
buckets up to 100 ms, coarse ones after), a step's verdict and what bound it, and
the printed table and summary."""

from __future__ import annotations

import argparse
import math
from typing import Any

P99_LIMIT_MS = 50.0

# 20 us buckets up to 100 ms, then 1 ms buckets up to 60 s; anything later is the last one.
_FINE_US, _FINE_N = 20, 5000
_COARSE_US, _COARSE_N = 1000, 59_900
HIST_SIZE = _FINE_N + _COARSE_N
BIN_NS = _FINE_US * 1000  # what a receiver counts in; folded into buckets at the end


def bucket(us: int) -> int:
    if us < _FINE_US * _FINE_N:
        return us // _FINE_US if us > 0 else 0
    return min(_FINE_N + (us - _FINE_US * _FINE_N) // _COARSE_US, HIST_SIZE - 1)


def bucket_ms(b: int) -> float:
    """The middle of bucket ``b``, in milliseconds."""
    if b < _FINE_N:
        return (b * _FINE_US + _FINE_US / 2) / 1000
    return (_FINE_US * _FINE_N + (b - _FINE_N) * _COARSE_US + _COARSE_US / 2) / 1000


def percentile(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(total * q))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return bucket_ms(b)
    return bucket_ms(max(hist))


def sparse(hist: list[int]) -> dict[int, int]:
    return {b: n for b, n in enumerate(hist) if n}


def verdict(step: dict[str, Any]) -> list[str]:
    """Why a step fails; empty if it passes."""
    if step.get("error"):
        return [f"error: {step['error']}"]
    why = []
    if step["lost"]:
        why.append(f"lost {step['lost']}")
    limit = step.get("p99_limit", P99_LIMIT_MS)
    if step["p99"] is None or step["p99"] > limit:
        why.append(f"p99>{limit:g}ms")
    if step["violations"]:
        why.append("order")
    if step["mismatched"] and not step["lost"]:
        why.append(f"ids differ on {step['mismatched']} clients")
    for close, n in step["closes"].items():
        why.append(f"closed {close} x{n}")
    if step["dropped"]:
        why.append(f"dropped x{step['dropped']} ({step['client_errors'][0]})"
                   if step["client_errors"] else f"dropped x{step['dropped']}")
    if step["other_frames"]:
        why.append(f"{step['other_frames']} other frames")
    if step["sent_measured"] < step["planned"]:
        why.append(f"{step['planned'] - step['sent_measured']} messages not sent")
    # The generator must have offered what we claim: within 5% of the target rate.
    if step["sent_measured"] > 1 and step["sent_rate"] < 0.95 * step["rate"]:
        why.append(f"generator behind ({step['sent_rate']:.0f} msg/s sent)")
    return why


def bound(step: dict[str, Any]) -> str:
    """Which side ran out of CPU during the measured window: "server", "generator", "both"."""
    cpu = step.get("cpu") or {}
    server, load = cpu.get("server"), cpu.get("load")
    if server is None or load is None:
        return ""
    # Pinned: its cores are (nearly) full. Unpinned: each of its event loops (one per
    # process) is, or the machine is and it used a good part.
    full = (cpu.get("idle") or 0) < 10
    cores = step.get("server_cpus")
    loops = step.get("server_loops") or 1
    server_bound = (server >= 90 * cores if cores
                    else server >= 90 * loops or (full and server >= 50))
    cores = step.get("load_cpus")
    load_bound = load >= 90 * cores if cores else full and load >= 50
    if server_bound and load_bound:
        return "both"
    return "server" if server_bound else "generator" if load_bound else ""


# --- output -----------------------------------------------------------------------------

COLUMNS = (("server", 10), ("msg/s", 6), ("offered/s", 9), ("achieved/s", 10),
           ("p50 ms", 7), ("p99 ms", 7), ("max ms", 7), ("lost", 8), ("order", 5),
           ("srv cpu", 7), ("gen cpu", 7), ("other", 5), ("lag99", 6), ("result", 0))
# With several nodes: latency of receivers on the sender's node and on another node.
SPLIT_COLUMNS = (("same50", 7), ("same99", 7), ("cross50", 7), ("cross99", 7))


def columns(split: bool, redis: bool) -> tuple[tuple[str, int], ...]:
    cols = list(COLUMNS)
    if split:
        at = cols.index(("max ms", 7)) + 1
        cols[at:at] = SPLIT_COLUMNS
    if redis:
        cols.insert(cols.index(("gen cpu", 7)) + 1, ("rds cpu", 7))
    return tuple(cols)


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_header(cols: tuple[tuple[str, int], ...] = COLUMNS) -> None:
    print(" ".join(name.rjust(w) if w else name for name, w in cols), flush=True)


def print_row(step: dict[str, Any], note: str = "",
              cols: tuple[tuple[str, int], ...] = COLUMNS) -> None:
    why = verdict(step)
    cpu = step.get("cpu") or {}
    error = bool(step.get("error"))

    def ms(key: str, spec: str = ".2f") -> str:
        return "-" if error else _fmt(step.get(key), spec)

    cells = {"server": step["server"], "msg/s": f"{step['rate']:.0f}",
             "offered/s": f"{step['offered']:.0f}",
             "achieved/s": "-" if error else f"{step['achieved']:.0f}",
             "p50 ms": ms("p50"), "p99 ms": ms("p99"), "max ms": ms("max", ".1f"),
             "same50": ms("same_p50"), "same99": ms("same_p99"),
             "cross50": ms("cross_p50"), "cross99": ms("cross_p99"),
             "lost": "-" if error else str(step["lost"]),
             "order": "-" if error else str(step["violations"]),
             "srv cpu": _fmt(cpu.get("server"), ".0f") + "%",
             "gen cpu": _fmt(cpu.get("load"), ".0f") + "%",
             "rds cpu": _fmt(cpu.get("redis"), ".0f") + "%",
             "other": _fmt(cpu.get("other"), ".0f") + "%",
             "lag99": ms("lag_p99", ".1f"),
             "result": ("pass" if not why else "FAIL " + ", ".join(why)) + _bound_note(step)
             + note}
    print(" ".join(cells[name].rjust(w) if w else cells[name] for name, w in cols),
          flush=True)
    if step.get("other_samples"):
        print(f"    unexpected frames, e.g. {step['other_samples'][0]}", flush=True)


def _bound_note(step: dict[str, Any]) -> str:
    which = bound(step)
    return f" [cpu-bound: {which}]" if which else ""


def summary_part(name: str, outcome: dict[str, Any], args: argparse.Namespace) -> str:
    if outcome.get("interrupted"):
        name += " (interrupted)"
    if outcome.get("error"):
        return f"{name} error: {outcome['error']}"
    best = outcome.get("best")
    if args.rate is not None:
        step = outcome["steps"][-1] if outcome["steps"] else None
        if step is None or step.get("error"):
            return f"{name} error: {step.get('error') if step else 'no run'}"
        why = verdict(step)
        return (f"{name} {step['rate']:.0f} msg/s: offered {step['offered']:.0f}, achieved "
                f"{step['achieved']:.0f} deliveries/s p50 {_fmt(step['p50'], '.2f')} ms "
                f"p99 {_fmt(step['p99'], '.1f')} ms lost {step['lost']} "
                f"({'pass' if not why else 'FAIL ' + ', '.join(why)}){_hop(step)}")
    if best is None:
        if not outcome["steps"]:
            return f"{name}: no steps"
        first = outcome["steps"][0]
        return (f"{name} max: none passed (at {first['rate']:.0f} msg/s: "
                f"{', '.join(verdict(first))})")
    limit = outcome.get("limit")
    suffix = ""
    if limit:
        suffix = (f", next {limit['rate']:.0f} msg/s: {', '.join(verdict(limit))}"
                  f"{_bound_note(limit)}")
    elif outcome.get("ladder_exhausted"):
        suffix = ", top of the ladder"
    return (f"{name} max {best['offered']:.0f} deliveries/s ({best['rate']:.0f} msg/s) "
            f"p99 {_fmt(best['p99'], '.1f')} ms lost {best['lost']}{_hop(best)}{suffix}")


def _hop(step: dict[str, Any]) -> str:
    """What the cross-node hop adds, when receivers were on several nodes."""
    same, cross = step.get("same_p50"), step.get("cross_p50")
    if same is None or cross is None:
        return ""
    return (f"; same-node p50 {same:.2f} p99 {_fmt(step['same_p99'], '.1f')} ms, "
            f"cross-node p50 {cross:.2f} p99 {_fmt(step['cross_p99'], '.1f')} ms: "
            f"the hop adds {cross - same:+.2f} ms at p50")
