"""The chaos run (scripts/chaos.py): each of its checks fails on evidence made to break
it, and a 20-second run against real nodes, Redis and MariaDB passes."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The run's parts are a package of the scripts, which are not installed.
sys.path.insert(0, str(ROOT / "scripts"))

from bench.chaos.checks import (  # noqa: E402
    Verdict,
    check_connections,
    check_deaths,
    check_delivery,
    check_sends,
    check_store,
)
from bench.chaos.clients import Client, Progress, Sent  # noqa: E402
from bench.chaos.common import Clock, Events  # noqa: E402
from bench.chaos.faults import FAULTS, SLOT, schedule  # noqa: E402
from bench.chaos.services import Node  # noqa: E402

ROOM = 101


def world() -> tuple[Any, list[Any], list[tuple[Any, ...]]]:
    """Two members of one room, one per node, each sending three messages that were all
    acked, stored and delivered to both: the evidence of a clean run."""
    events = Events(Clock(t0=0.0))
    nodes = [Node(i, Path("node.json"), Path("."), events) for i in range(2)]
    clients = [Client(i, ROOM, 1000 + i, nodes[i], 1.0, events.clock, Progress())
               for i in range(2)]
    for k in range(6):
        client = clients[k % 2]
        client.sent.append(Sent(f"m{k}", ROOM, client.author, client.node.index,
                                      float(k), acked_id=k + 1, acked_at=k + 0.5))
    for client in clients:
        client.delivered = [(k + 1, f"m{k}", 1000 + k % 2) for k in range(6)]
        client.states = [(-1.0, "connecting", ""), (-0.5, "connected", "")]
    rows = [(ROOM, k + 1, 1000 + k % 2, f"cmid{k}", f"m{k}") for k in range(6)]
    return events, clients, rows


def judge(events: Any, clients: list[Any], rows: list[tuple[Any, ...]]) -> Any:
    verdict = Verdict()
    check_sends(clients, events, verdict)
    check_store(rows, clients, events, verdict)
    check_delivery(clients, events, verdict)
    check_connections(clients, events, verdict)
    check_deaths(events, verdict)
    return verdict


def failed(verdict: Any) -> set[str]:
    return {check for check, _ in verdict.failures}


def test_clean_evidence_passes() -> None:
    verdict = judge(*world())
    assert verdict.passed, verdict.failures
    line = verdict.summary(20, 1, 5)
    assert "acked=6 stored=6 (each once: yes) delivered=12/12" in line
    assert line.endswith("-> PASS")


def test_an_acked_message_missing_from_the_store_fails() -> None:
    events, clients, rows = world()
    verdict = judge(events, clients, rows[:2] + rows[3:])
    assert verdict.lost_acked == 1 and not verdict.stored_ok
    assert failed(verdict) == {"lost_acked"}
    assert verdict.summary(20, 1, 5).endswith("-> FAIL")


def test_an_acked_id_holding_another_message_fails() -> None:
    events, clients, rows = world()
    rows[4] = (ROOM, 5, 1000, "cmid-other", "intruder")
    verdict = judge(events, clients, rows)
    assert verdict.lost_acked == 1
    assert failed(verdict) == {"lost_acked", "stored"}  # and the intruder was never sent


def test_a_message_stored_twice_fails() -> None:
    events, clients, rows = world()
    verdict = judge(events, clients, [*rows, (ROOM, 7, 1000, "cmid0", "m0")])
    assert verdict.duplicates_stored == 1 and not verdict.stored_ok
    assert "duplicates_stored" in failed(verdict)


def test_one_client_msg_id_stored_under_two_contents_fails() -> None:
    events, clients, rows = world()
    verdict = judge(events, clients, [*rows, (ROOM, 7, 1000, "cmid0", "m0 again")])
    assert verdict.duplicates_stored == 1
    assert "duplicates_stored" in failed(verdict)


def test_a_reader_missing_a_message_fails() -> None:
    events, clients, rows = world()
    del clients[1].delivered[2]
    verdict = judge(events, clients, rows)
    assert verdict.delivered == 11 and not verdict.delivered_ok
    assert failed(verdict) == {"delivered"}


def test_a_message_delivered_twice_or_out_of_order_fails() -> None:
    events, clients, rows = world()
    clients[0].delivered.append((7, "m0", 1000))
    clients[1].delivered[1], clients[1].delivered[2] = \
        clients[1].delivered[2], clients[1].delivered[1]
    verdict = judge(events, clients, rows)
    details = " ".join(line for _, line in verdict.failures)
    assert "more than once" in details and "out of order" in details
    assert "different sequences" in details


def test_readers_of_one_room_seeing_different_ids_fails() -> None:
    events, clients, rows = world()
    clients[1].delivered[5] = (9, "m5", 1001)
    verdict = judge(events, clients, rows)
    assert not verdict.delivered_ok
    assert any("another id" in line for _, line in verdict.failures)


def test_unanswered_and_refused_sends_fail() -> None:
    events, clients, rows = world()
    clients[0].sent.append(Sent("m6", ROOM, 1000, 0, 6.0))
    clients[1].sent.append(Sent("m7", ROOM, 1001, 1, 7.0, error="internal"))
    verdict = judge(events, clients, rows)
    assert (verdict.unsettled, verdict.refused) == (1, 1)
    assert failed(verdict) == {"unsettled", "refused"}


@pytest.mark.parametrize("kind", ["node-kill", "node-kill-lagging"])
def test_a_connection_lost_only_when_its_node_is_killed(kind: str) -> None:
    events, clients, rows = world()
    events.windows.append((kind, "node0", 3.0, 5.0))
    for client in clients:
        client.states += [(3.0, "reconnecting", "ConnectionClosed"), (5.5, "resumed", "")]
    verdict = judge(events, clients, rows)
    assert verdict.dropped_connections == 1  # node1's member: its node was fine
    assert "client1" in verdict.failures[0][1]


def test_a_process_dying_on_its_own_fails() -> None:
    events, clients, rows = world()
    events.deaths.append("node1 (pid 1) exited with -9 on its own at 3.0s")
    verdict = judge(events, clients, rows)
    assert verdict.unexpected_deaths == 1 and failed(verdict) == {"unexpected_deaths"}


def test_the_schedule_is_seeded_and_covers_every_fault() -> None:
    plan = schedule(60, FAULTS, seed=7)
    assert plan == schedule(60, FAULTS, seed=7)
    assert plan != schedule(60, FAULTS, seed=8)
    assert sorted(f.kind for f in plan) == sorted(FAULTS)
    for fault, following in itertools.pairwise(plan):
        assert fault.start + fault.length < following.start, "quiet between faults"
    assert plan[-1].start + plan[-1].length < 60
    longer = schedule(120, FAULTS, seed=7)
    assert len(longer) == round((120 - 5) / SLOT) > len(FAULTS)
    assert sorted(f.kind for f in longer[:len(FAULTS)]) == sorted(FAULTS), \
        "every kind before any again"
    assert [f.kind for f in schedule(60, ("node-kill",), seed=7)] == ["node-kill"] * 5
    assert schedule(60, (), seed=7) == []


def test_a_chaos_run_passes() -> None:
    # A subprocess, as it is run by hand: its services, signals and exit status are its own.
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "chaos.py"),
                                "--duration", "20"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it stops every process it started
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        raise AssertionError(f"the chaos run took over 300 s:\n{out}") from None
    assert process.returncode == 0, out
    assert re.search(r"^chaos: duration=20s .* -> PASS$", out, re.MULTILINE), out
