"""The deployment files: the systemd unit verified by systemd-analyze, the compose
file parsed and its settings checked by trio-chat's own parser, the Dockerfile's
layout and its health check run against a real server. (No container runtime
runs here, so the image itself is not built.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import trio
import yaml

from trio_chat.config import parse_config

from .conftest import make_config, start_server

DEPLOY = Path(__file__).parent.parent / "deploy"
ROOT = DEPLOY.parent


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed"
    text = (DEPLOY / "trio-chat.service").read_text()
    assert re.search(r"^Type=simple$", text, re.M)  # no sd_notify
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes",
                   "RestartPreventExitStatus=2", "KillSignal=SIGTERM"):
        assert re.search(rf"^{re.escape(option)}$", text, re.M), option
    exec_start = re.search(r"^ExecStart=(\S+) serve ", text, re.M)
    assert exec_start is not None
    # The same unit, with the trio-chat this test runs, so the command exists.
    unit = tmp_path / "trio-chat.service"
    unit.write_text(text.replace(exec_start.group(1), str(Path(sys.prefix) / "bin" /
                                                          "trio-chat")))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == result.stderr == "", result.stderr


def _substitute(value: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_file_has_two_nodes_mariadb_and_redis() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"chat1", "chat2", "mariadb", "redis"}
    ports = set()
    for name in ("chat1", "chat2"):
        node = services[name]
        assert node["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / node["build"]["context"] / "deploy" / "Dockerfile").exists()
        assert node["depends_on"] == {"mariadb": {"condition": "service_healthy"},
                                      "redis": {"condition": "service_healthy"}}
        assert node["stop_grace_period"] == "20s"
        ports.add(node["ports"][0].split(":")[0])
        environ = {k: _substitute(str(v)) for k, v in node["environment"].items()}
        # The nodes' settings are what trio-chat's parser makes of them, without a warning.
        config = parse_config({}, "compose", environ)
        assert config.warnings == ()
        assert config.db is not None and config.db.host == "mariadb"
        assert config.redis is not None and config.redis.host == "redis"
        assert config.server.startup_wait > 0
        db_env = services["mariadb"]["environment"]
        assert _substitute(db_env["MARIADB_PASSWORD"]) == config.db.password
        assert db_env["MARIADB_USER"] == config.db.id
        assert db_env["MARIADB_DATABASE"] == config.db.database
    assert len(ports) == 2
    for name in ("mariadb", "redis"):
        assert services[name]["healthcheck"]["test"]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile_layout() -> None:
    steps = _dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert all(re.match(r"python:3\.1[0-3]-slim\b", stage) for stage in stages)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    ops = [op for op, _ in final]
    user = next(args for op, args in final if op == "USER")
    assert user not in ("root", "0")
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    assert json.loads(next(a for op, a in final if op == "ENTRYPOINT")) == ["trio-chat", "serve"]
    assert "/healthz" in next(a for op, a in final if op == "HEALTHCHECK")
    assert next(a for op, a in final if op == "EXPOSE") == "8080"
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert (ROOT / source).exists(), source


async def test_dockerfile_health_check_asks_healthz(nursery, tmp_path: Path) -> None:
    check = next(a for op, a in _dockerfile() if op == "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3:])
    command[0] = sys.executable
    server = await start_server(nursery, make_config(tmp_path / "chat.db"))
    ok = await trio.run_process(command, env={"TRIO_CHAT_SERVER_PORT": str(server.port)},
                                check=False)
    assert ok.returncode == 0
    server.shutdown()
    with trio.fail_after(30):
        while server.task is not None and server.task.child_nurseries:
            await trio.sleep(0.05)
    down = await trio.run_process(command, env={"TRIO_CHAT_SERVER_PORT": str(server.port)},
                                  check=False, capture_stderr=True)
    assert down.returncode != 0
