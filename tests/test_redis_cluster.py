"""Several nodes through a real Redis Cluster: rooms on every shard, one order, no leaks.

The module's cluster is three masters (no replicas) of redis-server processes
of its own on free loopback ports; each node is given one cluster node as its
``redis.host:port``, finds out it is a cluster and uses every shard. Tests use
channel prefixes of their own, so they share the cluster without hearing each
other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio
from redis.crc import key_slot

from .conftest import (
    chat_frame,
    node_config,
    open_ws,
    recv,
    start_server,
    task_census,
    wait_no_tasks_beyond,
    wait_until,
    ws_url,
)
from .rawws import http_get
from .wire import free_ports

MASTERS = 3
# The task trio-asyncio runs for each socket the asyncio loop reads.
READER = "trio_asyncio.BaseTrioEventLoop._io_task"


@attrs.define
class Cluster:
    """The test's view of the cluster: plain clients on each master, by port."""

    ports: list[int]
    clients: dict[int, redis.Redis] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clients = {port: redis.Redis(port=port, decode_responses=True)
                        for port in self.ports}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def owner(self, key: str) -> int:
        """The port of the master serving ``key``'s (or a shard channel's) slot."""
        slot = key_slot(key.encode())
        for start, end, primary, *_ in self.clients[self.ports[0]].execute_command(
                "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} is not served")

    def shard_listeners(self, channel: str) -> dict[int, int]:
        """``PUBSUB SHARDNUMSUB channel`` on every master, by port."""
        return {port: int(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])
                for port, client in self.clients.items()}

    def connections(self, name_prefix: str) -> dict[int, list[dict[str, Any]]]:
        """``CLIENT LIST`` entries named ``name_prefix...`` on every master, by port."""
        return {port: [c for c in client.client_list()
                       if c.get("name", "").startswith(name_prefix)]
                for port, client in self.clients.items()}

    def rooms_by_shard(self, per_shard: int) -> dict[int, list[int]]:
        """``per_shard`` room ids served by each master: a room's ``{id}`` tag picks its slot."""
        rooms: dict[int, list[int]] = {port: [] for port in self.ports}
        room = 1
        while any(len(ids) < per_shard for ids in rooms.values()):
            ids = rooms[self.owner(f"{{{room}}}")]
            if len(ids) < per_shard:
                ids.append(room)
            room += 1
        return rooms


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Redis Cluster: timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master Redis Cluster of the module's own, killed at the end."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("the Redis Cluster tests need redis-server and redis-cli on PATH "
                    "(Debian package redis-server; scripts/services installs it)")
    workdir: Path = tmp_path_factory.mktemp("redis-cluster")
    ports = free_ports(2 * MASTERS)
    ports, bus_ports = ports[:MASTERS], ports[MASTERS:]
    processes: list[subprocess.Popen[bytes]] = []
    cluster: Cluster | None = None
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            with open(workdir / f"redis-{port}.log", "wb") as log_file:
                processes.append(subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                     # The bus port explicitly, rather than port + 10000 (maybe taken or > 65535).
                     "--cluster-port", str(bus_port),
                     "--dir", str(workdir), "--save", "", "--appendonly", "no"],
                    stdout=log_file, stderr=subprocess.STDOUT))
        cluster = Cluster(ports)
        for port, client in cluster.clients.items():
            _wait(client.ping, f"redis-server on port {port} to start "
                               f"(log: {workdir / f'redis-{port}.log'})")
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, f"redis-cli --cluster create failed:\n" \
                                        f"{created.stdout}\n{created.stderr}"

        def settled() -> bool:
            for client in cluster.clients.values():
                info = client.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{MASTERS}" not in info:
                    return False
            return True

        _wait(settled, "every node to see cluster_state:ok and all masters", timeout=30)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


@pytest.fixture
async def nodes(nursery: trio.Nursery, tmp_path: Path, channel: str, redis_cluster: Cluster
                ) -> AsyncIterator[Callable]:
    """Start trio-chat nodes, the i-th given the i-th cluster node (round robin) as its Redis."""
    async def start(n: int, **server: Any) -> list:
        servers = []
        for i in range(n):
            port = redis_cluster.ports[i % MASTERS]
            servers.append(await start_server(
                nursery, node_config(tmp_path / f"node{i}.db", port, channel, **server)))
        assert all(s.broker.cluster for s in servers), "every node found the cluster"
        return servers
    yield start


@pytest.mark.parametrize("n_nodes", [2, 3])
async def test_nodes_share_rooms_on_every_shard_exactly_once_in_one_order(
        nodes, redis_cluster: Cluster, n_nodes: int) -> None:
    servers = await nodes(n_nodes)
    by_shard = redis_cluster.rooms_by_shard(2)
    rooms = [room for ids in by_shard.values() for room in ids]
    per_sender = 15
    total = n_nodes * per_sender  # per room: one sender per node
    seen: dict[int, list[list[tuple[int, str]]]] = {room: [] for room in rooms}

    async def receive(url: str, room: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_ws(url) as ws:
            task_status.started()
            got = []
            while len(got) < total:
                message = await recv(ws, timeout=30)
                assert message["room_id"] == room
                got.append((message["id"], message["content"]))
            seen[room].append(got)

    async def send(url: str, room: int, name: str) -> None:
        async with open_ws(url) as ws:
            for i in range(per_sender):
                await ws.send_message(chat_frame(f"{name}-{i}", room_id=room))
            for _ in range(total):  # our own copies come back too
                message = await recv(ws, timeout=30)
                assert message.get("message_type") != "error", message

    with trio.fail_after(90):
        async with trio.open_nursery() as work:
            for room in rooms:
                for server in servers:
                    for _ in range(2):
                        await work.start(receive, ws_url(server, room), room)
            for room in rooms:
                for k, server in enumerate(servers):
                    work.start_soon(send, ws_url(server, room), room, f"r{room}n{k}")
    for room in rooms:
        views = seen[room]
        assert len(views) == 2 * n_nodes
        assert all(view == views[0] for view in views), f"room {room}: one order on every node"
        assert [i for i, _ in views[0]] == list(range(1, total + 1)), \
            f"room {room}: same ids, no gap, no echo"
        assert len({c for _, c in views[0]}) == total
        assert all(c.startswith(f"r{room}n") for _, c in views[0]), "no other room's message"


async def test_a_node_hears_only_rooms_alive_on_it_on_the_rooms_shard(
        nodes, redis_cluster: Cluster, channel: str) -> None:
    a, b = await nodes(2)
    by_shard = redis_cluster.rooms_by_shard(2)

    def listeners(room: int) -> dict[int, int]:
        return redis_cluster.shard_listeners(f"{channel}:{{{room}}}")

    def only_on(port: int, count: int) -> dict[int, int]:
        return {p: count if p == port else 0 for p in redis_cluster.ports}

    for port, (room, other) in by_shard.items():
        assert listeners(room) == only_on(port, 0)
        async with open_ws(ws_url(a, room)):
            await wait_until(lambda room=room, port=port: listeners(room) == only_on(port, 1))
            async with open_ws(ws_url(b, room)):
                await wait_until(lambda room=room, port=port: listeners(room) == only_on(port, 2))
                assert listeners(other) == only_on(port, 0), "a room alive nowhere: no listener"
            await wait_until(lambda room=room, port=port: listeners(room) == only_on(port, 1))
        await wait_until(lambda room=room, port=port: listeners(room) == only_on(port, 0))


async def test_node_shutdown_after_churn_leaves_nothing_on_any_shard(
        nursery, tmp_path: Path, channel: str, redis_cluster: Cluster) -> None:
    rooms = [room for ids in redis_cluster.rooms_by_shard(2).values() for room in ids]

    def connections() -> dict[int, list[dict[str, Any]]]:
        return redis_cluster.connections(channel)

    def subscription_connections() -> int:
        return sum(1 for on_shard in connections().values() for c in on_shard
                   if "P" in c["flags"])

    def room_channels() -> dict[int, list[str]]:
        return {port: client.execute_command("PUBSUB", "SHARDCHANNELS", f"{channel}:{{*")
                for port, client in redis_cluster.clients.items()}

    async with trio.open_nursery() as node_nursery:
        server = await start_server(node_nursery, node_config(
            tmp_path / "n.db", redis_cluster.ports[0], channel))
        assert server.broker.cluster
        assert sum(map(len, connections().values())) >= 1

        async def chat(cycle: int) -> None:
            room = rooms[cycle % len(rooms)]
            async with open_ws(ws_url(server, room)) as ws:
                await ws.send_message(chat_frame("x", room_id=room))
                message = await recv(ws)
                assert message["content"] == "x", message

        def settled() -> bool:
            # No room left, and of the subscription connections only the one for
            # the node's own channel (redis-py closes a shard's when it has none).
            return (not server.hub.rooms and not server.hub.connections
                    and subscription_connections() == 1)

        def sockets() -> int:
            """The node's open connections to the cluster, as its client holds them."""
            return sum(connection.is_connected for node in server.broker._client.get_nodes()
                       for connection in node._connections)

        def census() -> Counter[str]:
            # Each open socket has a reader task on the asyncio loop, and the open
            # sockets come and go with no leak: redis-py takes a shard's subscription
            # connection from that node's command pool and puts it back closed when
            # the shard's last room here goes; a later command opens it again.
            # So the readers are counted against the sockets open at the baseline.
            tasks = task_census(server.task)
            tasks[READER] -= sockets() - baseline_sockets
            return tasks

        # First one round on every shard, some rooms at once, so that each shard's
        # pool of command connections has grown to what a chat needs.
        for cycle in range(len(rooms)):
            await chat(cycle)
        async with trio.open_nursery() as together:
            for cycle in range(len(rooms)):
                together.start_soon(chat, cycle)
        await wait_until(settled)
        baseline, baseline_sockets = task_census(server.task), sockets()
        assert baseline[READER] >= baseline_sockets, "a reader per socket"
        for cycle in range(30):
            await chat(cycle)
        await wait_until(settled)
        await wait_no_tasks_beyond(server.task, baseline, census=census)
        await wait_until(lambda: room_channels() == {port: [] for port in redis_cluster.ports})
        server.shutdown()
    assert server.task is not None and not server.task.child_nurseries
    await wait_until(lambda: connections() == {port: [] for port in redis_cluster.ports})


async def test_losing_one_shards_subscription_is_a_lost_connection(
        nodes, redis_cluster: Cluster, channel: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis closes node a's subscription connection to one shard while b sends to a
    room there: a reconnects everything and its members miss nothing, see nothing twice."""
    a, b = await nodes(2)
    port, (room, _) = next(iter(redis_cluster.rooms_by_shard(2).items()))
    views: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    sent: list[str] = []
    stop = trio.Event()
    sender_done = trio.Event()

    async def watch(server, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_ws(ws_url(server, room)) as ws:
            task_status.started()
            while True:
                message = await recv(ws, timeout=30)
                views[name].append((message["id"], message["content"]))

    async def send() -> None:
        async with open_ws(ws_url(b, room)) as ws:
            i = 0
            while not stop.is_set():
                content = f"m{i}"
                await ws.send_message(chat_frame(content, room_id=room))
                while (frame := await recv(ws, timeout=30)).get("content") != content:
                    assert frame.get("message_type") != "error", frame
                sent.append(content)
                i += 1
                await trio.sleep(0.02)
        sender_done.set()

    def a_subscription_on_shard() -> list[dict[str, Any]]:
        return [c for c in redis_cluster.connections(f"{channel}:{a.broker.node}")[port]
                if "P" in c["flags"]]

    with trio.fail_after(60):
        async with trio.open_nursery() as work:
            await work.start(watch, a, "a")
            await work.start(watch, b, "b")
            work.start_soon(send)
            # a's member is in its room (a live subscription, not one still opening,
            # whose loss refuses the join with 1013) before the subscription is lost.
            await wait_until(lambda: len(sent) > 20 and bool(views["a"]))
            [victim] = a_subscription_on_shard()
            redis_cluster.clients[port].execute_command("CLIENT", "KILL", "ID", victim["id"])
            await wait_until(lambda: any("lost Redis" in r.getMessage()
                                         for r in caplog.records))
            await wait_until(lambda: a.broker.connected and a.broker.down_since is None)
            [replacement] = a_subscription_on_shard()
            assert replacement["id"] != victim["id"]
            before = len(sent)
            await wait_until(lambda: len(sent) > before + 20)
            stop.set()
            # Every send answered, and both members have what was accepted.
            with trio.fail_after(30):
                await sender_done.wait()
            await wait_until(lambda: min(len(views["a"]), len(views["b"])) >= len(sent))
            work.cancel_scope.cancel()
    assert views["a"] == views["b"], "one order, nothing missed or doubled across the loss"
    assert [i for i, _ in views["a"]] == list(range(1, len(sent) + 1))
    assert [c for _, c in views["a"]] == sent


async def test_a_hung_shard_is_a_lost_connection(nodes, redis_cluster: Cluster) -> None:
    """A master stops answering (SIGSTOP) while its connections stay open: the reader
    of node a's subscription to it notices by PING, and a reconnects once it is back."""
    (a,) = await nodes(1)
    # A shard other than the one a was pointed at, which a finds again through the others.
    port = redis_cluster.ports[1]
    room = redis_cluster.rooms_by_shard(1)[port][0]
    pid = int(redis_cluster.clients[port].info("server")["process_id"])
    async with open_ws(ws_url(a, room)) as ws:
        await ws.send_message(chat_frame("before", room_id=room))
        assert (await recv(ws))["content"] == "before"
        # Quick to give up, so the master is stopped only briefly; only now, for the
        # join opens a's subscription connection to the shard, which a busy machine
        # may take over a second to do (the join is then refused with 1013).
        timeout, a.broker.timeout = a.broker.timeout, 1.0
        a.broker.outage_hold = 0.5
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: not a.broker.connected)
            await ws.send_message(chat_frame("during", room_id=room, client_msg_id="hung-1"))
            refused = await recv(ws)
            assert (refused["code"], refused["client_msg_id"]) == ("sync_unavailable", "hung-1")
        finally:
            os.kill(pid, signal.SIGCONT)
        # The reconnection opens connections to every shard again: the usual deadline.
        a.broker.timeout = timeout
        await wait_until(lambda: a.broker.connected, timeout=40)
        await ws.send_message(chat_frame("after", room_id=room))
        assert (await recv(ws))["content"] == "after"


async def test_a_shard_dropping_a_subscription_is_a_lost_connection(
        nodes, redis_cluster: Cluster, channel: str, caplog: pytest.LogCaptureFixture) -> None:
    """The room's slot leaves its master and comes back (as when a slot migrates):
    Redis unsubscribes everyone from the room's channel; the nodes do not go deaf but
    reconnect, resubscribe and recover, with no gap and no duplicate."""
    a, b = await nodes(2)
    port, (room, _) = list(redis_cluster.rooms_by_shard(2).items())[-1]
    slot = key_slot(f"{{{room}}}".encode())
    owner = redis_cluster.clients[port]
    views: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    sent: list[str] = []
    refused = 0
    stop = trio.Event()
    sender_done = trio.Event()

    async def watch(server, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_ws(ws_url(server, room)) as ws:
            task_status.started()
            while True:
                message = await recv(ws, timeout=30)
                views[name].append((message["id"], message["content"]))

    async def send() -> None:
        nonlocal refused
        async with open_ws(ws_url(b, room)) as ws:
            i = 0
            while not stop.is_set():
                content = f"m{i}"
                i += 1
                await ws.send_message(chat_frame(content, room_id=room))
                while (frame := await recv(ws, timeout=30)).get("content") != content:
                    if frame.get("message_type") == "error":
                        assert frame["code"] == "sync_unavailable", frame
                        refused += 1
                        break
                else:
                    sent.append(content)
                await trio.sleep(0.02)
        sender_done.set()

    def lost() -> int:
        return sum("the cluster dropped the subscription" in r.getMessage()
                   for r in caplog.records)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as work:
                await work.start(watch, a, "a")
                await work.start(watch, b, "b")
                work.start_soon(send)
                # a's member is in its room before the slot goes (see above).
                await wait_until(lambda: len(sent) > 10 and bool(views["a"]))
                owner.execute_command("CLUSTER", "DELSLOTS", slot)
                await wait_until(lambda: lost() >= 2)  # both nodes heard it
                await trio.sleep(0.3)  # the slot stays unowned a while
                owner.execute_command("CLUSTER", "ADDSLOTS", slot)
                await wait_until(lambda: all(s.broker.connected and s.broker.down_since is None
                                             for s in (a, b)))
                before = len(sent)
                await wait_until(lambda: len(sent) > before + 10)
                stop.set()
                # Every send answered, and both members have what was accepted.
                with trio.fail_after(30):
                    await sender_done.wait()
                await wait_until(lambda: min(len(views["a"]), len(views["b"])) >= len(sent))
                work.cancel_scope.cancel()
    finally:
        if slot not in {s for start, end, *_ in owner.execute_command("CLUSTER", "SLOTS")
                        for s in range(start, end + 1)}:
            owner.execute_command("CLUSTER", "ADDSLOTS", slot)
    assert views["a"] == views["b"], "one order, nothing missed or doubled across the loss"
    assert [i for i, _ in views["a"]] == list(range(1, len(sent) + 1))
    assert [c for _, c in views["a"]] == sent


async def test_presence_on_every_shard(nodes, redis_cluster: Cluster) -> None:
    a, b = await nodes(2)
    for room in [ids[0] for ids in redis_cluster.rooms_by_shard(1).values()]:
        async with open_ws(ws_url(a, room, "?author_id=1")) as one:
            assert (await recv(one, events=True))["message_type"] == "chat_enter"
            async with open_ws(ws_url(b, room, "?author_id=2")):
                frame = await recv(one, events=True)
                assert (frame["message_type"], frame["author_id"], frame["online"]) == (
                    "chat_enter", 2, 2)
                status, _, body = await http_get(b.port, f"/rooms/{room}/members")
                assert status == 200 and json.loads(body)["members"] == [1, 2]
            frame = await recv(one, events=True)
            assert (frame["message_type"], frame["author_id"], frame["online"]) == (
                "chat_exit", 2, 1)


async def test_resends_and_edits_on_every_shard(nodes, redis_cluster: Cluster) -> None:
    a, b = await nodes(2)
    for room in [ids[0] for ids in redis_cluster.rooms_by_shard(1).values()]:
        async with open_ws(ws_url(a, room, "?author_id=7")) as on_a, \
                open_ws(ws_url(b, room, "?author_id=7")) as on_b:
            sent = json.dumps({"message_type": "chat_txt", "content": "teh",
                               "client_msg_id": f"c-{room}"})
            await on_a.send_message(sent)
            while (ack := await recv(on_a))["message_type"] != "ack":
                pass
            # The same client_msg_id through the other node: the first ack, no message.
            await on_b.send_message(sent)
            while (again := await recv(on_b))["message_type"] != "ack":
                pass
            assert again == ack
            await on_b.send_message(json.dumps({"message_type": "chat_edit", "content": "the",
                                                "target_id": ack["id"]}))
            while (edit := await recv(on_a))["message_type"] != "chat_edit":
                assert edit.get("client_msg_id") != f"c-{room}" or edit["id"] == ack["id"]
            assert (edit["id"], edit["target_id"]) == (ack["id"] + 1, ack["id"])
        # Rejoining reads the shard's recent list, which the edit brought up to date.
        async with open_ws(ws_url(b, room)) as newcomer:
            first = await recv(newcomer)
            assert (first["id"], first["content"], first["edited_at"]) == (
                ack["id"], "the", edit["received_at"])
            assert (await recv(newcomer))["message_type"] == "chat_edit"
