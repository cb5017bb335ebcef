"""What one client may make the HTTP side hold: bytes of request bodies in
flight, per address and for the whole server (:class:`ByteBudget`), and uploads
per identity (:class:`UploadAllowance`).

Sans-IO: no task, no I/O, time is an argument. The connection loop reserves a
body's bytes as they arrive and releases them once its answer is sent; the
upload handler takes from the allowance before any decoding.
"""

from __future__ import annotations

import attrs


@attrs.define
class ByteBudget:
    """Bytes held at once, at most ``per_key`` for one key (an address) and ``total``
    in all. Only keys holding bytes are remembered."""

    per_key: int = attrs.field(validator=attrs.validators.ge(1))
    total: int = attrs.field(validator=attrs.validators.ge(1))
    _held: dict[str, int] = attrs.field(init=False, factory=dict)
    _sum: int = attrs.field(init=False, default=0)

    def reserve(self, key: str, size: int) -> str | None:
        """Hold ``size`` more bytes for ``key``: None, or (nothing held) ``"key"`` when
        the key's budget, ``"total"`` when the server's, would be exceeded."""
        held = self._held.get(key, 0)
        if held + size > self.per_key:
            return "key"
        if self._sum + size > self.total:
            return "total"
        self._held[key] = held + size
        self._sum += size
        return None

    def release(self, key: str, size: int) -> None:
        """Give back ``size`` bytes that :meth:`reserve` held for ``key``."""
        held = self._held.get(key, 0)
        if size > held:
            raise ValueError(f"{key!r} holds {held} bytes, not {size}")
        if held == size:
            del self._held[key]
        else:
            self._held[key] = held - size
        self._sum -= size

    def held(self, key: str | None = None) -> int:
        """Bytes held by ``key``, or by everyone."""
        return self._sum if key is None else self._held.get(key, 0)


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
