"""Vector memory at scale: add throughput, single-query latency, recall@1 vs exact, RSS, brute force.

For each N it builds a `VectorMemory` with its default config (flat below 10,000 entries, IVF
from there, rebuilt in the background as it grows), adds N keys in batches (timing includes
every index rebuild: the clock stops after `wait()`), then times single queries one at a time and compares
their top-1 with exact search. The brute-force baseline is what the reference implementations
do: one torch matmul of the query against every key, then top-k, timed in the same run.

Key sets:
- `synthetic`: 384-d clustered vectors (N/100 Gaussian clusters around random unit centres,
  intra-cluster cosine about 0.6); queries are fresh draws from the same clusters.
- `real`: the keys SERAC stores, built from real parts: MiniLM embeddings (384-d) of every
  distinct question and fact text of the default world (424 texts), joined as `MultimodalKeys`
  does with real image keys (the default model's projector tokens, 8 LDA directions per token
  fitted on the train split as SERAC's `train` does: 128-d)
  of renders of 20,000 creatures, so keys are 512-d. The world generator's glyph sampler is
  quadratic and capped at 20,000, so glyphs here are drawn without its min-distance rule and
  rendered with the world's own renderer. Keys are (text, creature, render 0 or 1) triples drawn
  without repetition; queries are (text, creature, render 2): an image rephrase.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from functools import lru_cache

import numpy as np
import torch

from memory import MemoryConfig, VectorMemory
from simulator.world.schema import IMAGE_RELATIONS, TEXT_RELATIONS

DIM = 384
BATCH = 20_000
CREATURES = 20_000


def synthetic_keys(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N clustered unit vectors and `queries` held-out draws from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 100, 1), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIM), np.float32)
        for start in range(0, count, BATCH):
            m = min(BATCH, count - start)
            noise = rng.normal(scale=0.8 / np.sqrt(DIM), size=(m, DIM)).astype(np.float32)
            out[start : start + m] = centres[rng.integers(len(centres), size=m)] + noise
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return draw(n), draw(queries)


@lru_cache(maxsize=1)
def real_parts(seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """MiniLM vectors of the default world's texts (T, 384), image keys (CREATURES, 3, 128), image weight."""
    from dataclasses import replace

    from editors.edit_memory import VisionKeys, shared_text_embedder
    from editors.serac import SeracConfig
    from simulator.world.default import load_world_model
    from simulator.world.graph import GRID, PALETTE, WorldConfig, build_world

    config = SeracConfig()
    world = build_world(WorldConfig())
    texts = [t for relation in IMAGE_RELATIONS.values() for t in (*relation.templates, *relation.hop_questions)]
    for relation in TEXT_RELATIONS.values():
        texts += [t.format(x=x) for t in relation.templates for x in world.text_facts[relation.name]]
    texts = sorted(set(texts))
    text_vectors = shared_text_embedder().embed(texts)
    glyphs = np.random.default_rng(seed).integers(len(PALETTE), size=(CREATURES, GRID, GRID))
    many = replace(world, glyphs=glyphs, renders={})
    vision = VisionKeys(load_world_model(WorldConfig(), progress=False), config.pooling)
    # Fitted as SERAC's train fits it: train-split renders, render 0 paired with render 1.
    pairs = [(world.image(c, 0), world.image(c, 1)) for c in world.train_ids]
    vision.fit([image for pair in pairs for image in pair], pairs, config.image_components)
    images = np.empty((CREATURES, 3, vision.dim), np.float32)
    for start in range(0, CREATURES, 1000):
        chunk = range(start, min(start + 1000, CREATURES))
        for v in range(3):
            images[chunk.start : chunk.stop, v] = vision.embed([many.image(c, v) for c in chunk])
        many.renders.clear()
    return text_vectors, images, config.image_weight


def real_keys(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N distinct (text, creature, render 0/1) keys and `queries` (text, creature, render 2) queries."""
    texts, images, w = real_parts(seed)
    rng = np.random.default_rng(seed + 1)
    total = len(texts) * CREATURES * 2
    if n > total:
        raise ValueError(f"only {total} distinct real keys exist; asked for {n}")
    picks = rng.choice(total, n, replace=False)
    t, rest = np.divmod(picks, CREATURES * 2)
    c, v = np.divmod(rest, 2)

    def join(t: np.ndarray, i: np.ndarray) -> np.ndarray:  # MultimodalKeys: [sqrt(1-w)·t, sqrt(w)·i]
        return np.concatenate([np.sqrt(1 - w) * texts[t], np.sqrt(w) * i], axis=1).astype(np.float32)

    keys = np.concatenate([join(t[s : s + BATCH], images[c[s : s + BATCH], v[s : s + BATCH]]) for s in range(0, n, BATCH)])
    q = rng.integers(n, size=queries)  # ask about stored (text, creature) pairs through their third render
    return keys, join(t[q], images[c[q], 2])


def rss_mb() -> tuple[float, float]:
    """Current and peak resident set size of this process, MB."""
    with open("/proc/self/status") as status:
        current = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return current / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_query_latency(search, queries: np.ndarray) -> np.ndarray:
    """Seconds per call of `search` on each query alone."""
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        search(queries[i : i + 1])
        times[i] = time.perf_counter() - start
    return times


def run(name: str, keys: np.ndarray, queries: np.ndarray, brute_queries: int) -> None:
    """Measure one key set and print one line of results."""
    n = len(keys)
    memory = VectorMemory(keys.shape[1], MemoryConfig())
    start = time.perf_counter()
    for lo in range(0, n, BATCH):
        memory.add(keys[lo : lo + BATCH])
    memory.wait()
    add_seconds = time.perf_counter() - start

    latency = single_query_latency(lambda q: memory.search(q, 1), queries)
    found = np.concatenate([memory.search(queries[i : i + 1], 1).ids[:, 0] for i in range(len(queries))])

    # Brute force as the reference implementations do it: matmul over every key, then top-k.
    torch_keys = torch.from_numpy(keys)
    torch_queries = torch.from_numpy(queries)

    def brute(q: np.ndarray) -> torch.Tensor:
        return (torch_keys @ torch.from_numpy(q).T).squeeze(1).topk(1).indices

    brute_latency = single_query_latency(brute, queries[:brute_queries])
    exact_scores = torch.cat([(torch_keys @ torch_queries[lo : lo + 256].T).max(0).values
                              for lo in range(0, len(queries), 256)]).numpy()
    # Ids are row numbers here; a different id with the same score as the exact top-1 is a tie, not a miss.
    found_scores = np.einsum("ij,ij->i", keys[found], queries)
    recall = float(np.mean(found_scores >= exact_scores - 1e-5))
    current, peak = rss_mb()
    p50, p99 = np.percentile(latency, [50, 99]) * 1e3
    b50 = np.percentile(brute_latency, 50) * 1e3
    print(
        f"{name:9s} N={n:>9,d} d={keys.shape[1]} index={memory.index_kind}({memory._plan.lists} lists) "
        f"add={n / add_seconds:>9,.0f}/s ({add_seconds:6.1f} s) p50={p50:.3f} ms p99={p99:.3f} ms "
        f"recall@1={recall:.4f} brute_p50={b50:.2f} ms speedup={b50 / p50:.0f}x "
        f"rss={current:,.0f} MB peak={peak:,.0f} MB",
        flush=True,
    )
    del memory, torch_keys
    gc.collect()


def main() -> None:
    """Parse arguments and run every size of every key set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--sets", nargs="+", choices=["synthetic", "real"], default=["synthetic", "real"])
    parser.add_argument("--queries", type=int, default=2000, help="single queries timed per size")
    parser.add_argument("--brute-queries", type=int, default=100, help="single queries timed on brute force")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch threads={torch.get_num_threads()}", flush=True)
    for n in args.sizes:
        for name in args.sets:
            keys, queries = synthetic_keys(n, args.queries, args.seed) if name == "synthetic" else real_keys(n, args.queries, args.seed)
            run(name, keys, queries, args.brute_queries)
            del keys, queries
            gc.collect()


if __name__ == "__main__":
    main()
