"""Configuration: the seed's ``config.json`` shape plus our ``server`` section.

Owns reading and validating the file into frozen attrs records. Runs no tasks.
It is longer than the house's 400 lines on purpose: most of it is one
declaration per setting (key, default, type, bounds, why), and a setting is
easiest to find in the one table the README mirrors.

The seed's sections (``db``, ``mq``, ``redis``, ``logger``) keep their keys, so
a chatAPI ``config.json`` works unchanged. The seed's template has every value
as a string, ports included, and ``""`` for anything not set: we accept numbers
written as strings, and an empty string means "use the default". A section
whose ``host`` is empty (``db``, ``redis``) is treated as absent.

Every key can also come from the environment, over the file (and over the
embedded default): ``TRIO_CHAT_<SECTION>_<KEY>``, the key's camelCase split
into upper-case words (``server.maxFrameBytes`` is
``TRIO_CHAT_SERVER_MAX_FRAME_BYTES``, ``db.password`` ``TRIO_CHAT_DB_PASSWORD``).
A variable is a string, parsed and checked as the same string in the file would
be (a list is comma-separated, a boolean ``true`` or ``false``); an empty
variable means the default, as an empty string in the file does.

Errors are :class:`ConfigError` with one line naming the file (or the variable),
the key and what was expected; unknown keys are returned as warnings, not errors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from .framing import LARGE_WEIGHT

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is the whole message."""


def _opt(key: str, default: Any, kind: type, *, low: float | None = None,
         high: float | None = None, choices: Mapping[str, Any] | None = None,
         secret: bool = False) -> Any:
    """An attrs field that remembers its JSON key, type and bounds (a secret stays out
    of reprs, and so out of logs and tracebacks)."""
    return attrs.field(default=default, repr=not secret, metadata={
        "key": key, "kind": kind, "low": low, "high": high, "choices": choices,
        "secret": secret})


@attrs.frozen
class ServerConfig:
    host: str = _opt("host", "127.0.0.1", str)
    port: int = _opt("port", 8080, int, low=0, high=65535)
    # At start-up, how long to keep trying a Redis or database that is unreachable
    # (orchestrators start everything at once); 0: fail at once.
    startup_wait: float = _opt("startupWait", 0.0, float, low=0, high=86400)
    max_frame_bytes: int = _opt("maxFrameBytes", 64 * 1024, int, low=256, high=16 * 1024 * 1024)
    history_on_join: int = _opt("historyOnJoin", 50, int, low=0, high=10_000)
    replay_limit: int = _opt("replayLimit", 1000, int, low=0, high=1_000_000)
    # The recent messages a live room keeps for joiners, in bytes (besides historyOnJoin).
    history_bytes: int = _opt("historyBytes", 1024 * 1024, int, low=0, high=1024 * 1024 * 1024)
    # Messages over maxFrameBytes (chat_img data URLs) every connection together may be
    # reading or handling at once, in bytes.
    large_frame_budget: int = _opt("largeFrameBudget", 32 * 1024 * 1024, int, low=0,
                                   high=64 * 1024 * 1024 * 1024)
    send_queue_messages: int = _opt("sendQueueMessages", 1024, int, low=1, high=1_000_000)
    send_queue_bytes: int = _opt("sendQueueBytes", 4 * 1024 * 1024, int, low=1024,
                                 high=1024 * 1024 * 1024)
    write_wait: float = _opt("writeWait", 10.0, float, low=0.001, high=3600)
    pong_wait: float = _opt("pongWait", 60.0, float, low=0.001, high=86400)
    ping_period: float = _opt("pingPeriod", 54.0, float, low=0.001, high=86400)
    handshake_timeout: float = _opt("handshakeTimeout", 10.0, float, low=0.001, high=3600)
    # Running one HTTP handler (the upgrade's checks included); over it: 503.
    handler_timeout: float = _opt("handlerTimeout", 30.0, float, low=0.001, high=3600)
    # The slowest a request body or an HTTP answer may move, in bytes a second: its
    # deadline grows by its size over this rate, past handshakeTimeout or writeWait.
    min_transfer_rate: int = _opt("minTransferRate", 32 * 1024, int, low=1,
                                  high=1024 * 1024 * 1024)
    close_timeout: float = _opt("closeTimeout", 2.0, float, low=0.0, high=3600)
    shutdown_timeout: float = _opt("shutdownTimeout", 10.0, float, low=0.0, high=3600)
    # Seconds between a shutdown signal and closing anything, while /readyz answers 503.
    drain_delay: float = _opt("drainDelay", 0.0, float, low=0.0, high=3600)
    store_buffer: int = _opt("storeBuffer", 100_000, int, low=1, high=10_000_000)
    # The buffer's bound in bytes of message content, besides storeBuffer's count.
    store_buffer_bytes: int = _opt("storeBufferBytes", 64 * 1024 * 1024, int,
                                   low=64 * 1024, high=64 * 1024 * 1024 * 1024)
    store_batch: int = _opt("storeBatch", 1000, int, low=1, high=100_000)
    presence_ttl: float = _opt("presenceTtl", 30.0, float, low=0.1, high=86400)
    room_policy: str = _opt("roomPolicy", "auto", str,
                            choices={"auto": "auto", "strict": "strict"})
    # How long a client_msg_id is remembered: a resend within it is acked, not stored.
    idempotency_window: float = _opt("idempotencyWindow", 600.0, float, low=1,
                                     high=7 * 86400)
    # The client_msg_ids one node remembers (with their messages), in bytes; older
    # ones within the window are looked up in the history store.
    idempotency_memory_bytes: int = _opt("idempotencyMemoryBytes", 32 * 1024 * 1024, int,
                                         low=64 * 1024, high=64 * 1024 * 1024 * 1024)
    # With Redis: how long a room's recent list outlives the room's last message.
    recent_ttl: float = _opt("recentTtl", 86400.0, float, low=60, high=7 * 86400)
    # When a sender's ack goes out (and, on one node, when members see the message):
    # once the message is durable, or as soon as it is numbered.
    ack_after: str = _opt("ackAfter", "stored", str,
                          choices={"stored": "stored", "accepted": "accepted"})
    # While the history store is failing: accept messages into the bounded buffer
    # (acked with "durable": false), or refuse them (persistence_unavailable).
    store_outage: str = _opt("storeOutage", "buffer", str,
                             choices={"buffer": "buffer", "refuse": "refuse"})
    # A message waits this long for its commit before the store counts as too slow.
    store_wait: float = _opt("storeWait", 2.0, float, low=0.01, high=3600)
    # With Redis: a message still in a room's Redis log this long after it was
    # accepted is written to the history store by whichever node finds it.
    orphaned_after: float = _opt("orphanedAfter", 30.0, float, low=0.1, high=86400)
    # permessage-deflate (RFC 7692): agreed to when a client offers it, or never.
    compression: str = _opt("compression", "deflate", str,
                            choices={"deflate": "deflate", "off": "off"})


@attrs.frozen
class SqliteConfig:
    path: str = _opt("path", "./trio-chat.db", str)


@attrs.frozen
class DbConfig:
    """MySQL/MariaDB, as the seed names it: ``id`` is the user name."""

    id: str = _opt("id", "root", str)
    password: str = _opt("password", "", str, secret=True)
    host: str = _opt("host", "", str)
    port: int = _opt("port", 3306, int, low=1, high=65535)
    database: str = _opt("database", "chat", str)


@attrs.frozen
class MqConfig:
    """Accepted for compatibility with the seed; trio-chat does not use a queue."""

    host: str = _opt("host", "", str)
    port: str = _opt("port", "", str)
    id: str = _opt("id", "", str)
    password: str = _opt("password", "", str, secret=True)
    listening_queue_name: str = _opt("listeningQueueName", "", str)


@attrs.frozen
class RedisConfig:
    """Redis, as the seed names it: ``id`` is the ACL user name."""

    id: str = _opt("id", "", str)
    password: str = _opt("password", "", str, secret=True)
    host: str = _opt("host", "", str)
    port: int = _opt("port", 6379, int, low=1, high=65535)
    database: int = _opt("database", 0, int, low=0, high=1_000_000)
    listening_channel_name: str = _opt("listeningChannelName", "trio-chat", str)
    publish_channel_name: str = _opt("publishChannelName", "trio-chat", str)
    # The operator states that something forwards the publish channels to the
    # listening ones (chatAPI's synchronizer), so the two names may differ.
    relay: bool = _opt("relay", False, bool)


@attrs.frozen
class AuthConfig:
    """Identity and the management API. Secrets may come from the environment instead."""

    mode: str = _opt("mode", "off", str, choices={"off": "off", "token": "token"})
    secret: str = _opt("secret", "", str, secret=True)
    admin_key: str = _opt("adminKey", "", str, secret=True)
    # Needed (as a bearer token) to read /metrics, when set; the admin key works too.
    metrics_key: str = _opt("metricsKey", "", str, secret=True)
    # Origins allowed to open WebSockets from a browser; none: the server's own host.
    allowed_origins: tuple[str, ...] = _opt("allowedOrigins", (), tuple)


@attrs.frozen
class LimitsConfig:
    """Abuse limits, per connection, per identity and per client address."""

    messages_per_second: float = _opt("messagesPerSecond", 20.0, float, low=0.01,
                                      high=1_000_000)
    message_burst: int = _opt("messageBurst", 40, int, low=1, high=1_000_000)
    # Refused messages since the client last slowed down enough to refill its burst,
    # before the connection is closed (1008).
    flood_limit: int = _opt("floodLimit", 20, int, low=1, high=1_000_000)
    # Every TCP connection from one address counts, HTTP and WebSocket alike.
    connections_per_ip: int = _opt("connectionsPerIp", 1000, int, low=1, high=10_000_000)
    # Connections of one address not (yet) upgraded: reading, answering or idle between
    # requests. A burst of half-open requests is refused here, long before the descriptors
    # run out.
    http_connections_per_ip: int = _opt("httpConnectionsPerIp", 64, int, low=1,
                                        high=10_000_000)
    # Uploads per identity (a token's author, or the address when tokens are off).
    uploads_per_minute: float = _opt("uploadsPerMinute", 10.0, float, low=0.01,
                                     high=1_000_000)
    upload_bytes_per_hour: int = _opt("uploadBytesPerHour", 100 * 1024 * 1024, int,
                                      low=1024, high=1 << 40)
    # Request bodies, their multipart copies and answers held at once, per address and
    # in all.
    body_bytes_per_ip: int = _opt("bodyBytesPerIp", 12 * 1024 * 1024, int, low=1024 * 1024,
                                  high=1 << 40)
    body_bytes_total: int = _opt("bodyBytesTotal", 256 * 1024 * 1024, int,
                                 low=1024 * 1024, high=1 << 40)
    # What WebSocket readers hold (partial frames, fragments, messages being handled, data
    # URLs at three times their size), per address and in all.
    inbound_bytes_per_ip: int = _opt("inboundBytesPerIp", 24 * 1024 * 1024, int,
                                     low=64 * 1024, high=1 << 40)
    inbound_bytes_total: int = _opt("inboundBytesTotal", 256 * 1024 * 1024, int,
                                    low=64 * 1024, high=1 << 40)
    # Outbound queues (frames the sockets have not taken), per address and in all.
    outbound_bytes_per_ip: int = _opt("outboundBytesPerIp", 24 * 1024 * 1024, int,
                                      low=1024 * 1024, high=1 << 40)
    outbound_bytes_total: int = _opt("outboundBytesTotal", 1024 * 1024 * 1024, int,
                                     low=1024 * 1024, high=1 << 40)
    # Shared by every connection of one token's author (of one address without tokens).
    identity_messages_per_second: float = _opt("identityMessagesPerSecond", 50.0, float,
                                               low=0.01, high=1_000_000)
    identity_message_burst: int = _opt("identityMessageBurst", 100, int, low=1,
                                       high=1_000_000)
    # A connection's typing events closer together than this are dropped.
    typing_interval: float = _opt("typingInterval", 2.0, float, low=0, high=3600)


@attrs.frozen
class MediaConfig:
    """Images: uploads and chat_img frames."""

    max_image_bytes: int = _opt("maxImageBytes", 5 * 1024 * 1024, int, low=1024,
                                high=64 * 1024 * 1024)
    # Caps checked from the header before decoding (decompression bombs).
    max_dimension: int = _opt("maxDimension", 10_000, int, low=16, high=100_000)
    max_pixels: int = _opt("maxPixels", 40_000_000, int, low=256, high=1_000_000_000)
    thumbnail_size: int = _opt("thumbnailSize", 320, int, low=16, high=4096)
    # An upload that no chat_img message names within this many seconds is deleted.
    unsent_upload_ttl: float = _opt("unsentUploadTtl", 86400.0, float, low=1,
                                    high=365 * 86400)
    # Image decodes at once in the process; each may hold 8 bytes x maxPixels.
    decode_concurrency: int = _opt("decodeConcurrency", 1, int, low=1, high=64)


ENV_PREFIX = "TRIO_CHAT_"

# What an image upload's body may hold beyond the image: a multipart envelope.
UPLOAD_ENVELOPE = 64 * 1024

SECRET_ENV = "TRIO_CHAT_AUTH_SECRET"
# The older name of TRIO_CHAT_AUTH_ADMIN_KEY, still read.
ADMIN_KEY_ENV = "TRIO_CHAT_ADMIN_KEY"
MIN_SECRET = 32


@attrs.frozen
class LoggerConfig:
    level: int = _opt("level", logging.INFO, str, choices=LOG_LEVELS)
    # "text" (one readable line a record) or "json" (one object a line).
    format: str = _opt("format", "text", str, choices={"text": "text", "json": "json"})


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    sqlite: SqliteConfig = SqliteConfig()
    db: DbConfig | None = None
    mq: MqConfig | None = None
    redis: RedisConfig | None = None
    logger: LoggerConfig = LoggerConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    media: MediaConfig = MediaConfig()
    source: str = "<embedded default>"
    warnings: tuple[str, ...] = ()


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "sqlite": SqliteConfig,
    "db": DbConfig,
    "mq": MqConfig,
    "redis": RedisConfig,
    "logger": LoggerConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
    "media": MediaConfig,
}
# Sections that only exist when configured: an empty host means "not configured".
_OPTIONAL = {"db", "redis"}


_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True,
             "off": False, "1": True, "0": False}


def env_name(section: str, key: str) -> str:
    """The environment variable for ``section.key``: ``TRIO_CHAT_REDIS_LISTENING_CHANNEL_NAME``."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)
    return f"{ENV_PREFIX}{section.upper()}_{words.upper()}"


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _convert(where: str, value: Any, field: attrs.Attribute[Any]) -> Any:
    meta = field.metadata
    kind, low, high, choices = meta["kind"], meta["low"], meta["high"], meta["choices"]
    if choices is not None:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(sorted(choices))}, "
                              f"got {_describe(value)}")
        return choices[value.lower()]
    if kind is bool:
        if isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    if kind is tuple:
        # A list of strings, or (as the seed writes every value) one comma-separated string.
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {_describe(value)}")
        return tuple(value)
    expected = "an integer" if kind is int else "a number"
    number: Any = value
    if isinstance(value, str):
        # The seed's template writes ports as strings: "3306".
        try:
            number = int(value) if kind is int else float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")
    if kind is int and not isinstance(number, int):
        if not float(number).is_integer():
            raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")
        number = int(number)
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {_describe(value)}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ConfigError(f"{where}: expected {expected} from {low:g} to {high:g}, "
                          f"got {_describe(value)}")
    return kind(number)


def _section(source: str, name: str, raw: Any, cls: type, warnings: list[str],
             environ: Mapping[str, str]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name}: expected an object, got {_describe(raw)}")
    by_key = {f.metadata["key"]: f for f in attrs.fields(cls)}
    values = {}
    for key, value in raw.items():
        field = by_key.get(key)
        if field is None:
            warnings.append(f"{source}: {name}.{key}: unknown key, ignored")
            continue
        if value == "" or value is None:
            continue
        values[field.name] = _convert(f"{source}: {name}.{key}", value, field)
    for key, field in by_key.items():
        variable = env_name(name, key)
        if variable not in environ:
            continue
        values.pop(field.name, None)
        if environ[variable] != "":
            values[field.name] = _convert(f"{variable} ({name}.{key})", environ[variable],
                                          field)
    if name in _OPTIONAL and not values.get("host"):
        return None
    return cls(**values)


def parse_config(data: Any, source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate already-decoded JSON ``data`` with the ``TRIO_CHAT_*`` variables of
    ``environ`` (default: the process environment) over it; pure otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level, "
                          f"got {_describe(data)}")
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    for name in data:
        if name not in _SECTIONS:
            warnings.append(f"{source}: {name}: unknown section, ignored")
    known = {env_name(name, f.metadata["key"]) for name, cls in _SECTIONS.items()
             for f in attrs.fields(cls)}
    for variable in sorted(environ):
        section = variable[len(ENV_PREFIX):].split("_", 1)[0].lower()
        if variable.startswith(ENV_PREFIX) and section in _SECTIONS and variable not in known:
            warnings.append(f"{variable}: unknown setting, ignored")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        prefix = f"{ENV_PREFIX}{name.upper()}_"
        if name in data or any(v.startswith(prefix) and v in known for v in environ):
            sections[name] = _section(source, name, data.get(name, {}), cls, warnings,
                                      environ)
    config = Config(**sections, source=source, warnings=tuple(warnings))
    config = attrs.evolve(config, auth=_auth_secrets(config.auth, source, environ))
    server = config.server
    if server.ping_period >= server.pong_wait:
        raise ConfigError(f"{source}: server.pingPeriod: expected less than server.pongWait "
                          f"({server.pong_wait:g}), got {server.ping_period:g}")
    redis = config.redis
    if redis and redis.listening_channel_name != redis.publish_channel_name and not redis.relay:
        raise ConfigError(
            f"{source}: redis.listeningChannelName {redis.listening_channel_name!r} differs "
            f"from redis.publishChannelName {redis.publish_channel_name!r}: nodes would "
            "listen where nobody publishes and no message would reach anybody; give both "
            "the same value, or set redis.relay to true if a relay forwards one to the other")
    if config.limits.upload_bytes_per_hour < config.media.max_image_bytes:
        raise ConfigError(f"{source}: limits.uploadBytesPerHour: expected at least "
                          f"media.maxImageBytes ({config.media.max_image_bytes}), got "
                          f"{config.limits.upload_bytes_per_hour}")
    # A multipart upload's file part is copied out of its body, in the same budget.
    upload = 2 * (config.media.max_image_bytes + UPLOAD_ENVELOPE)
    for key, value in (("bodyBytesPerIp", config.limits.body_bytes_per_ip),
                       ("bodyBytesTotal", config.limits.body_bytes_total)):
        if value < upload:
            raise ConfigError(f"{source}: limits.{key}: expected at least twice "
                              f"media.maxImageBytes + {UPLOAD_ENVELOPE} ({upload}) so an "
                              f"upload and its multipart copy fit, got {value}")
    # Two messages of the largest size (one being handled, the next being read) and a step.
    frames = 2 * config.server.max_frame_bytes + 64 * 1024
    for key, value in (("inboundBytesPerIp", config.limits.inbound_bytes_per_ip),
                       ("inboundBytesTotal", config.limits.inbound_bytes_total)):
        if value < frames:
            raise ConfigError(f"{source}: limits.{key}: expected at least twice "
                              f"server.maxFrameBytes + 65536 ({frames}), got {value}")
        image = LARGE_WEIGHT * data_url_frame_bytes(config.media)
        if config.server.large_frame_budget and value < image:
            raise ConfigError(f"{source}: limits.{key}: expected at least {LARGE_WEIGHT} times "
                              f"the data URL of media.maxImageBytes ({image}) so a chat_img "
                              f"data URL fits, got {value} (or set server.largeFrameBudget "
                              "to 0 to refuse data URLs over server.maxFrameBytes)")
    return config


def data_url_frame_bytes(media: MediaConfig) -> int:
    """The largest frame a chat_img carrying its image as a data URL may need: the
    image in base64, with room for the rest of the frame."""
    return (media.max_image_bytes + 2) // 3 * 4 + 4096


def _auth_secrets(auth: AuthConfig, source: str, environ: Mapping[str, str]) -> AuthConfig:
    # TRIO_CHAT_AUTH_SECRET and TRIO_CHAT_AUTH_METRICS_KEY are read by the general rule.
    auth = attrs.evolve(auth, admin_key=auth.admin_key or environ.get(ADMIN_KEY_ENV, ""))
    if auth.mode == "token" and len(auth.secret.encode()) < MIN_SECRET:
        raise ConfigError(f"{source}: auth.secret: expected at least {MIN_SECRET} bytes "
                          f"(or set {SECRET_ENV}) when auth.mode is token, got "
                          f"{len(auth.secret.encode())}")
    if auth.admin_key and len(auth.admin_key) < 16:
        raise ConfigError(f"{source}: auth.adminKey: expected at least 16 characters, got "
                          f"{len(auth.admin_key)}")
    if auth.metrics_key and len(auth.metrics_key) < 16:
        raise ConfigError(f"{source}: auth.metricsKey: expected at least 16 characters, got "
                          f"{len(auth.metrics_key)}")
    return auth


def load_config(path: str | os.PathLike[str] | None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the embedded default for ``None``) with the environment over it."""
    if path is None:
        return parse_config({}, Config().source, environ)
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg.startswith("Expecting property name") or exc.msg.startswith(
                "Expecting value"):
            hint = " (a trailing comma?)"
        raise ConfigError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}{hint}") from None
    return parse_config(data, source, environ)
