"""A bounded map that forgets the entries used least recently: the one shape of the caches
of manifest pages, backup blocks, open files and read-ahead windows."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Each entry weighs 1 unless put() says otherwise; when they weigh more than `limit`
    in all, the least recently used go, each handed to `evicted` (to close a file, say).
    Not locked: its owner's lock guards it."""

    def __init__(self, limit: int, evicted: Callable[[K, V], None] | None = None) -> None:
        self.limit = limit
        self.weight = 0
        self._evicted = evicted
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(self._entries)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> V | None:
        """The value, leaving the order as it is; None if absent."""
        found = self._entries.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V, weight: int = 1) -> None:
        """Add or replace an entry, the most recently used; then drop the least recently
        used ones (this one too, if it alone weighs more than the limit) down to it."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.weight -= old[1]
        self._entries[key] = (value, weight)
        self.weight += weight
        self._shrink()

    def reweigh(self, key: K, weight: int) -> None:
        """Count an entry (if present) for `weight` from now on."""
        found = self._entries.get(key)
        if found is not None:
            self._entries[key] = (found[0], weight)
            self.weight += weight - found[1]
            self._shrink()

    def pop(self, key: K) -> V | None:
        """Remove an entry (not handed to `evicted`): its value, or None if absent."""
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self.weight -= found[1]
        return found[0]

    def clear(self) -> list[V]:
        """Remove every entry (none handed to `evicted`): their values."""
        values = [value for value, _ in self._entries.values()]
        self._entries.clear()
        self.weight = 0
        return values

    def _shrink(self) -> None:
        while self.weight > self.limit and self._entries:
            key, (value, weight) = self._entries.popitem(last=False)
            self.weight -= weight
            if self._evicted is not None:
                self._evicted(key, value)
