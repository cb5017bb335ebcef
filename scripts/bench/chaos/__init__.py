"""The chaos run (``scripts/chaos.py``), in parts: ``common`` (clock, events, probes),
``services`` (Redis, nodes), ``clients``, ``faults`` (schedule, injection), ``checks``
(the verdict) and ``run`` (set-up, phases, report, command line)."""
