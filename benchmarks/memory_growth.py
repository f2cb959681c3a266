"""Benchmark: how memory-based editors degrade as their memory grows, in one long run per method.

    python benchmarks/memory_growth.py                                  # 100,000 edits into every memory editor
    python benchmarks/memory_growth.py --edits 5000 --probe-every 500 --methods serac

Streams `--edits` distinct edits of the long-stream world (`simulate world --edits N`) into every
memory editor asked for (default: every registered editor that declares a memory), sequentially
with gap 10, a probe round every `--probe-every` edits and no MLflow. Each round reports, against
the memory size at that point: retention (reliability of a random sample of the stored edits,
re-asked), reference agreement (locality on the fixed reference set), retrieval recall@1 and
false-hit rate, the round's retrieval latency per query (`retrieval_latency_seconds`: keys and
search of the round's retrieval probe; the summary's `memory_search_seconds_p50` is a coarser
figure, the bucket bound of a histogram over the whole run), edits/s since the previous round,
and gap-10 reliability / I-Gen / T-Loc / I-Loc over the edits measured since the previous round. It writes `memory_growth.png` (all of them but I-Gen against memory size) and prints the
table at 10^3 / 10^4 / 10^5 (the rounds nearest those sizes) with each run's peak RSS (every
method runs in a fresh process of its own, so the figure is not the world's writing's or an
earlier method's). The world is written once
into `OUT/world-N` and kept beside the runs. `--report RUN...` prints and plots finished run
folders (e.g. `memory_growth/serac`) instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from editors import METHODS, HasMemory, editor_class  # noqa: E402
from simulator.config import RunConfig  # noqa: E402
from simulator.run import simulate  # noqa: E402
from simulator.world.export import StreamConfig, read_manifest, write_world  # noqa: E402
from simulator.world.graph import WorldConfig  # noqa: E402

SERIES = {  # rounds.jsonl key -> plot title
    "retention": "retention (stored edits re-asked)",
    "ref_agreement": "reference agreement (locality)",
    "retrieval_recall_at_1": "retrieval recall@1",
    "retrieval_false_hit_rate": "retrieval false-hit rate",
    "retrieval_latency_seconds": "retrieval latency per query (the round's probe), s",
    "edits_per_second": "edits/s",
}


def run(method: str, world: Path, edits: int, probe_every: int, out: Path) -> tuple[list[dict], float, float]:
    """Rounds of one long run, its wall seconds and the peak RSS (GiB) of the process it ran in."""
    config = RunConfig(stream=str(world / "eval.jsonl"), images=world / "images", method=method, gap=[10],
                       probe_every=probe_every, checkpoint_every=probe_every, out=out, train=world / "train.jsonl",
                       no_mlflow=True)
    start = time.monotonic()
    simulate(config, progress=True)
    seconds = time.monotonic() - start
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return rounds, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


WINDOWED = ("reliability", "i_gen", "t_loc", "i_loc")  # gap-10 metrics, averaged over the edits since the previous round
PLOTTED = {"reliability": "reliability (gap 10, since the last round)", "t_loc": "T-Loc (gap 10, since the last round)",
           "i_loc": "I-Loc (gap 10, since the last round)"}


def windowed(rounds: list[dict], index: int, key: str) -> float | None:
    """The gap-10 mean of `key` over the edits measured between round `index - 1` and round `index`.

    Rounds carry running means over all measured edits; with gap 10 and distinct edits, edit i is
    measured once edit i + 10 is applied, so `edits_applied - 10` edits are measured by a round.
    """
    def total(row: dict | None) -> tuple[float, int]:
        if row is None:
            return 0.0, 0
        n = max(row["edits_applied"] - 10, 0)
        return row["results"].get("gap_10", {}).get(key, 0.0) * n, n

    (after, n_after), (before, n_before) = total(rounds[index]), total(rounds[index - 1] if index else None)
    return (after - before) / (n_after - n_before) if n_after > n_before else None


def report(method: str, rounds: list[dict], sizes: list[int], axes) -> None:
    """Plot one method's rounds and print its rows nearest `sizes`."""
    memory = [r["memory_size"] for r in rounds]
    series = [[r.get(key) for r in rounds] for key in SERIES]
    series += [[windowed(rounds, i, key) for i in range(len(rounds))] for key in PLOTTED]
    for ax, values, title in zip(axes.flat, series, [*SERIES.values(), *PLOTTED.values()]):
        ax.plot(memory, [float("nan") if v is None else v for v in values], label=method)
        ax.set(title=title, xlabel="edits in memory", xscale="log")
    for size in sizes:
        index = min(range(len(rounds)), key=lambda i: abs(rounds[i]["memory_size"] - size))
        row = rounds[index]
        values = [row.get(k) for k in SERIES] + [windowed(rounds, index, k) for k in WINDOWED]
        cells = " ".join(f"{v:12.4g}" if v is not None else f"{'-':>12s}" for v in values)
        print(f"{method:6s} {row['memory_size']:7.0f} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    memory_methods = [name for name in METHODS if issubclass(editor_class(name), HasMemory)]
    parser.add_argument("--methods", nargs="+", default=memory_methods)
    parser.add_argument("--edits", type=int, default=100_000)
    parser.add_argument("--probe-every", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("memory_growth"))
    parser.add_argument("--report", nargs="+", type=Path, metavar="RUN",
                        help="print and plot finished runs (run folders, named by method) instead of running")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.report and (taken := [str(args.out / m) for m in args.methods if (args.out / m).exists()]):
        raise SystemExit(f"a run is already in {', '.join(taken)}: choose another --out, or --report it")
    args.out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(3, 3, figsize=(13, 10))
    header = [key[:12] for key in SERIES] + [f"{key.replace('reliability', 'rel')} (win)" for key in WINDOWED]
    print(f"{'method':6s} {'memory':>7s} " + " ".join(f"{h:>12s}" for h in header))
    if args.report:
        for folder in args.report:
            rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
            report(folder.name, rounds, [s for s in (10**3, 10**4, 10**5) if s <= rounds[-1]["memory_size"]], axes)
    else:
        world = args.out / f"world-{args.edits}"  # the same seed and size give the same world: written once
        if read_manifest(world) is None:  # its manifest is written last: a world without one is unfinished
            write_world(WorldConfig(), world, stream=StreamConfig(edits=args.edits), progress=True)
        sizes = [s for s in (10**3, 10**4, 10**5) if s <= args.edits]
        for method in args.methods:
            # A fresh process per method: its peak RSS is then the run's own, not the world's writing's or an
            # earlier method's (ru_maxrss only ever grows).
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rounds, seconds, rss = pool.submit(run, method, world, args.edits, args.probe_every,
                                                   args.out / method).result()
            report(method, rounds, sizes, axes)
            print(f"{method:6s} {len(rounds)} rounds, {seconds / 60:.1f} min, peak RSS {rss:.2f} GiB", flush=True)
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(args.out / "memory_growth.png", dpi=110)
    print(f"plot: {args.out / 'memory_growth.png'}")


if __name__ == "__main__":
    main()
