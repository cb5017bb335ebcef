"""``/metrics`` by Prometheus' conventions (read with prometheus_client's parser),
every worker's series under ``--workers``, ``/healthz`` and ``/readyz``, and the
access log."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_chat.http import Readiness
from trio_chat.metrics import Histogram

from .conftest import (
    MYSQL,
    REDIS_PORT,
    chat_frame,
    make_config,
    node_config,
    open_ws,
    recv,
    start_server,
    wait_until,
    ws_url,
)
from .proxy import Proxy
from .rawws import http_get
from .test_workers import open_cluster

# Units Prometheus wants spelt in base units: a name with one of these is wrong.
NOT_BASE_UNITS = re.compile(r"_(milli|micro|nano)?(ms|us|ns|millis\w*|micros\w*|minutes?|"
                            r"hours?|days?|kb|mb|gb|kilobytes|megabytes|bits)(_|$)")
TIME_WORDS = re.compile(r"(lag|latency|duration|outage|time|age|wait)")


async def scrape(port: int) -> tuple[str, dict[str, object]]:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def lint(text: str, families: dict[str, object]) -> None:
    """Prometheus' naming conventions, on the text and on what its parser read."""
    declared = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in declared, f"{name}: a second TYPE line"
            declared[name] = kind
    helped = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# HELP ")}
    assert set(declared) == helped, "every family has both HELP and TYPE"
    for name, kind in declared.items():
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), name
        assert name.startswith(("triochat_", "process_")), name
        assert (kind == "counter") == name.endswith("_total"), \
            f"{name} ({kind}): counters, and only counters, end in _total"
        assert not NOT_BASE_UNITS.search(name), f"{name}: base units (seconds, bytes)"
        # A lag counted in messages says so; any other time is in seconds.
        if kind in ("gauge", "histogram") and TIME_WORDS.search(name) and \
                not name.startswith("process_") and not name.endswith("_messages"):
            assert name.endswith("_seconds"), f"{name}: a time is in seconds"
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a histogram has a unit"
    for family in families.values():
        assert family.documentation, f"{family.name}: HELP text"  # type: ignore[attr-defined]


def value(families: dict[str, object], name: str, sample: str | None = None,
          **labels: str) -> float:
    family = families[name]
    found = [s.value for s in family.samples  # type: ignore[attr-defined]
             if s.name == (sample or name) and all(s.labels.get(k) == v
                                                   for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def test_metrics_follow_prometheus_conventions(server) -> None:
    async with open_ws(ws_url(server, 1)) as ws, open_ws(ws_url(server, 1)) as other:
        for content in ("one", "two"):
            await ws.send_message(chat_frame(content, room_id=1))
            await recv(ws)
            await recv(other)
        await ws.send_message("nope")
        await recv(ws)
        await wait_until(lambda: server.store.lag == 0)
        text, families = await scrape(server.port)
    lint(text, families)
    # The parser strips _total from a counter family's name.
    assert families["triochat_messages_received"].type == "counter"
    assert value(families, "triochat_messages_received", "triochat_messages_received_total") == 2
    assert value(families, "triochat_connections_open") == 2
    assert value(families, "triochat_refusals", "triochat_refusals_total",
                 reason="bad_frame") == 1
    reasons = {s.labels["reason"] for s in families["triochat_refusals"].samples}
    assert reasons == {"auth", "origin", "ip_limit", "rate_limited", "bad_frame", "store_full"}
    assert {s.labels["reason"] for s in families["triochat_disconnects"].samples} == {
        "slow_consumer", "flood", "frame_too_big", "inbound_budget"}
    # Two messages, two members each: four deliveries, each observed once.
    latency = families["triochat_delivery_latency_seconds"]
    assert latency.type == "histogram"
    assert value(families, "triochat_delivery_latency_seconds",
                 "triochat_delivery_latency_seconds_count") == 4
    buckets = [s.value for s in latency.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 4
    assert value(families, "triochat_store_write_lag_seconds",
                 "triochat_store_write_lag_seconds_count") == 2
    assert value(families, "triochat_event_loop_lag_seconds",
                 "triochat_event_loop_lag_seconds_count") >= 0
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "process_max_fds"):
        assert name in families, name
    assert value(families, "process_open_fds") > 2
    assert value(families, "process_resident_memory_bytes") > 10 * 2**20


async def test_event_loop_lag_is_observed(server) -> None:
    await wait_until(lambda: sum(server.metrics.loop_lag.counts) >= 2)
    before = server.metrics.loop_lag.sum
    # Block the loop: the watcher's next wake-up, due within lag.INTERVAL, comes at
    # least 0.6 - 0.25 s late.
    time.sleep(0.6)  # noqa: ASYNC251 (blocking the loop is the point)
    await wait_until(lambda: server.metrics.loop_lag.sum - before >= 0.3)


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for observed in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(observed)
    histogram.observe(0.2, 10)
    assert histogram.counts == [2, 12, 1]
    assert histogram.samples()[-1] == ("_count", "", 15)
    assert [v for _, _, v in histogram.samples()[:3]] == [2, 14, 15]


async def test_workers_metrics_never_go_back(tmp_path: Path) -> None:
    """Under ``--workers 2`` any worker answers for both, each series labelled with its
    worker, and no counter ever decreases from one scrape to the next."""
    async with open_cluster(tmp_path) as cluster:
        previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for scrape_number in range(10):
            # Traffic between scrapes, landing on whichever worker the kernel picks.
            async with open_ws(f"ws://127.0.0.1:{cluster.port}/ws/7") as ws:
                await ws.send_message(chat_frame(f"m{scrape_number}", room_id=7))
                await recv(ws)
            text, families = await scrape(cluster.port)
            lint(text, families)
            workers = {s.labels.get("worker") for f in families.values() for s in f.samples}
            assert workers == {"1", "2"}, f"scrape {scrape_number}: {workers}"
            for family in families.values():
                for s in family.samples:
                    counting = family.type == "counter" or (
                        family.type == "histogram" and not s.name.endswith("_sum"))
                    if not counting:
                        continue
                    key = (s.name, tuple(sorted(s.labels.items())))
                    assert s.value >= previous.get(key, 0), \
                        f"scrape {scrape_number}: {key} went from {previous[key]} to {s.value}"
                    previous[key] = s.value
        # The other worker's file is at most a second old: soon both count every message.
        with trio.fail_after(10):
            while True:
                _, families = await scrape(cluster.port)
                received = families["triochat_messages_received"].samples
                if sum(s.value for s in received) == 10:
                    break
                await trio.sleep(0.1)


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    status, _, body = await http_get(port, "/readyz")
    return status, json.loads(body)


async def wait_ready(port: int, ready: bool, timeout: float = 30) -> dict[str, object]:
    with trio.fail_after(timeout):
        while True:
            status, body = await readyz(port)
            if (status == 200) == ready:
                assert status in (200, 503)
                return body
            await trio.sleep(0.05)


async def test_readyz_while_redis_is_cut(nursery, db_path, channel) -> None:
    proxy = await nursery.start(Proxy(REDIS_PORT).run)
    server = await start_server(nursery, node_config(db_path, proxy.port, channel))
    server.broker.timeout = 1.0
    assert await readyz(server.port) == (200, {"status": "ready"})
    proxy.cut()
    body = await wait_ready(server.port, False)
    assert body["status"] == "not_ready" and body["reasons"] == ["broker_unavailable"]
    assert "Redis" in body["detail"]
    # Alive all the same: liveness must not restart a node for its dependency's outage.
    assert (await http_get(server.port, "/healthz"))[0] == 200
    proxy.restore()
    assert await wait_ready(server.port, True, timeout=40) == {"status": "ready"}


async def test_readyz_while_the_store_fails(nursery, db_path, mysql_db) -> None:
    proxy = await nursery.start(Proxy(MYSQL["port"]).run)
    server = await start_server(nursery, make_config(
        db_path, db=attrs.evolve(mysql_db, port=proxy.port)))
    async with open_ws(ws_url(server, 5)) as ws:
        await ws.send_message(chat_frame("before", room_id=5))
        await recv(ws)
        assert (await readyz(server.port))[0] == 200
        proxy.cut()
        await ws.send_message(chat_frame("while cut", room_id=5))
        await wait_until(lambda: server.store.failing_since is not None)
        body = await wait_ready(server.port, False)
        assert body["reasons"] == ["store_failing"]
        proxy.restore()
        await wait_ready(server.port, True)


async def test_readyz_is_503_while_draining(nursery, db_path) -> None:
    server = await start_server(nursery, make_config(db_path, drain_delay=2.0))
    async with open_ws(ws_url(server, 3)) as ws:
        server.shutdown()
        status, body = await readyz(server.port)
        assert status == 503 and body["reasons"] == ["draining"]
        # Still serving while the load balancer takes note.
        assert (await http_get(server.port, "/healthz"))[0] == 200
        await ws.send_message(chat_frame("still here", room_id=3))
        assert (await recv(ws))["content"] == "still here"
        # Then the shutdown proper: the WebSocket is closed with 1001.
        with trio.fail_after(10):
            await wait_until(lambda: ws.closed is not None)
        assert ws.closed.code == 1001


def test_readiness_wants_the_listener() -> None:
    readiness = Readiness()
    assert [reason for reason, _ in readiness.problems()] == ["not_listening"]
    readiness.listening = True
    assert readiness.problems() == []


async def test_access_log_at_debug(server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_chat.http.access")
    secret = "s3cret-token-value"
    await http_get(server.port, f"/rooms/9/messages?limit=5&token={secret}",
                   f"Authorization: Bearer {secret}\r\n")
    await http_get(server.port, "/nowhere")
    async with open_ws(ws_url(server, 9, f"?author_id=4&token={secret}")):
        pass
    await wait_until(lambda: len(caplog.records) >= 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_chat.http.access"]
    assert all(secret not in line for line in lines), lines
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /rooms/9/messages" 200 \d+ \d+\.\dms',
                        lines[0]), lines[0]
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /nowhere" 404 \d+ \d+\.\dms', lines[1])
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /ws/9" 101 0 \d+\.\dms', lines[2])
    assert all(r.levelno == logging.DEBUG for r in caplog.records
               if r.name == "trio_chat.http.access")
