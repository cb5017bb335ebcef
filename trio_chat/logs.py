"""Logging set-up: ``logger.level`` and ``logger.format`` (text or JSON lines).

Owns the root handler of the ``trio-chat`` process. Text is one readable line
per record, as always. JSON is one object per line with ``time`` (UTC,
ISO-8601), ``level``, ``logger``, ``message``, ``worker`` (with ``--workers``),
the exception when there is one, and whatever the record carries as ``extra``
(``event``, ``room``, ``connection``, ``remote``, ``close_code``,
``duration``...), so a log pipeline needs no parsing. Runs no tasks.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

# What every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker:
            entry["worker"] = self._worker
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: int, fmt: str = "text", worker: str | None = None) -> None:
    """Send every record at ``level`` or above to stderr in ``fmt`` ("text" or "json");
    ``worker`` ("1/2") marks the lines of one of ``--workers``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        prefix = f"[worker {worker}] " if worker else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
