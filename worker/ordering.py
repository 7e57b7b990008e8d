"""Text order for an utterance made of several segment requests.

The frontend splits a long text into segments; the stages compute them concurrently, so their
chunks arrive interleaved. :class:`SegmentOrder` releases them in text order: every chunk of
segment 1, then of segment 2, ... holding back what arrives early. The in-process
``Engine.stream`` and the server (replies for one ``tts`` id) both use it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class SegmentOrder(Generic[T]):
    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("an utterance needs at least one segment")
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.current = 0  # index of the segment whose chunks are released now
        self.held: dict[str, list[T]] = {k: [] for k in self.keys}
        self.ended: set[str] = set()

    def push(self, key: str, item: T, final: bool) -> list[T]:
        """Add a segment's chunk (``final``: that segment's last). -> chunks now due, in order."""
        if key not in self.index:
            raise KeyError(f"unknown segment {key!r}")
        if key in self.ended:
            raise ValueError(f"segment {key!r} already ended")
        self.held[key].append(item)
        if final:
            self.ended.add(key)
        out: list[T] = []
        while self.current < len(self.keys):
            k = self.keys[self.current]
            out += self.held[k]
            self.held[k] = []
            if k not in self.ended:
                break
            self.current += 1
        return out

    @property
    def done(self) -> bool:
        """Every segment has ended and everything was released."""
        return self.current == len(self.keys)

    def pending(self) -> list[str]:
        """Segments that have not ended yet."""
        return [k for k in self.keys if k not in self.ended]
