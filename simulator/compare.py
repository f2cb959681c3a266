"""`simulate compare`: runs side by side, from MLflow.

A table like VLKEB's Table 2 (Huang et al., NeurIPS 2024), one row per experiment: model, data
(the stream's hash), limit, setting (`single` or `gap_N`) and method — runs are never averaged
across these, nor across any other setting they differ in (a hyperparameter, a threshold; the
`settings` column names it); only seeds are. Each row says how many runs it holds and how they
ended; each metric is the mean ± standard deviation over those runs. Per-edit metrics are each
run's mean over its edits in that setting; probe-round metrics (retention, perplexity ratio,
retrieval ...) are each run's value reduced by the metric's aggregation (`run/<key>`, or from the
history for runs that have not finished); the first collapse alarm is its own column. Runs that did
not finish (killed, interrupted, still running) are left out unless asked for. Printed as Markdown
(the best mean of a column among the methods of one model, data, limit and setting in bold, by the
metric's direction) and saved as CSV (`<key>_sd` columns) and Markdown, with one PNG per metric
against edits applied, one line per run.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from monitor.run_tags import COLLAPSE_AT_TAG, COLLAPSE_TAG, LIMIT_TAG, STOPPED_TAG
from monitor.sink import short_model_name
from simulator.command import ArgumentParser, CommandError, add_model_options, options

if TYPE_CHECKING:
    from monitor.exporters.plots import Points

log = logging.getLogger(__name__)

KEY_COLUMNS = ("model", "stream", "data_hash", "limit", "setting", "method")
SETTINGS_COLUMN = "settings"  # only when the compared runs differ in a setting outside the key columns
COUNT_COLUMNS = ("status", "n", "edits")
COLLAPSE_COLUMNS = ("collapsed", "collapse_at", "collapse_at_sd")  # runs that raised it; mean ± sd of where
SD_SUFFIX = "_sd"
HASH_SHOWN = 8  # hex digits of the data hash in the Markdown table (the CSV has all)
# Params that do not make two runs different experiments: the seed (what a row averages over), the key
# columns' own params, where a run reads and writes, and how it runs and reports. Every other param that
# differs between the compared runs splits their rows: a new setting splits by default, which shows a
# difference rather than hiding it in a mean.
NOT_SETTINGS = frozenset({
    "seed", "model", "method", "stream", "data_hash", "limit", "mode", "gap", "gaps", "run_name", "out", "images",
    "resume", "follow", "checkpoint_every", "device", "trust_remote_code", "editwatch_version", "mlflow_uri",
    "mlflow_experiment", "mlflow_flush_seconds", "no_mlflow", "prometheus_port", "prometheus_host",
    "prometheus_linger", "pushgateway",
})
_SETTING = re.compile(r"single|gap_(\d+)")


class CompareOptions(BaseModel):
    """Settings of `simulate compare` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    mlflow_experiment: str = Field("editwatch", description="MLflow experiment whose runs are compared")
    runs: list[str] | None = Field(None, description="only these MLflow run ids")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: MLflow's local default)")
    out: Path = Field(Path("compare"), description="folder for table.csv, table.md and plots/")
    include_unfinished: bool = Field(
        False, description="also compare runs that did not finish (killed, interrupted, still running); the status "
        "column counts them"
    )
    sync: list[Path] = Field(default_factory=list, description="first send what these run folders left unsent to "
                             "MLflow (their mlflow/ journals); writes the server rejected are counted, never re-sent")


def parser() -> argparse.ArgumentParser:
    """Options of `simulate compare`."""
    compare = ArgumentParser(
        prog="simulate compare",
        description="Compare MLflow runs of `simulate`: a table of methods x metrics per model, data, limit and "
        "setting, mean ± sd over seeds (CSV and Markdown), and plots of each metric against edits applied, one "
        "line per run.",
    )
    add_model_options(compare, CompareOptions)
    compare.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return compare


@dataclass
class RunView:
    """What the comparison reads of one MLflow run."""

    run_id: str
    name: str
    method: str
    model: str
    metrics: dict[str, float]  # latest value of every metric key; `run/<key>`: a probe-round metric's run value
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status: str = "FINISHED"  # MLflow's: RUNNING, FINISHED, KILLED, FAILED, SCHEDULED

    @property
    def label(self) -> str:
        """How the run is named in plots."""
        return f"{self.name} ({self.method})"

    @property
    def state(self) -> str:
        """How the run ended: MLflow's status, or INTERRUPTED for a run stopped short that MLflow has FINISHED.

        A --follow run is stopped on purpose (its stream has no end): that is how it finishes.
        """
        stopped = self.tags.get(STOPPED_TAG) == "interrupted" and self.params.get("follow") != "true"
        return "INTERRUPTED" if self.status == "FINISHED" and stopped else self.status

    @property
    def finished(self) -> bool:
        """Whether the run ended normally (the only runs compared unless --include-unfinished)."""
        return self.state == "FINISHED"

    @property
    def collapse_at(self) -> float | None:
        """Edits applied at the run's first collapse alarm; None when it raised none (or has not ended)."""
        if self.tags.get(COLLAPSE_TAG) != "True" or COLLAPSE_AT_TAG not in self.tags:
            return None
        return float(self.tags[COLLAPSE_AT_TAG])


def split_key(key: str, metrics: Collection[str]) -> tuple[str, str] | None:
    """`gap_10/reliability` -> ("gap_10", "reliability"); None for keys that are not per-setting metrics."""
    setting, _, metric = key.partition("/")
    if _SETTING.fullmatch(setting) and (metric in metrics or metric == "edits_measured"):
        return setting, metric
    return None


def find_runs(client: Any, experiment: str, run_ids: list[str] | None) -> list[RunView]:
    """The given runs, else every `simulate` run of the experiment, each with its probe-round metrics' run values."""
    if run_ids:
        runs = [client.get_run(run_id) for run_id in run_ids]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise CommandError(f"no MLflow experiment {experiment!r} (give --mlflow-experiment or --mlflow-uri)")
        runs = client.search_runs([found.experiment_id], "tags.`editwatch.kind` = 'simulate'", max_results=10_000)
    views = [RunView(run.info.run_id, run.info.run_name or run.info.run_id, run.data.params.get("method", "?"),
                     run.data.params.get("model", "?"), dict(run.data.metrics), dict(run.data.params),
                     dict(run.data.tags), run.info.status) for run in runs]
    for view in views:
        _add_run_values(client, view)
    return views


def _add_run_values(client: Any, run: RunView) -> None:
    """`run/<key>` for every probe-round metric the run logged but has no run value of yet (it has not finished)."""
    from monitor.exporters.tracking import RUN_PREFIX
    from monitor.metrics import METRICS, reduce

    for key in [k for k in run.metrics if k in METRICS and METRICS[k].scope == "round"]:
        if RUN_PREFIX + key not in run.metrics:
            history = latest_per_step(client.get_metric_history(run.run_id, key))
            run.metrics[RUN_PREFIX + key] = reduce(key, [value for _, value in history])


def _setting_order(setting: str) -> tuple[int, int]:
    match = _SETTING.fullmatch(setting)
    return (0, 0) if match is None or match.group(1) is None else (1, int(match.group(1)))


def _data(run: RunView) -> str:
    """What identifies a run's data: the stream's hash, else (a --follow run, standard input) its path."""
    return run.params.get("data_hash") or f"stream {run.params.get('stream', '?')}"


def _limit(run: RunView) -> int | None:
    """The --limit the run ended under: a resume may raise it, and MLflow keeps a param's first value."""
    limit = run.tags.get(LIMIT_TAG, run.params.get("limit"))
    return int(limit) if limit not in (None, "", "None") else None


def differing_settings(runs: Iterable[RunView]) -> list[str]:
    """Params (besides NOT_SETTINGS) whose values differ between `runs`: what else tells their experiments apart."""
    runs = list(runs)
    keys = {key for run in runs for key in run.params if key not in NOT_SETTINGS}
    return sorted(key for key in keys if len({run.params.get(key) for run in runs}) > 1)


def _variants(runs: list[RunView]) -> dict[str, tuple[tuple[str, str | None], ...]]:
    """Run id -> the settings it differs in from runs of the same model, data, limit and method, with its values.

    Compared within a method: two methods' hyperparameters differ by nature, and the method is a column.
    """
    families: dict[tuple[Any, ...], list[RunView]] = {}
    for run in runs:
        families.setdefault((run.model, _data(run), _limit(run), run.method), []).append(run)
    variants = {}
    for members in families.values():
        keys = differing_settings(members)
        variants.update({run.run_id: tuple((key, run.params.get(key)) for key in keys) for run in members})
    return variants


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of `values`; the deviation is None for fewer than two, and NaN
    (the mean NaN or infinite) when a value is NaN or infinite, as a diverged run's can be."""
    if not values:
        return None, None
    if not all(map(math.isfinite, values)):  # fsum and stdev raise on these; a plain sum gives inf or NaN
        return sum(values) / len(values), math.nan if len(values) > 1 else None
    return math.fsum(values) / len(values), statistics.stdev(values) if len(values) > 1 else None


def table(runs: list[RunView], metrics: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: per experiment (KEY_COLUMNS, and the settings the runs differ in), the runs' status
    counts, their number `n`, and the mean and sample standard deviation (`<key>_sd`) of each metric over them.

    `metrics` are the metric keys in column order (monitor.metrics.METRICS); absent ones are left out.
    A run's probe-round metrics (`run/<key>`) and its first collapse go into each of its settings' rows.
    """
    variants = _variants(runs)
    models: dict[str, set[str]] = {}
    for run in runs:
        models.setdefault(short_model_name(run.model), set()).add(run.model)
    groups: dict[tuple[Any, ...], list[tuple[RunView, dict[str, float]]]] = {}
    for run in runs:
        by_setting: dict[str, dict[str, float]] = {}
        for key, value in run.metrics.items():
            if (parts := split_key(key, metrics)) is not None:
                by_setting.setdefault(parts[0], {})[parts[1]] = value
        health = {key.removeprefix("run/"): value for key, value in run.metrics.items()
                  if key.startswith("run/") and key.removeprefix("run/") in metrics}
        for setting, values in by_setting.items():
            groups.setdefault((run.model, _data(run), _limit(run), setting, run.method, variants[run.run_id]),
                              []).append((run, {**values, **health}))
    present = {key for group in groups.values() for _, values in group for key in values}
    columns = [key for key in metrics if key in present]
    rows = []
    for (model, _, limit, setting, method, variant), group in sorted(groups.items(), key=lambda g: _sortable(g[0])):
        first = group[0][0]
        row: dict[str, Any] = {
            # The full name where two models share a short one.
            "model": short_model_name(model) if len(models[short_model_name(model)]) == 1 else model,
            "stream": Path(first.params.get("stream", "?")).name, "data_hash": first.params.get("data_hash"),
            "limit": limit, "setting": setting, "method": method,
        }
        if any(variants.values()):
            row[SETTINGS_COLUMN] = ", ".join(f"{k}={v}" for k, v in variant if v is not None) or "–"
        states = Counter(run.state for run, _ in group)
        row["status"] = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
        row["n"] = len(group)
        row["edits"] = mean_sd([v["edits_measured"] for _, v in group if "edits_measured" in v])[0]
        for key in columns:
            row[key], row[key + SD_SUFFIX] = mean_sd([v[key] for _, v in group if key in v])
        collapses = [run.collapse_at for run, _ in group if run.collapse_at is not None]
        row["collapsed"] = len(collapses)
        row["collapse_at"], row["collapse_at" + SD_SUFFIX] = mean_sd(collapses)
        rows.append(row)
    keys = [*KEY_COLUMNS, *([SETTINGS_COLUMN] if any(variants.values()) else []), *COUNT_COLUMNS]
    spread = [column for key in columns for column in (key, key + SD_SUFFIX)]
    return [*keys, *spread, *COLLAPSE_COLUMNS], rows


def _sortable(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """A group key in table order: settings by gap; no limit and unset params (None) first."""
    model, data, limit, setting, method, variant = key
    return (model, data, (limit is not None, limit or 0), _setting_order(setting), setting, method,
            tuple((key, value is not None, value or "") for key, value in variant))


def _format(key: str, value: float) -> str:
    """A number as the table shows it: fractions, factors, nats and norms to 3 decimals, seconds to 3 digits,
    counts whole (one decimal for a mean that is not)."""
    from monitor.metrics import METRICS

    unit = METRICS[key].unit if key in METRICS else "count"
    if unit == "seconds":
        return f"{value:.3g}"
    if unit == "count":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.3f}"


def _cell(row: dict[str, Any], key: str, bold: bool) -> str:
    """One Markdown cell; a number as `mean ± sd`, its mean bold when `bold`."""
    value = row.get(key)
    if key == "collapsed":
        return f"{value}/{row['n']}"
    if value is None:
        return "–"
    if key == "data_hash":
        return str(value)[:HASH_SHOWN]
    if isinstance(value, str) or key in ("n", "limit"):
        return str(value)
    mean = _format(key, value)
    sd = row.get(key + SD_SUFFIX)
    return (f"**{mean}**" if bold else mean) + (f" ± {_format(key, sd)}" if sd is not None else "")


def _context(row: dict[str, Any]) -> tuple[Any, ...]:
    """The rows whose means compete for bold: one model, data, limit and setting (methods and settings vary)."""
    return row["model"], row["stream"], row["data_hash"], row["limit"], row["setting"]


def write_table(columns: list[str], rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path, str]:
    """table.csv and table.md in `out`; returns their paths and the Markdown text.

    The CSV has a `<key>_sd` column beside each mean; the Markdown shows `mean ± sd` in one cell and
    bolds each column's best mean among the rows of one model, data, limit and setting (by the
    metric's direction; metrics without one, such as sizes, are never bold).
    """
    from monitor.metrics import METRICS, best

    out.mkdir(parents=True, exist_ok=True)
    with (out / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    winners: dict[tuple[Any, ...], float | None] = {}
    for key in (k for k in columns if k in METRICS):
        for context in {_context(row) for row in rows}:
            values = [row[key] for row in rows if _context(row) == context and row.get(key) is not None]
            winners[(*context, key)] = best(key, values) if len(values) > 1 else None

    def won(row: dict[str, Any], key: str) -> bool:
        winner = winners.get((*_context(row), key))
        return winner is not None and row.get(key) == winner

    shown = [key for key in columns if not (key.endswith(SD_SUFFIX) and key.removesuffix(SD_SUFFIX) in columns)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row, key, won(row, key)) for key in shown) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    (out / "table.md").write_text(markdown, encoding="utf-8")
    return out / "table.csv", out / "table.md", markdown


def latest_per_step(history: Iterable[Any]) -> Points:
    """(step, value) pairs of one metric's MLflow history, one per step, sorted by step: the latest value logged.

    A run resumed from a checkpoint logs the probe rounds after that checkpoint again at the
    same steps; the replay is what the run's results hold, so it wins. "Latest" is MLflow's own
    order for a run's current value: timestamp, then the larger value on a tie.
    """
    by_step: dict[float, float] = {}
    for metric in sorted(history, key=lambda m: (m.timestamp, m.value)):
        by_step[metric.step] = metric.value
    return sorted(by_step.items())


def histories(client: Any, runs: list[RunView], metrics: Collection[str]) -> dict[str, dict[str, Points]]:
    """Metric key -> run label -> (edits applied, value), for probe-round metrics and per-setting means."""
    out: dict[str, dict[str, Points]] = {}
    named = Counter(run.label for run in runs)  # two runs of one name (the same cell of two sweeps) are two lines
    for run in runs:
        label = run.label if named[run.label] == 1 else f"{run.label} [{run.run_id[:8]}]"
        for key in run.metrics:
            if key not in metrics and (split_key(key, metrics) is None or key.endswith("/edits_measured")):
                continue
            out.setdefault(key, {})[label] = latest_per_step(client.get_metric_history(run.run_id, key))
    return out


def main(namespace: argparse.Namespace) -> int:
    """`simulate compare`."""
    args = options(namespace, CompareOptions)
    # imported here: MLflow and torch (under the metric definitions) take seconds, not needed for --help
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from monitor.exporters.journal import JournalError
    from monitor.exporters.plots import metric_plots
    from monitor.exporters.tracking import TrackingRejected, TrackingUnavailable, dead_letters, sync
    from monitor.metrics import METRICS

    for folder in args.sync:
        try:
            log.info("%s: %d MLflow operations sent", folder, sync(Path(folder), args.mlflow_uri))
        except (FileNotFoundError, JournalError, TrackingUnavailable, TrackingRejected) as error:
            raise CommandError(f"cannot sync {folder}: {error}") from None
        # Rejected writes are never sent again (each sync's own are logged as they happen): say, every time, how
        # many the run has and where.
        rejected = dead_letters(Path(folder))
        if (count := rejected.count()):
            log.warning("%s: %d MLflow writes were rejected by the tracking server and are not sent again; they are "
                        "in %s with the server's answers", folder, count, rejected.path)
    try:
        client = MlflowClient(tracking_uri=args.mlflow_uri)
        found = find_runs(client, args.mlflow_experiment, args.runs)
    except (MlflowException, OSError) as error:  # an unknown run id, a tracking URI that cannot be read
        where = args.mlflow_uri or "MLflow's default tracking URI"
        raise CommandError(f"cannot read the runs from {where}: {str(error).splitlines()[0]}") from None
    runs = [run for run in found if run.finished or args.include_unfinished]
    left_out = [f"{run.name} ({run.state.lower()})" for run in found if not (run.finished or args.include_unfinished)]
    if left_out:
        log.warning("%d unfinished runs left out (--include-unfinished compares them): %s", len(left_out),
                    ", ".join(left_out))
    if not runs:
        unfinished = f"; {len(left_out)} unfinished: --include-unfinished compares them" if left_out else ""
        asked = "among the given runs" if args.runs else f"in MLflow experiment {args.mlflow_experiment!r}"
        raise CommandError(f"no finished simulate runs {asked}{unfinished}")
    out = Path(args.out)
    columns, rows = table(runs, list(METRICS))
    csv_path, _, markdown = write_table(columns, rows, out)
    print(markdown)
    plots = metric_plots(histories(client, runs, METRICS), out / "plots")
    log.info("%d runs compared: table in %s (and .md), %d plots in %s", len(runs), csv_path, len(plots), out / "plots")
    return 0
