"""PNG plots of metrics against edits applied (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from monitor.metrics import METRICS

Points = list[tuple[float, float]]  # (edits applied, value)


def line_plot(title: str, lines: dict[str, Points], path: Path, xlabel: str = "edits applied") -> Path:
    """Draw one line per entry of `lines` into the PNG `path`."""
    from matplotlib.figure import Figure  # imported here: matplotlib takes a second to load

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    for label, points in lines.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        axes.plot(xs, ys, marker="." if len(points) < 50 else None, label=label)
    key = title.rpartition("/")[2]
    axes.set_title(f"{title}: {METRICS[key].description}" if key in METRICS else title, fontsize="small")
    axes.set_xlabel(xlabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def round_series(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Points]]:
    """Metric key -> line label -> points, from a run's rounds.jsonl rows.

    A probe-round metric (retention, ref_ppl_ratio, ...) is one line; a per-edit metric
    (reliability, ...) has one line per setting (`gap_1`, `gap_10`, ...).
    """
    series: dict[str, dict[str, Points]] = {}
    for row in rows:
        step = row["edits_applied"]
        for key, value in row.items():
            if key in METRICS and isinstance(value, (int, float)):
                series.setdefault(key, {}).setdefault("probe round", []).append((step, value))
        for setting, means in row.get("results", {}).items():
            for key, value in means.items():
                if isinstance(value, (int, float)):
                    series.setdefault(key, {}).setdefault(setting, []).append((step, value))
    return series


def round_plots(rows: Iterable[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per metric of a run's probe rounds, into `folder`."""
    return [line_plot(key, lines, folder / f"{key}.png") for key, lines in round_series(rows).items()]
