"""Benchmark: train a world's model and print time, size and the unedited model's accuracies.

    python benchmarks/world_train.py                    # the default world (as shipped)
    python benchmarks/world_train.py --entities 40      # a small world
    python benchmarks/world_train.py --evaluate-shipped # only evaluate the shipped weights
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

from editors import LVLM
from simulator.world.default import SHIPPED, TRAINING_RECORD, train_world_model
from simulator.world.graph import WorldConfig, build_world
from simulator.world.training import eval_sets, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-shipped", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = WorldConfig(entities=args.entities, seed=args.seed)
    if args.evaluate_shipped:
        folder, seconds, steps = SHIPPED, None, json.loads((SHIPPED / TRAINING_RECORD).read_text())["steps"]
        config = WorldConfig(**{k: v for k, v in json.loads((SHIPPED / TRAINING_RECORD).read_text())["world"].items()
                                if k in WorldConfig.model_fields})
    else:
        folder = Path(tempfile.mkdtemp()) / "model"
        start = time.monotonic()
        result = train_world_model(config, folder, progress=True)
        seconds, steps = time.monotonic() - start, result.steps
    lvlm = LVLM.load(folder, prompt_format="plain")
    start = time.monotonic()
    sets = eval_sets(build_world(config))
    metrics = evaluate(lvlm, sets)
    print(f"world: entities={config.entities} seed={config.seed} digest={config.digest()}")
    print(f"parameters: {sum(p.numel() for p in lvlm.model.parameters()):,}")
    if seconds is not None:
        print(f"training: {steps} steps in {seconds:.0f} s (including evaluations)")
    else:
        print(f"training: {steps} steps (shipped weights)")
    print(f"evaluation: {time.monotonic() - start:.1f} s")
    for name, value in metrics.items():
        print(f"  {name:24s} {value:.3f}")
    # Two chance levels, equal at every hop by construction: a guess among every k-hop answer of the set
    # (how runs report port_chance), and a guess among the names of the answer's own kind (one pool size).
    # "above" asks for 3 binomial standard errors over the higher one (1,000 questions per hop).
    print(f"base portability against chance (pool of {config.pool_size} names per kind):")
    print(f"  {'hop':4s} {'eval':>6s} {'train':>6s} {'1/answers':>10s} {'1/pool':>7s} {'z':>6s}  above chance")
    for k in range(1, 5):
        queries = sets[f"port_{k}hop_eval"]
        answers = len({query.answer for query in queries})
        chance = max(1 / answers, 1 / config.pool_size)
        held_out, trained = metrics[f"port_{k}hop_eval"], metrics[f"port_{k}hop_train"]
        z = (held_out - chance) / math.sqrt(chance * (1 - chance) / len(queries))
        print(f"  {k:<4d} {held_out:6.3f} {trained:6.3f} {1 / answers:10.4f} {1 / config.pool_size:7.4f} {z:6.1f}  "
              f"{'yes' if z > 3 else 'no'}")


if __name__ == "__main__":
    main()
