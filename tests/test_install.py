"""Installing trio-chat as an operator would: ``pip install .`` into a clean venv and
``trio-chat serve`` from another directory; ``scripts/run``'s venv installs once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from .conftest import wait_until
from .rawws import http_get

ROOT = Path(__file__).parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRIO_CHAT_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


@pytest.mark.slow
async def test_pip_install_then_serve_from_another_directory(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    await trio.run_process([sys.executable, "-m", "venv", str(venv)])
    # A copy of the tree, so the build leaves nothing in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "trio_chat", source / "trio_chat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    await trio.run_process([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            str(source)], env=clean_env(), capture_stdout=True,
                           capture_stderr=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [str(venv / "bin" / "trio-chat"), "serve", "--port", "0"], cwd=str(elsewhere),
            stderr=log_file, env=clean_env())
    try:
        await wait_until(lambda: b"listening on" in log_path.read_bytes(), timeout=60)
        text = log_path.read_text()
        port = int(text.split("listening on http://127.0.0.1:")[1].split("/")[0])
        status, _, body = await http_get(port, "/")  # the demo page is package data
        assert status == 200 and b"<html" in body.lower()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    assert (elsewhere / "trio-chat.db").exists()  # the embedded default, in its cwd


def test_scripts_venv_installs_only_when_pyproject_changed() -> None:
    venv = Path(sys.prefix)  # the venv running the tests, installed by scripts/_venv.sh
    stamp = venv / ".trio-chat-installed"
    script = f'source "{ROOT}/scripts/_venv.sh"; ensure_venv ""'
    env = clean_env(TRIO_CHAT_VENV=str(venv))
    subprocess.run(["bash", "-c", script], check=True, env=env, timeout=600,
                   capture_output=True)
    assert stamp.exists()
    before = stamp.stat().st_mtime_ns
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", script], env=env, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == result.stderr == ""
    assert time.monotonic() - started < 2  # no pip, no package index
    assert stamp.stat().st_mtime_ns == before
