"""A bounded table of live things (programs, conversations) forgotten when idle."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Seen(Protocol):
    last_seen_s: float


V = TypeVar("V", bound=Seen)


class IdleTable(Generic[V]):
    """Entries by key, least recently seen first: one idle for ``idle_timeout_s`` is
    forgotten, and so is the least recent one when a new entry would pass ``max_entries``.
    ``on_forget`` hears of each entry forgotten either way."""

    def __init__(
        self,
        idle_timeout_s: float,
        max_entries: int,
        what: str,
        on_forget: Callable[[V], None] = lambda entry: None,
    ) -> None:
        if idle_timeout_s <= 0:
            raise ValueError(f"idle timeout must be > 0 s, got {idle_timeout_s}")
        if max_entries < 1:
            raise ValueError(f"{what} must be >= 1, got {max_entries}")
        self.idle_timeout_s = idle_timeout_s
        self.max_entries = max_entries
        self._on_forget = on_forget
        self._entries: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        return self._entries.get(key)

    def pop(self, key: str) -> V | None:
        return self._entries.pop(key, None)

    def touch(self, key: str, entry: V, now_s: float) -> None:
        """``entry`` seen at ``now_s``: (re)inserted as the most recent."""
        entry.last_seen_s = now_s
        self._entries[key] = entry
        self._entries.move_to_end(key)

    def make_room(self) -> None:
        """Forget the least recent entries until a new one fits."""
        while len(self._entries) >= self.max_entries:
            self._forget(next(iter(self._entries)))

    def forget_idle(self, now_s: float) -> None:
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now_s - oldest.last_seen_s < self.idle_timeout_s:
                return
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._on_forget(self._entries.pop(key))
