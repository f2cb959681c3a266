"""Bounded caches, safe to share between threads: least recently used first, or oldest generation first."""

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


class GenerationCache(Generic[V]):
    """Values by key in generations: the oldest generation goes whole once more than `max_entries` are held.

    Its state is a plain history, unlike `LRUCache`'s: a lookup changes nothing, a value is put in the open
    (newest) generation, and `seal` closes that one and opens the next (as does filling it with
    `generation_entries` values). A sealed generation never gains a value (a key put again moves to the open one),
    so each can be saved once, and `restore` from the saved ones rebuilds the same cache.
    """

    def __init__(self, max_entries: int, generation_entries: int | None = None) -> None:
        self.max_entries = max_entries
        self.generation_entries = generation_entries or max(1, max_entries // 16)
        self._generations: dict[int, dict[Hashable, V]] = {0: {}}  # oldest first; the last is the open one
        self._where: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def get(self, key: Hashable) -> V | None:
        """The value under `key`, or None."""
        with self._lock:
            generation = self._where.get(key)
            return None if generation is None else self._generations[generation][key]

    def put(self, key: Hashable, value: V) -> None:
        """Keep `value` under `key` in the open generation; the oldest generations go beyond `max_entries`."""
        with self._lock:
            held = self._where.get(key)
            if held is not None:
                del self._generations[held][key]
            open_id, values = self._open()
            values[key] = value
            self._where[key] = open_id
            if len(values) >= self.generation_entries:
                self._seal()
            while len(self._where) > self.max_entries and len(self._generations) > 1:
                for gone in self._generations.pop(next(iter(self._generations))):
                    del self._where[gone]

    def seal(self) -> None:
        """Close the open generation, if it holds anything, and open the next."""
        with self._lock:
            self._seal()

    def sealed(self) -> dict[int, dict[Hashable, V]]:
        """Every generation but the open one, oldest first, by number."""
        with self._lock:
            return {number: dict(values) for number, values in list(self._generations.items())[:-1]}

    def drop_open(self) -> None:
        """Forget the values of the open generation (what no saved generation holds)."""
        with self._lock:
            for key in self._open()[1]:
                del self._where[key]
            self._open()[1].clear()

    @property
    def opened(self) -> int:
        """The number of the open generation."""
        with self._lock:
            return self._open()[0]

    def restore(self, generations: dict[int, dict[Hashable, V]], opened: int) -> None:
        """Hold exactly the sealed `generations` (as `sealed` gave them, or saved before some of their keys moved to a
        newer one: the newest holds a key), and an empty open generation numbered `opened`, past all of them."""
        if opened <= max(generations, default=-1):
            raise ValueError(f"the open generation {opened} must come after the sealed ones {sorted(generations)}")
        with self._lock:
            self._generations, self._where = {}, {}
            for number in sorted(generations):
                self._generations[number] = dict(generations[number])
                for key in generations[number]:
                    if key in self._where:
                        del self._generations[self._where[key]][key]
                    self._where[key] = number
            self._generations[opened] = {}

    def clear(self) -> None:
        """Forget every value; generations are numbered on from the last."""
        with self._lock:
            self._generations = {self._open()[0] + 1: {}}
            self._where = {}

    def _open(self) -> tuple[int, dict[Hashable, V]]:
        number = next(reversed(self._generations))
        return number, self._generations[number]

    def _seal(self) -> None:
        number, values = self._open()
        if values:
            self._generations[number + 1] = {}
