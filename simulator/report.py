"""`simulate report RUN_DIR [--against OTHER ...]`: one self-contained HTML page about a run.

The page holds the run's settings (config.json), a pass/fail list of checks with the thresholds
they used, plots of every probe-round metric and running mean (drawn by the rules of
monitor/exporters/plots.py, as inline PNGs), and summary.json's tables: `results` (one row per
setting), `base` and `health`. `--against` draws other runs on the same plots and sets their
settings and checks beside the run's.

The checks:
- collapse: no probe round crossed a threshold of the run's own `collapse` settings;
- forgetting: no round found significant forgetting (monitor/alarms.py `forgetting_significant`);
- retention floor: retention after the last round (its run value) is at least `--retention-floor`
  (default: the run's `collapse.retention`, else 0.8);
- locality floors: each setting's mean `t_loc` / `i_loc` is at least `--t-loc-floor` / `--i-loc-floor`
  (0.8: the edited model still agrees with the unedited one on 4 answer tokens of 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memory.files import write_text_atomically
from monitor.alarms import CollapseThresholds
from monitor.sink import short_model_name
from simulator.command import ArgumentParser, CommandError, add_model_options, options, validation_problems
from simulator.outputs import CONFIG, ROUNDS, SUMMARY
from simulator.report_html import check_item, figure, page, table

if TYPE_CHECKING:
    from monitor.exporters.plots import Threshold

log = logging.getLogger(__name__)

REPORT = "report.html"
DEFAULT_RETENTION_FLOOR = 0.8
LOCALITY = ("t_loc", "i_loc")
State = Literal["pass", "fail", "n/a"]
Model = TypeVar("Model", bound=BaseModel)


class ReportOptions(BaseModel):
    """Settings of `simulate report` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    against: list[Path] = Field(default_factory=list, description="other run folders drawn on the same plots")
    out: Path | None = Field(None, description="HTML file to write (default: RUN_DIR/report.html)")
    retention_floor: float | None = Field(
        None, ge=0, le=1, description="lowest acceptable retention after the last round "
        f"(default: the run's collapse retention threshold, else {DEFAULT_RETENTION_FLOOR})")
    t_loc_floor: float = Field(0.8, ge=0, le=1, description="lowest acceptable mean t_loc of each setting")
    i_loc_floor: float = Field(0.8, ge=0, le=1, description="lowest acceptable mean i_loc of each setting")


class _CollapseLog(BaseModel):
    raised: bool = False
    first_at: int | None = None
    reasons: list[str] = Field(default_factory=list)


class _ForgettingLog(BaseModel):
    detected: bool = False
    first_at: int | None = None


class _Alarms(BaseModel):
    collapse: _CollapseLog = Field(default_factory=_CollapseLog)
    forgetting: _ForgettingLog = Field(default_factory=_ForgettingLog)


class Summary(BaseModel):
    """What the report reads of summary.json (DESIGN.md, Command line); other keys are shown as they are."""

    model_config = ConfigDict(extra="ignore")

    run: str | None = None
    method: str | None = None
    model: str | None = None
    mode: str | None = None
    gaps: list[int] = Field(default_factory=list)
    edits_read: int | None = None
    edits_applied: int | None = None
    quarantined: int | None = None
    failed: int | None = None
    rounds: int | None = None
    stopped: str | None = None
    results: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    base: dict[str, float | None] = Field(default_factory=dict)
    health: dict[str, float | None] = Field(default_factory=dict)
    alarms: _Alarms = Field(default_factory=_Alarms)


class RoundRow(BaseModel):
    """One line of rounds.jsonl: edits applied, the round's metrics (extra keys), reasons, running means."""

    model_config = ConfigDict(extra="allow")

    edits_applied: int
    alarms: list[str] = Field(default_factory=list)
    results: dict[str, dict[str, float | None]] = Field(default_factory=dict)


class _Config(BaseModel):
    model_config = ConfigDict(extra="allow")

    collapse: CollapseThresholds = Field(default_factory=CollapseThresholds)


@dataclass
class RunData:
    """A run folder as the report reads it; `summary` is None while the run has not finished."""

    folder: Path
    name: str
    config: dict[str, Any]
    collapse: CollapseThresholds
    rows: list[dict[str, Any]]
    summary: Summary | None
    stale: bool = False  # summary.json was left by an earlier end (the run was resumed since) and is not read

    @property
    def results(self) -> dict[str, dict[str, float | None]]:
        """Per-setting means: the summary's, else the running means of the last round."""
        if self.summary is not None:
            return self.summary.results
        return self.rows[-1]["results"] if self.rows else {}

    def run_value(self, key: str) -> float | None:
        """A probe-round metric's run value: the summary's `health`, else reduced from the rounds as the run's end
        reduces them; null (how the files hold NaN/Inf) is NaN, never an older finite value."""
        if self.summary is not None and key in self.summary.health:
            value = self.summary.health[key]
            return math.nan if value is None else value
        from monitor.metrics import reduce_rounds

        return reduce_rounds(self.rows).get(key)

    def first_collapse(self) -> tuple[int | None, list[str]]:
        """Edits applied at the first collapse alarm and its reasons (None when never raised)."""
        if self.summary is not None and self.summary.alarms.collapse.raised:
            return self.summary.alarms.collapse.first_at, self.summary.alarms.collapse.reasons
        first = next((row for row in self.rows if row["alarms"] or row.get("collapse_alarm")), None)
        return (None, []) if first is None else (first["edits_applied"], first["alarms"])

    def first_forgetting(self) -> dict[str, Any] | None:
        """The first round that found significant forgetting."""
        return next((row for row in self.rows if row.get("forgetting_significant")), None)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not JSON: {error}") from None


def _validated(path: str | Path, model: type[Model], value: Any) -> Model:
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise CommandError(f"{path}: {validation_problems(error, flags=False)}") from None


def _rounds(path: Path) -> list[dict[str, Any]]:
    """rounds.jsonl's rows; a torn last line (a run killed while writing it) is left out with a warning."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                log.warning("%s: last line %d is incomplete and left out (%s)", path, number, error)
                break
            raise CommandError(f"{path} line {number} is not JSON: {error}") from None
        rows.append(_validated(f"{path} line {number}", RoundRow, row).model_dump())
    return rows


def load_run(folder: Path) -> RunData:
    """A run folder (`simulate --out`): config.json, rounds.jsonl and, once finished, summary.json."""
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder (give a run's --out folder)")
    if not (folder / CONFIG).is_file() and not (folder / SUMMARY).is_file():
        raise CommandError(f"{folder} is not a run folder: it has no {CONFIG} or {SUMMARY}")
    config = _json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    collapse = _validated(folder / CONFIG, _Config, config).collapse
    raw = _json(folder / SUMMARY) if (folder / SUMMARY).is_file() else None
    if isinstance(raw, dict) and "sweep" in raw and "cells" in raw:
        raise CommandError(f"{folder} is a sweep's folder: give one of its cells' run folders, in {folder / 'cells'}")
    summary = None if raw is None else _validated(folder / SUMMARY, Summary, raw)
    name = (summary.run if summary else None) or config.get("run_name") or folder.resolve().name
    rows = _rounds(folder / ROUNDS)
    # A resumed run goes on past the end its summary.json describes until it ends again: its rounds are newer.
    stale = summary is not None and bool(rows) and rows[-1]["edits_applied"] > (summary.edits_applied or 0)
    return RunData(folder, name, config, collapse, rows, None if stale else summary, stale)


@dataclass(frozen=True)
class Check:
    """One line of the pass/fail list, with the threshold it used."""

    ident: str  # the element id is `check-<ident>`
    name: str
    state: State
    detail: str
    threshold: str


def retention_floor(run: RunData, options: ReportOptions) -> tuple[float, str]:
    """The retention floor and where it comes from: the flag, the run's collapse threshold, the default."""
    if options.retention_floor is not None:
        return options.retention_floor, "--retention-floor"
    if run.collapse.retention is not None:
        return run.collapse.retention, "the run's collapse.retention"
    return DEFAULT_RETENTION_FLOOR, "report default"


def checks(run: RunData, options: ReportOptions) -> list[Check]:
    """The run's checks: collapse, forgetting, retention floor, locality floors per setting."""
    found = [_collapse_check(run), _forgetting_check(run)]
    floor, source = retention_floor(run, options)
    retention = run.run_value("retention")
    bound = f"floor {floor:g}, {source}"
    if retention is None:
        found.append(Check("retention", "retention floor", "n/a", "no retention measured (no probe round)", bound))
    else:
        low, high = run.run_value("retention_ci_low"), run.run_value("retention_ci_high")
        interval = f" (95% CI {low:.3f}–{high:.3f})" if low is not None and high is not None else ""
        found.append(Check("retention", "retention floor", "pass" if retention >= floor else "fail",
                           f"retention after the last round {retention:.3f}{interval}", bound))
    floors = {"t_loc": options.t_loc_floor, "i_loc": options.i_loc_floor}
    for setting, means in run.results.items():
        for key in LOCALITY:
            value = means.get(key)
            name = f"{key} floor ({setting})"
            if value is None:
                found.append(Check(f"{key}-{setting}", name, "n/a", f"no {key} measured", f"floor {floors[key]:g}"))
                continue
            found.append(Check(f"{key}-{setting}", name, "pass" if value >= floors[key] else "fail",
                               f"mean {key} {value:.3f} over the setting's edits", f"floor {floors[key]:g}"))
    return found


def _collapse_check(run: RunData) -> Check:
    from monitor.exporters.plots import collapse_thresholds

    limits = collapse_thresholds(run.collapse)
    bound = "thresholds from the run's config: " + ", ".join(
        [f"{key} {line.label.removeprefix('collapse ')} {line.value:g}" for key, line in limits.items()]
        + ["NaN/Inf weights"])
    if not run.rows:
        return Check("collapse", "collapse", "n/a", "no probe rounds (single mode, or fewer edits than a round)", bound)
    extremes = []
    for key, line in limits.items():
        # null is how the rounds hold NaN/Inf: the worst value, not a round to skip
        values = [math.nan if row[key] is None else float(row[key]) for row in run.rows if key in row]
        if values:
            above = line.label.endswith("above")
            worst = math.nan if any(map(math.isnan, values)) else max(values) if above else min(values)
            extremes.append(f"{'highest' if above else 'lowest'} {key} {worst:.3g}")
    first_at, reasons = run.first_collapse()
    found = [f"no alarm in {len(run.rows)} probe rounds"] if first_at is None else [
        f"first alarm after {first_at} edits: {'; '.join(reasons)}"]
    return Check("collapse", "collapse", "pass" if first_at is None else "fail", "; ".join(found + extremes), bound)


def _forgetting_check(run: RunData) -> Check:
    bound = "fails when the 95% interval of retention lies below reliability at edit time"
    measured = [row for row in run.rows if row.get("retention") is not None]
    if not measured:
        return Check("forgetting", "forgetting", "n/a", "no retention measured (no probe round)", bound)
    first = run.first_forgetting()
    if first is None:
        last = measured[-1]
        return Check("forgetting", "forgetting", "pass",
                     f"not significant in {len(measured)} rounds; last forgetting {last.get('forgetting', 0):.3f}",
                     bound)
    at_edit = first["retention"] + first["forgetting"]
    return Check("forgetting", "forgetting", "fail",
                 f"significant after {first['edits_applied']} edits: retention {first['retention']:.3f} "
                 f"(95% CI up to {first['retention_ci_high']:.3f}) < {at_edit:.3f} at edit time", bound)


def plot_thresholds(run: RunData, options: ReportOptions) -> dict[str, Threshold]:
    """Metric key -> the threshold line of its plot: the run's collapse thresholds, then the report's floors."""
    from monitor.exporters.plots import Threshold, collapse_thresholds

    lines = collapse_thresholds(run.collapse)
    floor, source = retention_floor(run, options)
    if source != "the run's collapse.retention":
        lines["retention"] = Threshold(floor, "retention floor")
    lines["t_loc"] = Threshold(options.t_loc_floor, "locality floor")
    lines["i_loc"] = Threshold(options.i_loc_floor, "locality floor")
    return lines


def plotted(runs: list[RunData]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """What the plots show: metric key -> line label -> points over all runs (in registry order), and each
    run's first collapse alarm. Lines are named by run (and setting) when there are several runs."""
    from monitor.exporters.plots import round_series
    from monitor.metrics import METRICS

    single = len(runs) == 1
    series: dict[str, dict[str, Any]] = {}
    for run in runs:
        for key, lines in round_series(run.rows, None if single else run.name).items():
            series.setdefault(key, {}).update(lines)
    collapses = {"" if single else run.name: at for run in runs if (at := run.first_collapse()[0]) is not None}
    order = {key: i for i, key in enumerate(METRICS)}
    return dict(sorted(series.items(), key=lambda item: order.get(item[0], len(order)))), collapses


def _plot_sections(runs: list[RunData], options: ReportOptions) -> str:
    """The plots of every metric, grouped: model health, edits (running means), retrieval."""
    from monitor.exporters.plots import axis_label, figures, png
    from monitor.metrics import METRICS

    series, collapses = plotted(runs)
    groups: dict[str, list[str]] = {"Model health (probe rounds)": [], "Edits (running means per setting)": [],
                                    "Retrieval and memory (memory-based editors)": []}
    titles = list(groups)
    for key, drawn in figures(series, plot_thresholds(runs[0], options), collapses):
        metric = METRICS.get(key)
        group = titles[1] if metric and metric.scope == "edit" else \
            titles[2] if key.startswith(("retrieval_", "memory_")) else titles[0]
        groups[group].append(figure(key, png(drawn), f"{key}: {axis_label(key)}".replace("\n", " ")))
    if not any(groups.values()):
        return "<h2>Plots</h2><p>No probe round yet: nothing to plot.</p>"
    return "".join(f'<h2>{title}</h2><div class="plots">{"".join(items)}</div>'
                   for title, items in groups.items() if items)


def _tables(runs: list[RunData]) -> str:
    """summary.json's results (one row per setting and run), base (one row per run) and health (one row per metric)."""
    from monitor.metrics import METRICS

    single = len(runs) == 1
    keys = ["setting"] if single else ["run", "setting"]
    rows = [{"run": run.name, "setting": setting, **means} for run in runs for setting, means in run.results.items()]
    for row in rows:  # a count, read as a float
        if row.get("edits_measured") is not None:
            row["edits_measured"] = f"{row['edits_measured']:g}"
    present = {key for row in rows for key in row}
    metrics = [key for key in METRICS if key in present]
    columns = [*keys, *(["edits_measured"] if "edits_measured" in present else []), *metrics]
    notes = {key: METRICS[key].unit for key in metrics}
    parts = ["<h2>Results per setting</h2>",
             table(columns, rows, len(keys), notes, "results") if rows else "<p>No setting measured yet.</p>"]
    base = [{"run": run.name, **run.summary.base} for run in runs if run.summary and run.summary.base]
    if base:
        base_keys = list(dict.fromkeys(key for row in base for key in row if key != "run"))
        parts += ["<h2>Base: the unedited model's token accuracy on the original answers</h2>",
                  table(["run", *base_keys], base, 1, table_id="base")]
    # One row per metric (there are ~20), one column per run.
    health = []
    for key in (key for key in METRICS if METRICS[key].scope == "round"):
        values = {run.name: run.run_value(key) for run in runs}
        if any(value is not None for value in values.values()):
            if METRICS[key].unit == "count":
                values = {name: None if v is None else f"{v:g}" for name, v in values.items()}
            health.append({"metric": key, "aggregation": METRICS[key].aggregation, "unit": METRICS[key].unit,
                           **values})
    if health:
        parts += ["<h2>Health: probe-round metrics, each reduced by its aggregation</h2>",
                  table(["metric", "aggregation", "unit", *[run.name for run in runs]], health, 3,
                        table_id="health")]
    return "".join(parts)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (`collapse.ppl_ratio`)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "method_config":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = "–" if value is None else value if isinstance(value, str) else json.dumps(value)
    return out


def _settings(runs: list[RunData]) -> str:
    """The runs' config.json side by side; rows where they differ are marked."""
    flats = [_flat(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    rows = [{"setting": key, **{run.name: flat.get(key, "–") for run, flat in zip(runs, flats)}} for key in keys]
    differ = [i for i, row in enumerate(rows) if len({str(row[run.name]) for run in runs}) > 1]
    named = escape(", ".join(rows[i]["setting"] for i in differ)) or "none"
    note = f"<p>Settings that differ (highlighted): {named}.</p>" if len(runs) > 1 else ""
    body = table(["setting", *[run.name for run in runs]], rows, len(runs) + 1, table_id="settings", marked=differ)
    return f"<h2>Settings (config.json)</h2>{note}{body}"


def _check_sections(runs: list[RunData], options: ReportOptions) -> str:
    found = checks(runs[0], options)
    items = "".join(check_item(c.ident, c.name, c.state, c.detail, c.threshold) for c in found)
    text = f'<h2>Checks</h2><ul class="checks" id="checks">{items}</ul>'
    if len(runs) > 1:
        by_run = {run.name: {c.ident: c for c in checks(run, options)} for run in runs}
        idents = list(dict.fromkeys(ident for states in by_run.values() for ident in states))
        cells = "".join(
            f'<tr><td class="key">{escape(ident)}</td>' + "".join(
                f'<td class="{states[ident].state.replace("/", "")}">{states[ident].state.upper()}</td>'
                if ident in states else "<td>–</td>" for states in by_run.values()) + "</tr>" for ident in idents)
        heads = "".join(f"<th>{escape(name)}</th>" for name in by_run)
        text += (f'<h3>Checks of every run</h3><table id="checks-all"><thead><tr><th class="key">check</th>{heads}'
                 f"</tr></thead><tbody>{cells}</tbody></table>")
    return text


def _header(run: RunData) -> str:
    summary = run.summary
    status = (f"stopped: {summary.stopped}" if summary else
              "resumed since summary.json was written: read from its rounds; still going, or killed" if run.stale else
              "no summary.json: the run is still going, or was killed")
    model = (summary.model if summary else None) or run.config.get("model") or "?"
    facts = [f"method {run.config.get('method') or (summary.method if summary else None) or '?'}",
             f"model {short_model_name(model)}", status]
    if summary:
        facts.insert(2, f"{summary.edits_applied} edits applied of {summary.edits_read} read, {summary.failed} failed, "
                        f"{summary.quarantined} quarantined, {summary.rounds} probe rounds")
    return (f"<h1>editwatch report: {escape(run.name)}</h1>"
            f'<p class="meta">{escape(" · ".join(facts))}<br>run folder {escape(str(run.folder))}</p>')


def render(runs: list[RunData], options: ReportOptions) -> str:
    """The report page of `runs[0]`, the others drawn against it."""
    for i, run in enumerate(runs):  # names label lines and columns: they must differ
        if any(run.name == other.name for other in runs[:i]):
            run.name = f"{run.name} ({run.folder})"
    return page(f"editwatch report: {runs[0].name}", [
        _header(runs[0]), _check_sections(runs, options), _plot_sections(runs, options), _tables(runs),
        _settings(runs)])


def write_report(run_dir: Path, options: ReportOptions) -> Path:
    """Write the report of `run_dir` (against `options.against`); returns the HTML file's path."""
    runs = [load_run(Path(folder)) for folder in [run_dir, *options.against]]
    out = options.out or Path(run_dir) / REPORT
    html = render(runs, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, html)
    return out


def parser() -> argparse.ArgumentParser:
    """Options of `simulate report`."""
    report = ArgumentParser(
        prog="simulate report",
        description="Write one self-contained HTML page about a run: its settings, pass/fail checks (collapse, "
        "forgetting, retention and locality floors) and plots of every metric against edits applied.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's --out folder")
    add_model_options(report, ReportOptions)
    report.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return report


def main(args: argparse.Namespace) -> int:
    """`simulate report`."""
    settings = options(args, ReportOptions, skip=("verbose", "run_dir"))
    out = write_report(Path(args.run_dir), settings)
    log.info("report written to %s", out)
    print(out)
    return 0
