"""What one flush of a large room hands its members: :class:`Flush`. Sans-IO, no task.

A room over :data:`trio_chat.room.WRITE_NOW_MEMBERS` members keeps the frames
that arrive between two passes of the flusher once, in one list; at the flush
every member is given the same :class:`Flush`. A member whose queue is empty
writes :attr:`Flush.joined` with one ``write``; one with something queued (or
in history replay, or slow) takes it as one queue entry that counts as
``len(frames)`` frames. The joined bytes are the frames back to back, so the
wire still carries one message per WebSocket frame.

A member that encodes frames its own way (a compressing transport) builds its
bytes once per flush with :meth:`Flush.encoded`, and every member encoding the
same way shares them: the cost stays per flush, not per member.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


@attrs.define(eq=False)
class Flush:
    """A large room's pending frames, in order, and their bytes."""

    frames: list[bytes]
    nbytes: int
    _joined: bytes | None = attrs.field(init=False, default=None)
    # One other encoding of the frames, made by the first member that asked for it.
    _encoding: str = attrs.field(init=False, default="")
    _encoded: bytes = attrs.field(init=False, default=b"")

    @property
    def joined(self) -> bytes:
        """The frames back to back, joined once for every member."""
        if self._joined is None:
            frames = self.frames
            self._joined = frames[0] if len(frames) == 1 else b"".join(frames)
        return self._joined

    def encoded(self, encoding: str, encode: Callable[[list[bytes]], bytes]) -> bytes:
        """The frames as ``encode`` writes them, made once per flush for ``encoding``
        (a name such as ``"deflate"``); a second encoding replaces the first."""
        if self._encoding != encoding:
            self._encoded = encode(self.frames)
            self._encoding = encoding
        return self._encoded
