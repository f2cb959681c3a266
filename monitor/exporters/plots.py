"""Plots of metrics against edits applied (matplotlib, no display needed), all drawn by one set of rules.

`simulate report`, `simulate compare`'s PNGs and the MLflow artifacts draw through `draw`, so
every plot of editwatch reads the same way:
- the y label names the metric and its unit (`Metric.unit`); the memory search quantiles are
  upper bounds of histogram buckets (memory/stats.py `latency_quantile`), not measured
  percentiles, and are labelled "≤ bucket bound (p99)";
- a threshold (a collapse threshold, a floor) is a dashed horizontal line, always inside the axis;
- a 95% interval (`<key>_ci_low` .. `<key>_ci_high`) is a shaded band around its line, not two plots;
- unbounded ratios (unit "factor": the reference perplexity ratio) and the log-spaced latency
  buckets get a log axis, so a ratio that grows a hundredfold stays readable;
- a run's first collapse alarm is a vertical line;
- lines never hide each other: each has its own marker and dash, later lines are thinner, and
  lines with identical values are named in a note;
- a per-edit metric against edits applied is the running mean over the edits measured so far
  (rounds.jsonl `results`), and says so: a running mean that rises is not the model recovering.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from monitor.alarms import collapse_checks
from monitor.metrics import METRICS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

    from monitor.alarms import CollapseThresholds

Points = list[tuple[float, float]]  # (edits applied, value)
Series = Mapping[str, Mapping[str, Points]]  # metric key -> line label -> points

ROUND_LINE = "probe round"  # label of a probe-round metric's line when the plot shows one run
COLLAPSE = "collapse_alarm"
CI_SUFFIXES = ("_ci_low", "_ci_high")
UNIT_LABELS = {"ratio": "fraction, 0–1", "factor": "factor, log scale", "nats": "nats", "seconds": "seconds",
               "count": "count", "norm": "Frobenius norm"}
# memory/stats.py reports these as the upper bound of the histogram bucket holding the quantile.
BUCKET_BOUNDS = {"memory_search_seconds_p50": "p50", "memory_search_seconds_p99": "p99"}
LINE_STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
THRESHOLD_COLOUR = "crimson"
CHAR_INCHES = 0.09  # the width of a digit or minus sign of a 10-point tick label, with room to spare
# zlib's fastest level: 13% less time a plot than PIL's default (6) for a 3% larger file (one plot saved
# ten times each way).
SAVE: dict[str, Any] = {"dpi": 100, "pil_kwargs": {"compress_level": 1}}


@dataclass(frozen=True)
class Threshold:
    """A horizontal line on a metric's plot: `value`, and what crossing it means (e.g. "collapse above")."""

    value: float
    label: str


def metric_of(key: str) -> str:
    """`gap_10/reliability` (compare's per-setting keys) -> `reliability`; a plain key as it is."""
    return key.rpartition("/")[2]


def axis_label(key: str) -> str:
    """The y label of metric `key`: its name and unit; per-edit metrics as running means."""
    name = metric_of(key)
    metric = METRICS.get(name)
    if name in BUCKET_BOUNDS:
        return f"{name}\n≤ bucket bound ({BUCKET_BOUNDS[name]}), seconds"
    if metric is None:
        return name
    label = f"{name} ({UNIT_LABELS[metric.unit]})"
    return f"running mean of {label}" if metric.scope == "edit" else label


def title_of(key: str) -> str:
    """The plot's title: the key, what it measures, and for per-edit metrics how to read a running mean."""
    metric = METRICS.get(metric_of(key))
    text = f"{key}: {metric.description}" if metric else key
    if metric_of(key) in BUCKET_BOUNDS:
        text += " — shown as the upper bound of the latency histogram bucket that holds it"
    if metric and metric.scope == "edit":
        text += " — running mean over the edits measured so far: it moves slowly, and a rise is not recovery"
    return "\n".join(textwrap.wrap(text, 90))  # ~ the width of a 7-inch figure in a small font


def collapse_thresholds(limits: CollapseThresholds) -> dict[str, Threshold]:
    """The collapse thresholds of a run (monitor/alarms.py `collapse_checks`) as lines on their metrics' plots."""
    return {check.metric: Threshold(check.threshold, "collapse above" if check.above else "collapse below")
            for check in collapse_checks(limits)}


def _xy(points: Iterable[tuple[float, Any]]) -> tuple[list[float], list[float]]:
    """Sorted x and y, a missing value (null: NaN in the run's JSON) as NaN, so the line breaks there."""
    pairs = sorted((float(x), math.nan if y is None else float(y)) for x, y in points)
    return [x for x, _ in pairs], [y for _, y in pairs]


def draw(key: str, lines: Mapping[str, Points], *, bands: Mapping[str, tuple[Points, Points]] | None = None,
         threshold: Threshold | None = None, collapses: Mapping[str, float] | None = None,
         xlabel: str = "edits applied") -> Figure:
    """The figure of metric `key`: one line per entry of `lines`, a band per entry of `bands` (same labels),
    a threshold line, and a vertical line per entry of `collapses` (label -> edits at the first alarm; an empty
    label when the plot shows one run)."""
    from matplotlib.figure import Figure  # imported here: matplotlib takes a second to load

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    name = metric_of(key)
    colours: dict[str, str] = {}
    seen: list[float] = []
    for i, (label, points) in enumerate(lines.items()):
        xs, ys = _xy(points)
        # Lines with equal values must not hide each other: dash, marker and width all differ by line.
        (line,) = axes.plot(xs, ys, label=label, linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                            marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(xs) // 15),
                            markersize=max(3.0, 7.0 - i), linewidth=max(0.8, 2.6 - 0.5 * i),
                            markerfacecolor="none" if i % 2 else None,
                            drawstyle="steps-post" if name in BUCKET_BOUNDS else "default")
        colours[label] = line.get_color()
        seen += [y for y in ys if math.isfinite(y)]
    for label, (low, high) in (bands or {}).items():
        lows, highs = dict(_pairs(low)), dict(_pairs(high))
        xs = sorted(set(lows) & set(highs))
        axes.fill_between(xs, [lows[x] for x in xs], [highs[x] for x in xs], color=colours.get(label), alpha=0.2,
                          linewidth=0, label=f"{label}: 95% interval" if label else "95% interval")
        seen += [v for x in xs for v in (lows[x], highs[x]) if math.isfinite(v)]
    if threshold is not None:
        axes.axhline(threshold.value, color=THRESHOLD_COLOUR, linestyle=(0, (6, 3)), linewidth=1.3,
                     label=f"{threshold.label} {threshold.value:g}")
        seen.append(threshold.value)
    for label, step in (collapses or {}).items():
        axes.axvline(step, color=colours.get(label, THRESHOLD_COLOUR), linestyle=(0, (1, 1.5)), linewidth=1.8,
                     label=f"first collapse alarm{' of ' + label if label else ''}: {step:g} edits")
    metric = METRICS.get(name)
    if metric is not None and (metric.unit == "factor" or name in BUCKET_BOUNDS):
        _log_axis(axes, seen + ([1.0] if metric.unit == "factor" else []))
        if metric.unit == "factor":
            axes.axhline(1.0, color="grey", linewidth=0.8, label="1 = unchanged")
    elif metric is not None and metric.unit == "ratio":
        # Fractions on their whole range, so a change of 0.01 does not look like a collapse.
        axes.set_ylim(min([-0.03, *[v - 0.03 for v in seen]]), max([1.03, *[v + 0.03 for v in seen]]))
    elif seen:
        axes.set_ylim(*_padded(min(seen), max(seen)))
    _note_identical(axes, lines)
    title, ylabel = title_of(key), axis_label(key)
    axes.set_title(title, fontsize="small")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    _set_margins(figure, axes, title, ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    return figure


def _set_margins(figure: Figure, axes: Axes, title: str, ylabel: str) -> None:
    """Margins sized for the texts a plot holds, so nothing is cut off at the figure's edge.

    Computed from the texts rather than measured on a drawn figure: a layout engine (constrained, tight) draws
    every figure twice to measure it, which made a run's plots ~1.3x slower to write. The room is that of the
    title's lines in a small font, the y label's lines, the widest y tick label and half the widest x tick label
    (test_plots checks every text of extreme plots lies inside the figure). An offset or exponent above the y axis
    (1e-5) lifts the title a line.
    """
    ylabels, xlabels = _tick_labels(axes.yaxis), _tick_labels(axes.xaxis)
    width, height = figure.get_size_inches()
    offset = axes.yaxis.get_major_formatter().get_offset()
    top = 0.12 + 0.15 * (title.count("\n") + 1) + (0.2 if offset else 0.0)
    left = 0.3 + CHAR_INCHES * max(map(len, ylabels), default=0) + 0.2 * (ylabel.count("\n") + 1)
    right = 0.1 + CHAR_INCHES / 2 * max(map(len, xlabels), default=0)  # a tick at the axis's end is centred on it
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=0.55 / height, top=1 - top / height)


def _tick_labels(axis: Axis) -> list[str]:
    """The labels `axis` draws at its major ticks in view, formatted as a draw formats them (which sets the offset)."""
    low, high = sorted(axis.get_view_interval())
    locs = axis.get_majorticklocs()
    labels = axis.get_major_formatter().format_ticks(locs)
    return [label for loc, label in zip(locs, labels) if low <= loc <= high]


def _pairs(points: Points) -> list[tuple[float, float]]:
    xs, ys = _xy(points)
    return list(zip(xs, ys))


def _padded(low: float, high: float) -> tuple[float, float]:
    """Limits that hold [low, high] with a margin (a constant line sits mid-axis, not on the frame)."""
    margin = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    return low - margin, high + margin


def _log_axis(axes: Axes, values: list[float]) -> None:
    """A log y axis over the positive values, ticks labelled as plain numbers (1, 2, 5, 10, not 10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return
    low, high = min(positive) / 1.25, max(positive) * 1.25
    span = high / low
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span < 30 else (1.0, 2.0, 5.0) if span < 1e4 else (1.0,)
    axes.set_ylim(low, high)
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def _note_identical(axes: Axes, lines: Mapping[str, Points]) -> None:
    """Name the lines whose values are all equal: drawn on top of each other, one would otherwise vanish."""
    groups: dict[tuple[tuple[float, float], ...], list[str]] = {}
    for label, points in lines.items():
        if points:
            groups.setdefault(tuple(_pairs(points)), []).append(label)
    same = [" = ".join(labels) for labels in groups.values() if len(labels) > 1]
    if same:
        axes.text(0.01, 0.01, "identical values: " + "; ".join(same), transform=axes.transAxes, fontsize="x-small",
                  va="bottom", gid="identical-note", bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` as the PNG `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, **SAVE)
    return path


def png(figure: Figure) -> bytes:
    """`figure` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **SAVE)
    return buffer.getvalue()


def line_plot(title: str, lines: dict[str, Points], path: Path, xlabel: str = "edits applied") -> Path:
    """Draw one metric (`title` is its key, e.g. `gap_10/reliability`), one line per entry, into the PNG `path`."""
    return save(draw(title, lines, xlabel=xlabel), path)


def first_collapses(series: Series) -> dict[str, float]:
    """Line label -> edits applied at the first round whose `collapse_alarm` is raised ("" for a one-run plot)."""
    found = {}
    for label, points in series.get(COLLAPSE, {}).items():
        raised = [x for x, y in _pairs(points) if y >= 1]
        if raised:
            found["" if label == ROUND_LINE else label] = raised[0]
    return found


def figures(series: Series, thresholds: Mapping[str, Threshold] | None = None,
            collapses: Mapping[str, float] | None = None) -> Iterator[tuple[str, Figure]]:
    """(key, figure) for every metric of `series`, its interval keys drawn as bands on its own plot.

    `thresholds` are keyed by metric (they apply to `gap_N/<metric>` too); collapse markers come from
    the `collapse_alarm` lines unless `collapses` is given.
    """
    thresholds = thresholds or {}
    collapses = first_collapses(series) if collapses is None else collapses
    for key, lines in series.items():
        if key.endswith(CI_SUFFIXES) and key.rsplit("_ci_", 1)[0] in series:
            continue  # drawn as the band of its metric
        low, high = (series.get(key + suffix, {}) for suffix in CI_SUFFIXES)
        bands = {label: (low[label], high[label]) for label in lines if label in low and label in high}
        yield key, draw(key, lines, bands=bands, threshold=thresholds.get(metric_of(key)), collapses=collapses)


def metric_plots(series: Series, folder: Path, thresholds: Mapping[str, Threshold] | None = None) -> list[Path]:
    """One PNG per metric of `series` into `folder` (`<key>.png`; `gap_N/<metric>` keys in subfolders)."""
    return [save(figure, folder / f"{key}.png") for key, figure in figures(series, thresholds)]


def round_series(rows: Iterable[dict[str, Any]], run: str | None = None) -> dict[str, dict[str, Points]]:
    """Metric key -> line label -> points, from a run's rounds.jsonl rows.

    A probe-round metric (retention, ref_ppl_ratio, ...) is one line, labelled `run` (or "probe round");
    a per-edit metric (reliability, ...) has one line per setting (`gap_1`, `gap_10`, ... after `run`):
    its running mean at each round.
    """
    series: dict[str, dict[str, Points]] = {}
    for row in rows:
        step = row["edits_applied"]
        for key, value in row.items():
            if key in METRICS and (value is None or isinstance(value, (int, float))):
                series.setdefault(key, {}).setdefault(run or ROUND_LINE, []).append((step, value))
        for setting, means in row.get("results", {}).items():
            for key, value in means.items():
                if key in METRICS and (value is None or isinstance(value, (int, float))):
                    label = f"{run} {setting}" if run else setting
                    series.setdefault(key, {}).setdefault(label, []).append((step, value))
    return series


def round_plots(rows: Iterable[dict[str, Any]], folder: Path,
                thresholds: Mapping[str, Threshold] | None = None) -> list[Path]:
    """One PNG per metric of a run's probe rounds, into `folder` (pass the run's `collapse_thresholds`)."""
    return metric_plots(round_series(rows), folder, thresholds)
