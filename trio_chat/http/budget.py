"""Uploads per identity (:class:`UploadAllowance`); the bytes of request bodies in
flight are a :class:`trio_chat.budget.ByteBudget`.

Sans-IO: no task, no I/O, time is an argument. The upload handler takes from
the allowance before any decoding.
"""

from __future__ import annotations

import attrs


@attrs.define
class UploadAllowance:
    """Uploads per identity (a token's author, or an address): ``per_minute`` uploads
    and ``bytes_per_hour`` bytes, each a token bucket that starts full and refills
    steadily. Identities whose buckets are full again are forgotten, so the table is
    as large as the set of identities that uploaded lately."""

    per_minute: float = attrs.field(validator=attrs.validators.gt(0))
    bytes_per_hour: float = attrs.field(validator=attrs.validators.gt(0))
    # identity -> (uploads left, bytes left, when last refilled)
    _left: dict[str, tuple[float, float, float]] = attrs.field(init=False, factory=dict)

    def take(self, identity: str, size: int, now: float) -> tuple[str, float] | None:
        """Count an upload of ``size`` bytes at monotonic ``now``: None, or (nothing
        counted) ``("rate" | "quota", seconds until it would pass)``."""
        uploads, size_left = self._refilled(identity, now)
        if uploads < 1:
            return "rate", (1 - uploads) * 60 / self.per_minute
        if size_left < size:
            return "quota", (size - size_left) * 3600 / self.bytes_per_hour
        self._left[identity] = (uploads - 1, size_left - size, now)
        if len(self._left) > _PRUNE_AT:
            self._prune(now)
        return None

    def _refilled(self, identity: str, now: float) -> tuple[float, float]:
        uploads, size_left, stamp = self._left.get(
            identity, (self.per_minute, self.bytes_per_hour, now))
        elapsed = max(0.0, now - stamp)
        return (min(self.per_minute, uploads + elapsed * self.per_minute / 60),
                min(self.bytes_per_hour, size_left + elapsed * self.bytes_per_hour / 3600))

    def _prune(self, now: float) -> None:
        for identity in list(self._left):
            if self._refilled(identity, now) == (self.per_minute, self.bytes_per_hour):
                del self._left[identity]

    def __len__(self) -> int:
        return len(self._left)


# Identities remembered before full buckets are looked for and forgotten.
_PRUNE_AT = 4096
