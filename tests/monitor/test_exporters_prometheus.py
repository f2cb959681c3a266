"""Prometheus exporter: values per DESIGN.md names and labels, the live endpoint, promtool, Pushgateway."""

import logging
import math
import subprocess

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.exporters import PrometheusSink
from tests.services import free_port, get, pushgateway, require_binary  # noqa: F401  (fixture)

LABELS = {"run": "r1", "method": "ft-llm", "model": "tiny"}
ROUND = {"retention": 0.75, "ref_ppl_ratio": 1.5, "collapse_alarm": 1.0, "weight_change_norm": 3.25}
RESULTS = {"gap_1": {"reliability": 0.5, "t_loc": 0.875, "edits_measured": 7},
           "gap_10": {"reliability": 0.25, "t_loc": float("nan")}}


def feed(sink, tmp_path):
    """A short run: three edits (one failed), two quarantined lines, one probe round, the end."""
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny", "gaps": [1, 10]}, tmp_path, 0)
    for applied, seconds in [(True, 0.002), (False, 0.3), (True, 0.004)]:
        sink.on_edit(applied, seconds, 1)
    sink.on_quarantine(1)
    sink.on_quarantine(2)
    sink.on_round(2, ROUND, 0.07, RESULTS)
    sink.on_finish({"results": {"gap_1": {"reliability": 0.625, "edits_measured": 8}},
                    "health": {"retention": 0.5, "collapse_alarm": 1.0}}, tmp_path)


def test_values_names_and_labels(tmp_path):
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny"}, tmp_path, 0)
    # Counters exist at 0 before anything happens, so dashboards see the run at once.
    assert registry.get_sample_value("editwatch_edits_failed_total", LABELS) == 0
    feed(sink, tmp_path)
    value = registry.get_sample_value
    assert value("editwatch_edits_applied_total", LABELS) == 2
    assert value("editwatch_edits_failed_total", LABELS) == 1
    assert value("editwatch_edits_quarantined_total", LABELS) == 2
    assert value("editwatch_probe_rounds_total", LABELS) == 1
    assert value("editwatch_edit_duration_seconds_count", LABELS) == 3
    assert value("editwatch_edit_duration_seconds_sum", LABELS) == pytest.approx(0.306)
    assert value("editwatch_edit_duration_seconds_bucket", {**LABELS, "le": "0.005"}) == 2
    assert value("editwatch_probe_duration_seconds_sum", LABELS) == pytest.approx(0.07)
    for key, expected in ROUND.items():
        assert value("editwatch_probe_metric", {**LABELS, "metric": key}) == expected
    assert value("editwatch_collapse_alarm", LABELS) == 1
    assert value("editwatch_run_metric", {**LABELS, "metric": "retention"}) == 0.5
    # Per-gap running means with the setting in its own label; the final summary overrides the round's.
    assert value("editwatch_edit_metric", {**LABELS, "setting": "gap_1", "metric": "reliability"}) == 0.625
    assert value("editwatch_edit_metric", {**LABELS, "setting": "gap_10", "metric": "reliability"}) == 0.25
    assert math.isnan(value("editwatch_edit_metric", {**LABELS, "setting": "gap_10", "metric": "t_loc"}))
    assert value("editwatch_edit_metric", {**LABELS, "setting": "gap_1", "metric": "edits_measured"}) is None
    assert not any("/" in sample.labels.get("metric", "") for metric in registry.collect()
                   for sample in metric.samples)  # never two dimensions packed into one label
    names = {metric.name for metric in registry.collect()}
    assert all(name.startswith("editwatch_") for name in names)
    for metric in registry.collect():
        for sample in metric.samples:
            assert set(sample.labels) <= {"run", "method", "model", "setting", "metric", "le"}, sample


def test_live_endpoint_on_localhost_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    port = free_port()
    sink = PrometheusSink(registry=CollectorRegistry(), port=port)
    try:
        assert sink.address == ("127.0.0.1", port)
        feed(sink, tmp_path)
        body = get(f"http://127.0.0.1:{port}/metrics").decode()
    finally:
        sink.close()
    assert 'editwatch_probe_metric{method="ft-llm",metric="retention",model="tiny",run="r1"} 0.75' in body
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_a_busy_port_fails_at_once():
    first = PrometheusSink(registry=CollectorRegistry(), port=free_port())
    try:
        with pytest.raises(OSError):
            PrometheusSink(registry=CollectorRegistry(), port=first.address[1])
    finally:
        first.close()


def test_pushgateway_holds_the_pushed_run(pushgateway, tmp_path):  # noqa: F811
    sink = PrometheusSink(registry=CollectorRegistry(), pushgateway=pushgateway, job="editwatch")
    feed(sink, tmp_path)
    families = {f.name: f for f in text_string_to_metric_families(get(f"{pushgateway}/metrics").decode())}
    pushed = {**LABELS, "job": "editwatch", "instance": ""}

    def sample(family, name, **labels):
        return next(s.value for s in families[family].samples if s.name == name and s.labels == {**pushed, **labels})

    assert sample("editwatch_edits_applied", "editwatch_edits_applied_total") == 2
    assert sample("editwatch_edit_metric", "editwatch_edit_metric", setting="gap_1", metric="reliability") == 0.625
    assert sample("editwatch_probe_metric", "editwatch_probe_metric", metric="ref_ppl_ratio") == 1.5
    assert sample("editwatch_edit_duration_seconds", "editwatch_edit_duration_seconds_count") == 3


def test_an_unreachable_pushgateway_warns_once_and_the_run_goes_on(tmp_path, caplog):
    sink = PrometheusSink(registry=CollectorRegistry(), pushgateway=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.prometheus"):
        feed(sink, tmp_path)
    warnings = [r.message for r in caplog.records if "unreachable" in r.message]
    assert len(warnings) == 1 and "Pushgateway" in warnings[0]
    assert sink.registry.get_sample_value("editwatch_edits_applied_total", LABELS) == 2
