"""Retrieval statistics kept as plain numbers, for exporters (Prometheus, MLflow) to read later."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Upper bounds (seconds) of the latency histogram buckets, Prometheus-style (`le`); a last
# implicit bucket holds everything slower than the final bound.
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
)


@dataclass
class StatsSnapshot:
    """A consistent copy of the counters at one moment."""

    size: int  # live entries in the memory
    searches: int  # search calls
    queries: int  # query vectors searched (a call may carry many)
    latency_sum: float  # seconds spent in search calls
    latency_counts: list[int]  # calls per bucket, len(LATENCY_BUCKETS) + 1 (last: slower than all)
    hits: int  # queries an editor routed to a memory entry
    misses: int  # queries an editor found out of scope
    rebuilds: int  # index rebuilds finished
    index_kind: str  # "flat" or "ivf"
    buckets: tuple[float, ...] = field(default=LATENCY_BUCKETS)

    def summary(self) -> dict[str, float]:
        """Search latency p50/p99 (seconds; upper bounds of histogram buckets), hits, misses and rebuilds."""
        return {
            "memory_search_seconds_p50": self.latency_quantile(0.5),
            "memory_search_seconds_p99": self.latency_quantile(0.99),
            "memory_hits": float(self.hits),
            "memory_misses": float(self.misses),
            "memory_rebuilds": float(self.rebuilds),
        }

    def latency_quantile(self, q: float) -> float:
        """Upper bound (seconds) of the bucket holding the q-quantile of call latency; inf if beyond."""
        total = sum(self.latency_counts)
        if not total:
            return 0.0
        running = 0
        for i, count in enumerate(self.latency_counts):
            running += count
            if running >= q * total:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")


class RetrievalStats:
    """Thread-safe counters of a memory: search latency histogram, hits and misses, rebuilds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._searches = 0
        self._queries = 0
        self._hits = 0
        self._misses = 0
        self._rebuilds = 0

    def observe_search(self, seconds: float, queries: int) -> None:
        """Count one search call of `queries` vectors that took `seconds`."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._counts[slot] += 1
            self._latency_sum += seconds
            self._searches += 1
            self._queries += queries

    def record_routing(self, hits: int, misses: int) -> None:
        """Count queries routed to an entry (hits) and queries judged out of scope (misses)."""
        with self._lock:
            self._hits += hits
            self._misses += misses

    def record_rebuild(self) -> None:
        """Count one finished index rebuild."""
        with self._lock:
            self._rebuilds += 1

    def counters(self) -> dict[str, int]:
        """The running totals a resumed run must continue from: hits, misses, rebuilds (latency is wall clock)."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "rebuilds": self._rebuilds}

    def restore(self, counters: dict[str, int]) -> None:
        """Set the running totals `counters` returned."""
        with self._lock:
            self._hits, self._misses, self._rebuilds = counters["hits"], counters["misses"], counters["rebuilds"]

    def snapshot(self, size: int, index_kind: str) -> StatsSnapshot:
        """A copy of every counter, with the memory's current size and index kind."""
        with self._lock:
            return StatsSnapshot(
                size, self._searches, self._queries, self._latency_sum, list(self._counts),
                self._hits, self._misses, self._rebuilds, index_kind,
            )
