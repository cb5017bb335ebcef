"""Operating settings: every key from the environment, check-config, token,
--log-level, JSON logs, and log levels that match what happened."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_chat.auth import verify_token
from trio_chat.config import ConfigError, env_name, parse_config

from .conftest import chat_frame, node_config, open_ws, recv, start_server, wait_until, ws_url

EXAMPLE = Path(__file__).parent.parent / "config.json.example"
SECRET = "0123456789abcdef0123456789abcdef"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}
    return {**env, **extra}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trio_chat.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env or clean_env())


def test_every_key_has_a_variable_by_one_rule() -> None:
    assert env_name("db", "password") == "TRIO_CHAT_DB_PASSWORD"
    assert env_name("server", "port") == "TRIO_CHAT_SERVER_PORT"
    assert env_name("redis", "host") == "TRIO_CHAT_REDIS_HOST"
    assert env_name("server", "maxFrameBytes") == "TRIO_CHAT_SERVER_MAX_FRAME_BYTES"
    assert env_name("auth", "secret") == "TRIO_CHAT_AUTH_SECRET"
    listed = cli("check-config", "--env").stdout.splitlines()
    data = json.loads(EXAMPLE.read_text())
    expected = {f"{env_name(name, key)}\t{name}.{key}" for name in data for key in data[name]}
    assert set(listed) == expected


def test_variables_apply_over_the_file_and_the_default() -> None:
    env = {"TRIO_CHAT_DB_PASSWORD": "s3cret", "TRIO_CHAT_DB_HOST": "db.example",
           "TRIO_CHAT_SERVER_PORT": "9000", "TRIO_CHAT_REDIS_HOST": "redis.example",
           "TRIO_CHAT_AUTH_ALLOWED_ORIGINS": "https://a.example, https://b.example",
           "TRIO_CHAT_LOGGER_LEVEL": "debug", "TRIO_CHAT_REDIS_RELAY": "true"}
    config = parse_config({"db": {"host": "file.example", "password": "from-file"},
                           "server": {"port": 8000}}, "c.json", env)
    assert config.db is not None and config.redis is not None
    assert (config.db.host, config.db.password) == ("db.example", "s3cret")
    assert config.server.port == 9000
    assert config.redis.host == "redis.example" and config.redis.relay is True
    assert config.auth.allowed_origins == ("https://a.example", "https://b.example")
    assert config.logger.level == logging.DEBUG
    # An empty variable is the default, as an empty string in the file is.
    assert parse_config({"server": {"port": 8000}}, "c.json",
                        {"TRIO_CHAT_SERVER_PORT": ""}).server.port == 8080
    assert parse_config({}, "c.json", {"TRIO_CHAT_REDIS_HOST": ""}).redis is None
    # The older name of the admin key still works.
    key = "k" * 16
    assert parse_config({}, "c", {"TRIO_CHAT_ADMIN_KEY": key}).auth.admin_key == key


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("TRIO_CHAT_SERVER_PORT", "http", 'TRIO_CHAT_SERVER_PORT (server.port): expected an '
                                      'integer, got "http"'),
    ("TRIO_CHAT_SERVER_WRITE_WAIT", "0", "TRIO_CHAT_SERVER_WRITE_WAIT (server.writeWait): "
                                         "expected a number from 0.001 to 3600, got \"0\""),
    ("TRIO_CHAT_REDIS_RELAY", "maybe", 'TRIO_CHAT_REDIS_RELAY (redis.relay): expected true '
                                       'or false, got "maybe"'),
    ("TRIO_CHAT_LOGGER_FORMAT", "xml", 'TRIO_CHAT_LOGGER_FORMAT (logger.format): expected '
                                       'one of json, text, got "xml"'),
])
def test_bad_variables_are_checked_like_the_file(variable: str, value: str,
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({}, "c.json", {variable: value})
    assert str(caught.value) == message


def test_a_misspelt_variable_is_warned_about() -> None:
    config = parse_config({}, "c.json", {"TRIO_CHAT_SERVER_PROT": "1",
                                         "TRIO_CHAT_TEST_MYSQL_HOST": "x"})
    assert config.warnings == ("TRIO_CHAT_SERVER_PROT: unknown setting, ignored",)


def test_check_config_masks_secrets_and_fails_like_serve(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"db": {"host": "127.0.0.1", "password": "in-the-file"},
                                "logger": {"level": "warn"}}))
    result = cli("check-config", str(path), env=clean_env(TRIO_CHAT_REDIS_PASSWORD="pw",
                                                          TRIO_CHAT_REDIS_HOST="r"))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["db"]["password"] == "********" and shown["redis"]["password"] == "********"
    assert shown["auth"]["secret"] == "" and shown["redis"]["host"] == "r"
    assert shown["logger"] == {"level": "warn", "format": "text"}
    assert "in-the-file" not in result.stdout and "pw" not in json.dumps(shown["redis"])
    # And what the configuration lets one address, and the server, make the node hold.
    assert "memory: one address at most 61.0 MiB (limits.inboundBytesPerIp 24.0 + " \
        "limits.outboundBytesPerIp 24.0 + limits.bodyBytesPerIp 12.0 + request heads 1.0)" \
        in result.stderr
    assert "memory: the server at most 1937.2 MiB (limits.inboundBytesTotal 256.0" \
        in result.stderr
    # The same one-line error, and exit status, as serve.
    env = clean_env(TRIO_CHAT_SERVER_PORT="70000")
    checked, served = cli("check-config", str(path), env=env), cli("serve", str(path), env=env)
    assert checked.returncode == served.returncode == 2
    assert checked.stderr == served.stderr
    assert checked.stderr.count("\n") == 1 and "TRIO_CHAT_SERVER_PORT" in checked.stderr


def test_token_is_signed_with_the_configured_secret() -> None:
    result = cli("token", "--sub", "11", "--rooms", "1,2", "--ttl", "1h",
                 env=clean_env(TRIO_CHAT_AUTH_SECRET=SECRET))
    assert result.returncode == 0, result.stderr
    claims = verify_token(result.stdout.strip(), SECRET)
    assert claims.author_id == 11 and claims.rooms == frozenset({1, 2})
    refused = cli("token", "--sub", "11")
    assert refused.returncode == 2
    assert "auth.secret" in refused.stderr and "TRIO_CHAT_AUTH_SECRET" in refused.stderr
    bad = cli("token", "--sub", "11", "--ttl", "soon", env=clean_env(TRIO_CHAT_AUTH_SECRET=SECRET))
    assert bad.returncode == 2 and "--ttl" in bad.stderr


async def _serve_and_stop(tmp_path: Path, *options: str, env: dict[str, str],
                          room: int | None = None) -> list[str]:
    """Run serve, optionally chat once in ``room``, stop it; its stderr lines."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_chat.cli", "serve", "--port", "0", "--sqlite",
             str(tmp_path / "chat.db"), *options], stderr=log_file, env=env)
    try:
        await wait_until(lambda: b"listening on" in log_path.read_bytes(), timeout=60)
        if room is not None:
            text = log_path.read_text()
            port = int(text.split("listening on http://127.0.0.1:")[1].split("/")[0])
            async with open_ws(f"ws://127.0.0.1:{port}/ws/{room}") as ws:
                await ws.send_message(chat_frame("hi", room_id=room))
                await recv(ws)
            await wait_until(lambda: b"closed in room" in log_path.read_bytes())
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    return log_path.read_text().splitlines()


async def test_json_logs_with_connections_at_debug(tmp_path: Path) -> None:
    lines = await _serve_and_stop(tmp_path, "--log-level", "debug", room=7,
                                  env=clean_env(TRIO_CHAT_LOGGER_FORMAT="json"))
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
        assert record["time"].endswith("Z")
    events = {r.get("event"): r for r in records}
    opened, closed = events["ws_open"], events["ws_close"]
    assert opened["level"] == "debug" and opened["room"] == 7
    assert opened["connection"] == closed["connection"]
    assert opened["remote"].startswith("127.0.0.1:")
    assert closed["close_code"] == 1000 and 0 <= closed["duration"] < 30
    listening = events["listening"]
    assert listening["level"] == "info"
    assert f"history: SQLite {tmp_path / 'chat.db'}" in listening["message"]
    assert "broker: in-process" in listening["message"]
    gc_line = next(r for r in records if "gc thresholds" in r["message"])
    assert gc_line["level"] == "debug"
    [frozen] = [r for r in records if "heap frozen after start-up" in r["message"]]
    assert frozen["level"] == "debug" and frozen["logger"] == "trio_chat.collector"


async def test_info_level_has_no_internal_tuning_line(tmp_path: Path) -> None:
    lines = await _serve_and_stop(tmp_path, env=clean_env())
    assert not any("gc thresholds" in line for line in lines)
    listening = [line for line in lines if "listening on" in line]
    assert len(listening) == 1 and " INFO trio_chat.server: " in listening[0]
    assert "history: SQLite" in listening[0] and "broker: in-process" in listening[0]
    assert not any("DEBUG" in line for line in lines)


async def test_redis_coming_back_is_info(nursery, tmp_path, redis_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat")
    port = redis_server()
    server = await start_server(nursery, node_config(tmp_path / "n.db", port, "t-back"))
    async with open_ws(ws_url(server, 3)) as ws:
        await ws.send_message(chat_frame("before", room_id=3))
        await recv(ws)
        process = redis_server.processes[-1]
        process.kill()
        await trio.to_thread.run_sync(process.wait)
        await wait_until(lambda: not server.broker.connected)
        redis_server()
        await wait_until(lambda: server.broker.connected, timeout=40)
    back = [r for r in caplog.records if r.getMessage().startswith("Redis is back")]
    assert back and all(r.levelno == logging.INFO for r in back)
    server.shutdown()

