"""The verdict: what must hold after a chaos run (every ack stored once, delivered
in order to every member, connections back, deaths explained) and the evidence."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import attrs

from bench.chaos.clients import Client, Sent
from bench.chaos.common import Events


@attrs.define
class Verdict:
    sent: int = 0
    acked: int = 0
    stored: int = 0
    delivered: int = 0
    deliveries_expected: int = 0
    refused_and_resent: int = 0
    unsettled: int = 0
    refused: int = 0
    lost_acked: int = 0
    duplicates_stored: int = 0
    dropped_connections: int = 0
    leaked_tasks: int = 0
    unexpected_deaths: int = 0
    stored_ok: bool = True
    delivered_ok: bool = True
    # What failed, with evidence: (check, line).
    failures: list[tuple[str, str]] = attrs.field(factory=list)

    def fail(self, check: str, line: str) -> None:
        self.failures.append((check, line))

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self, duration: float, seed: int, faults: int) -> str:
        def yes(ok: bool) -> str:
            return "yes" if ok else "NO"

        return (f"chaos: duration={duration:g}s seed={seed} faults={faults} sent={self.sent} "
                f"acked={self.acked} stored={self.stored} (each once: {yes(self.stored_ok)}) "
                f"delivered={self.delivered}/{self.deliveries_expected} (each reader once, "
                f"in one order per room: {yes(self.delivered_ok)}) "
                f"refused_and_resent={self.refused_and_resent} unsettled={self.unsettled} "
                f"refused={self.refused} lost_acked={self.lost_acked} "
                f"duplicates_stored={self.duplicates_stored} "
                f"dropped_connections={self.dropped_connections} "
                f"leaked_tasks={self.leaked_tasks} "
                f"unexpected_deaths={self.unexpected_deaths} -> "
                + ("PASS" if self.passed else "FAIL"))


def check_sends(clients: list[Client], events: Events, v: Verdict) -> None:
    for client in clients:
        v.refused_and_resent += len(client.resends)
        for sent in client.sent:
            v.sent += 1
            if sent.acked_id is not None:
                v.acked += 1
            elif sent.error is not None:
                v.refused += 1
                v.fail("refused", f"{client.name} {sent.content!r} refused with "
                       f"{sent.error}, sent at {sent.started:.1f}s "
                       f"({events.around(sent.started)})")
            else:
                v.unsettled += 1
                v.fail("unsettled", f"{client.name} {sent.content!r} never answered, sent at "
                       f"{sent.started:.1f}s ({events.around(sent.started)})")
    ids: dict[tuple[int, int], list[Sent]] = defaultdict(list)
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                ids[sent.room, sent.acked_id].append(sent)
    for (room, mid), sents in ids.items():
        if len(sents) > 1:
            v.fail("one id, one message", f"room {room} id {mid} acked for "
                   f"{[s.content for s in sents]}")


def check_store(rows: list[tuple[Any, ...]], clients: list[Client], events: Events,
                v: Verdict) -> None:
    """``rows``: (room_id, id, author_id, client_msg_id, content) of the run's rooms."""
    by_key = {(room, mid): content for room, mid, _, _, content in rows}
    # Every send has its own content and client_msg_id: a second row with either is a
    # message stored twice.
    by_content: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_cmid: dict[tuple[int, int, str], list[tuple[int, int]]] = defaultdict(list)
    for room, mid, author, cmid, content in sorted(rows, key=lambda r: (r[0], r[1])):
        by_content[content].append((room, mid))
        if cmid is not None:
            by_cmid[room, author, cmid].append((room, mid))
    extra = {key for keys in (*by_content.values(), *by_cmid.values()) for key in keys[1:]}
    v.duplicates_stored = len(extra)
    sends = {s.content: s for c in clients for s in c.sent}
    for content, keys in by_content.items():
        sent = sends.get(content)
        if len(keys) > 1:
            when = (f"sent at {sent.started:.1f}s ({events.around(sent.started)})"
                    if sent else "not sent by this run")
            v.fail("duplicates_stored", f"{content!r} stored {len(keys)} times as {keys}; "
                   f"{when}")
        if sent is None:
            v.fail("stored", f"{content!r} stored as {keys} but never sent by this run")
        elif sent.acked_id is None and sent.error is not None:
            v.fail("stored", f"{content!r} stored as {keys} though refused with {sent.error}")
    for (room, author, cmid), keys in by_cmid.items():
        if len(keys) > 1 and len({by_key[k] for k in keys}) > 1:
            v.fail("duplicates_stored", f"room {room} author {author} client_msg_id {cmid} "
                   f"stored as {keys} with different contents")
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is None:
                continue
            content = by_key.get((sent.room, sent.acked_id))
            if content == sent.content and len(by_content[content]) == 1:
                v.stored += 1
                continue
            v.lost_acked += content != sent.content
            where = (f"acked at {sent.acked_at:.1f}s by {client.node.name} "
                     f"({events.around(sent.acked_at or 0.0)}), sent at {sent.started:.1f}s"
                     f"{client.journey(sent)}")
            if content is None:
                v.fail("lost_acked", f"room {sent.room} id {sent.acked_id} {sent.content!r} "
                       f"not stored; {where}")
            elif content != sent.content:
                v.fail("lost_acked", f"room {sent.room} id {sent.acked_id} acked for "
                       f"{sent.content!r} holds {content!r}; {where}")
    v.stored_ok = v.stored == v.acked and v.duplicates_stored == 0 and not any(
        check == "stored" for check, _ in v.failures)


def check_delivery(clients: list[Client], events: Events, v: Verdict) -> None:
    acked: dict[int, dict[str, int]] = defaultdict(dict)  # room -> content -> id
    sends = {s.content: s for c in clients for s in c.sent}
    for client in clients:
        for sent in client.sent:
            if sent.acked_id is not None:
                acked[sent.room][sent.content] = sent.acked_id
    ok = True
    for client in clients:
        room_acked = acked[client.room]
        v.deliveries_expected += len(room_acked)
        ids_of: dict[str, list[int]] = defaultdict(list)
        for mid, content, _ in client.delivered:
            ids_of[content].append(mid)
        missing, moved = [], []
        for content, mid in room_acked.items():
            if ids_of.get(content) == [mid]:
                v.delivered += 1
            elif content not in ids_of:
                missing.append((mid, content))
            else:
                moved.append((mid, content, ids_of[content]))
        twice = [(ids, c) for c, ids in ids_of.items() if len(ids) > 1]
        strange = [(ids, c) for c, ids in ids_of.items() if c not in room_acked]
        ids = [mid for mid, _, _ in client.delivered]
        backwards = [(a, b) for a, b in itertools.pairwise(ids) if b <= a]
        resets = [f"{t:.1f}s" for t, state, _ in client.states if state == "reset"]
        for label, items in (("missing", sorted(missing)), ("delivered at another id", moved),
                             ("delivered more than once", twice), ("not acked", strange)):
            if items:
                ok = False
                sent = sends.get(items[0][1])
                when = (f"; the first sent at {sent.started:.1f}s "
                        f"({events.around(sent.started)})" if sent else "")
                v.fail("delivered", f"{client.name}: {len(items)} {label}, e.g. "
                       f"{items[:4]}{when}" + (f"; history resets at {resets}" if resets else ""))
        if backwards:
            ok = False
            v.fail("delivered", f"{client.name}: ids out of order {backwards[:4]}")
    rooms: dict[int, list[Client]] = defaultdict(list)
    for client in clients:
        rooms[client.room].append(client)
    for room, members in rooms.items():
        first = [(mid, c) for mid, c, _ in members[0].delivered]
        for other in members[1:]:
            seq = [(mid, c) for mid, c, _ in other.delivered]
            if seq != first:
                ok = False
                at = next((i for i, (x, y) in enumerate(zip(first, seq, strict=False))
                           if x != y), min(len(first), len(seq)))
                v.fail("delivered", f"room {room}: {members[0].name} and {other.name} saw "
                       f"different sequences from position {at}: {first[at:at + 3]} vs "
                       f"{seq[at:at + 3]} (lengths {len(first)}, {len(seq)})")
    v.delivered_ok = ok and v.delivered == v.deliveries_expected


def check_connections(clients: list[Client], events: Events, v: Verdict) -> None:
    """A connection may be lost when its own node is killed, and for nothing else: with
    Redis or the database down, members stay connected (and can read)."""
    for client in clients:
        previous = ""
        for t, state, detail in client.states:
            if (state == "reconnecting" and previous in ("connected", "resumed")
                    and not events.node_down(client.node.name, t)):
                v.dropped_connections += 1
                v.fail("dropped_connections", f"{client.name} lost its connection at "
                       f"{t:.1f}s ({events.around(t)}): {detail}")
            previous = state


def check_deaths(events: Events, v: Verdict) -> None:
    v.unexpected_deaths = len(events.deaths)
    for death in events.deaths:
        v.fail("unexpected_deaths", death)
    for problem in events.problems:
        v.fail("services", problem)


# --- the run --------------------------------------------------------------------------------
