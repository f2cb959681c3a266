"""`simulate compare`: runs side by side, from MLflow.

A table like VLKEB's Table 2 (Huang et al., NeurIPS 2024): one row per model, setting (`single`
or `gap_N`) and method, one column per metric — the mean over the runs in the group (seeds) —
printed as Markdown and saved as CSV and Markdown; and one PNG per metric against edits applied,
one line per run. The metric registry drives it: per-edit metrics are each run's mean over its
edits in that setting; probe-round metrics (retention, perplexity ratio, retrieval ...) are each
run's value reduced by the metric's aggregation (`run/<key>`, or from the history for runs that
have not finished); in the Markdown table the best value of a column within a model and setting
is bold, by the metric's direction.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from simulator.command import ArgumentParser, CommandError, add_model_options, options

if TYPE_CHECKING:
    from monitor.exporters.plots import Points

log = logging.getLogger(__name__)

KEY_COLUMNS = ("model", "setting", "method", "runs", "edits")
_SETTING = re.compile(r"single|gap_(\d+)")


class CompareOptions(BaseModel):
    """Settings of `simulate compare` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("editwatch", description="MLflow experiment")
    runs: list[str] | None = Field(None, description="only these MLflow run ids")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: MLflow's local default)")
    out: Path = Field(Path("compare"), description="folder for table.csv, table.md and plots/")
    sync: list[Path] = Field(default_factory=list, description="first send what these run folders left unsent to "
                             "MLflow (their mlflow/ journals)")


def parser() -> argparse.ArgumentParser:
    """Options of `simulate compare`."""
    compare = ArgumentParser(
        prog="simulate compare",
        description="Compare MLflow runs of `simulate`: a table of methods x metrics per model and setting "
        "(CSV and Markdown) and plots of each metric against edits applied, one line per run.",
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

    @property
    def label(self) -> str:
        """How the run is named in plots."""
        return f"{self.name} ({self.method})"


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
            raise CommandError(f"no MLflow experiment {experiment!r} (give --experiment or --mlflow-uri)")
        runs = client.search_runs([found.experiment_id], "tags.`editwatch.kind` = 'simulate'", max_results=10_000)
    views = [RunView(run.info.run_id, run.info.run_name or run.info.run_id, run.data.params.get("method", "?"),
                     run.data.params.get("model", "?"), dict(run.data.metrics)) for run in runs]
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


def table(runs: list[RunView], metrics: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: per (model, setting, method), the mean of each metric over the group's runs.

    `metrics` are the metric keys in column order (monitor.metrics.METRICS); absent ones are left out.
    A run's probe-round metrics (`run/<key>`) go into each of its settings' rows.
    """
    groups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for run in runs:
        by_setting: dict[str, dict[str, float]] = {}
        for key, value in run.metrics.items():
            if (parts := split_key(key, metrics)) is not None:
                by_setting.setdefault(parts[0], {})[parts[1]] = value
        health = {key.removeprefix("run/"): value for key, value in run.metrics.items()
                  if key.startswith("run/") and key.removeprefix("run/") in metrics}
        for setting, values in by_setting.items():
            values.update(health)
            groups.setdefault((run.model, setting, run.method), []).append(values)
    present = {key for group in groups.values() for values in group for key in values}
    columns = [key for key in metrics if key in present]
    rows = []
    for (model, setting, method), group in sorted(groups.items(), key=lambda g: (g[0][0], _setting_order(g[0][1]),
                                                                                   g[0][2])):
        row: dict[str, Any] = {"model": model, "setting": setting, "method": method, "runs": len(group)}
        for key in ("edits_measured", *columns):
            values = [v[key] for v in group if key in v]
            row["edits" if key == "edits_measured" else key] = sum(values) / len(values) if values else None
        rows.append(row)
    return [*KEY_COLUMNS, *columns], rows


def write_table(columns: list[str], rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path, str]:
    """table.csv and table.md in `out`; returns their paths and the Markdown text.

    In the Markdown, each column's best value among the methods of one model and setting is bold
    (by the metric's direction; metrics without one, such as sizes, are never bold).
    """
    from monitor.metrics import METRICS, best

    out.mkdir(parents=True, exist_ok=True)
    with (out / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "–"
        if key in ("runs", "edits"):
            return f"{value:g}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    winners: dict[tuple[str, str, str], float | None] = {}
    for key in (k for k in columns if k in METRICS):
        for model, setting in {(row["model"], row["setting"]) for row in rows}:
            values = [row[key] for row in rows if (row["model"], row["setting"]) == (model, setting)
                      and row.get(key) is not None]
            winners[model, setting, key] = best(key, values) if len(values) > 1 else None

    def shown(row: dict[str, Any], key: str) -> str:
        text = cell(key, row.get(key))
        won = winners.get((row["model"], row["setting"], key))
        return f"**{text}**" if won is not None and row.get(key) == won else text

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(shown(row, key) for key in columns) + " |" for row in rows]
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
    for run in runs:
        for key in run.metrics:
            if key not in metrics and (split_key(key, metrics) is None or key.endswith("/edits_measured")):
                continue
            out.setdefault(key, {})[run.label] = latest_per_step(client.get_metric_history(run.run_id, key))
    return out


def main(namespace: argparse.Namespace) -> int:
    """`simulate compare`."""
    args = options(namespace, CompareOptions)
    # imported here: MLflow and torch (under the metric definitions) take seconds, not needed for --help
    from mlflow import MlflowClient

    from monitor.exporters.journal import JournalError
    from monitor.exporters.plots import line_plot
    from monitor.exporters.tracking import TrackingUnavailable, sync
    from monitor.metrics import METRICS

    for folder in args.sync:
        try:
            log.info("%s: %d MLflow operations sent", folder, sync(Path(folder), args.mlflow_uri))
        except (FileNotFoundError, JournalError, TrackingUnavailable) as error:
            raise CommandError(f"cannot sync {folder}: {error}") from None
    client = MlflowClient(tracking_uri=args.mlflow_uri)
    runs = find_runs(client, args.experiment, args.runs)
    if not runs:
        raise CommandError(f"no simulate runs in MLflow experiment {args.experiment!r}")
    out = Path(args.out)
    columns, rows = table(runs, list(METRICS))
    csv_path, _, markdown = write_table(columns, rows, out)
    print(markdown)
    plots = [line_plot(key, lines, out / "plots" / f"{key}.png")
             for key, lines in histories(client, runs, METRICS).items()]
    log.info("%d runs compared: table in %s (and .md), %d plots in %s", len(runs), csv_path, len(plots), out / "plots")
    return 0
