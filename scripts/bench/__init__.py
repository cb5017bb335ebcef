"""The benchmark scripts' parts. ``scripts/bench_*.py`` (but bench_codec and
bench_acks, which stand alone) and ``scripts/chaos.py`` import from here
(``scripts/`` is on the path of a script run from it):

- ``client``: one load-generator connection (upgrade, frame scanning, sends);
- ``loadgen``: load-generator processes over many such connections, and the tally;
- ``step``: one fan-out step at one rate, from placement to aggregated results;
- ``fanout``: bench_fanout's rate search and command line;
- ``report``: latency histograms, verdicts, the printed table and summary;
- ``servers``: the servers under test as processes (the gorilla chat example's
  binary among them), and the CPU split;
- ``reference``: the ``websockets`` comparison server;
- ``probes``: CPU, memory, descriptor and /metrics readings;
- ``procstat``: a process tree's CPU, memory and descriptors read from ``/proc``;
- ``chatload_run``, ``chatload_report``: bench_chatload's runs of the Go load
  generator against one server, and their figures and markdown tables;
- ``scale``: idle and churning connection workers (bench_conns, bench_churn);
- ``store_load``, ``store_fanout``: bench_store's in-process store load and its
  fan-out comparison;
- ``chaos``: the chaos run's parts (a package; its ``__init__`` has the map);
- ``abuse``, ``rawclient``: bench_abuse's hostile clients and probe, and the raw
  trio client they are built on (connections from a chosen loopback address).

The client side of the WebSocket wire and free ports come from ``tests/wire.py``,
shared with the tests, hence the repository root on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent.parent

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
