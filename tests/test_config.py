"""Configuration: the seed's config.json shape, our server section, clear errors."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trio_chat.config import ConfigError, load_config, parse_config
from trio_chat.store import SCHEMA_VERSION

EXAMPLE = Path(__file__).parent.parent / "config.json.example"


def test_embedded_default() -> None:
    config = load_config(None)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.sqlite.path == "./trio-chat.db"
    assert config.db is None and config.redis is None


def test_seed_template_with_empty_strings_is_accepted() -> None:
    # The seed README's template, every value an empty string (its trailing comma removed).
    seed = {
        "db": {"id": "", "password": "", "host": "", "port": "", "database": ""},
        "mq": {"host": "", "port": "", "id": "", "password": "", "listeningQueueName": ""},
        "redis": {"id": "", "password": "", "host": "", "port": "", "database": "",
                  "listeningChannelName": "", "publishChannelName": ""},
        "logger": {"level": ""},
    }
    config = parse_config(seed, "config.json")
    assert config.db is None and config.redis is None
    assert config.mq is not None
    assert config.logger.level == logging.INFO
    assert config.warnings == ()


def test_seed_values_as_strings() -> None:
    config = parse_config({"db": {"host": "127.0.0.1", "port": "3307", "id": "chat"},
                           "logger": {"level": "DEBUG"}, "server": {"port": "9000"}})
    assert config.db is not None and config.db.port == 3307 and config.db.id == "chat"
    assert config.logger.level == logging.DEBUG
    assert config.server.port == 9000


def test_example_file_is_valid_and_covers_every_key() -> None:
    data = json.loads(EXAMPLE.read_text())
    config = parse_config(data, str(EXAMPLE))
    assert config.warnings == ()
    import attrs

    from trio_chat import config as module
    for name, cls in module._SECTIONS.items():
        keys = {f.metadata["key"] for f in attrs.fields(cls)}
        assert set(data[name]) == keys, name


def test_unknown_keys_warn_not_fail() -> None:
    config = parse_config({"server": {"port": 1, "prot": 2}, "extra": {}}, "c.json")
    assert config.server.port == 1
    assert "c.json: server.prot: unknown key, ignored" in config.warnings
    assert "c.json: extra: unknown section, ignored" in config.warnings


@pytest.mark.parametrize(("data", "message"), [
    ([], "c.json: expected a JSON object at the top level, got []"),
    ({"server": 5}, "c.json: server: expected an object, got 5"),
    ({"server": {"port": 70000}}, "c.json: server.port: expected an integer from 0 to 65535, "
                                  "got 70000"),
    ({"server": {"port": "http"}}, 'c.json: server.port: expected an integer, got "http"'),
    ({"server": {"port": True}}, "c.json: server.port: expected an integer, got true"),
    ({"server": {"port": 80.5}}, "c.json: server.port: expected an integer, got 80.5"),
    ({"server": {"host": 1}}, "c.json: server.host: expected a string, got 1"),
    ({"logger": {"level": "loud"}}, 'c.json: logger.level: expected one of critical, debug, '
                                    'error, info, warn, warning, got "loud"'),
    ({"server": {"pingPeriod": 70}}, "c.json: server.pingPeriod: expected less than "
                                     "server.pongWait (60), got 70"),
    ({"server": {"writeWait": -1}}, "c.json: server.writeWait: expected a number from 0.001"),
    ({"limits": {"bodyBytesPerIp": 8 * 1024 * 1024}}, "c.json: limits.bodyBytesPerIp: "
     "expected at least twice media.maxImageBytes + 65536 (10616832) so an upload and its "
     "multipart copy fit, got 8388608"),
    ({"limits": {"inboundBytesPerIp": 100_000}}, "c.json: limits.inboundBytesPerIp: "
     "expected at least twice server.maxFrameBytes + 65536 (196608), got 100000"),
    ({"limits": {"inboundBytesTotal": 16 * 1024 * 1024}}, "c.json: limits.inboundBytesTotal: "
     "expected at least 3 times the data URL of media.maxImageBytes (20983812) so a chat_img "
     "data URL fits, got 16777216"),
])
def test_bad_values_name_file_key_and_expectation(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.json")
    assert str(info.value).startswith(message)


def test_not_json_names_line_and_hints_at_trailing_comma(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"db": {"host": "",\n}}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid JSON:")
    assert "line 2" in str(info.value) and "trailing comma" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.json")


@pytest.mark.parametrize(("content", "expected"), [
    ("not json", "not valid JSON"),
    ('{"server": {"port": 99999}}', "server.port"),
    ('{"logger": {"level": "verbose"}}', "logger.level"),
])
def test_cli_exits_with_one_line_and_no_traceback(tmp_path: Path, content: str,
                                                  expected: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "trio_chat.cli", "serve", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trio-chat: error: {path}:")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_help_explains_every_option() -> None:
    result = subprocess.run([sys.executable, "-m", "trio_chat.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("CONFIG", "--host", "--port", "--sqlite", "embedded default", "SIGTERM"):
        assert option in result.stdout
    top = subprocess.run([sys.executable, "-m", "trio_chat.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "serve" in top.stdout


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trio_chat.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_migrate_creates_and_reports_the_schema(tmp_path: Path, mysql_db) -> None:
    result = _cli("migrate", "--sqlite", str(tmp_path / "m.db"))
    assert result.returncode == 0, result.stderr
    schema = f"schema at version {SCHEMA_VERSION}"
    assert result.stdout.strip() == f"SQLite {tmp_path / 'm.db'}: {schema}"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"db": {"host": mysql_db.host, "port": str(mysql_db.port),
                                       "id": mysql_db.id, "password": mysql_db.password,
                                       "database": mysql_db.database}}))
    for _ in range(2):  # and again: nothing left to do, same version
        result = _cli("migrate", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(f"/{mysql_db.database}: {schema}")


def test_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path.write_text(json.dumps({"db": {"host": "127.0.0.1", "port": port, "database": "x"}}))
    result = _cli("serve", str(path), "--port", "0")
    assert result.returncode == 3  # a service unreachable at start-up
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"trio-chat: error: db: MySQL at 127.0.0.1:{port} (user 'root', "
                      f"database 'x'): (2003, \"Can't connect to MySQL server on "
                      f"'127.0.0.1'\")"] or (len(errors) == 1 and str(port) in errors[0])
    assert "Traceback" not in result.stderr
