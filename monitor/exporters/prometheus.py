"""Prometheus exporter: live metrics over HTTP (127.0.0.1 by default) and pushes to a Pushgateway.

Names follow DESIGN.md (prefix `editwatch_`, base units, `_total` counters) and carry only the
labels `run`, `method`, `model` and, on value gauges, `setting` and `metric`. Values are grouped by
the metric registry's unit, so one graph never mixes a 0-1 ratio with a count or a norm:
- `editwatch_probe_<unit>{metric=KEY}`: the latest probe round's value of each METRICS key, e.g.
  `editwatch_probe_ratio{metric="retention"}`, `editwatch_probe_factor{metric="ref_ppl_ratio"}`,
  `editwatch_probe_seconds`, `editwatch_probe_nats`, `editwatch_probe_norm`, `editwatch_probe_number`
  (counts and sizes);
- `editwatch_edit_<unit>{setting=SETTING, metric=KEY}`: running mean of a per-edit metric in one
  setting (`single`, `gap_10`, ...);
- `editwatch_run_<unit>{metric=KEY}`: at the end, a probe-round metric's value over the whole
  run, reduced by its aggregation (monitor.metrics.reduce_rounds);
- the run's lifecycle, which the alert rules follow: `editwatch_run_running` (1 from start to its
  end), `editwatch_run_failed` (1 when it ended on an error), `editwatch_last_progress_timestamp_seconds`
  (the last edit or round), `editwatch_progress_interval_seconds` (a probe job's interval, 0 for a run);
  `editwatch_collapse_alarm` (1 when the latest round raised the collapse
  alarm) and `editwatch_collapse_check{metric=INDICATOR}` (1 for each indicator that crossed its
  threshold: the alarm's reason, as a label);
- counters of edits applied / failed / quarantined and probe rounds, this process's: a resumed run's start at
  0, as a restarted process's do, so `rate()` and `increase()` read them right (counters that went on from the
  checkpoint fell below what the crashed process had exported, which Prometheus reads as a reset: a spike);
  the run's totals across resumes (the summary's counts) are the gauges `editwatch_edits_{applied,failed,
  quarantined}_in_run`; histograms of edit and probe-round durations in seconds.
A served run that Prometheus has scraped before keeps serving after its end until one more
scrape has seen the final state (at most `linger_seconds`), so an alert resolves because the run
ended, and a run that vanishes while running is told apart.
A pushed run's group is its run name and its folder (as `instance`, which the scrape of the
Pushgateway keeps): two runs of one name, e.g. the same cell of two sweeps, keep their own groups,
and a resumed run pushes into its own again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping
from urllib.error import URLError

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

from monitor.metrics import METRICS
from monitor.sink import Sink, short_model_name

log = logging.getLogger(__name__)

LABELS = ("run", "method", "model")
# Edits take milliseconds on the embedded model and up to minutes on a 7B model with a hypernetwork.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PUSH_EVERY_SECONDS = 15.0  # pushes between probe rounds, so counters move in single mode too
PUSH_TIMEOUT_SECONDS = 5.0
# Prometheus name suffix of each registry unit (base units; counts and sizes are plain numbers).
SUFFIX = {"ratio": "ratio", "factor": "factor", "nats": "nats", "seconds": "seconds", "count": "number",
          "norm": "norm"}


def series_name(scope: str, key: str) -> str:
    """The gauge holding metric `key` per probe round ("probe"), per edit and setting ("edit") or per run ("run")."""
    return f"editwatch_{scope}_{SUFFIX[METRICS[key].unit]}"


class _ScrapeClock:
    """A collector that only notes when the registry was last collected (scraped or pushed)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.scraped = threading.Event()

    def collect(self) -> Iterable[Any]:
        """Note the time; add no metrics."""
        self.last = time.monotonic()
        self.scraped.set()
        return []


class PrometheusSink(Sink):
    """Keeps a run's metrics in `registry`; serves them on `host:port` and/or pushes them to `pushgateway`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        pushgateway: str | None = None,
        job: str = "editwatch",
        linger_seconds: float = 30.0,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pushgateway = pushgateway
        self.job = job
        self.linger_seconds = linger_seconds
        r = self.registry
        # Collected first: a scrape's time is then never later than the values it read, so a scrape that still read
        # "running" cannot end the linger after the run's end.
        self.clock = _ScrapeClock()
        r.register(self.clock)  # type: ignore[arg-type]
        self.applied = Counter("editwatch_edits_applied", "Edits applied to the model.", LABELS, registry=r)
        self.failed = Counter("editwatch_edits_failed", "Stream lines that failed: edits rolled back, retractions "
                              "refused.", LABELS, registry=r)
        self.quarantined = Counter("editwatch_edits_quarantined", "Stream lines quarantined as bad input.", LABELS,
                                   registry=r)
        self.rounds = Counter("editwatch_probe_rounds", "Probe rounds run.", LABELS, registry=r)
        self.counters = {"applied": self.applied, "failed": self.failed, "quarantined": self.quarantined}
        self.in_run = {key: Gauge(f"editwatch_edits_{key}_in_run", f"{what} in the run so far, across resumes "
                                  f"(summary.json's `{key}`; the _total counter counts this process's).", LABELS,
                                  registry=r)
                       for key, what in (("applied", "Edits applied"), ("failed", "Stream lines that failed"),
                                         ("quarantined", "Stream lines quarantined"))}
        self.edit_seconds = Histogram("editwatch_edit_duration_seconds", "Time to apply one edit.", LABELS,
                                      buckets=BUCKETS, registry=r)
        self.probe_seconds = Histogram("editwatch_probe_duration_seconds", "Time of one probe round.", LABELS,
                                       buckets=BUCKETS, registry=r)
        self.running = Gauge("editwatch_run_running", "1 while the run is running, 0 once it ended.", LABELS,
                             registry=r)
        self.run_failed = Gauge("editwatch_run_failed", "1 when the run ended on an error.", LABELS, registry=r)
        self.progress = Gauge("editwatch_last_progress_timestamp_seconds", "Unix time of the run's last edit, "
                              "retraction or probe round.", LABELS, registry=r)
        self.interval = Gauge("editwatch_progress_interval_seconds", "How often a scheduled job (simulate probe) "
                              "makes progress; 0 for a run, which progresses at every edit.", LABELS, registry=r)
        self.collapse = Gauge("editwatch_collapse_alarm", "1 when the latest probe round raised the collapse alarm.",
                              LABELS, registry=r)
        self.collapse_check = Gauge("editwatch_collapse_check", "1 when the latest probe round crossed this "
                                    "indicator's collapse threshold.", (*LABELS, "metric"), registry=r)
        self.values: dict[str, Gauge] = {}
        for scope, labels, what in (("probe", ("metric",), "Latest probe-round value of a metric"),
                                    ("edit", ("setting", "metric"), "Running mean of a per-edit metric in one setting"),
                                    ("run", ("metric",), "A probe-round metric over the whole run, by its aggregation")):
            for unit, suffix in SUFFIX.items():
                name = f"editwatch_{scope}_{suffix}"
                self.values[name] = Gauge(name, f"{what} (unit: {unit}; monitor.metrics).", (*LABELS, *labels),
                                          registry=r)
        self.labels: dict[str, str] = {}
        self._group: dict[str, str] = {}  # the Pushgateway grouping key: the run and its folder
        self._crossed: set[str] = set()
        self._finished = False
        self._seen_quarantined = 0
        self._last_push = 0.0
        self._push_failing = False
        self._server = None
        if port is not None:
            # Started now, before any model loads, so a busy port fails the run at once.
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, self._server.server_port)
        self.clock.scraped.clear()  # registering collected once; only real scrapes count

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) metrics are served on; None when not serving."""
        return self._server.server_address[:2] if self._server is not None else None

    def on_start(self, run: str, params: dict[str, Any], folder: Path, step: int) -> None:
        """Label every series with the run; create the counters at 0 so dashboards see them at once."""
        self.labels = {"run": run, "method": str(params.get("method")), "model": short_model_name(str(params.get("model")))}
        self._group = {"run": run, "instance": str(Path(folder).resolve())}
        for counter in (*self.counters.values(), self.rounds):
            counter.labels(**self.labels)
        for key, gauge in self.in_run.items():  # a probe job starts where its run's edits stand
            gauge.labels(**self.labels).set(step if key == "applied" else 0)
        self.collapse.labels(**self.labels).set(0)
        self.running.labels(**self.labels).set(1)
        self.run_failed.labels(**self.labels).set(0)
        self.progress.labels(**self.labels).set_to_current_time()
        self.interval.labels(**self.labels).set(params.get("every_seconds") or 0)  # the stall alert waits twice that
        self._push(force=True)

    def on_resume(self, counts: Mapping[str, int]) -> None:
        """Continue the run's totals from its checkpoint; the counters count this process's work from 0."""
        for key, gauge in self.in_run.items():
            gauge.labels(**self.labels).set(counts.get(key, 0))
        self._seen_quarantined = counts.get("quarantined", 0)
        self._push(force=True)

    def on_edit(self, applied: bool, seconds: float, step: int) -> None:
        """Count the edit and its duration."""
        self._count("applied" if applied else "failed")
        self.edit_seconds.labels(**self.labels).observe(seconds)
        self.progress.labels(**self.labels).set_to_current_time()
        self._push()

    def on_retraction(self, applied: bool) -> None:
        """Note the progress; a refused retraction counts as a failed line, as `summary.json`'s `failed` does."""
        if not applied:
            self._count("failed")
        self.progress.labels(**self.labels).set_to_current_time()
        self._push()

    def on_quarantine(self, total: int) -> None:
        """Count newly quarantined lines."""
        self._count("quarantined", max(total - self._seen_quarantined, 0))
        self._seen_quarantined = total

    def _count(self, key: str, amount: int = 1) -> None:
        """Count stream lines of an outcome: this process's counter and the run's total."""
        self.counters[key].labels(**self.labels).inc(amount)
        self.in_run[key].labels(**self.labels).inc(amount)

    def on_round(
        self, step: int, values: dict[str, float], seconds: float, results: dict[str, dict[str, float]],
        crossed: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        """Publish the round's values, the running means per setting and the collapse alarm with its indicators."""
        self.rounds.labels(**self.labels).inc()
        self.probe_seconds.labels(**self.labels).observe(seconds)
        # Edits applied when measured: a run's count already, and the only one of a probe job, which applies none.
        self.in_run["applied"].labels(**self.labels).set(step)
        for key, value in values.items():
            self.values[series_name("probe", key)].labels(**self.labels, metric=key).set(value)
        self._results(results)
        if "collapse_alarm" in values:
            self.collapse.labels(**self.labels).set(values["collapse_alarm"])
        self._crossed |= set(crossed)
        for indicator in self._crossed:
            self.collapse_check.labels(**self.labels, metric=indicator).set(float(indicator in crossed))
        self.progress.labels(**self.labels).set_to_current_time()
        self._push(force=True)

    def on_finish(self, summary: dict[str, Any], folder: Path) -> None:
        """Publish the final means (single mode has no probe rounds), the run's values, and that it ended."""
        self.on_quarantine(summary.get("quarantined", self._seen_quarantined))  # bad lines after the last record
        for key, gauge in self.in_run.items():  # the run's totals as its summary holds them
            counted = summary.get("edits_applied" if key == "applied" else key)
            if isinstance(counted, int):
                gauge.labels(**self.labels).set(counted)
        self._results(summary.get("results", {}))
        for key, value in summary.get("health", {}).items():
            if key in METRICS:
                self.values[series_name("run", key)].labels(**self.labels, metric=key).set(value)
        self._end(failed=False)

    def close(self) -> None:
        """Mark a run that did not finish as failed, let Prometheus see the end, stop serving."""
        if self.labels and not self._finished:
            self._end(failed=True)
        if self._server is not None:
            self._linger()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _end(self, failed: bool) -> None:
        self._finished = True
        self.running.labels(**self.labels).set(0)
        self.run_failed.labels(**self.labels).set(float(failed))
        self._ended_at = time.monotonic()
        self._push(force=True)

    def _linger(self) -> None:
        """Keep serving until a scrape after the end, if Prometheus scrapes this run at all (bounded wait)."""
        if not self.clock.scraped.is_set() or not self._finished:
            return
        deadline = time.monotonic() + self.linger_seconds
        while self.clock.last <= self._ended_at and time.monotonic() < deadline:
            time.sleep(0.05)

    def _results(self, results: dict[str, dict[str, float]]) -> None:
        for setting, means in results.items():
            for key, value in means.items():
                if key in METRICS and value is not None:
                    self.values[series_name("edit", key)].labels(**self.labels, setting=setting, metric=key).set(value)

    def _push(self, force: bool = False) -> None:
        """Push to the Pushgateway (grouped by job, run and folder); a failure warns once and the run goes on."""
        if self.pushgateway is None or not self.labels:
            return
        if not force and time.monotonic() - self._last_push < PUSH_EVERY_SECONDS:
            return
        self._last_push = time.monotonic()
        try:
            push_to_gateway(self.pushgateway, job=self.job, registry=self.registry,
                            grouping_key=self._group, timeout=PUSH_TIMEOUT_SECONDS)
        except (URLError, OSError) as error:
            if not self._push_failing:
                log.warning("Pushgateway %s unreachable (%s): metrics are pushed again when it answers",
                            self.pushgateway, error)
            self._push_failing = True
            return
        if self._push_failing:
            log.warning("Pushgateway %s reachable again", self.pushgateway)
        self._push_failing = False
