"""A least-recently-used cache bounded by a cost (bytes, entries), safe to share between threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Values by key; the least recently used go once the summed `cost` of the values passes `max_cost`.

    A value costing more than `max_cost` on its own is not kept. The default cost is 1 per entry.
    """

    def __init__(self, max_cost: int, cost: Callable[[V], int] = lambda value: 1) -> None:
        self.max_cost = max_cost
        self.cost = cost
        self.total = 0
        self.hits = self.misses = 0
        self._values: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Hashable) -> bool:
        """Whether `key` is held, without counting a hit or making it the most recently used."""
        return key in self._values

    def get(self, key: Hashable) -> V | None:
        """The value under `key` (now the most recently used), or None."""
        with self._lock:
            item = self._values.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._values.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        """Keep `value` under `key`, evicting the least recently used beyond `max_cost`."""
        cost = self.cost(value)
        with self._lock:
            if cost > self.max_cost:
                return
            old = self._values.pop(key, None)
            if old is not None:
                self.total -= old[1]
            self._values[key] = (value, cost)
            self.total += cost
            while self.total > self.max_cost:
                _, (_, evicted) = self._values.popitem(last=False)
                self.total -= evicted

    def clear(self) -> None:
        """Forget every value."""
        with self._lock:
            self._values.clear()
            self.total = 0
