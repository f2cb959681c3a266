"""Benchmark: edits/s and probe cost of the main job on the default model.

    python benchmarks/simulate.py                         # ft-llm and serac, 1,000 and 5,000 edits
    python benchmarks/simulate.py --methods none --edits 200 1000

Streams longer than the default world's 1,000 eval edits edit every fact again with another
counterfactual value (and the portability answers that follow from it), so a 5,000-edit
stream changes each of the 1,000 facts five times. Probe rounds run every `--probe-every`
edits on a bounded sample: probe seconds per round should stay flat, and total probe time
grow linearly with the stream.

Each run's seconds are wall time of the whole `simulate` call, start-up included (loading the
model and MiniLM), without MLflow; an untimed 20-edit run of each method first trains and caches
a learned editor (`$EDITWATCH_CACHE`), so no timed run trains it. For the per-edit cost without
start-up, side by side with older code, see `edit_cost.py`. The work folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from simulator.config import RunConfig
from simulator.run import simulate
from simulator.world.export import edit_records, write_world
from simulator.world.graph import WorldConfig, build_world
from simulator.world.schema import IMAGE_RELATIONS


def long_stream(world_dir: Path, edits: int, seed: int = 0) -> Path:
    """A stream of `edits` records: the eval split, then again with fresh counterfactual values."""
    world = build_world(WorldConfig())
    base = edit_records(world, "eval")
    rng = np.random.default_rng(seed)
    rows = []
    for cycle in range(-(-edits // len(base))):
        for record in base:
            row = dict(record)
            if cycle:
                relation = next(r for r in IMAGE_RELATIONS.values() if r.templates[0] == record["src"])
                pool = [v for v in world.names[relation.object] if v not in (record["pred"], record["alt"])]
                row["alt"] = pool[rng.integers(len(pool))]
                answers = world.chain(relation, row["alt"])
                row["port_new"] = [{**hop, "Q&A": {**hop["Q&A"], "Answer": a}} for hop, a in zip(record["port_new"], answers)]
                for key in ("port_q", "port_a", "port_edit_q", "port_edit_a"):
                    row.pop(key, None)
                row["id"] = f"{record['id']}#{cycle}"
            rows.append(row)
    path = world_dir / f"stream-{edits}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:edits]))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ft-llm", "serac"])
    parser.add_argument("--edits", nargs="+", type=int, default=[1000, 5000])
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="editwatch-bench-"))
    try:
        world_dir = write_world(WorldConfig(), work / "w", progress=False)
        print(f"{'method':8s} {'edits':>6s} {'seconds':>8s} {'edits/s':>8s} {'rounds':>6s} {'probe s/round':>13s} "
              f"{'first..last round':>17s} {'probe s total':>13s}")
        for method in args.methods:
            simulate(run_config(world_dir, long_stream(world_dir, 20), method, args, work / f"{method}-warm-up"),
                     progress=False)  # untimed: trains a learned editor into the cache
            for edits in args.edits:
                out = work / f"{method}-{edits}"
                config = run_config(world_dir, long_stream(world_dir, edits), method, args, out)
                start = time.monotonic()
                simulate(config, progress=False)
                seconds = time.monotonic() - start
                rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
                probe = [r["probe_seconds"] for r in rounds]
                print(f"{method:8s} {edits:6d} {seconds:8.1f} {edits / seconds:8.2f} {len(rounds):6d} "
                      f"{np.mean(probe):13.3f} {probe[0]:8.3f}..{probe[-1]:<8.3f} {sum(probe):13.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_config(world_dir: Path, stream: Path, method: str, args: argparse.Namespace, out: Path) -> RunConfig:
    """The benchmark's run of `method` over `stream` into `out`, without MLflow."""
    return RunConfig(stream=str(stream), images=world_dir / "images", method=method, gap=[args.gap],
                     probe_every=args.probe_every, out=out, train=world_dir / "train.jsonl", no_mlflow=True)


if __name__ == "__main__":
    main()
