"""Benchmark: seconds to draw a run's plots (the PNGs every MLflow-logged run draws at its end), this code next
to an earlier commit, in one invocation.

    python benchmarks/plots.py --baseline 49c81ee
    python benchmarks/plots.py --baseline HEAD~1 --rounds 100 --repeat 5

The rounds are made up, seeded: every probe-round metric of `monitor.metrics.METRICS` and every per-edit
metric under three settings (gap_1, gap_10, gap_100), a collapse alarm from the middle round on, so each
code draws one plot per metric with the default collapse thresholds and alarm line, as a run's MLflow
artifacts are drawn. "this code" is the working tree, uncommitted changes included. Each code runs in a
fresh process (its tree first on sys.path), imports matplotlib and draws once untimed, then draws
`--repeat` times; the codes take turns, and the least wall time counts (wall, not CPU: writing the PNGs
is part of the cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Run inside the code under test; prints the seconds of one `round_plots` of the rows file.
DRAW = """
import json, sys, time
from pathlib import Path
from monitor.alarms import CollapseThresholds
from monitor.exporters.plots import collapse_thresholds, round_plots
rows = [json.loads(line) for line in open(sys.argv[1])]
thresholds = collapse_thresholds(CollapseThresholds())
round_plots(rows, Path(sys.argv[2]) / "warm-up", thresholds)
start = time.perf_counter()
paths = round_plots(rows, Path(sys.argv[2]) / "timed", thresholds)
print(json.dumps({"seconds": time.perf_counter() - start, "plots": len(paths)}))
"""


def made_up_rounds(rounds: int, every: int, seed: int = 0) -> list[dict]:
    """`rounds` probe-round rows, one every `every` edits, with a value for every metric editwatch defines."""
    from monitor.metrics import METRICS

    rng = random.Random(seed)
    round_keys = [key for key, metric in METRICS.items() if metric.scope == "round"]
    edit_keys = [key for key, metric in METRICS.items() if metric.scope == "edit"]
    rows = []
    for i in range(1, rounds + 1):
        row: dict = {"round": i, "edits_applied": i * every}
        row.update({key: rng.random() for key in round_keys})
        row["collapse_alarm"] = float(i > rounds // 2)
        row["results"] = {f"gap_{gap}": {key: rng.random() for key in edit_keys} for gap in (1, 10, 100)}
        rows.append(row)
    return rows


def timed_draw(code: Path, rows: Path, out: Path) -> tuple[float, int]:
    """Seconds and plot count of one `round_plots` by `code`, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", DRAW, str(rows), str(out)], cwd=code, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(code)})
    if done.returncode:
        raise RuntimeError(f"{code.name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["plots"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision of the code to compare with")
    parser.add_argument("--rounds", type=int, default=10, help="probe rounds in the run (points per line)")
    parser.add_argument("--repeat", type=int, default=3, help="timed draws of each code; the least counts")
    args = parser.parse_args()
    from edit_cost import drop_worktree, worktree

    work = Path(tempfile.mkdtemp(prefix="editwatch-plots-"))
    rows = work / "rounds.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in made_up_rounds(args.rounds, every=100)))
    codes = {"this code": ROOT, args.baseline: worktree(args.baseline, work)}
    try:
        best = {name: (math.inf, 0) for name in codes}
        for turn in range(args.repeat):
            for name in (list(codes) if turn % 2 == 0 else list(reversed(codes))):
                seconds, plots = timed_draw(codes[name], rows, work / f"{codes[name].name}-{turn}")
                best[name] = min(best[name], (seconds, plots))
        print(f"{'code':>12s} {'plots':>6s} {'seconds':>8s} {'ms/plot':>8s}")
        for name, (seconds, plots) in best.items():
            print(f"{name[:12]:>12s} {plots:6d} {seconds:8.2f} {seconds / plots * 1000:8.0f}")
        print(f"{'speed-up':>12s} {best[args.baseline][0] / best['this code'][0]:22.2f}x")
    finally:  # the PNGs stay in `work` for a look; the worktree is unregistered from the repository
        drop_worktree(codes[args.baseline])


if __name__ == "__main__":
    main()
