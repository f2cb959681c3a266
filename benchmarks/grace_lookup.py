"""GRACE codebook lookup latency at 10^3, 10^4, 10^5 entries (p50/p99 per lookup, recall@1 vs exact).

A lookup is what GRACE's hook does once per forward: the keys of one scoring batch (16 rows,
`LVLM.score`'s default batch) searched in the codebook's `VectorMemory` (L2; flat below
`exact_below` entries, 10,000 by default, IVF from there: `GraceConfig().memory`), then each
nearest entry's radius checked (`Codebook.hits`). Keys have the dimension of the default model's GRACE layer (the input of
decoder block 2's MLP down projection: 256) and the scale measured there on the default world:
norms about 34, an edit's text rephrase about 13 away, other questions 35-60 away. They are
synthetic, drawn around N/100 cluster centres (a question template asked of many creatures);
queries are fresh draws from the same clusters, and recall@1 compares the codebook's nearest
entry with exact search. GRACE's own code compares every key with `torch.cdist`; that brute
force is timed on the same keys for reference.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grace_lookup.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from editors.grace import Codebook, GraceConfig
from memory import MemoryConfig

DIM, VALUE_DIM, BATCH = 256, 128, 16
CENTRE_SCALE, SPREAD = 34.0, 13.0  # norm of a cluster centre, distance of a draw from it (default model, layer 2)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n keys (n, DIM) float32, each a centre plus Gaussian noise of norm about SPREAD / sqrt(2)."""
    noise = rng.normal(size=(n, DIM)) * (SPREAD / np.sqrt(2 * DIM))
    return (centres[rng.integers(0, len(centres), n)] + noise).astype(np.float32)


def measure(size: int, lookups: int, seed: int, memory: MemoryConfig | None = None) -> dict[str, float]:
    """Build a codebook of `size` entries; time `lookups` batch lookups and a brute-force cdist of each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(size // 100, 1), DIM)) * (CENTRE_SCALE / np.sqrt(DIM))
    keys = clustered(rng, centres, size)
    book = Codebook(DIM, VALUE_DIM, memory or GraceConfig().memory)
    start = time.perf_counter()
    book.extend(keys, torch.zeros(size, VALUE_DIM), torch.full((size,), 1.0), [""] * size, [""] * size)
    book.keys.wait()  # the IVF rebuild past 50,000 entries runs in the background
    build = time.perf_counter() - start
    queries = [clustered(rng, centres, BATCH) for _ in range(lookups)]
    book.hits(queries[0])  # warm-up
    seconds, found = [], []
    for batch in queries:
        start = time.perf_counter()
        ids, _, _ = book.hits(batch)
        seconds.append(time.perf_counter() - start)
        found.append(ids)
    table = torch.from_numpy(keys)
    brute, exact = [], []
    for batch in queries:
        start = time.perf_counter()
        nearest = torch.cdist(table, torch.from_numpy(batch)).argmin(0)  # GRACE's linear scan
        brute.append(time.perf_counter() - start)
        exact.append(nearest.numpy())
    recall = float(np.mean(np.concatenate(found) == np.concatenate(exact)))
    return {
        "size": size, "index": book.keys.index_kind, "build_s": build,
        "p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p99_ms": 1e3 * float(np.percentile(seconds, 99)),
        "recall_at_1": recall, "cdist_p50_ms": 1e3 * float(np.percentile(brute, 50)),
    }


def main() -> None:
    """Print one row per codebook size, and p50 at the largest size over p50 at the smallest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--lookups", type=int, default=300, help="timed lookups (batches of 16 keys) per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [measure(size, args.lookups, args.seed) for size in args.sizes]
    print("| entries | index | lookup p50 (ms) | lookup p99 (ms) | recall@1 | cdist p50 (ms) | build (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']:,} | {r['index']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['recall_at_1']:.3f} "
              f"| {r['cdist_p50_ms']:.3f} | {r['build_s']:.1f} |")
    print(f"p50 at {rows[-1]['size']:,} / p50 at {rows[0]['size']:,}: {rows[-1]['p50_ms'] / rows[0]['p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
