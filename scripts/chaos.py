#!/usr/bin/env python
"""A chaos run: failures stay where they happen.

Starts two ``trio-chat serve`` nodes sharing a private redis-server and a fresh
MariaDB database, reached through a TCP proxy this script controls, and clients
(``trio_chat.client.open_chat``) chatting in a few rooms, each client on one of
the two nodes and each room with members on both. While they chat, a seeded
schedule breaks things in turn, with quiet periods between so recovery shows:

- ``redis-kill``: SIGKILL the redis-server, restart it on the same port;
- ``redis-pause``: SIGSTOP it for a while, then SIGCONT (a hung Redis);
- ``redis-garbage``: publish malformed payloads on every room's channel (truncated
  JSON, a message without fields, a broken control command, plain text);
- ``db-cut``: the proxy drops every database connection and refuses new ones;
- ``db-pause``: the proxy holds every byte of the database link (a dead link that
  heals before TCP gives up: nothing is lost, only late);
- ``node-kill``: SIGKILL one node, restart it on the same port (its clients
  reconnect, resume with ``since=`` and resend their outboxes);
- ``node-kill-lagging``: pause the database link, SIGKILL a node halfway through
  (its store buffer then holds messages it acked), restore, restart it.

Redis runs with ``--appendonly yes --appendfsync always`` in the run's temporary
directory, so a SIGKILLed Redis comes back with everything it acknowledged
(counters, recent lists, idempotency records): what a Redis crash tests here is
trio-chat's recovery, not Redis losing data.

Then sending stops and the run settles: it waits (under deadlines, for
conditions, never a fixed sleep) until every send was answered, every reader
caught up with its room's last acked id and both nodes wrote their store
buffers; it then checks, and prints one summary line:

- every acked message is stored once at its acked id (MariaDB, queried
  directly) and no message is stored twice;
- every reader received every acked message of its room once, in id order, and
  all readers of a room saw the same sequence;
- every send was answered, none refused for good (transient refusals the client
  resent are counted);
- after the clients leave, each node's ``triochat_trio_tasks`` is back to what it
  was before they came (for a restarted node: what the node had at its first
  start, the same configuration idle), less one task per open Redis or database
  connection: trio-asyncio watches each socket with a task, and the pools keep the
  connections a busy moment opened, which is no leak;
- no client lost its connection but to its own node's death (with Redis or the
  database down, members stay connected);
- no node or Redis process died that the schedule did not kill.

Exit status 0 on PASS, 1 on FAIL (with what failed, when the faults happened and
the tail of each log), 2 when the run could not be set up. MariaDB is
``TRIO_CHAT_TEST_MYSQL_HOST``/``_PORT``/``_USER``/``_PASSWORD`` (default root with
no password on 127.0.0.1:3306), as for the tests; the run's database is
``trio_chat_chaos_<hex>``, dropped at the end. Every process the run starts is
stopped on the way out, also on failure, Ctrl-C or SIGTERM.

    python scripts/chaos.py --duration 60 --seed 1
    python scripts/chaos.py --faults none             # the checker alone must pass
    python scripts/chaos.py --faults node-kill -v     # one kind, with the timeline
"""

import sys

from bench.chaos.run import interrupted, main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("chaos: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
