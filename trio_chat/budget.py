"""Bytes held on behalf of clients, per key (an address) and in all: :class:`ByteBudget`.

Sans-IO: no task, no I/O. The HTTP side holds request bodies and answers in one
(``limits.bodyBytesPerIp``, ``bodyBytesTotal``); the WebSocket transport holds
its outbound queues in another (``limits.outboundBytesPerIp``,
``outboundBytesTotal``), and what its readers hold in a third
(``limits.inboundBytesPerIp``, ``inboundBytesTotal``).
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
    # Reservations refused so far.
    refusals: int = attrs.field(init=False, default=0)

    def reserve(self, key: str, size: int) -> str | None:
        """Hold ``size`` more bytes for ``key``: None, or (nothing held) ``"key"`` when
        the key's budget, ``"total"`` when the server's, would be exceeded."""
        held = self._held.get(key, 0)
        if held + size > self.per_key:
            self.refusals += 1
            return "key"
        if self._sum + size > self.total:
            self.refusals += 1
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
