"""A vector memory: stable int64 ids, add / search / remove, persistence, a size-adaptive FAISS index.

Concurrency: searches share a readers-writer lock, adds and removes take it exclusively (FAISS
indexes are not safe under concurrent mutation). When the size crosses a plan boundary (see
`MemoryConfig`), a new index is built in a background thread from a snapshot of the old one;
searches keep using the old index meanwhile, changes made during the build are logged and
replayed onto the new one, and only the last small batch of them holds the lock at the swap.
A rebuild that fails (in the background or not) keeps the old index; its error is raised by
`wait()` or by the next add before that changes anything, never by the change that started it,
which is done, nor by a remove: so a caller's bookkeeping of what the memory holds stays true.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict

from memory.files import write_atomically, write_text_atomically
from memory.index import IndexKind, IndexPlan, MemoryConfig, build, configure, contents, empty_flat, kind_of
from memory.lock import ReadWriteLock
from memory.stats import RetrievalStats, StatsSnapshot

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "memory.json"
FORMAT_VERSION = 1
CATCH_UP_UNLOCKED = 4096  # logged changes replayed outside the lock until fewer than this remain...
# Below this many queries a search runs on one OpenMP thread: FAISS parallelises over queries,
# and on a busy machine the barrier waiting for a descheduled thread costs milliseconds
# (measured: one query on a 10k flat index, 22 ms with 2 threads vs 0.65 ms with 1).
PARALLEL_QUERIES = 32
CATCH_UP_ROUNDS = 4  # ...or for this many rounds, so that steady heavy adding cannot postpone the swap forever


class MemoryInputError(ValueError):
    """Bad input to a vector memory (shape, dtype, ids); the message names the bad value."""


@dataclass(frozen=True)
class SearchResult:
    """Top-k matches of each query; rows with fewer than k live entries pad with id -1."""

    scores: np.ndarray  # (Q, k) float32, higher is closer (cosine when normalising; -squared L2 for metric l2)
    ids: np.ndarray  # (Q, k) int64


class Manifest(BaseModel):
    """The JSON side file of a saved memory."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    dim: int
    size: int
    next_id: int
    kind: IndexKind
    lists: int
    planned_size: int
    config: MemoryConfig


class VectorMemory:
    """Keys of dimension `dim` under stable integer ids, searched by inner product (or L2: `MemoryConfig.metric`)."""

    def __init__(self, dim: int, config: MemoryConfig | None = None, stats: RetrievalStats | None = None) -> None:
        if dim < 1:
            raise MemoryInputError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.config = config or MemoryConfig()
        self.stats = stats or RetrievalStats()
        self._lock = ReadWriteLock()
        self._index: faiss.Index = empty_flat(dim, self.config.metric)
        self._plan = IndexPlan("flat", 0, 0)
        self._ids: set[int] = set()
        self._next_id = 0
        self._pending: list[tuple[str, np.ndarray | None, np.ndarray]] | None = None  # changes during a rebuild
        self._rebuild_guard = threading.Lock()
        self._rebuild_thread: threading.Thread | None = None
        self._rebuilding = False  # a rebuild loop is running (guarded by _rebuild_guard)
        self._rebuild_error: BaseException | None = None

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._ids

    @property
    def index_kind(self) -> IndexKind:
        """The kind of index searches use right now."""
        return self._plan.kind

    @property
    def plan(self) -> IndexPlan:
        """The plan of the index searches use right now; a rebuild replaces it (a journal compacts then)."""
        return self._plan

    def ids(self) -> np.ndarray:
        """Every live id, sorted."""
        with self._lock.read():  # adds and removes change the set under the write lock
            return np.array(sorted(self._ids), dtype=np.int64)

    def search(self, queries: np.ndarray, k: int = 1) -> SearchResult:
        """The k entries closest to each query (Q, D), best first."""
        if k < 1:
            raise MemoryInputError(f"k must be at least 1, got {k}")
        x = self._vectors(queries, "queries")
        start = time.perf_counter()
        with self._lock.read(), _omp_threads(1 if len(x) < PARALLEL_QUERIES else None):
            scores, ids = self._index.search(x, k)
        if self.config.metric == "l2":
            scores = -scores  # FAISS returns squared distances; callers rank by "higher is closer"
        self.stats.observe_search(time.perf_counter() - start, len(x))
        return SearchResult(scores, ids)

    def snapshot(self) -> StatsSnapshot:
        """Retrieval statistics with the current size and index kind."""
        return self.stats.snapshot(len(self), self.index_kind)

    # -- writing ---------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: Iterable[int] | None = None) -> np.ndarray:
        """Store keys (N, D); returns their ids (given, or the next free ones). Ids are never reused."""
        self._raise_rebuild_error()
        x = self._vectors(vectors, "vectors")
        with self._lock.write():
            new_ids = self._new_ids(len(x), ids)
            if len(x):
                self._index.add_with_ids(x, new_ids)
            self._ids.update(new_ids.tolist())
            self._next_id = max(self._next_id, int(new_ids.max(initial=-1)) + 1)
            if self._pending is not None:
                self._pending.append(("add", x, new_ids))
        self._maybe_rebuild()
        return new_ids

    def remove(self, ids: Iterable[int]) -> int:
        """Delete entries by id; unknown ids are ignored. Returns how many were removed.

        A failed rebuild's error is left to the next add or `wait()`: removing from the index in use is sound, and
        a caller that adds and then removes in one step (a fact edited again, an edit rolled back) must not be
        stopped halfway.
        """
        wanted = np.unique(np.asarray(list(ids), dtype=np.int64))
        with self._lock.write():
            present = np.array([i for i in wanted.tolist() if i in self._ids], dtype=np.int64)
            if len(present):
                self._index.remove_ids(present)
                self._ids.difference_update(present.tolist())
                if self._pending is not None:
                    self._pending.append(("remove", None, present))
        self._maybe_rebuild()
        return len(present)

    def wait(self) -> None:
        """Block until a background rebuild (if any) has finished; re-raise its error."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join()
        self._raise_rebuild_error()

    # -- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `index.faiss` (FAISS `write_index`) and `memory.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock.read():
            manifest = self._manifest()
            write_atomically(directory / INDEX_FILE, lambda tmp: faiss.write_index(self._index, str(tmp)))
        # The manifest goes last. Saved over an older memory, a crash between the two leaves the older manifest
        # beside the new index: `load` refuses it unless it matches (size, kind, ids below its next id).
        write_text_atomically(directory / MANIFEST_FILE, manifest.model_dump_json(indent=2))

    @classmethod
    def load(cls, directory: str | Path, stats: RetrievalStats | None = None) -> VectorMemory:
        """Read a memory written by `save`."""
        directory = Path(directory)
        if not (directory / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"no vector memory in {directory} (missing {MANIFEST_FILE})")
        manifest = Manifest.model_validate_json((directory / MANIFEST_FILE).read_text())
        return cls._from_index(faiss.read_index(str(directory / INDEX_FILE)), manifest, stats)

    def to_bytes(self) -> tuple[np.ndarray, dict]:
        """The index serialised by FAISS (uint8 array) and the manifest as JSON data, for editor states."""
        with self._lock.read():
            return faiss.serialize_index(self._index), json.loads(self._manifest().model_dump_json())

    @classmethod
    def from_bytes(cls, blob: np.ndarray, manifest: dict, stats: RetrievalStats | None = None) -> VectorMemory:
        """Rebuild a memory from `to_bytes` output."""
        parsed = Manifest.model_validate(manifest)
        return cls._from_index(faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8)), parsed, stats)

    def _manifest(self) -> Manifest:
        return Manifest(
            version=FORMAT_VERSION, dim=self.dim, size=len(self._ids), next_id=self._next_id,
            kind=self._plan.kind, lists=self._plan.lists, planned_size=self._plan.size, config=self.config,
        )

    @classmethod
    def _from_index(cls, index: faiss.Index, manifest: Manifest, stats: RetrievalStats | None) -> VectorMemory:
        memory = cls(manifest.dim, manifest.config, stats)
        index = configure(index, manifest.config)
        _, ids = contents(index, with_vectors=False)
        if index.d != manifest.dim or len(ids) != manifest.size or kind_of(index) != manifest.kind:
            raise ValueError(
                f"index ({type(index).__name__}, d={index.d}, {len(ids)} entries) does not match its manifest "
                f"({manifest.kind}, d={manifest.dim}, {manifest.size} entries)"
            )
        # An index saved over another's whose manifest was not written after it: new ids would repeat held ones.
        if len(ids) and int(ids.max()) >= manifest.next_id:
            raise ValueError(f"index holds id {int(ids.max())}, but its manifest's next id is {manifest.next_id}")
        memory._index = index
        memory._plan = IndexPlan(manifest.kind, manifest.lists, manifest.planned_size)
        memory._ids = set(ids.tolist())
        memory._next_id = manifest.next_id
        return memory

    # -- internals -------------------------------------------------------------------------

    def _vectors(self, array: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(array, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MemoryInputError(f"{what} must have shape (N, {self.dim}), got {tuple(np.shape(array))}")
        if not np.isfinite(x).all():
            raise MemoryInputError(f"{what} contain NaN or Inf")
        if self.config.normalize:
            x = np.array(x, order="C", copy=True)  # normalised in place: never the caller's array
            faiss.normalize_L2(x)
        return np.ascontiguousarray(x)

    def _new_ids(self, n: int, ids: Iterable[int] | None) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        given = np.asarray(list(ids), dtype=np.int64)
        if given.shape != (n,):
            raise MemoryInputError(f"got {len(given)} ids for {n} vectors")
        if len(np.unique(given)) != n:
            raise MemoryInputError("ids repeat within one add")
        if n and given.min() < 0:
            raise MemoryInputError(f"ids must be non-negative, got {int(given.min())}")
        taken = [i for i in given.tolist() if i in self._ids]
        if taken:
            raise MemoryInputError(f"ids already in the memory: {taken[:5]}{' ...' if len(taken) > 5 else ''}")
        return given

    def _maybe_rebuild(self) -> None:
        with self._rebuild_guard:
            if self._rebuilding or not self._plan.outgrown(len(self._ids), self.config):
                return
            self._rebuilding = True
        if not self.config.background:
            self._rebuild_until_current()
            return
        self._rebuild_thread = threading.Thread(target=self._rebuild_until_current, daemon=True)
        self._rebuild_thread.start()

    def _rebuild_until_current(self) -> None:
        """Rebuild until the index fits the size: entries added during a long build may call for the next plan."""
        try:
            while True:
                with self._rebuild_guard:
                    size = len(self._ids)
                    if not self._plan.outgrown(size, self.config):
                        self._rebuilding = False
                        return
                self._rebuild(self.config.plan(size))
        except Exception as error:  # surfaced to the caller by wait() / the next add or remove
            log.exception("rebuilding the memory index failed; keeping the old one")
            with self._lock.write():  # adds and removes check and append to `_pending` under it
                self._pending = None
            with self._rebuild_guard:
                self._rebuild_error = error
                self._rebuilding = False

    def _rebuild(self, plan: IndexPlan) -> None:
        start = time.perf_counter()
        with self._lock.read():
            vectors, ids = contents(self._index)
            self._pending = []  # adders wait for the read lock to drop, so none is missed
        index = build(plan, vectors, ids, self.config)
        del vectors
        for round_ in range(CATCH_UP_ROUNDS):
            with self._lock.write():
                changes, self._pending = self._pending, []
                if sum(len(ids) for _, _, ids in changes) < CATCH_UP_UNLOCKED or round_ == CATCH_UP_ROUNDS - 1:
                    _replay(index, changes)
                    self._index, self._plan, self._pending = index, plan, None
                    break
            _replay(index, changes)  # a long backlog replays without blocking searches
        self.stats.record_rebuild()
        log.info("memory index rebuilt as %s (%d lists) for %d entries in %.1f s",
                 plan.kind, plan.lists, plan.size, time.perf_counter() - start)

    def _raise_rebuild_error(self) -> None:
        if self._rebuild_error is not None:
            error, self._rebuild_error = self._rebuild_error, None
            raise RuntimeError(f"a rebuild of the memory index failed: {error}") from error


@contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` OpenMP threads in this thread (None: unchanged); OpenMP's setting is per thread."""
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _replay(index: faiss.Index, changes: list[tuple[str, np.ndarray | None, np.ndarray]]) -> None:
    for action, vectors, ids in changes:
        if action == "add":
            index.add_with_ids(vectors, ids)
        else:
            index.remove_ids(ids)
