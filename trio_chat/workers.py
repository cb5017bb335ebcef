"""Every worker's metrics on any worker's ``/metrics`` under ``serve --workers N``.

The kernel hands a scrape to whichever worker accepts it, so each answers for
all of them, every sample labelled ``worker="I"``. The supervisor makes a
private directory and gives its path to every worker; :class:`SharedMetrics`
writes this worker's families there as ``worker-I.json`` (replaced atomically)
every :data:`PUBLISH_INTERVAL` and on every scrape it answers, and merges the
other workers' files into its answer.

Why a counter never goes back between scrapes: a worker's own series in an
answer are either read live by that worker, which writes them to its file
before answering, or read from its file; both its file and its live values only
grow, and every value served was in the file by then. Other workers' gauges are
up to :data:`PUBLISH_INTERVAL` old.

Owns one task (:meth:`SharedMetrics.run`). A file that cannot be read (a worker
not started yet) leaves that worker out of the answer; one that cannot be
written is logged at most once a minute.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import attrs
import trio

from .metrics import Family, LogThrottle, Metrics

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 1.0


@attrs.define(eq=False)
class SharedMetrics:
    directory: Path
    worker: int
    metrics: Metrics
    _throttle: LogThrottle = attrs.field(init=False, factory=LogThrottle)

    def __attrs_post_init__(self) -> None:
        self.metrics.labels = f'worker="{self.worker}"'
        self.metrics.merge = self.merge

    @property
    def path(self) -> Path:
        return self.directory / f"worker-{self.worker}.json"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.publish(self.metrics.families())
        task_status.started()
        while True:
            await trio.sleep(PUBLISH_INTERVAL)
            self.publish(self.metrics.families())

    def publish(self, families: list[Family]) -> None:
        """Write ``families`` to this worker's file, atomically (a few kilobytes: on
        the event loop, so files are written in the order values were read)."""
        data = json.dumps([[f.name, f.kind, f.help, list(map(list, f.samples))]
                           for f in families])
        partial = self.path.with_suffix(".tmp")
        try:
            partial.write_text(data)
            os.replace(partial, self.path)
        except OSError as exc:
            if self._throttle.allow("publish") is not None:
                log.warning("cannot write this worker's metrics to %s: %s", self.path, exc)

    def merge(self, own: list[Family]) -> list[Family]:
        """``own`` (just read) published, then every worker's families, one block per
        family (the text format wants a family's samples together), by worker."""
        self.publish(own)
        blocks: dict[str, tuple[Family, list[tuple[str, str, float]]]] = {}
        for worker in self._workers():
            for family in own if worker == self.worker else self._read(worker):
                blocks.setdefault(family.name, (family, []))[1].extend(family.samples)
        return [attrs.evolve(family, samples=samples) for family, samples in blocks.values()]

    def _workers(self) -> list[int]:
        workers = {self.worker}
        for path in self.directory.glob("worker-*.json"):
            try:
                workers.add(int(path.stem.removeprefix("worker-")))
            except ValueError:
                continue
        return sorted(workers)

    def _read(self, worker: int) -> list[Family]:
        try:
            rows = json.loads((self.directory / f"worker-{worker}.json").read_text())
        except (OSError, ValueError):
            return []
        return [Family(name, kind, help_text, [tuple(sample) for sample in samples])
                for name, kind, help_text, samples in rows]
