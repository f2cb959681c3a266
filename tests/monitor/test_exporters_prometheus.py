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
    sink.on_round(2, ROUND, 0.07, RESULTS, {"ref_ppl_ratio": "reference perplexity ratio 1.5 > 1.2"})
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
    # Grouped by unit: a ratio, a growth factor and a norm never share one series name.
    for name, key in [("editwatch_probe_ratio", "retention"), ("editwatch_probe_factor", "ref_ppl_ratio"),
                      ("editwatch_probe_ratio", "collapse_alarm"), ("editwatch_probe_norm", "weight_change_norm")]:
        assert value(name, {**LABELS, "metric": key}) == ROUND[key]
    assert value("editwatch_probe_ratio", {**LABELS, "metric": "ref_ppl_ratio"}) is None
    assert value("editwatch_collapse_alarm", LABELS) == 1
    assert value("editwatch_collapse_check", {**LABELS, "metric": "ref_ppl_ratio"}) == 1  # the reason, as a label
    assert value("editwatch_run_ratio", {**LABELS, "metric": "retention"}) == 0.5
    # The lifecycle: it ended on purpose, after progressing.
    assert value("editwatch_run_running", LABELS) == 0 and value("editwatch_run_failed", LABELS) == 0
    assert value("editwatch_last_progress_timestamp_seconds", LABELS) > 1.7e9
    # Per-gap running means with the setting in its own label; the final summary overrides the round's.
    assert value("editwatch_edit_ratio", {**LABELS, "setting": "gap_1", "metric": "reliability"}) == 0.625
    assert value("editwatch_edit_ratio", {**LABELS, "setting": "gap_10", "metric": "reliability"}) == 0.25
    assert math.isnan(value("editwatch_edit_ratio", {**LABELS, "setting": "gap_10", "metric": "t_loc"}))
    assert value("editwatch_edit_ratio", {**LABELS, "setting": "gap_1", "metric": "edits_measured"}) is None
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
    assert 'editwatch_probe_ratio{method="ft-llm",metric="retention",model="tiny",run="r1"} 0.75' in body
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
    pushed = {**LABELS, "job": "editwatch", "instance": str(tmp_path.resolve())}  # its group: run and folder

    def sample(family, name, **labels):
        return next(s.value for s in families[family].samples if s.name == name and s.labels == {**pushed, **labels})

    assert sample("editwatch_edits_applied", "editwatch_edits_applied_total") == 2
    assert sample("editwatch_edit_ratio", "editwatch_edit_ratio", setting="gap_1", metric="reliability") == 0.625
    assert sample("editwatch_probe_factor", "editwatch_probe_factor", metric="ref_ppl_ratio") == 1.5
    assert sample("editwatch_run_running", "editwatch_run_running") == 0  # the group is marked ended
    assert sample("editwatch_edit_duration_seconds", "editwatch_edit_duration_seconds_count") == 3


def test_two_runs_of_one_name_keep_their_own_pushgateway_groups(pushgateway, tmp_path):  # noqa: F811
    # The same cell of two sweeps: one name, two folders. Grouped by the name alone, the second overwrote the first.
    for folder, edits in [(tmp_path / "sweep-a" / "cell", 2), (tmp_path / "sweep-b" / "cell", 5)]:
        sink = PrometheusSink(registry=CollectorRegistry(), pushgateway=pushgateway, job="editwatch")
        sink.on_start("cell", {"method": "serac", "model": "tiny"}, folder, 0)
        for _ in range(edits):
            sink.on_edit(True, 0.01, 1)
        sink.on_finish({"results": {}}, folder)
    pushed = {s.labels["instance"]: s.value for f in text_string_to_metric_families(get(f"{pushgateway}/metrics").decode())
              for s in f.samples if s.name == "editwatch_edits_applied_total" and s.labels.get("run") == "cell"}
    assert pushed == {str(tmp_path / "sweep-a" / "cell"): 2, str(tmp_path / "sweep-b" / "cell"): 5}


def test_an_unreachable_pushgateway_warns_once_and_the_run_goes_on(tmp_path, caplog):
    sink = PrometheusSink(registry=CollectorRegistry(), pushgateway=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.prometheus"):
        feed(sink, tmp_path)
    warnings = [r.message for r in caplog.records if "unreachable" in r.message]
    assert len(warnings) == 1 and "Pushgateway" in warnings[0]
    assert sink.registry.get_sample_value("editwatch_edits_applied_total", LABELS) == 2


def test_a_run_that_does_not_finish_is_marked_failed_and_a_round_clears_recovered_indicators(tmp_path):
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    sink.on_start("r1", {"method": "ft-llm", "model": "/abs/path/to/tiny"}, tmp_path, 0)
    labels = {**LABELS, "model": "tiny"}  # a local folder is labelled by its name, not its absolute path
    assert registry.get_sample_value("editwatch_run_running", labels) == 1
    sink.on_round(1, {"collapse_alarm": 1.0}, 0.1, {}, {"ref_ppl_ratio": "x", "nonfinite_parameters": "y"})
    sink.on_round(2, {"collapse_alarm": 1.0}, 0.1, {}, {"ref_agreement": "z"})
    checks = {m: registry.get_sample_value("editwatch_collapse_check", {**labels, "metric": m})
              for m in ("ref_ppl_ratio", "nonfinite_parameters", "ref_agreement")}
    assert checks == {"ref_ppl_ratio": 0, "nonfinite_parameters": 0, "ref_agreement": 1}
    sink.close()  # no on_finish: the run stopped on an error
    assert registry.get_sample_value("editwatch_run_running", labels) == 0
    assert registry.get_sample_value("editwatch_run_failed", labels) == 1


def test_a_scraped_run_serves_until_prometheus_has_seen_its_end(tmp_path):
    import threading
    import time

    sink = PrometheusSink(registry=CollectorRegistry(), port=free_port(), linger_seconds=10)
    url = f"http://127.0.0.1:{sink.address[1]}/metrics"
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny"}, tmp_path, 0)
    get(url)  # Prometheus scrapes the run while it runs
    sink.on_finish({}, tmp_path)
    seen = []
    scraper = threading.Timer(1.0, lambda: seen.append(get(url).decode()))
    scraper.start()
    start = time.monotonic()
    sink.close()
    waited = time.monotonic() - start
    scraper.join()
    # close() waited for that scrape (about 1 s, well under the 10 s bound), and it saw the end.
    assert 0.8 < waited < 9 and 'editwatch_run_running{method="ft-llm",model="tiny",run="r1"} 0.0' in seen[0]


def test_a_run_never_scraped_does_not_linger(tmp_path):
    import time

    sink = PrometheusSink(registry=CollectorRegistry(), port=free_port(), linger_seconds=10)
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny"}, tmp_path, 0)
    sink.on_finish({}, tmp_path)
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 1


def test_a_resumed_run_counts_from_zero_and_continues_its_totals(tmp_path):
    """A resumed process's counters start at 0 (a crash after the checkpoint exported more than it holds, and a
    counter that fell to the checkpoint's value would read as a reset: `rate()` would spike by the whole count);
    the run's totals go on in the `_in_run` gauges."""
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny"}, tmp_path, 40)
    sink.on_resume({"applied": 40, "failed": 2, "quarantined": 3, "rounds": 10})
    sink.on_edit(True, 0.01, 41)
    sink.on_edit(False, 0.01, 41)
    sink.on_retraction(False)
    sink.on_quarantine(4)  # the reader's running total: one more line
    value = registry.get_sample_value
    assert value("editwatch_edits_applied_total", LABELS) == 1
    assert value("editwatch_edits_failed_total", LABELS) == 2
    assert value("editwatch_edits_quarantined_total", LABELS) == 1
    assert value("editwatch_probe_rounds_total", LABELS) == 0
    assert value("editwatch_edits_applied_in_run", LABELS) == 41
    assert value("editwatch_edits_failed_in_run", LABELS) == 4
    assert value("editwatch_edits_quarantined_in_run", LABELS) == 4


def test_the_run_totals_start_where_a_probe_job_stands_and_end_as_its_summary_says(tmp_path):
    """A probe job starts at its run's edits applied, and every run's totals end as summary.json's counts."""
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    sink.on_start("r1", {"method": "ft-llm", "model": "tiny"}, tmp_path, 40)
    assert registry.get_sample_value("editwatch_edits_applied_in_run", LABELS) == 40
    sink.on_round(55, {"retention": 1.0}, 0.1, {})  # the run checkpointed since: this round probed 55 edits
    assert registry.get_sample_value("editwatch_edits_applied_in_run", LABELS) == 55
    sink.on_finish({"edits_applied": 60, "failed": 3, "quarantined": 2}, tmp_path)
    totals = {key: registry.get_sample_value(f"editwatch_edits_{key}_in_run", LABELS)
              for key in ("applied", "failed", "quarantined")}
    assert totals == {"applied": 60, "failed": 3, "quarantined": 2}
    assert registry.get_sample_value("editwatch_edits_quarantined_total", LABELS) == 2  # seen by this process


def test_a_scrape_notes_its_time_before_it_reads_the_run_state():
    """Else a scrape that read "running" while the run ended could look like a scrape after the end, and end the
    linger before Prometheus saw the end."""
    sink = PrometheusSink(CollectorRegistry())
    order = []
    clock, running = sink.clock.collect, sink.running.collect
    sink.clock.collect = lambda: order.append("clock") or clock()
    sink.running.collect = lambda: order.append("running") or running()
    list(sink.registry.collect())
    assert order == ["clock", "running"]
