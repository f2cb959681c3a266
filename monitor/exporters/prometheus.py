"""Prometheus exporter: live metrics over HTTP (127.0.0.1 by default) and pushes to a Pushgateway.

Names follow DESIGN.md (prefix `editwatch_`, base units, `_total` counters) and carry only
the labels `run`, `method`, `model` and, on the value gauges, `setting` and `metric`:
- `editwatch_probe_metric{metric=KEY}`: the latest probe round's value of each METRICS key
  (`forgetting_significant` is the run's own forgetting flag, which the alert rule reads);
- `editwatch_edit_metric{setting=SETTING, metric=KEY}`: running mean of a per-edit metric in
  one setting (`single`, `gap_10`, ...), so PromQL can aggregate over settings or metrics;
- `editwatch_run_metric{metric=KEY}`: at the end, a probe-round metric's run value, reduced over
  the rounds by the metric's aggregation (mean, last or max; monitor.metrics.reduce_rounds);
- `editwatch_collapse_alarm`: 1 when the latest round raised the collapse alarm;
- counters of edits applied / failed / quarantined and probe rounds; histograms of edit and
  probe-round durations in seconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.error import URLError

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

from monitor.metrics import METRICS
from monitor.sink import Sink

log = logging.getLogger(__name__)

LABELS = ("run", "method", "model")
# Edits take milliseconds on the embedded model and up to minutes on a 7B model with a hypernetwork.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PUSH_EVERY_SECONDS = 15.0  # pushes between probe rounds, so counters move in single mode too
PUSH_TIMEOUT_SECONDS = 5.0


class PrometheusSink(Sink):
    """Keeps a run's metrics in `registry`; serves them on `host:port` and/or pushes them to `pushgateway`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        pushgateway: str | None = None,
        job: str = "editwatch",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pushgateway = pushgateway
        self.job = job
        r = self.registry
        self.applied = Counter("editwatch_edits_applied", "Edits applied to the model.", LABELS, registry=r)
        self.failed = Counter("editwatch_edits_failed", "Edits that failed and were rolled back.", LABELS, registry=r)
        self.quarantined = Counter("editwatch_edits_quarantined", "Stream lines quarantined as bad input.", LABELS,
                                   registry=r)
        self.rounds = Counter("editwatch_probe_rounds", "Probe rounds run.", LABELS, registry=r)
        self.edit_seconds = Histogram("editwatch_edit_duration_seconds", "Time to apply one edit.", LABELS,
                                      buckets=BUCKETS, registry=r)
        self.probe_seconds = Histogram("editwatch_probe_duration_seconds", "Time of one probe round.", LABELS,
                                       buckets=BUCKETS, registry=r)
        self.probe_metric = Gauge("editwatch_probe_metric", "Latest probe-round value of a metric (monitor.metrics).",
                                  (*LABELS, "metric"), registry=r)
        self.edit_metric = Gauge("editwatch_edit_metric", "Running mean of a per-edit metric in one setting.",
                                 (*LABELS, "setting", "metric"), registry=r)
        self.run_metric = Gauge("editwatch_run_metric", "A probe-round metric's value over the whole run, reduced "
                                "by its aggregation (monitor.metrics).", (*LABELS, "metric"), registry=r)
        self.collapse = Gauge("editwatch_collapse_alarm", "1 when the latest probe round raised the collapse alarm.",
                              LABELS, registry=r)
        self.labels: dict[str, str] = {}
        self._seen_quarantined = 0
        self._last_push = 0.0
        self._push_failing = False
        self._server = None
        if port is not None:
            # Started now, before any model loads, so a busy port fails the run at once.
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, self._server.server_port)

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) metrics are served on; None when not serving."""
        return self._server.server_address[:2] if self._server is not None else None

    def on_start(self, run: str, params: dict[str, Any], folder: Path, step: int) -> None:
        """Label every series with the run; create the counters at 0 so dashboards see them at once."""
        self.labels = {"run": run, "method": str(params.get("method")), "model": str(params.get("model"))}
        for counter in (self.applied, self.failed, self.quarantined, self.rounds):
            counter.labels(**self.labels)
        self.collapse.labels(**self.labels).set(0)
        self._push(force=True)

    def on_edit(self, applied: bool, seconds: float, step: int) -> None:
        """Count the edit and its duration."""
        (self.applied if applied else self.failed).labels(**self.labels).inc()
        self.edit_seconds.labels(**self.labels).observe(seconds)
        self._push()

    def on_quarantine(self, total: int) -> None:
        """Count newly quarantined lines."""
        self.quarantined.labels(**self.labels).inc(max(total - self._seen_quarantined, 0))
        self._seen_quarantined = total

    def on_round(
        self, step: int, values: dict[str, float], seconds: float, results: dict[str, dict[str, float]]
    ) -> None:
        """Publish the round's values, the running means per setting and the collapse alarm."""
        self.rounds.labels(**self.labels).inc()
        self.probe_seconds.labels(**self.labels).observe(seconds)
        for key, value in values.items():
            self.probe_metric.labels(**self.labels, metric=key).set(value)
        self._results(results)
        if "collapse_alarm" in values:
            self.collapse.labels(**self.labels).set(values["collapse_alarm"])
        self._push(force=True)

    def on_finish(self, summary: dict[str, Any], folder: Path) -> None:
        """Publish the final means (single mode has no probe rounds) and push the end state."""
        self._results(summary.get("results", {}))
        for key, value in summary.get("health", {}).items():
            self.run_metric.labels(**self.labels, metric=key).set(value)
        self._push(force=True)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _results(self, results: dict[str, dict[str, float]]) -> None:
        for setting, means in results.items():
            for key, value in means.items():
                if key in METRICS and value is not None:
                    self.edit_metric.labels(**self.labels, setting=setting, metric=key).set(value)

    def _push(self, force: bool = False) -> None:
        """Push to the Pushgateway (grouped by job and run); a failure warns once and the run goes on."""
        if self.pushgateway is None or not self.labels:
            return
        if not force and time.monotonic() - self._last_push < PUSH_EVERY_SECONDS:
            return
        self._last_push = time.monotonic()
        try:
            push_to_gateway(self.pushgateway, job=self.job, registry=self.registry,
                            grouping_key={"run": self.labels["run"]}, timeout=PUSH_TIMEOUT_SECONDS)
        except (URLError, OSError) as error:
            if not self._push_failing:
                log.warning("Pushgateway %s unreachable (%s): metrics are pushed again when it answers",
                            self.pushgateway, error)
            self._push_failing = True
            return
        if self._push_failing:
            log.warning("Pushgateway %s reachable again", self.pushgateway)
        self._push_failing = False
