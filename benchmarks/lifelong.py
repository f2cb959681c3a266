"""Benchmark: every method over one long sequential stream of the default world, same seed and probes.

    python benchmarks/lifelong.py --out bench-lifelong                      # all methods, 5,000 edits
    python benchmarks/lifelong.py --out bench-lifelong --methods grace lora  # add methods to the same folder
    python benchmarks/lifelong.py --out bench-lifelong --report              # table and plots only

Each method runs in its own process (`simulate`, gap 10, a probe round every 100 edits, no
MLflow), so its peak resident memory is its own; `--parallel N` runs N at once, each on
cores / N torch threads (edits/s are then per process, not of the whole machine). Edits/s is
the stream's rate from the first probe round to the last, so start-up (loading the model,
training or loading an editor) is left out; the whole run's seconds stay in `METHOD.json`. The table
reads the probe rounds after 100, 1,000 and 5,000 edits: Rel / T-Gen / I-Gen / T-Loc / I-Loc
are running means over the edits measured so far (each measured 10 edits after it was
applied); retention and the reference-set perplexity ratio are the state of the model at that
point. Plots: every metric against edits applied, one line per method. Runs already in the
folder are kept, so methods can be added.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from simulate import long_stream  # noqa: E402  (benchmarks/simulate.py)

from simulator.world.export import read_manifest, write_world  # noqa: E402
from simulator.world.graph import WorldConfig  # noqa: E402

METHODS = ["ft-llm", "mend", "serac", "ike", "grace", "wise", "lora"]
PER_EDIT = ["reliability", "t_gen", "i_gen", "t_loc", "i_loc"]
STATE = ["retention", "ref_ppl_ratio"]
CHECKPOINTS = [100, 1000, 5000]


def run(method: str, stream: Path, world: Path, out: Path, gap: int, probe_every: int, threads: int) -> dict:
    """One `simulate` process on `threads` torch threads; returns its wall seconds and peak RSS (MiB)."""
    command = [sys.executable, "-m", "simulator.cli", "--stream", str(stream), "--images", str(world / "images"),
               "--train", str(world / "train.jsonl"), "--method", method, "--gap", str(gap), "--probe-every",
               str(probe_every), "--no-mlflow", "--out", str(out)]
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(out.parent / f"{method}.log").open("w"),
                               env=env)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} failed: see {out.parent / f'{method}.log'}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def rounds(out: Path) -> list[dict]:
    """The run's probe rounds."""
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def row_at(method_rounds: list[dict], edits: int, gap: int) -> dict[str, float]:
    """Per-edit running means and model state at the round after `edits` edits."""
    found = next((r for r in method_rounds if r["edits_applied"] >= edits), None)
    if found is None:
        return {}
    means = found["results"].get(f"gap_{gap}", {})
    return {**{k: means.get(k) for k in PER_EDIT}, **{k: found.get(k) for k in STATE}}


def stream_rate(method_rounds: list[dict]) -> float | None:
    """Edits per second from the first probe round to the last: each round's rate covers the edits since the one
    before, so the time before the first round (start-up) is left out."""
    later = list(zip(method_rounds, method_rounds[1:]))
    if not later or not all(row.get("edits_per_second") for _, row in later):
        return None
    seconds = sum((row["edits_applied"] - before["edits_applied"]) / row["edits_per_second"] for before, row in later)
    return (method_rounds[-1]["edits_applied"] - method_rounds[0]["edits_applied"]) / seconds


def report(folder: Path, gap: int) -> str:
    """Markdown table of every finished method in `folder`, and plots beside it."""
    lines = ["| method | edits | Rel | T-Gen | I-Gen | T-Loc | I-Loc | retention | ref ppl ratio | edits/s | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {}
    for method in METHODS:
        if not (folder / method / "rounds.jsonl").is_file():
            continue
        meta_file = folder / f"{method}.json"  # written when the run finished
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        runs[method] = rounds(folder / method)
        reached = [edits for edits in CHECKPOINTS if row_at(runs[method], edits, gap)]
        for edits in reached:
            values = row_at(runs[method], edits, gap)
            cells = " | ".join("–" if values[k] is None else f"{values[k]:.3f}" for k in PER_EDIT + STATE)
            # Speed (the stream's rate) and peak memory: shown once, on the run's last row (a run still going: its
            # rate so far, and no peak yet).
            rate = stream_rate(runs[method])
            speed = "–" if rate is None else f"{rate:.1f}"
            whole = (f"{speed} | {meta['peak_rss_mib']:.0f} MiB" if meta else
                     f"{speed} (unfinished: {runs[method][-1]['edits_applied']:,} edits) | –")
            lines.append(f"| {method} | {edits:,} | {cells} | {whole if edits == reached[-1] else ' | '} |")
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    for metric in PER_EDIT + STATE:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for method, method_rounds in runs.items():
            xs = [r["edits_applied"] for r in method_rounds]
            ys = [r["results"].get(f"gap_{gap}", {}).get(metric) if metric in PER_EDIT else r.get(metric)
                  for r in method_rounds]
            axis.plot(xs, [float("nan") if y is None else y for y in ys], label=method)
        axis.set_xlabel("edits applied")
        axis.set_ylabel(metric + (" (running mean)" if metric in PER_EDIT else ""))
        if metric == "ref_ppl_ratio":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(plots / f"{metric}.png", dpi=110)
        plt.close(figure)
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, table.md and plots/")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--edits", type=int, default=5000)
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=1, help="methods run at once (each on cores / N threads)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        world = args.out / "world"
        if read_manifest(world) is None:  # its manifest is written last: a world without one is unfinished
            write_world(WorldConfig(), world, progress=False)
        stream = long_stream(world, args.edits)
        threads = max(1, (os.cpu_count() or 1) // args.parallel)

        def one(method: str) -> None:
            out = args.out / method
            shutil.rmtree(out, ignore_errors=True)  # an unfinished run of an earlier invocation
            meta = {"edits": args.edits, "threads": threads,
                    **run(method, stream, world, out, args.gap, args.probe_every, threads)}
            (args.out / f"{method}.json").write_text(json.dumps(meta) + "\n")
            print(f"{method}: {meta['seconds']:.0f} s, peak {meta['peak_rss_mib']:.0f} MiB", flush=True)

        todo = [m for m in args.methods if not (args.out / f"{m}.json").is_file()]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(one, todo))
    print(report(args.out, args.gap))


if __name__ == "__main__":
    main()
