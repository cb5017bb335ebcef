"""bench_chatload's figures and table: what a run's record (``chatload_run``) comes to
per delivery, per member and per message, and the markdown table of a sitting, one
table per scenario. Pure: records in, numbers and text out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Redis's answer to the publish script, {1, id, log entry id}, as RESP2: about this
# many bytes of its output per message besides the pushes to subscribers.
SCRIPT_REPLY_BYTES = 40


def push_bytes(channel_len: int, payload_len: int) -> int:
    """One shard-channel push to a RESP2 subscriber: [smessage, channel, payload]."""
    def bulk(n: int) -> int:
        return 1 + len(str(n)) + 2 + n + 2
    return len("*3\r\n") + bulk(len("smessage")) + bulk(channel_len) + bulk(payload_len)


def _delta(end: dict[str, Any], start: dict[str, Any], key: str) -> float:
    return float(end[key]) - float(start[key])


def figures(record: dict[str, Any]) -> dict[str, Any]:
    """A run's derived figures; only ``server`` and ``error`` if it failed."""
    out: dict[str, Any] = {"server": record["server"], "offered": record["offered"]}
    if record.get("error") or "chatload" not in record:
        out["error"] = record.get("error", "no result")
        return out
    result, samples = record["chatload"], record["samples"]
    base, start, end = samples["base"], samples["start"], samples["end"]
    received = int(result["received"])
    window = max(end["t"] - start["t"], 1e-6)
    server_cpu = _delta(end, start, "server_cpu_s")
    load_cpu = _delta(end, start, "load_cpu_s")
    out.update({
        "achieved": float(result["deliveries_per_s"]), "lost": int(result["lost"]),
        "received": received, "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "max_ms": result["max_ms"], "window_s": window,
        "cpu_us_per_delivery": server_cpu * 1e6 / received if received else None,
        "server_pct": 100 * server_cpu / window, "load_pct": 100 * load_cpu / window,
        "rss_per_member": (start["server_rss"] - base["server_rss"]) / record["clients"],
        "peak_rss": samples["peak_server_rss"],
        "connect_cpu_us_per_client":
            _delta(start, base, "server_cpu_s") * 1e6 / record["clients"],
    })
    other = _delta(end, start, "busy_s") - server_cpu - load_cpu
    if "fds" in start:
        # Descriptors each process gained while chatload connected: its members.
        split = [start["fds"][pid] - base["fds"].get(pid, 0) for pid in start["fds"]]
        out["members_per_process"] = [n for n in split if n > 0]
    if "redis" in record:
        # From when every client was connected (else from before chatload started).
        readings = record["redis"]
        r0, r1 = readings.get("start", readings["base"]), readings["end"]
        out["redis_window_from_connected"] = "start" in readings
        messages = record["senders"] * record["msgs"]
        redis_cpu = r1["cpu_s"] - r0["cpu_s"]
        other -= redis_cpu
        out_per_msg = (r1["out_bytes"] - r0["out_bytes"]) / messages
        out.update({
            "redis_pct": 100 * redis_cpu / window,
            "redis_us_per_msg": redis_cpu * 1e6 / messages,
            "redis_in_per_msg": (r1["in_bytes"] - r0["in_bytes"]) / messages,
            "redis_out_per_msg": out_per_msg,
            "redis_subscribers": max(r0["subscribers"], r1["subscribers"]),
        })
        if record.get("redis_payload_bytes"):
            push = push_bytes(record["redis_channel_bytes"], record["redis_payload_bytes"])
            out["redis_push_bytes"] = push
            out["redis_pushes_per_msg"] = (out_per_msg - SCRIPT_REPLY_BYTES) / push
    out["other_pct"] = 100 * max(other, 0.0) / window
    return out


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None or value < 0:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def scenario_title(clients: int, senders: int, rate: float, msgs: int) -> str:
    offered = clients * senders * rate
    return (f"{clients:,} clients in one room, {senders} senders at {rate:g} msg/s "
            f"({offered:,.0f} deliveries/s offered), {msgs} messages per sender")


def table(records: Iterable[dict[str, Any]]) -> str:
    """One scenario's runs as a markdown table (Redis columns when a run used Redis)."""
    rows = [figures(r) for r in records]
    redis = any("redis_us_per_msg" in f for f in rows)
    head = ["server", "achieved/s", "lost", "p50 ms", "p99 ms", "max ms",
            "CPU µs/delivery", "server CPU", "chatload CPU", "other CPU", "KiB/member"]
    if redis:
        head += ["members per worker", "Redis CPU", "Redis µs/msg", "Redis B in/out per msg",
                 "pushes/msg (subscriptions)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in rows:
        if "error" in f:
            cells = [f["server"], f"error: {f['error']}"] + [""] * (len(head) - 2)
        else:
            cells = [f["server"], _num(f["achieved"]), _num(f["lost"]), _ms(f["p50_ms"]),
                     _ms(f["p99_ms"]), _ms(f["max_ms"]), _num(f["cpu_us_per_delivery"], 2),
                     f"{f['server_pct']:.0f}%", f"{f['load_pct']:.0f}%",
                     f"{f['other_pct']:.0f}%", _num(f["rss_per_member"] / 1024, 1)]
            if redis:
                split = f.get("members_per_process")
                cells.append(" + ".join(map(str, split)) if split else "-")
                if "redis_us_per_msg" in f:
                    cells += [f"{f['redis_pct']:.0f}%", _num(f["redis_us_per_msg"], 1),
                              f"{f['redis_in_per_msg']:,.0f} / {f['redis_out_per_msg']:,.0f}",
                              f"{_num(f.get('redis_pushes_per_msg'), 2)} "
                              f"({f['redis_subscribers']})"]
                else:
                    cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
