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

    Its state is a plain history of puts, unlike `LRUCache`'s: a lookup changes nothing, a value is put in the open
    (newest) generation, which is sealed and followed by a new one once it holds `generation_entries` values. A
    sealed generation never gains a value (a key put again moves to the open one; a generation left empty goes),
    so each can be saved once: `restore` from the sealed ones saved so far and a copy of the open one rebuilds the
    same cache, whenever the copy was taken.
    """

    def __init__(self, max_entries: int, generation_entries: int | None = None) -> None:
        self.max_entries = max_entries
        self.generation_entries = generation_entries or max(1, max_entries // 64)
        if not 0 < self.generation_entries <= max_entries:
            raise ValueError(f"a generation of {self.generation_entries} values in a cache of {max_entries}")
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
            opened = next(reversed(self._generations))
            held = self._where.get(key)
            if held is not None:
                self._remove(held, key)
            self._generations[opened][key] = value
            self._where[key] = opened
            if len(self._generations[opened]) >= self.generation_entries:
                self._generations[opened + 1] = {}
            while len(self._where) > self.max_entries:
                for gone in self._generations.pop(next(iter(self._generations))):
                    del self._where[gone]

    def saved(self) -> tuple[dict[int, dict[Hashable, V]], int, dict[Hashable, V]]:
        """What `restore` takes: every sealed generation by number (oldest first), the open one's number and a copy
        of its values."""
        with self._lock:
            *sealed, (opened, values) = self._generations.items()
            return {number: dict(held) for number, held in sealed}, opened, dict(values)

    def restore(self, sealed: dict[int, dict[Hashable, V]], opened: int, values: dict[Hashable, V]) -> None:
        """Hold what `saved` gave, where a sealed generation may have been saved before some of its keys moved to a
        newer one (the newest holds a key)."""
        if opened <= max(sealed, default=-1):
            raise ValueError(f"the open generation {opened} must come after the sealed ones {sorted(sealed)}")
        with self._lock:
            self._generations, self._where = {}, {}
            for number, held in sorted({**sealed, opened: values}.items()):
                self._generations[number] = {}
                for key, value in held.items():
                    if key in self._where:
                        self._remove(self._where[key], key)
                    self._generations[number][key] = value
                    self._where[key] = number
            self._generations.setdefault(opened, {})

    def clear(self) -> None:
        """Forget every value; generations are numbered on from the last."""
        with self._lock:
            self._generations = {next(reversed(self._generations)) + 1: {}}
            self._where = {}

    def _remove(self, number: int, key: Hashable) -> None:
        """Take `key` out of generation `number`, and a sealed generation it leaves empty with it."""
        held = self._generations[number]
        del held[key]
        if not held and number != next(reversed(self._generations)):
            del self._generations[number]
