"""Benchmark: CPU time per edit of a sequential run, this code next to an earlier commit, in one invocation.

    python benchmarks/edit_cost.py --baseline 56fa0d7                    # serac and ft-llm, 100 and 400 edits
    python benchmarks/edit_cost.py --baseline HEAD~3 --methods serac --edits 100 1000 --repeat 1

Each (code, method, length) is a fresh process on one thread (OMP_NUM_THREADS=1 and
torch.set_num_threads(1)) timing `simulate` alone with `time.process_time`, `--repeat` times (the
codes taking turns, so both meet the same load) keeping the least: on a shared machine one run's
CPU time varies by several percent. The per-edit cost is the difference between the longest and
the shortest run divided by the difference in edits, so start-up (model load, MiniLM) cancels out.
Each code first makes one untimed run of the short stream with its own $EDITWATCH_CACHE, so that
the trained editor (SERAC's scope and counterfactual model) is cached before any timed run:
otherwise only the first timed run trains it, which makes the per-edit cost look smaller than it
is. Both codes read the same stream, images and model (this checkout's default world and model),
gap 10, no MLflow, and the table ends with the largest difference between their summaries' metric
values. `GC ms/edit` is the part of the per-edit cost spent in Python's garbage collector (`gc.callbacks`),
from the same runs; it moves with the machine's load too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Run inside the code under test (its tree first on sys.path); prints the CPU seconds of `simulate`, and those of
# them spent in Python's garbage collector.
RUN = """
import gc, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from simulator.config import RunConfig
from simulator.run import simulate
stream, images, model, train, method, out = sys.argv[1:7]
config = RunConfig(stream=stream, images=Path(images), model=model, method=method, gap=[10], out=Path(out),
                   train=Path(train), no_mlflow=True)
collector = {"seconds": 0.0, "since": 0.0}
def watch(phase, info):
    if phase == "start":
        collector["since"] = time.process_time()
    else:
        collector["seconds"] += time.process_time() - collector["since"]
gc.callbacks.append(watch)
start, collector["seconds"] = time.process_time(), 0.0
simulate(config, progress=False)
print(json.dumps({"cpu_seconds": time.process_time() - start, "gc_seconds": collector["seconds"]}))
"""


def worktree(revision: str, work: Path) -> Path:
    """A checkout of `revision` (a detached git worktree) under `work`."""
    path = work / f"code-{revision.replace('/', '_')}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), revision],
                   check=True, capture_output=True)
    return path


def drop_worktree(path: Path) -> None:
    """Remove the worktree `worktree` made at `path` and unregister it from the repository."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False,
                   capture_output=True)


def timed_run(code: Path, stream: Path, world: Path, model: Path, method: str, out: Path) -> tuple[float, float]:
    """CPU seconds of one `simulate` run of `code`, in a fresh single-threaded process, and those in the garbage
    collector."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "EDITWATCH_CACHE": str(out.parent / f"cache-{code.name}")}
    args = [sys.executable, "-c", RUN, str(stream), str(world / "images"), str(model), str(world / "train.jsonl"),
            method, str(out)]
    done = subprocess.run(args, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{code.name} {method} failed:\n{done.stderr[-3000:]}")
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    return timed["cpu_seconds"], timed["gc_seconds"]


def largest_difference(a: Path, b: Path) -> tuple[float, list[str]]:
    """The largest absolute difference between two summaries' per-setting and base metric values (infinite where a
    number on one side is null, how the files hold NaN/Inf, on the other), and the values only one side has."""
    first, second = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    worst, one_sided = 0.0, []
    for part in ("results", "base"):
        left, right = first[part], second[part]
        pairs = {f"{part}.{k}": (left.get(k, {}), right.get(k, {})) for k in left.keys() | right.keys()} \
            if part == "results" else {part: (left, right)}
        for where, (x, y) in sorted(pairs.items()):
            one_sided += [f"{where}.{key}" for key in sorted(x.keys() ^ y.keys())]
            for key in x.keys() & y.keys():
                u, v = x[key], y[key]
                if (u is None) != (v is None):
                    worst = math.inf
                elif isinstance(u, (int, float)) and isinstance(v, (int, float)):
                    worst = max(worst, abs(u - v))
    return worst, one_sided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision of the code to compare with")
    parser.add_argument("--methods", nargs="+", default=["serac", "ft-llm"])
    parser.add_argument("--edits", nargs=2, type=int, default=[100, 400], metavar=("SHORT", "LONG"))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each code and length; the least counts")
    args = parser.parse_args()
    from simulate import long_stream

    from simulator.world.default import SHIPPED
    from simulator.world.export import write_world
    from simulator.world.graph import WorldConfig

    work = Path(tempfile.mkdtemp(prefix="editwatch-cost-"))
    world = write_world(WorldConfig(), work / "w", progress=False)
    model = Path(shutil.copytree(SHIPPED, work / "model"))
    codes = {"this code": ROOT, args.baseline: worktree(args.baseline, work)}
    try:
        short, long = sorted(args.edits)
        streams = {n: long_stream(world, n) for n in (short, long)}
        print(f"{'method':8s} {'code':>12s} {f'{short} edits s':>12s} {f'{long} edits s':>12s} {'ms/edit':>8s} "
              f"{'GC ms/edit':>10s}")
        for method in args.methods:
            for code in codes.values():
                timed_run(code, streams[short], world, model, method, work / f"{method}-warm-up-{code.name}")
            # (CPU, GC) seconds of the least CPU time of each code and length
            seconds = {(name, n): (math.inf, math.nan) for name in codes for n in (short, long)}
            for turn in range(args.repeat):
                # The two codes take turns going first: a machine that warms or slows over a turn favours neither.
                names = list(codes) if turn % 2 == 0 else list(reversed(codes))
                order = [(name, n) for name in names for n in (short, long)]
                for name, n in order:
                    best, code = seconds[name, n], codes[name]
                    out = work / f"{method}-{n}-{code.name}-{turn}"
                    seconds[name, n] = min(best, timed_run(code, streams[n], world, model, method, out))
            per_edit = {}
            for name in codes:
                (short_cpu, short_gc), (long_cpu, long_gc) = seconds[name, short], seconds[name, long]
                per_edit[name] = (long_cpu - short_cpu) / (long - short) * 1000
                print(f"{method:8s} {name[:12]:>12s} {short_cpu:12.1f} {long_cpu:12.1f} {per_edit[name]:8.1f} "
                      f"{(long_gc - short_gc) / (long - short) * 1000:10.2f}", flush=True)
            this, before = (work / f"{method}-{long}-{code.name}-0" for code in codes.values())
            worst, one_sided = largest_difference(this, before)
            print(f"{method:8s} {'speed-up':>12s} {per_edit[args.baseline] / per_edit['this code']:37.2f}x; "
                  f"largest metric difference between the two {long}-edit summaries: {worst:.2e}"
                  + (f" (on one side only: {', '.join(one_sided)})" if one_sided else ""))
    finally:  # the run folders stay in `work` for a look; the worktree is unregistered from the repository
        drop_worktree(codes[args.baseline])


if __name__ == "__main__":
    main()
