"""A real Prometheus scraping real `simulate` runs: every dashboard panel and rule expression returns data."""

import json
import re
import signal
import subprocess
import time
import urllib.parse

import pytest
import yaml

from tests.dashboards.dashboards import RULES, panel_queries, rule_queries
from tests.services import SIMULATE, Service, free_port, get_json, one_thread_env, require_binary, wait_until

EDITS = 20  # per run; a probe round every 4 edits
QUIET_ALERTS = ("EditwatchRunStalled", "EditwatchRunVanished", "EditwatchRunFailed")  # fire only on sick runs
SELECTOR = re.compile(r"editwatch_[a-z_]+(?:\{[^}]*\})?")
RUNS = {"ft": "ft-llm", "mem": "ike"}  # weight edits (forgetting, collapse) and a memory (retrieval health)


def query(base, expr):
    """Instant query result (a list of samples); an invalid expression fails the test."""
    answer = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def rounds(folder):
    path = folder / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_every_panel_and_rule_expression_returns_data(small_world, small_model, tmp_path):
    prometheus = require_binary("prometheus")
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join((small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:EDITS]))
    ports = {name: free_port() for name in RUNS}
    env = one_thread_env()
    runs = {
        name: subprocess.Popen(
            [SIMULATE, "--stream", str(stream), "--images", str(small_world / "images"), "--model", str(small_model),
             "--method", method, "--gap", "1", "3", "--probe-every", "4", "--retention-sample", "5",
             "--reference-size", "4", "--follow", "--no-mlflow", "--prometheus-port", str(ports[name]),
             "--run-name", name, "--out", str(tmp_path / name)],
            env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{name}.log").open("w"))
        for name, method in RUNS.items()
    }
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES / "*.yml")],
              "scrape_configs": [{"job_name": "editwatch",
                                  "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports.values()]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = Service([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                     tmp_path / "prometheus.log", f"http://127.0.0.1:{port}/-/ready")
    base = f"http://127.0.0.1:{port}"
    try:
        server.start()
        for name, process in runs.items():
            wait_until(lambda: len(rounds(tmp_path / name)) == EDITS // 4, 300, f"{name}'s probe rounds", process)
        expressions = panel_queries() + rule_queries()
        deadline = time.monotonic() + 60

        def answers(where, expr):
            # Lifecycle alerts stay quiet for healthy runs: then each series they read must exist.
            if query(base, expr):
                return True
            return any(where.endswith(alert) for alert in QUIET_ALERTS) and all(
                query(base, selector) for selector in SELECTOR.findall(expr))

        while missing := [where for where, expr in expressions if not answers(where, expr)]:
            assert time.monotonic() < deadline, f"no data from {len(missing)} expressions: {missing}"
            time.sleep(1)

        # The numbers are the runs' own: counters, running means per gap, probe values.
        last = {name: rounds(tmp_path / name)[-1] for name in RUNS}

        def value(expr):
            (sample,) = query(base, expr)
            return float(sample["value"][1])

        wait_until(lambda: all(value(f'editwatch_probe_rounds_total{{run="{name}"}}') == EDITS // 4 for name in RUNS),
                   30, "Prometheus to scrape the last round")
        assert value('editwatch_edits_applied_total{run="ft"}') == EDITS
        assert value('editwatch_edit_ratio{run="ft", setting="gap_3", metric="reliability"}') == pytest.approx(
            last["ft"]["results"]["gap_3"]["reliability"])
        assert value('editwatch_probe_norm{run="ft", metric="weight_change_norm"}') == pytest.approx(
            last["ft"]["weight_change_norm"]) and last["ft"]["weight_change_norm"] > 0
        assert value('editwatch_probe_ratio{run="mem", metric="retrieval_false_hit_rate"}') == pytest.approx(
            last["mem"]["retrieval_false_hit_rate"])
        assert value('editwatch_probe_number{run="mem", metric="memory_size"}') == EDITS
        assert value('editwatch_edit_duration_seconds_count{run="mem"}') == EDITS
    finally:
        for process in runs.values():
            process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(120) for name, process in runs.items()}
        server.stop()
    assert codes == {name: 0 for name in RUNS}, codes
    for name in RUNS:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["edits_applied"] == EDITS and summary["stopped"] == "interrupted"
