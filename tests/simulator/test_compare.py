"""`simulate compare` over runs logged to a real `mlflow server`, one of them through a server outage."""

import csv
import json
import os
import signal
import subprocess

import pytest

from simulator.compare import RunView, find_runs, histories, latest_per_step, table, write_table
from tests.services import SIMULATE, mlflow_service, url_of, wait_until

METRICS = ["reliability", "t_gen", "t_loc", "retention", "ref_ppl_ratio", "memory_size"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_table_averages_seeds_per_model_setting_and_method():
    runs = [
        RunView("1", "a", "ft-llm", "tiny", {"gap_10/reliability": 0.5, "gap_10/edits_measured": 30, "gap_1/t_loc": 1.0,
                                             "retention": 0.25, "run/retention": 0.5, "run/ref_ppl_ratio": 3.0}),
        RunView("2", "b", "ft-llm", "tiny", {"gap_10/reliability": 0.75, "gap_10/edits_measured": 30,
                                             "run/retention": 0.25, "run/ref_ppl_ratio": 5.0}),
        RunView("3", "c", "ike", "tiny", {"gap_10/reliability": 1.0, "gap_10/t_gen": 0.5, "run/retention": 1.0,
                                          "run/ref_ppl_ratio": 1.0, "run/memory_size": 40.0}),
        RunView("4", "d", "none", "big", {"single/reliability": 0.125, "single/t_loc": 1.0}),
    ]
    columns, table_rows = table(runs, METRICS)
    assert columns == ["model", "setting", "method", "runs", "edits", "reliability", "t_gen", "t_loc", "retention",
                       "ref_ppl_ratio", "memory_size"]
    assert [(r["model"], r["setting"], r["method"], r["runs"]) for r in table_rows] == [
        ("big", "single", "none", 1), ("tiny", "gap_1", "ft-llm", 1), ("tiny", "gap_10", "ft-llm", 2),
        ("tiny", "gap_10", "ike", 1)]
    ft = table_rows[2]
    assert ft["reliability"] == 0.625 and ft["edits"] == 30 and ft["t_gen"] is None
    # Probe-round metrics: each run's run value (not its latest round), averaged over seeds, in every setting row.
    assert ft["retention"] == 0.375 and ft["ref_ppl_ratio"] == 4.0 and table_rows[1]["retention"] == 0.5


def test_the_markdown_marks_the_best_method_by_each_metrics_direction(tmp_path):
    runs = [RunView("1", "a", "ft-llm", "tiny", {"gap_10/reliability": 0.5, "run/ref_ppl_ratio": 3.0,
                                                 "run/memory_size": 10.0}),
            RunView("2", "b", "ike", "tiny", {"gap_10/reliability": 1.0, "run/ref_ppl_ratio": 1.5,
                                              "run/memory_size": 40.0})]
    columns, table_rows = table(runs, METRICS)
    _, _, markdown = write_table(columns, table_rows, tmp_path)
    ft, ike = markdown.splitlines()[2:]
    # Higher reliability wins, lower perplexity ratio wins; a size has no direction and is never bold.
    assert "| 0.500 |" in ft and "| **1.000** |" in ike
    assert "| **1.500** |" in ike and "| 3.000 |" in ft
    assert "**10" not in ft and "**40" not in ike


def test_one_value_per_step_the_latest_logged():
    from mlflow.entities import Metric

    logged = [Metric("retention", 1.0, 100, 4), Metric("retention", 0.75, 200, 8), Metric("retention", 0.5, 300, 12),
              Metric("retention", 0.7, 400, 8),  # the round at step 8 again, after a resume
              Metric("retention", 0.4, 500, 12), Metric("retention", 0.45, 500, 12)]  # a tie: MLflow keeps the larger
    assert latest_per_step(reversed(logged)) == [(4, 1.0), (8, 0.7), (12, 0.45)]


def test_a_resumed_run_logs_the_rounds_after_its_checkpoint_again_and_compare_keeps_the_replay(tmp_path):
    from mlflow import MlflowClient

    from monitor.exporters import MlflowSink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rounds = {4: 1.0, 8: 0.75}
    sink = MlflowSink(uri, "resumed")
    sink.on_start("run-a", {"method": "ft-llm", "model": "tiny"}, tmp_path, 0)
    for step, value in rounds.items():
        sink.on_round(step, {"retention": value}, 0.01, {"gap_1": {"reliability": value}})
    sink.close()  # killed after the round at 8 edits; the last checkpoint was at 4
    sink = MlflowSink(uri, "resumed")
    sink.on_start("run-a", {"method": "ft-llm", "model": "tiny"}, tmp_path, 4)
    for step, value in {8: 0.7, 12: 0.5}.items():
        sink.on_round(step, {"retention": value}, 0.01, {"gap_1": {"reliability": value}})
    sink.close()

    client = MlflowClient(uri)
    runs = find_runs(client, "resumed", None)
    assert len(runs) == 1
    raw = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].run_id, "retention"))
    assert raw == [(4, 1.0), (8, 0.7), (8, 0.75), (12, 0.5)]  # MLflow keeps both values at step 8
    lines = histories(client, runs, METRICS)
    assert lines["retention"] == {"run-a (ft-llm)": [(4, 1.0), (8, 0.7), (12, 0.5)]}
    assert lines["gap_1/reliability"] == {"run-a (ft-llm)": [(4, 1.0), (8, 0.7), (12, 0.5)]}


@pytest.mark.slow
def test_two_methods_compared_and_a_server_outage_mid_run_loses_nothing(small_world, small_model, tmp_path):
    server = mlflow_service(tmp_path / "mlflow")
    uri = url_of(server)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = (small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:20]
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(lines[:8]))

    def args(method, out, *extra):
        return [SIMULATE, "--stream", str(stream), "--images", str(small_world / "images"), "--model",
                str(small_model), "--method", method, "--gap", "1", "--probe-every", "4", "--retention-sample", "4",
                "--reference-size", "4", "--mlflow-uri", uri, "--mlflow-experiment", "cmp", "--out", str(out), *extra]

    try:
        server.start()
        subprocess.run(args("none", tmp_path / "none"), env=env, check=True, capture_output=True, timeout=300)
        # ft-llm follows the stream while the server is killed, the stream grows, the run ends,
        # and only then the server comes back: the run waits for it at its end and sends everything.
        ft = tmp_path / "ft"
        process = subprocess.Popen(args("ft-llm", ft, "--follow", "--mlflow-flush-seconds", "300"), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: len(rows(ft / "rounds.jsonl")) == 2, 300, "two rounds of ft-llm", process)
        server.kill()
        with stream.open("a") as more:
            more.writelines(lines[8:])
        wait_until(lambda: len(rows(ft / "rounds.jsonl")) == 5, 300, "ft-llm to go on without MLflow", process)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: (ft / "summary.json").exists(), 120, "ft-llm's summary", process)
        server.start()
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert "MLflow tracking unreachable" in stderr and "reachable again" in stderr

        out = tmp_path / "cmp"
        result = subprocess.run([SIMULATE, "compare", "--experiment", "cmp", "--mlflow-uri", uri, "--out", str(out)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        runs = {r.data.params["method"]: r for r in client.search_runs(
            [client.get_experiment_by_name("cmp").experiment_id])}
        run_id = runs["ft-llm"].info.run_id
        history = client.get_metric_history(run_id, "retention")
        artifacts = {a.path for a in client.list_artifacts(run_id)}
    finally:
        server.stop()

    with (out / "table.csv").open() as handle:
        table_rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(table_rows) == {"none", "ft-llm"}
    for method, folder in (("none", tmp_path / "none"), ("ft-llm", ft)):
        summary = json.loads((folder / "summary.json").read_text())
        row = table_rows[method]
        assert row["setting"] == "gap_1" and float(row["edits"]) == summary["results"]["gap_1"]["edits_measured"]
        for key in ("reliability", "t_gen", "i_gen", "t_loc", "i_loc"):
            assert float(row[key]) == pytest.approx(summary["results"]["gap_1"][key]), (method, key)
    assert "| model | setting | method | runs | edits | reliability |" in result.stdout
    assert (out / "table.md").read_text() in result.stdout
    for plot in ("retention.png", "ref_ppl_ratio.png", "gap_1/reliability.png", "gap_1/t_loc.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    # Nothing lost: every round of the outage run is in MLflow at its step, and so are its files.
    ft_rounds = rows(ft / "rounds.jsonl")
    assert sorted((m.step, m.value) for m in history) == [(r["edits_applied"], r["retention"]) for r in ft_rounds]
    assert runs["ft-llm"].info.status == "KILLED"  # stopped by SIGTERM: a --follow run's normal end
    assert artifacts >= {"summary.json", "rounds.jsonl", "plots"}
