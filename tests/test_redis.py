"""Several nodes through real Redis: one room across servers, one order, Redis restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis
import trio

from .conftest import (
    REDIS_PORT,
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


@pytest.fixture
async def nodes(nursery, tmp_path, channel) -> AsyncIterator[Callable]:
    async def start(n: int, port: int = REDIS_PORT, **server) -> list:
        return [await start_server(nursery, node_config(tmp_path / f"node{i}.db", port,
                                                        channel, **server))
                for i in range(n)]
    yield start


@pytest.mark.parametrize("n_nodes", [2, 3])
async def test_nodes_share_a_room_exactly_once_in_one_order(nodes, n_nodes) -> None:
    servers = await nodes(n_nodes)
    senders_per_node, per_sender = 2, 20
    total = n_nodes * senders_per_node * per_sender
    seen: list[list[tuple[int, str]]] = []

    async def receive(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_ws(url) as ws:
            task_status.started()
            got = []
            while len(got) < total:
                message = await recv(ws)
                got.append((message["id"], message["content"]))
            seen.append(got)

    async def send(url: str, name: str) -> None:
        async with open_ws(url) as ws:
            for i in range(per_sender):
                await ws.send_message(chat_frame(f"{name}-{i}", room_id=9))
            for _ in range(total):  # our own copies come back too
                await recv(ws)

    with trio.fail_after(60):
        async with trio.open_nursery() as work:
            for server in servers:
                for _ in range(2):
                    await work.start(receive, ws_url(server, 9))
            for k, server in enumerate(servers):
                for j in range(senders_per_node):
                    work.start_soon(send, ws_url(server, 9), f"n{k}s{j}")
    assert len(seen) == 2 * n_nodes
    assert all(order == seen[0] for order in seen), "one order on every node"
    assert [i for i, _ in seen[0]] == list(range(1, total + 1)), "same ids, no gap, no echo"
    assert len({c for _, c in seen[0]}) == total


async def test_a_node_hears_only_rooms_alive_on_it(nodes, channel) -> None:
    a, b = await nodes(2)
    client = redis.Redis(port=REDIS_PORT)

    def listeners(room: int) -> int:
        return client.execute_command("PUBSUB", "SHARDNUMSUB", f"{channel}:{{{room}}}")[1]

    assert listeners(5) == 0
    async with open_ws(ws_url(a, 5)):
        await wait_until(lambda: listeners(5) == 1)
        async with open_ws(ws_url(b, 5)):
            await wait_until(lambda: listeners(5) == 2)
            assert listeners(6) == 0
        await wait_until(lambda: listeners(5) == 1)
    await wait_until(lambda: listeners(5) == 0)


async def test_resume_on_another_node(nodes) -> None:
    a, b = await nodes(2)
    async with open_ws(ws_url(a, 11)) as stayer:
        async with open_ws(ws_url(a, 11)) as leaver:
            await stayer.send_message(chat_frame("one", room_id=11))
            last = (await recv(leaver))["id"]
        for word in ("two", "three"):
            await stayer.send_message(chat_frame(word, room_id=11))
        async with open_ws(ws_url(b, 11, f"?since={last}")) as moved:
            assert [(await recv(moved))["content"] for _ in range(2)] == ["two", "three"]
            await stayer.send_message(chat_frame("four", room_id=11))
            assert (await recv(moved))["content"] == "four"


async def test_redis_restart_no_gap_no_duplicate_and_ids_continue(nodes, redis_server,
                                                                  mysql_db) -> None:
    port = redis_server()
    # One shared history, as in production: a node back later than the other recovers
    # from it what no longer fits in Redis's recent list.
    a, b = await nodes(2, port=port, db=mysql_db)
    accepted: list[str] = []
    refused = 0
    views: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    stop = trio.Event()
    senders_done = 0

    async def watch(server, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_ws(ws_url(server, 3)) as ws:
            task_status.started()
            while True:
                message = await recv(ws, timeout=60)
                views[name].append((message["id"], message["content"]))

    async def send(server) -> None:
        nonlocal refused, senders_done
        async with open_ws(ws_url(server, 3)) as ws:
            i = 0
            while not stop.is_set():
                content = f"{server.port}-{i}"
                await ws.send_message(chat_frame(content, room_id=3))
                # Our own copy, or an error frame saying sync is unavailable.
                while True:
                    frame = await recv(ws, timeout=60)
                    if frame.get("message_type") == "error":
                        assert frame["code"] == "sync_unavailable"
                        refused += 1
                        break
                    if frame["content"] == content:
                        accepted.append(content)
                        break
                i += 1
                await trio.sleep(0.01)
        senders_done += 1

    with trio.fail_after(90):
        async with trio.open_nursery() as work:
            await work.start(watch, a, "a")
            await work.start(watch, b, "b")
            work.start_soon(send, a)
            work.start_soon(send, b)
            await wait_until(lambda: len(accepted) > 20)
            process = redis_server.processes[-1]  # type: ignore[attr-defined]
            process.kill()
            process.wait()
            await wait_until(lambda: refused > 0)
            await trio.sleep(0.5)  # the outage lasts a while
            redis_server()
            await wait_until(lambda: a.broker.connected and b.broker.connected)
            before = len(accepted)
            await wait_until(lambda: len(accepted) > before + 20)
            stop.set()
            # Every send answered, and both members have what was accepted.
            await wait_until(lambda: senders_done == 2
                             and min(len(views["a"]), len(views["b"])) >= len(accepted))
            work.cancel_scope.cancel()
    if views["a"] != views["b"]:
        ids_a = [i for i, _ in views["a"]]
        ids_b = [i for i, _ in views["b"]]
        raise AssertionError(f"a: {ids_a}\nb: {ids_b}\nrefused={refused}")
    ids = [i for i, _ in views["a"]]
    assert ids == sorted(set(ids)), "increasing, no duplicate"
    assert ids == list(range(1, len(ids) + 1)), "ids continue after Redis lost its counter"
    assert sorted(c for _, c in views["a"]) == sorted(accepted), "every accepted message, once"


async def test_node_shutdown_after_churn_leaves_nothing(nursery, tmp_path, channel) -> None:
    client = redis.Redis(port=REDIS_PORT, decode_responses=True)

    def connections() -> int:
        return sum(1 for c in client.client_list() if c.get("name", "").startswith(channel))

    async with trio.open_nursery() as node_nursery:
        server = await start_server(node_nursery, node_config(tmp_path / "n.db", REDIS_PORT,
                                                              channel))
        assert connections() >= 1

        async def chat(cycle: int) -> None:
            async with open_ws(ws_url(server, 100 + cycle % 5, f"?author_id={cycle}")) as ws:
                await ws.send_message(chat_frame("x", room_id=100 + cycle % 5))
                await recv(ws)

        # One round first: Redis's command connection (pooled, with a reader task
        # on the asyncio loop) opens on first use and stays.
        await chat(0)
        await wait_until(lambda: not server.hub.rooms and not server.hub.connections)
        baseline = task_census(server.task)
        for cycle in range(30):
            await chat(cycle)
        await wait_until(lambda: not server.hub.rooms and not server.hub.connections)
        await wait_no_tasks_beyond(server.task, baseline)
        # The last room's unsubscribe may still be on its way to Redis.
        await wait_until(lambda: client.execute_command(
            "PUBSUB", "SHARDCHANNELS", f"{channel}:{{*") == [])
        # Every presence entry withdrawn, and its keys with it.
        await wait_until(lambda: not client.keys(f"{channel}:*:presence")
                         and not client.keys(f"{channel}:*:online"))
        server.shutdown()
    assert server.task is not None and not server.task.child_nurseries
    await wait_until(lambda: connections() == 0)


async def test_a_redis_blip_holds_sends_instead_of_refusing_them(nodes, redis_server) -> None:
    port = redis_server()
    (a,) = await nodes(1, port=port)
    a.broker.outage_hold = 30  # generous: a loaded machine restarts Redis slowly
    async with open_ws(ws_url(a, 12)) as ws:
        await ws.send_message(chat_frame("before", room_id=12))
        assert (await recv(ws))["id"] == 1
        process = redis_server.processes[-1]  # type: ignore[attr-defined]
        process.kill()
        process.wait()
        await wait_until(lambda: not a.broker.connected)
        await ws.send_message(chat_frame("during", room_id=12))
        await trio.sleep(0.3)
        redis_server()  # empty: the counter restarts from the node's last id
        frame = await recv(ws, timeout=40)
        assert (frame["content"], frame["id"]) == ("during", 2)


async def test_a_resend_after_redis_lost_its_records_is_still_recognised(
        nodes, redis_server) -> None:
    port = redis_server()
    (a,) = await nodes(1, port=port)
    # As if the node had been up longer than the window: only Redis remembers ids now.
    a.broker._check_store_until = 0
    text = chat_frame("once", room_id=14, client_msg_id="r-1")
    async with open_ws(ws_url(a, 14)) as ws:
        await ws.send_message(text)
        while (ack := await recv(ws))["message_type"] != "ack":
            pass
        process = redis_server.processes[-1]  # type: ignore[attr-defined]
        process.kill()
        process.wait()
        await wait_until(lambda: not a.broker.connected)
        redis_server()  # empty: the record of r-1 is gone with the old process
        await wait_until(lambda: a.broker.connected, timeout=40)
        await ws.send_message(text)
        while (again := await recv(ws))["message_type"] != "ack":
            assert again["id"] == ack["id"]  # the first send's broadcast, nothing new
        assert again == ack
    assert a.metrics.duplicates == 1
    assert [m.content for m in await a.store.page(14)] == ["once"]
