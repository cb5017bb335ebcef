"""The operator's commands ``check-config`` and ``token``, and their arguments.

Owns showing the effective configuration (the file, the environment and the
options over the defaults) with secrets masked and the memory bounds it sets
(README, "Memory budget"), and minting user tokens signed with the configured
secret. Runs no tasks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import attrs

from .auth import make_token
from .config import _SECTIONS, Config, env_name
from .http.serve import MAX_HEAD_BYTES

# What a secret that is set looks like in check-config's output.
MASK = "********"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float | None:
    """``--ttl``: seconds, or a number with s, m, h or d; ``none`` for no expiry."""
    if text.lower() == "none":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90, 15m, 1h or 7d (or none), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def room_list(text: str) -> list[int]:
    """``--rooms``: comma-separated room ids."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated room ids, got {text!r}") from None


def add_commands(commands: Any) -> None:
    """Add ``check-config`` and ``token`` to the ``trio-chat`` subcommands."""
    check = commands.add_parser(
        "check-config", help="check a configuration and print the effective settings",
        description="Read CONFIG (or the embedded default) with the TRIO_CHAT_* environment "
                    "variables over it, exactly as serve does, and print the effective "
                    "settings as JSON with secrets masked, each key's variable beside it "
                    "with --env. A bad setting is one line on stderr and exit status 2.")
    check.add_argument("config", nargs="?", metavar="CONFIG",
                       help="path to config.json (default: the embedded default)")
    check.add_argument("--env", action="store_true",
                       help="list each setting's environment variable instead")
    token = commands.add_parser(
        "token", help="print a user token signed with the configured secret",
        description="Print an HS256 token for author --sub, signed with auth.secret (from "
                    "CONFIG or TRIO_CHAT_AUTH_SECRET), for ?token= or Authorization: Bearer.")
    token.add_argument("config", nargs="?", metavar="CONFIG",
                       help="path to config.json (default: the embedded default)")
    token.add_argument("--sub", type=int, required=True, metavar="AUTHOR_ID",
                       help="the author id the token proves")
    token.add_argument("--rooms", type=room_list, default=[], metavar="ID,ID",
                       help="private rooms it may join")
    token.add_argument("--ttl", type=duration, default=3600.0, metavar="DURATION",
                       help="how long it is valid: 90, 15m, 1h (the default), 7d, or none")


def effective(config: Config) -> dict[str, Any]:
    """The configuration as config.json would write it, secrets masked."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        if section is None:
            continue
        values: dict[str, Any] = {}
        for field in attrs.fields(type(section)):
            meta, value = field.metadata, getattr(section, field.name)
            if meta["secret"]:
                value = MASK if value else ""
            elif meta["choices"] is not None:
                value = next(k for k, v in meta["choices"].items() if v == value)
            elif isinstance(value, tuple):
                value = list(value)
            values[meta["key"]] = value
        out[name] = values
    return out


def check_config(config: Config, env: bool) -> int:
    """``check-config``: print the effective settings (or their variables)."""
    for warning in config.warnings:
        print(f"trio-chat: warning: {warning}", file=sys.stderr)
    if env:
        for name, cls in _SECTIONS.items():
            for field in attrs.fields(cls):
                print(f"{env_name(name, field.metadata['key'])}\t{name}."
                      f"{field.metadata['key']}")
        return 0
    print(json.dumps(effective(config), indent=2))
    for line in memory_bounds(config):
        print(f"trio-chat: {line}", file=sys.stderr)
    return 0


def memory_bounds(config: Config) -> list[str]:
    """What one address, and the whole server, can make a node hold under ``config``:
    the sums of the budgets, each named by its key, in MiB."""
    limits, server, media = config.limits, config.server, config.media

    def total(parts: list[tuple[str, int]]) -> str:
        added = " + ".join(f"{name} {size / 2**20:.1f}" for name, size in parts)
        return f"{sum(size for _, size in parts) / 2**20:.1f} MiB ({added})"

    address = [("limits.inboundBytesPerIp", limits.inbound_bytes_per_ip),
               ("limits.outboundBytesPerIp", limits.outbound_bytes_per_ip),
               ("limits.bodyBytesPerIp", limits.body_bytes_per_ip),
               ("request heads", limits.http_connections_per_ip * MAX_HEAD_BYTES)]
    node = [("limits.inboundBytesTotal", limits.inbound_bytes_total),
            ("limits.outboundBytesTotal", limits.outbound_bytes_total),
            ("limits.bodyBytesTotal", limits.body_bytes_total),
            ("server.storeBufferBytes", server.store_buffer_bytes),
            ("server.idempotencyMemoryBytes", server.idempotency_memory_bytes),
            ("image decoding", 8 * media.max_pixels * media.decode_concurrency)]
    return [f"memory: one address at most {total(address)}",
            f"memory: the server at most {total(node)}, plus server.historyBytes "
            f"({server.history_bytes / 2**20:.1f} MiB) per live room"]


def print_token(config: Config, args: argparse.Namespace) -> int:
    """``token``: one line, the token."""
    try:
        print(make_token(args.sub, config.auth.secret, rooms=args.rooms, ttl=args.ttl))
    except ValueError as exc:
        print(f"trio-chat: error: {config.source}: auth.secret: {exc} (set auth.secret or "
              "TRIO_CHAT_AUTH_SECRET)", file=sys.stderr)
        return 2
    return 0
