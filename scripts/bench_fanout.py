#!/usr/bin/env python3
"""Fan-out benchmark: one room, many receivers, a few senders at a fixed offered rate.

Starts the server under test as a subprocess (``trio-chat serve`` with a fresh
SQLite file, and for comparison a minimal ``websockets`` broadcast server,
``scripts/bench/reference.py``), then, for each step, spawns load-generator processes that
connect ``--clients`` WebSocket clients to a fresh room. ``--senders`` of those
clients also send, on an absolute schedule, at a total of R messages/s. Every
client receives every message; each one carries its send time (``time.time_ns``,
a clock all processes share) so the receiver computes the latency.

A step is: connect everything, warm up for 1 s at the step's rate (not
measured), measure for ``--duration`` seconds, then wait up to 3 s for
stragglers. It reports deliveries/s, p50/p99 latency, lost deliveries (per
receiver: measured messages scheduled minus distinct ids received) and ordering
violations (an id not greater than the previous one on that connection). The
search steps the rate up until a step loses a delivery, has p99 over 50 ms, or
fails otherwise, bisects a little between the last pass and the first failure,
and reports the highest passing rate.

The load generator must cost less per delivery than the server it measures,
so it is not asyncio: each process runs a plain epoll loop over non-blocking
sockets, does the HTTP upgrade itself, and reads runs of frames with regex
scans instead of decoding JSON (the id leads every message frame; the send
time leads the content). Frames without an id whose message_type is
chat_enter or chat_exit (presence events) are counted apart, not as messages.
The server and the load generator share the machine's cores: by default the
server is pinned to CPU 0 and the load generator to the others (``--no-pin``
to let the scheduler decide); the CPU each side used during the measured
window is printed with every step, so a step limited by the load generator
shows as such.

Several nodes: ``--nodes N`` starts N trio-chat processes sharing the room
through Redis (a channel name of the run's own, each node its own SQLite
file), all pinned to the server's CPU; client i connects to node i % N and the
senders are spread the same way. Each receiver splits its latency into
messages from a sender on its own node and from one on another node, so the
cost of the hop between nodes shows (with Redis even the sender's own node
gets its messages back from Redis). ``--redis`` runs one node through Redis,
the baseline for that; ``--server-workers N`` runs one ``serve --workers N``
(the kernel spreads the clients over the workers) and pins nothing, so the
workers may use every core. redis-server's CPU is shown apart.

Usage::

    .venv/bin/python scripts/bench_fanout.py --quick
    .venv/bin/python scripts/bench_fanout.py --server trio-chat --rate 2000
    .venv/bin/python scripts/bench_fanout.py --nodes 2 --rate 100
    .venv/bin/python scripts/bench_fanout.py --server-workers 2 --quick
    .venv/bin/python scripts/bench_fanout.py --websockets-server 0   # the comparison server
"""

import sys

from bench.fanout import main

if __name__ == "__main__":
    sys.exit(main())
