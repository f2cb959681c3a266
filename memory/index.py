"""FAISS index choice by size: exact flat search while small, inverted lists (IVF) past a threshold.

Both kinds keep the caller's int64 ids and delete natively (`remove_ids`), so no tombstones are
needed. IVF-Flat keeps the full vectors in its lists, so a rebuild reads them back from the old
index instead of keeping a second copy of every key in RAM.

Why IVF and not HNSW: HNSW inserts cost hundreds of distance computations each and cannot be
bulk-built, which is too slow for 10^6 adds on two cores; IVF adds cost one quantizer search,
and its k-means is trained on a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

IndexKind = Literal["flat", "ivf"]
Metric = Literal["ip", "l2"]


class MemoryConfig(BaseModel):
    """How a vector memory indexes its keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exact_below: int = Field(10_000, ge=1, description="live entries below which search is exact (flat index)")
    lists_per_sqrt: float = Field(
        2.0, gt=0, description="IVF lists per square root of the size at build time (rounded to a power of two)"
    )
    nprobe: int = Field(16, ge=1, description="IVF lists scanned per query (recall/latency trade-off)")
    grow_factor: float = Field(4.0, gt=1, description="rebuild the IVF index when the size grows by this factor")
    # 16 per list left recall@1 at 0.88 on 10^6 clustered keys (2048 lists, nprobe 16); 64 gives 0.99.
    train_per_list: int = Field(64, ge=8, description="k-means training vectors per IVF list (a sample of the keys)")
    kmeans_iterations: int = Field(10, ge=1, description="k-means iterations when training IVF centroids")
    background: bool = Field(True, description="rebuild in a background thread while searches continue")
    normalize: bool = Field(True, description="L2-normalise keys and queries, so scores are cosine similarities")
    metric: Metric = Field(
        "ip", description="ip: scores are inner products; l2: scores are negated squared Euclidean distances"
    )
    seed: int = Field(0, description="seed of the k-means sample and initialisation")

    @model_validator(mode="after")
    def _lists_fit(self) -> MemoryConfig:
        if self.metric == "l2" and self.normalize:
            raise ValueError("metric='l2' needs normalize=False (on unit vectors l2 ranks as ip does)")
        if self.plan(self.exact_below).lists > self.exact_below:
            raise ValueError(
                f"exact_below={self.exact_below} is too small for lists_per_sqrt={self.lists_per_sqrt}: "
                "the IVF index would have more lists than vectors"
            )
        return self

    def plan(self, size: int) -> IndexPlan:
        """The index kind (and IVF list count) for `size` live entries."""
        if size < self.exact_below:
            return IndexPlan("flat", 0, size)
        lists = 2 ** round(math.log2(max(self.lists_per_sqrt * math.sqrt(size), 1)))
        return IndexPlan("ivf", int(min(max(lists, 1), size)), size)


@dataclass(frozen=True)
class IndexPlan:
    """An index to build: its kind, IVF list count (0 for flat) and the size it was planned for."""

    kind: IndexKind
    lists: int
    size: int

    def outgrown(self, size: int, config: MemoryConfig) -> bool:
        """Whether an index built from this plan should be rebuilt now that `size` entries are live."""
        if self.kind == "flat":
            return size >= config.exact_below
        # Hysteresis: fall back to flat only well below the threshold, so add/remove near it do not thrash.
        return size >= config.grow_factor * max(self.size, 1) or size < config.exact_below // 2


def empty_flat(dim: int, metric: Metric = "ip") -> faiss.Index:
    """An exact inner-product (or L2) index that keeps caller ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim))


def build(plan: IndexPlan, vectors: np.ndarray, ids: np.ndarray, config: MemoryConfig) -> faiss.Index:
    """An index of `plan`'s kind holding `vectors` (N, D) under `ids` (N,)."""
    dim = vectors.shape[1]
    if plan.kind == "flat":
        index = empty_flat(dim, config.metric)
    else:
        l2 = config.metric == "l2"
        quantizer = faiss.IndexFlatL2(dim) if l2 else faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, plan.lists, faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = config.kmeans_iterations
        index.cp.seed = config.seed
        index.cp.spherical = config.normalize  # centroids on the unit sphere, like the keys
        # We sample the training set ourselves; these stop FAISS resampling it or warning about its size.
        index.cp.max_points_per_centroid = config.train_per_list
        index.cp.min_points_per_centroid = 1
        sample = min(len(vectors), plan.lists * config.train_per_list)
        rows = np.random.default_rng(config.seed).choice(len(vectors), sample, replace=False)
        index.train(vectors[np.sort(rows)])
        index.nprobe = config.nprobe
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index


def kind_of(index: faiss.Index) -> IndexKind:
    """Which of our two index kinds `index` is."""
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def contents(index: faiss.Index, with_vectors: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Every stored vector (N, D) float32 (None unless asked) and its id (N,) int64, in storage order."""
    if isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = index.index.reconstruct_n(0, index.ntotal) if with_vectors else None
        return vectors, ids
    if not isinstance(index, faiss.IndexIVFFlat):
        raise TypeError(f"unsupported index type {type(index).__name__}; expected IndexIDMap2 or IndexIVFFlat")
    lists = index.invlists
    id_parts, vector_parts = [], []
    for number in range(index.nlist):
        n = lists.list_size(number)
        if not n:
            continue
        id_parts.append(faiss.rev_swig_ptr(lists.get_ids(number), n).copy())
        if with_vectors:
            codes = faiss.rev_swig_ptr(lists.get_codes(number), n * index.code_size)
            vector_parts.append(np.frombuffer(codes, dtype=np.float32).reshape(n, index.d).copy())
    ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    if not with_vectors:
        return None, ids
    vectors = np.concatenate(vector_parts) if vector_parts else np.empty((0, index.d), np.float32)
    return vectors, ids


def configure(index: faiss.Index, config: MemoryConfig) -> faiss.Index:
    """Apply search settings to a loaded index (FAISS's readers already return the concrete class)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = config.nprobe
    return index
