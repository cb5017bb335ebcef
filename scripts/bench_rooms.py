#!/usr/bin/env python3
"""Many rooms: 1,000 rooms of 10 clients, one sender in each, the total rate ramped.

bench_fanout with a preset: ``--rooms 1000 --clients 10000 --senders 1000`` (client
i in room i % 1000; sender s speaks in room s, so every room chats at the same
steady rate, total/1000 messages a second), latency on every 10th client, a
step passing with zero loss and p99 at most 50 ms. The search steps through
total rates (messages/s over all rooms; deliveries/s are 10 times that) and
reports the highest passing one, for trio-chat and then the ``websockets``
broadcast server. Any other bench_fanout option may follow, and overrides the
preset (``--rate R`` runs one step).

Usage::

    .venv/bin/python scripts/bench_rooms.py --quick
    .venv/bin/python scripts/bench_rooms.py
"""

from __future__ import annotations

import sys

from bench import fanout

PRESET = ["--rooms", "1000", "--clients", "10000", "--senders", "1000",
          "--latency-every", "10", "--p99", "50"]
FULL = ["--ladder", "500,1000,2000,3000,4000,5000,6000,8000,10000,12000,15000"]
QUICK = ["--ladder", "1000,2000,4000,8000"]


def main(argv: list[str]) -> int:
    ladder = QUICK if "--quick" in argv else FULL
    return fanout.main([*PRESET, *ladder, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
