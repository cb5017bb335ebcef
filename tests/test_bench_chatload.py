"""bench_chatload's pure parts: reading /proc (a process's stat line, the machine's,
a process tree), a run's derived figures, the size of a Redis push (against a real
Redis), and the markdown table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REDIS_PORT

ROOT = Path(__file__).resolve().parent.parent
# The benchmark's parts are a package of the scripts, which are not installed.
sys.path.insert(0, str(ROOT / "scripts"))

from bench.chatload_report import (  # noqa: E402
    SCRIPT_REPLY_BYTES,
    figures,
    push_bytes,
    table,
)
from bench.procstat import (  # noqa: E402
    PAGE_BYTES,
    TICK_S,
    ProcStat,
    descendants,
    parse_machine,
    parse_stat,
    process_tree,
    read_stat,
    sum_stats,
)


def test_stat_line_with_parentheses_and_spaces_in_the_name() -> None:
    fields = ["S", "41", *["0"] * 9, "250", "50", *["0"] * 8, "1000", *["0"] * 20]
    stat = parse_stat("1234 (a) (b c) " + " ".join(fields) + "\n")
    assert stat == ProcStat(pid=1234, ppid=41, utime_ticks=250, stime_ticks=50,
                            rss_pages=1000)
    assert stat.cpu_s == pytest.approx(300 * TICK_S)
    assert stat.rss_bytes == 1000 * PAGE_BYTES
    with pytest.raises(ValueError):
        parse_stat("garbage")


def test_own_stat_and_a_child_in_the_tree() -> None:
    own = read_stat(os.getpid())
    assert own is not None and own.pid == os.getpid() and own.ppid == os.getppid()
    assert own.rss_bytes > 0
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert os.getppid() not in tree
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert read_stat(child.pid) is None


def test_descendants_and_sums() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1}
    assert descendants(parents, 10) == [10, 11, 12, 13]
    assert descendants(parents, 20) == [20]
    total = sum_stats([ProcStat(10, 1, 100, 20, 5), ProcStat(11, 10, 30, 0, 7),
                       ProcStat(10, 1, 100, 20, 5)])
    assert total.cpu_s == pytest.approx(150 * TICK_S)
    assert total.rss_bytes == 12 * PAGE_BYTES
    assert sorted(total.per_pid) == [10, 11]


def test_machine_busy_leaves_out_idle_and_iowait() -> None:
    busy, total = parse_machine("cpu  100 5 50 1000 40 3 2 0 7 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert busy == pytest.approx(160 * TICK_S)
    assert total == pytest.approx(1200 * TICK_S)
    with open("/proc/stat") as f:
        busy, total = parse_machine(f.read())
    assert 0 < busy < total


def _sample(t: float, cpu: float, rss: int, load: float, busy: float, **extra: Any
            ) -> dict[str, Any]:
    return {"t": t, "server_cpu_s": cpu, "server_rss": rss, "load_cpu_s": load,
            "busy_s": busy, "total_s": 0.0, **extra}


def _record(redis: bool) -> dict[str, Any]:
    extra_base: dict[str, Any] = {}
    extra_start: dict[str, Any] = {}
    extra_end: dict[str, Any] = {}
    if redis:
        extra_base = {"fds": {7: 20, 8: 30, 9: 30}}
        extra_start = {"fds": {7: 20, 8: 530, 9: 530}}
        extra_end = {"fds": {7: 20, 8: 530, 9: 530}}
    record: dict[str, Any] = {
        "server": "workers:2" if redis else "trio-chat", "clients": 1000, "senders": 10,
        "msgs": 100, "offered": 200_000.0,
        "chatload": {"received": 1_000_000, "lost": 0, "deliveries_per_s": 199_000.0,
                     "p50_ms": 3.5, "p99_ms": 45.25, "max_ms": 120.0, "connect_s": 1.2},
        "samples": {"base": _sample(0.0, 1.0, 50_000_000, 0.0, 100.0, **extra_base),
                    "start": _sample(1.5, 1.4, 60_240_000, 0.3, 102.0, **extra_start),
                    "end": _sample(6.5, 4.4, 70_000_000, 3.3, 110.0, **extra_end),
                    "peak_server_rss": 71_000_000},
        "redis_payload_bytes": 250, "redis_channel_bytes": 25}
    if redis:
        record["redis"] = {
            "base": {"cpu_s": 0.2, "in_bytes": 0, "out_bytes": 0, "subscribers": 0},
            "start": {"cpu_s": 1.0, "in_bytes": 0, "out_bytes": 1000, "subscribers": 2},
            "end": {"cpu_s": 1.5, "in_bytes": 500_000, "out_bytes": 1_001_000,
                    "subscribers": 2}}
    return record


def test_figures_per_delivery_member_and_message() -> None:
    f = figures(_record(redis=False))
    assert f["cpu_us_per_delivery"] == pytest.approx(3.0)  # 3 s over 1,000,000
    assert f["server_pct"] == pytest.approx(60.0)  # 3 s over 5 s
    assert f["load_pct"] == pytest.approx(60.0)
    assert f["other_pct"] == pytest.approx(40.0)  # 8 busy - 3 - 3 = 2 s over 5 s
    assert f["rss_per_member"] == pytest.approx(10_240.0)
    assert f["connect_cpu_us_per_client"] == pytest.approx(400.0)
    assert "redis_us_per_msg" not in f and "members_per_process" not in f

    f = figures(_record(redis=True))
    assert f["members_per_process"] == [500, 500]
    assert f["redis_us_per_msg"] == pytest.approx(500.0)  # 0.5 s over 1,000 messages
    assert f["redis_in_per_msg"] == pytest.approx(500.0)
    assert f["redis_out_per_msg"] == pytest.approx(1000.0)
    assert f["redis_pushes_per_msg"] == pytest.approx(
        (1000 - SCRIPT_REPLY_BYTES) / push_bytes(25, 250))
    assert f["other_pct"] == pytest.approx(30.0)  # Redis's 0.5 s is not "other"
    assert f["redis_subscribers"] == 2 and f["redis_window_from_connected"]

    assert figures({"server": "gorilla", "offered": 1.0, "error": "boom"}) == {
        "server": "gorilla", "offered": 1.0, "error": "boom"}


def test_table_has_redis_columns_only_with_redis() -> None:
    plain = table([_record(redis=False),
                   {"server": "gorilla", "offered": 1.0, "error": "no listen"}])
    lines = plain.splitlines()
    assert len(lines) == 4 and "Redis" not in lines[0]
    assert lines[2].startswith("| trio-chat | 199,000 | 0 | 3.5 | 45.2 | 120 | 3.00 | 60% |")
    assert "error: no listen" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    mixed = table([_record(redis=False), _record(redis=True)]).splitlines()
    assert "pushes/msg" in mixed[0]
    pushes = (1000 - SCRIPT_REPLY_BYTES) / push_bytes(25, 250)
    assert f"| 500 + 500 | 10% | 500.0 | 500 / 1,000 | {pushes:.2f} (2) |" in mixed[3]
    assert all(line.count("|") == mixed[0].count("|") for line in mixed)


def _read_until(sock: socket.socket, buffer: bytes, end: bytes) -> bytes:
    while not buffer.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"Redis closed the connection after {buffer!r}"
        buffer += chunk
    return buffer


def test_push_size_is_what_redis_sends_a_subscriber(channel: str) -> None:
    room_channel = f"{channel}:{{1}}"
    payload = '{"id":1,"content":"' + "x" * 211 + '"}'
    subscriber = socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=10)
    publisher = socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=10)
    try:
        subscriber.sendall(f"SSUBSCRIBE {room_channel}\r\n".encode())
        _read_until(subscriber, b"", b":1\r\n")  # [ssubscribe, channel, 1]
        command = (f"*3\r\n$8\r\nSPUBLISH\r\n${len(room_channel)}\r\n{room_channel}\r\n"
                   f"${len(payload)}\r\n{payload}\r\n")
        publisher.sendall(command.encode())
        assert _read_until(publisher, b"", b"\r\n") == b":1\r\n"
        push = _read_until(subscriber, b"", payload.encode() + b"\r\n")
    finally:
        subscriber.close()
        publisher.close()
    assert len(push) == push_bytes(len(room_channel), len(payload))
