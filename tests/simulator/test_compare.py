"""`simulate compare`: one row per experiment, mean ± sd over seeds, unfinished runs left out; over runs logged
to MLflow, one of them through an outage of a real `mlflow server`."""

import csv
import json
import logging
import math
import signal
import subprocess

import pytest

from simulator import compare
from monitor.sink import short_model_name
from simulator.command import CommandError
from simulator.compare import RunView, find_runs, histories, latest_per_step, table, write_table
from tests import zygote
from tests.services import SIMULATE, free_port, mlflow_service, one_thread_env, url_of, wait_until

METRICS = ["reliability", "t_gen", "t_loc", "retention", "ref_ppl_ratio", "memory_size"]
MODEL = "/home/me/models/tiny-llava"
A, B = "a" * 16, "b" * 16  # data hashes of two streams


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def view(name, metrics, method="ft-llm", data=A, seed=0, status="FINISHED", tags=None, **params):
    """A run as compare reads it from MLflow."""
    params = {"method": method, "model": MODEL, "data_hash": data, "stream": f"/data/{data[0]}/eval.jsonl",
              "seed": str(seed), "out": f"runs/{name}", **params}
    return RunView(name, name, method, MODEL, metrics, params, tags or {}, status)


def test_runs_of_other_streams_or_limits_are_rows_of_their_own_and_seeds_are_mean_and_sd():
    runs = [view(f"a{seed}", {"gap_10/reliability": value, "gap_10/edits_measured": 30, "run/retention": retention},
                 seed=seed) for seed, (value, retention) in enumerate([(0.25, 0.5), (0.5, 0.25), (0.75, 0.75)])]
    runs += [view("b", {"gap_10/reliability": 1.0, "gap_10/edits_measured": 20}, data=B),
             view("a-limit", {"gap_10/reliability": 0.0, "gap_10/edits_measured": 5}, limit="10")]
    columns, found = table(runs, METRICS)
    assert columns == ["model", "stream", "data_hash", "limit", "setting", "method", "status", "n", "edits",
                       "reliability", "reliability_sd", "retention", "retention_sd", "collapsed", "collapse_at",
                       "collapse_at_sd"]
    assert [(r["model"], r["data_hash"], r["limit"], r["setting"], r["n"], r["status"]) for r in found] == [
        ("tiny-llava", A, None, "gap_10", 3, "3 finished"), ("tiny-llava", A, 10, "gap_10", 1, "1 finished"),
        ("tiny-llava", B, None, "gap_10", 1, "1 finished")]
    seeds = found[0]
    # 0.25, 0.5, 0.75: mean 0.5, sample sd sqrt(((-0.25)^2 + 0 + 0.25^2) / 2) = 0.25; retention likewise
    assert (seeds["reliability"], seeds["reliability_sd"], seeds["retention"], seeds["retention_sd"]) == (
        0.5, 0.25, 0.5, 0.25)
    assert seeds["edits"] == 30 and seeds["stream"] == "eval.jsonl"
    assert (found[1]["reliability"], found[1]["reliability_sd"], found[2]["reliability"]) == (0.0, None, 1.0)


def test_settings_besides_the_seed_split_rows_and_say_how():
    runs = [view(f"lr{lr}-s{seed}", {"single/reliability": value}, seed=seed, **{"method_config.lr": lr})
            for lr, seed, value in [("0.1", 0, 0.5), ("0.1", 1, 1.0), ("0.01", 0, 0.0)]]
    runs += [view(f"ike-s{seed}", {"single/reliability": 1.0}, "ike", seed=seed, **{"method_config.k": "4"})
             for seed in (0, 1)]
    columns, found = table(runs, METRICS)
    assert columns[columns.index("method") + 1] == "settings"  # after the key columns; `out` and `seed` differ too
    assert [(r["method"], r["settings"], r["n"], r["reliability"]) for r in found] == [
        ("ft-llm", "method_config.lr=0.01", 1, 0.0), ("ft-llm", "method_config.lr=0.1", 2, 0.75), ("ike", "–", 2, 1.0)]
    assert found[1]["reliability_sd"] == math.sqrt(0.125)
    # Methods have hyperparameters of their own: that alone is no difference to show.
    assert "settings" not in table([run for run in runs if run.params.get("method_config.lr") != "0.01"], METRICS)[0]


def test_the_first_collapse_is_a_column_over_the_runs_that_collapsed(tmp_path):
    collapsed = [view(f"c{at}", {"gap_1/reliability": 1.0}, seed=at,
                      tags={"editwatch.collapse": "True", "editwatch.collapse_first_at": str(at)}) for at in (40, 60)]
    healthy = view("h", {"gap_1/reliability": 1.0}, seed=1, tags={"editwatch.collapse": "False"})
    columns, found = table([*collapsed, healthy], METRICS)
    assert (found[0]["collapsed"], found[0]["collapse_at"], found[0]["collapse_at_sd"]) == (2, 50.0, math.sqrt(200))
    _, _, markdown = write_table(columns, found, tmp_path)
    assert markdown.splitlines()[2].endswith("| 1.000 ± 0.000 | 2/3 | 50 ± 14.1 |")


def test_the_markdown_shows_mean_and_sd_and_bolds_the_best_mean_by_each_metrics_direction(tmp_path):
    runs = [view("a0", {"gap_10/reliability": 0.5, "run/ref_ppl_ratio": 3.0, "run/memory_size": 10.0}),
            view("a1", {"gap_10/reliability": 0.75, "run/ref_ppl_ratio": 5.0, "run/memory_size": 10.0}, seed=1),
            view("b", {"gap_10/reliability": 1.0, "run/ref_ppl_ratio": 1.5, "run/memory_size": 40.0}, "ike"),
            view("other-stream", {"gap_10/reliability": 0.0, "run/ref_ppl_ratio": 9.0}, "none", data=B)]
    columns, found = table(runs, METRICS)
    csv_path, _, markdown = write_table(columns, found, tmp_path)
    header, _, ft, ike, other = markdown.splitlines()
    assert header == ("| model | stream | data_hash | limit | setting | method | status | n | edits | reliability | "
                      "ref_ppl_ratio | memory_size | collapsed | collapse_at |")
    assert ft == ("| tiny-llava | eval.jsonl | aaaaaaaa | – | gap_10 | ft-llm | 2 finished | 2 | – | 0.625 ± 0.177 | "
                  "4.000 ± 1.414 | 10 ± 0 | 0/2 | – |")
    # Higher reliability wins, lower perplexity ratio wins; a size has no direction and is never bold;
    # the other stream's run is not in the same comparison (nothing to beat: not bold either).
    assert "| **1.000** |" in ike and "| **1.500** |" in ike and "**40" not in ike
    assert "**" not in other and "**" not in ft
    with csv_path.open() as handle:
        first = next(csv.DictReader(handle))
    assert (first["reliability"], first["reliability_sd"], first["data_hash"]) == ("0.625", str(math.sqrt(0.03125)), A)


def test_a_diverged_seed_makes_its_mean_nan_and_never_wins_the_bold(tmp_path):
    # A diverged run logs run/ref_ppl_ratio as NaN (or inf): statistics.stdev raised on it, and max/min with NaN
    # picked a winner by the order of the rows.
    runs = [view("a0", {"gap_10/reliability": 0.5, "run/ref_ppl_ratio": math.nan}),
            view("a1", {"gap_10/reliability": 0.75, "run/ref_ppl_ratio": 2.0}, seed=1),
            view("b", {"gap_10/reliability": 1.0, "run/ref_ppl_ratio": 1.5}, "ike"),
            view("c0", {"gap_10/reliability": 0.5, "run/ref_ppl_ratio": math.inf}, "none"),
            view("c1", {"gap_10/reliability": 0.5, "run/ref_ppl_ratio": 3.0}, "none", seed=1)]
    columns, found = table(runs, METRICS)
    ft, ike, none = found
    assert math.isnan(ft["ref_ppl_ratio"]) and math.isnan(ft["ref_ppl_ratio_sd"]) and ft["reliability"] == 0.625
    assert none["ref_ppl_ratio"] == math.inf and math.isnan(none["ref_ppl_ratio_sd"])
    for order in (runs, runs[::-1]):
        columns, found = table(order, METRICS)
        _, _, markdown = write_table(columns, found, tmp_path)
        bold = [line for line in markdown.splitlines() if "**1.500**" in line]
        assert len(bold) == 1 and "| ike |" in bold[0], markdown


def test_two_runs_of_one_name_are_two_lines_of_a_plot():
    from mlflow.entities import Metric

    class Client:
        def get_metric_history(self, run_id, key):
            return [Metric(key, 1.0 if run_id == "1" * 32 else 0.5, 0, 10)]

    twins = [RunView(run_id, "method=ft-llm,seed=0", "ft-llm", MODEL, {"retention": 1.0}, {}, {})
             for run_id in ("1" * 32, "2" * 32)]
    lines = histories(Client(), twins, METRICS)["retention"]
    assert lines == {"method=ft-llm,seed=0 (ft-llm) [11111111]": [(10, 1.0)],
                     "method=ft-llm,seed=0 (ft-llm) [22222222]": [(10, 0.5)]}


def test_an_unknown_run_id_or_an_unreadable_uri_is_a_one_line_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = compare.parser().parse_args(["--mlflow-uri", uri, "--runs", "0123456789abcdef", "--out", str(tmp_path)])
    with pytest.raises(CommandError, match=f"cannot read the runs from {uri}: Run with id=0123456789abcdef not"):
        compare.main(args)


@pytest.mark.parametrize("model, short", [("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"), ("default", "default"),
                                          ("/home/me/models/tiny-llava/", "tiny-llava"), ("C:\\models\\blip2", "blip2")])
def test_short_model_names(model, short):
    assert short_model_name(model) == short


def test_models_that_share_a_short_name_keep_their_full_names():
    runs = [RunView(m, m, "ft-llm", m, {"single/reliability": 1.0}, {"model": m}) for m in ("/a/m", "/b/m", "/c/n")]
    assert [row["model"] for row in table(runs, METRICS)[1]] == ["/a/m", "/b/m", "n"]


@pytest.mark.parametrize("status, tags, params, state", [
    ("FINISHED", {"editwatch.stopped": "end of stream"}, {}, "FINISHED"),
    ("FINISHED", {"editwatch.stopped": "limit"}, {}, "FINISHED"),
    ("KILLED", {"editwatch.stopped": "interrupted"}, {}, "KILLED"),
    ("FINISHED", {"editwatch.stopped": "interrupted"}, {}, "INTERRUPTED"),  # MLflow says done, the run did not end
    ("FINISHED", {"editwatch.stopped": "interrupted"}, {"follow": "true"}, "FINISHED"),  # how a --follow run ends
    ("RUNNING", {}, {}, "RUNNING"),
])
def test_how_a_run_ended(status, tags, params, state):
    run = RunView("1", "r", "ft-llm", "m", {}, params, tags, status)
    assert (run.state, run.finished) == (state, state == "FINISHED")


def log_run(uri, folder, stream, data_hash, seed, reliability, stopped="end of stream"):
    """A run logged to MLflow by the exporter, as `simulate` leaves it in `folder`."""
    from monitor.exporters import MlflowSink

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"stream": stream, "method": "ft-llm", "seed": seed, "gap": [1],
                                                    "follow": False}))
    summary = {"stopped": stopped, "edits_applied": 8, "results": {"gap_1": {"reliability": reliability,
                                                                             "edits_measured": 7}},
               "health": {"retention": reliability}, "alarms": {"collapse": {"raised": False}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    sink = MlflowSink(uri, "streams")
    sink.on_start(folder.name, {"method": "ft-llm", "model": MODEL, "stream": stream, "data_hash": data_hash,
                                "seed": seed}, folder, 0)
    sink.on_round(8, {"retention": reliability}, 0.01, {"gap_1": {"reliability": reliability}})
    sink.on_finish(summary, folder)
    sink.close()


def test_two_streams_are_two_rows_and_a_killed_run_is_left_out_unless_asked_for(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_run(uri, tmp_path / "a0", "w1/eval.jsonl", A, 0, 0.5)
    log_run(uri, tmp_path / "a1", "w1/eval.jsonl", A, 1, 1.0)
    log_run(uri, tmp_path / "a2-killed", "w1/eval.jsonl", A, 2, 0.0, stopped="interrupted")
    log_run(uri, tmp_path / "b0", "w2/eval.jsonl", B, 0, 0.25)

    def compared(*flags):
        out = tmp_path / f"out{len(flags)}"
        args = compare.parser().parse_args(["--mlflow-experiment", "streams", "--mlflow-uri", uri, "--out", str(out), *flags])
        assert compare.main(args) == 0
        with (out / "table.csv").open() as handle:
            return list(csv.DictReader(handle))

    with caplog.at_level(logging.WARNING, logger="simulator.compare"):
        found = compared()
    assert "1 unfinished runs left out (--include-unfinished compares them): a2-killed (killed)" in caplog.text
    assert [(r["data_hash"], r["status"], r["n"], r["reliability"], r["retention"]) for r in found] == [
        (A, "2 finished", "2", "0.75", "0.75"), (B, "1 finished", "1", "0.25", "0.25")]
    assert found[0]["reliability_sd"] == str(math.sqrt(0.125)) and found[1]["reliability_sd"] == ""
    found = compared("--include-unfinished")
    assert [(r["data_hash"], r["status"], r["n"], r["reliability"]) for r in found] == [
        (A, "2 finished, 1 killed", "3", "0.5"), (B, "1 finished", "1", "0.25")]


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
def test_sync_sends_what_a_run_left_and_reports_the_writes_the_server_rejected_without_resending_them(tmp_path,
                                                                                                     caplog):
    from mlflow import MlflowClient

    from monitor.exporters import MlflowSink

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"stream": "w1/eval.jsonl", "method": "ft-llm", "gap": [1]}))
    summary = {"stopped": "end of stream", "edits_applied": 8, "results": {"gap_1": {"reliability": 0.5}},
               "alarms": {"collapse": {"raised": False}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "synced", flush_seconds=0.5)  # nothing listens there
    sink.on_start("run-a", {"method": "ft-llm", "model": MODEL, "seed": 0}, folder, 0)
    sink.on_round(4, {"retention": 1.0, "bad!key": 0.5}, 0.01, {"gap_1": {"reliability": 1.0}})
    sink.journal.append({"op": "params", "params": {"seed": "1"}})  # MLflow refuses to change a param
    sink.on_round(8, {"retention": 0.5}, 0.01, {"gap_1": {"reliability": 0.5}})
    sink.on_finish(summary, folder)
    sink.close()
    letters = folder / "mlflow" / "dead_letter.jsonl"
    reported = (f"{folder}: 2 MLflow writes were rejected by the tracking server and are not sent again; they are in "
                f"{letters} with the server's answers")
    server = mlflow_service(tmp_path / "mlflow")
    try:
        server.start()
        uri = url_of(server)

        def compared():
            caplog.clear()
            args = compare.parser().parse_args(["--sync", str(folder), "--mlflow-uri", uri, "--mlflow-experiment",
                                                "synced", "--out", str(tmp_path / "out")])
            with caplog.at_level(logging.INFO, logger="simulator.compare"):
                assert compare.main(args) == 0
            return caplog.text

        first = compared()
        assert f"{folder}: 9 MLflow operations sent" in first and reported in first
        written = letters.read_text()
        second = compared()  # the rejected writes are reported again, never re-sent
        assert f"{folder}: 0 MLflow operations sent" in second and reported in second
        assert letters.read_text() == written
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("synced").experiment_id])
        retention = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "retention"))
    finally:
        server.stop()
    assert [(d["op"], d["status"]) for d in rows(letters)] == [("metrics", 400), ("params", 400)]
    assert "Changing param values is not allowed" in rows(letters)[1]["message"]
    assert retention == [(4, 1.0), (8, 0.5)] and "bad!key" not in run.data.metrics
    assert run.data.params["seed"] == "0" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_two_methods_compared_and_a_server_outage_mid_run_loses_nothing(small_world, small_model, tmp_path):
    server = mlflow_service(tmp_path / "mlflow")
    uri = url_of(server)
    env = one_thread_env()
    lines = (small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:20]
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(lines[:8]))

    def args(method, out, *extra):
        return [SIMULATE, "--stream", str(stream), "--images", str(small_world / "images"), "--model",
                str(small_model), "--method", method, "--gap", "1", "--probe-every", "4", "--retention-sample", "4",
                "--reference-size", "4", "--mlflow-uri", uri, "--mlflow-experiment", "cmp", "--out", str(out), *extra]

    try:
        server.start()
        zygote.run(args("none", tmp_path / "none"), env=env, check=True, capture_output=True, timeout=300)
        # ft-llm follows the stream while the server is killed, the stream grows, the run ends,
        # and only then the server comes back: the run waits for it at its end and sends everything.
        ft = tmp_path / "ft"
        process = zygote.Forked(args("ft-llm", ft, "--follow", "--mlflow-flush-seconds", "300"), env=env,
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
        result = zygote.run([SIMULATE, "compare", "--mlflow-experiment", "cmp", "--mlflow-uri", uri, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        runs = {r.data.params["method"]: r for r in client.search_runs(
            [client.get_experiment_by_name("cmp").experiment_id])}
        run_id = runs["ft-llm"].info.run_id
        history = client.get_metric_history(run_id, "retention")
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        kind = client.get_experiment_by_name("cmp").tags.get("mlflow.experimentKind")
        base = {key: [(m.step, m.value) for m in client.get_metric_history(runs["none"].info.run_id, key)]
                for key in runs["none"].data.metrics if key.startswith("base/")}
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
    assert (table_rows["ft-llm"]["model"], table_rows["ft-llm"]["status"]) == (small_model.name, "1 finished")
    assert table_rows["none"]["data_hash"] and not table_rows["ft-llm"]["data_hash"]  # a --follow stream has none
    assert "| model | stream | data_hash | limit | setting | method | status | n | edits | reliability |" in result.stdout
    assert (out / "table.md").read_text() in result.stdout
    for plot in ("retention.png", "ref_ppl_ratio.png", "gap_1/reliability.png", "gap_1/t_loc.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    # Nothing lost: every round of the outage run is in MLflow at its step, and so are its files.
    ft_rounds = rows(ft / "rounds.jsonl")
    assert sorted((m.step, m.value) for m in history) == [(r["edits_applied"], r["retention"]) for r in ft_rounds]
    assert runs["ft-llm"].info.status == "FINISHED"  # stopped by SIGTERM: a --follow run's normal end
    assert runs["ft-llm"].data.tags["editwatch.stopped"] == "interrupted"
    assert artifacts >= {"summary.json", "rounds.jsonl", "plots"}

    # Every run's whole config is its params, nested settings flattened; what the run resolved wins.
    resolved = ("model", "method_config", "prompt_format", "vlkeb_compat")
    for method, folder in (("none", tmp_path / "none"), ("ft-llm", ft)):
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        params = runs[method].data.params
        for key, value in config.items():
            nested = value.items() if isinstance(value, dict) and key != "mlflow_tags" else []
            for name, item in [(f"{key}.{k}", v) for k, v in nested] or [(key, value)]:
                if item is not None and key not in (*resolved, "mlflow_tags"):
                    assert params[name] == (item if isinstance(item, str) else json.dumps(item)), (method, name)
        assert params["collapse.ppl_ratio"] == "2.0" and params["probe_every"] == "4" and "limit" not in params
        assert params["model"] == str(small_model) and params["prompt_format"] == summary["prompt_format"]
        assert {k: v for k, v in params.items() if k.startswith("method_config.")} == {
            f"method_config.{k}": v if isinstance(v, str) else json.dumps(v)
            for k, v in summary["method_config"].items() if v is not None}
    assert runs["ft-llm"].data.params["method_config.lr"]  # ft-llm's hyperparameters, defaults included
    # The stream (as the run read it) is the dataset input; a followed stream, still growing, is not one.
    (dataset_input,) = runs["none"].inputs.dataset_inputs
    none_summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("stream.jsonl", none_summary["data_hash"])
    assert json.loads(dataset_input.dataset.source) == {"uri": str(stream.resolve())}
    assert runs["ft-llm"].inputs.dataset_inputs == []
    assert kind == "custom_model_development"  # MLflow opens the experiment in its training view
    # The unedited model's accuracies at step 0, under the keys of the metrics that ask the same questions.
    names = {"pred_src": "reliability", "pred_rephrase": "t_gen", "pred_image_rephrase": "i_gen"}
    assert base == {f"base/{names.get(k, k)}": [(0, v)] for k, v in none_summary["base"].items()}
    assert {"base/reliability", "base/loc", "base/port_1hop"} <= set(base)
