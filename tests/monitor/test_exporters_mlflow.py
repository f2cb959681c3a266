"""MLflow exporter: one run per simulation, journaled so an unreachable server loses nothing.

Most tests use a local sqlite store; tests/simulator/test_compare.py runs `simulate` against a
real `mlflow server` that is killed and restarted mid-run, and checks there what these check here
(the whole config as params, the stream as a dataset input, the experiment's kind, base metrics at
step 0, a --follow run stopped by SIGTERM ending FINISHED). The dead-letter tests provoke a real
`mlflow server`'s own 4xx answers.
"""

import json
import logging
import math
import sys
import threading
import time
from pathlib import Path

import pytest

from monitor.exporters import MlflowSink, sync
from monitor.exporters import tracking
from monitor.exporters.journal import DeadLetters, Journal
from tests.services import free_port, mlflow_service, url_of

PARAMS = {"method": "ft-llm", "model": "tiny", "mode": "sequential", "gaps": [1, 3], "seed": 7,
          "data_hash": "abc", "stream": "edits.jsonl", "prompt_format": "plain", "vlkeb_compat": False,
          "method_config": {"lr": 0.5, "steps": 10}}  # resolved by the run: these win over config.json's
CONFIG = {"stream": "edits.jsonl", "model": "default", "method": "ft-llm", "method_config": {"lr": 0.5},
          "gap": [1, 3], "seed": 7, "limit": None, "follow": False, "prompt_format": "auto", "probe_every": 4,
          "collapse": {"ppl_ratio": 2.0, "agreement": 0.5, "weight_change": None},
          "mlflow_uri": "http://me:secret@tracking.example:5000", "mlflow_tags": {"team": "vision"}}
ROUNDS = [  # (step, round values, per-setting running means)
    (4, {"retention": 1.0, "ref_ppl_ratio": 1.25}, {"gap_1": {"reliability": 0.5}}),
    (8, {"retention": 0.75, "ref_ppl_ratio": 1.5}, {"gap_1": {"reliability": 0.25}, "gap_3": {"reliability": 0.5}}),
    (12, {"retention": 0.5, "ref_ppl_ratio": 2.5}, {"gap_1": {"reliability": 0.125}, "gap_3": {"reliability": 0.25}}),
]
SUMMARY = {"edits_read": 13, "edits_applied": 12, "failed": 1, "quarantined": 0, "stopped": "end of stream",
           "results": {"gap_1": {"reliability": 0.125, "edits_measured": 11}},
           "base": {"pred_src": 0.75, "pred_rephrase": 0.5, "pred_image_rephrase": 0.25, "loc": 0.875, "m_loc": 0.625,
                    "port_2hop": 0.125},
           "alarms": {"collapse": {"raised": True, "first_at": 8}, "forgetting": {"detected": False}}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local MLflow tracking store (sqlite) and a client on it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def run_folder(tmp_path, rounds=ROUNDS, **config):
    """A run folder as `simulate` leaves it: config, summary and rounds files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **config}))
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    with (tmp_path / "rounds.jsonl").open("w") as out:
        for step, values, results in rounds:
            out.write(json.dumps({"edits_applied": step, **values, "results": results}) + "\n")
    return tmp_path


def play(sink, folder, start=0, rounds=ROUNDS, finish=True, summary=SUMMARY, params=PARAMS):
    """Feed the sink a run's events, as the timeline does."""
    sink.on_start("run-a", params, folder, start)
    for step, values, results in rounds:
        sink.on_round(step, values, 0.01, results)
    if finish:
        sink.on_finish(summary, folder)
    sink.close()


def only_run(client, experiment):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def history(client, run, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_a_run_with_params_metrics_per_step_tags_and_artifacts(store, tmp_path):
    uri, client = store
    play(MlflowSink(uri, "exp-local"), run_folder(tmp_path))
    run = only_run(client, "exp-local")
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["gaps"] == "[1, 3]" and run.data.params["data_hash"] == "abc"
    assert run.data.params["editwatch_version"] == "0.1.0"
    assert run.data.tags["editwatch.kind"] == "simulate" and run.data.tags["editwatch.collapse"] == "True"
    assert history(client, run, "retention") == [(4, 1.0), (8, 0.75), (12, 0.5)]
    assert history(client, run, "gap_3/reliability") == [(8, 0.5), (12, 0.25)]
    assert run.data.metrics["gap_1/edits_measured"] == 11 and run.data.metrics["failed"] == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.json", "summary.json", "rounds.jsonl", "plots"}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/retention.png", "plots/ref_ppl_ratio.png", "plots/reliability.png"}
    assert Journal(tmp_path / "mlflow").unsent() == 0


def test_an_unreachable_server_keeps_everything_for_sync(store, tmp_path, caplog):
    uri, client = store
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.tracking"):
        play(MlflowSink(down, "exp-synced", flush_seconds=1), run_folder(tmp_path))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "MLflow tracking unreachable" in messages and "simulate compare --sync" in messages
    journal = Journal(tmp_path / "mlflow")
    assert journal.unsent() == 10  # create, params, dataset input, 3 rounds, final metrics, tags, artifacts, end
    assert sync(tmp_path, uri) == 10 and journal.unsent() == 0
    run = only_run(client, "exp-synced")
    assert history(client, run, "retention") == [(4, 1.0), (8, 0.75), (12, 0.5)]
    assert run.info.status == "FINISHED" and "plots" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert sync(tmp_path) == 0  # nothing left to send


def test_a_resumed_run_continues_its_mlflow_run_and_a_new_one_starts_afresh(store, tmp_path):
    uri, client = store
    folder = run_folder(tmp_path)
    play(MlflowSink(uri, "exp-resumed"), folder, rounds=ROUNDS[:1], finish=False)  # killed after one round
    play(MlflowSink(uri, "exp-resumed"), folder, start=4, rounds=ROUNDS[1:])  # --resume after 4 edits
    run = only_run(client, "exp-resumed")
    assert history(client, run, "retention") == [(4, 1.0), (8, 0.75), (12, 0.5)]
    assert run.info.status == "FINISHED"
    play(MlflowSink(uri, "exp-resumed"), folder)  # a fresh run in the same folder
    experiment = client.get_experiment_by_name("exp-resumed").experiment_id
    assert len(client.search_runs([experiment])) == 2
    assert len(list(tmp_path.glob("mlflow-*"))) == 1  # the first journal, moved aside


def test_a_line_torn_by_a_kill_is_cut_before_the_resumed_run_appends(store, tmp_path, caplog):
    uri, client = store
    folder = run_folder(tmp_path)
    play(MlflowSink(uri, "exp-torn"), folder, rounds=ROUNDS[:1], finish=False)
    journal = Journal(folder / "mlflow")
    whole = journal.path.stat().st_size
    torn = b'{"op": "metrics", "metrics": [["retention", 0.'  # SIGKILL in the middle of an append
    with journal.path.open("ab") as out:
        out.write(torn)
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.journal"):
        play(MlflowSink(uri, "exp-torn"), folder, start=4, rounds=ROUNDS[1:])
    assert f"partial line ({len(torn)} bytes from byte {whole}" in caplog.text
    lines = journal.path.read_bytes().splitlines()
    assert all(json.loads(line)["op"] for line in lines) and lines[4] == b'{"op": "resume"}'
    run = only_run(client, "exp-torn")
    assert history(client, run, "retention") == [(4, 1.0), (8, 0.75), (12, 0.5)]
    assert run.info.status == "FINISHED" and journal.unsent() == 0


def test_closing_stops_the_sender_when_the_server_stays_down(tmp_path):
    before = set(threading.enumerate())
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "exp-down", flush_seconds=0.5)
    play(sink, run_folder(tmp_path), finish=False)
    assert [t for t in set(threading.enumerate()) - before if t.name == "mlflow-sender"] == []
    assert Journal(tmp_path / "mlflow").unsent() == 6  # create, params, dataset input, three rounds: all kept


def test_an_unexpected_error_stops_the_sender_and_close_reports_it(store, tmp_path, caplog):
    uri, client = store
    folder = run_folder(tmp_path)
    sink = MlflowSink(uri, "exp-error")
    before = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.tracking"):
        sink.on_start("run-a", PARAMS, folder, 0)
        sink.journal.append({"op": "bogus"})  # e.g. written by a newer editwatch
        sink.on_round(4, ROUNDS[0][1], 0.01, ROUNDS[0][2])
        sink.close()
    assert [t for t in set(threading.enumerate()) - before if t.name == "mlflow-sender"] == []
    stopped = [r for r in caplog.records if r.getMessage().startswith("the MLflow sender stopped on an unexpected")]
    assert len(stopped) == 1 and "unknown operation 'bogus'" in str(stopped[0].exc_info[1])
    reported = [r for r in caplog.records if r.getMessage().startswith("the MLflow sender stopped on an error")]
    assert len(reported) == 1 and reported[0].levelname == "ERROR"
    assert "JournalError: unknown operation 'bogus'" in reported[0].getMessage()
    assert "2 operations unsent" in reported[0].getMessage() and "--sync" in reported[0].getMessage()
    assert "could not be sent" not in caplog.text
    assert only_run(client, "exp-error").data.params["seed"] == "7"  # what came before the bad line was sent


def test_a_crash_after_the_run_was_created_does_not_create_a_second_run(store, tmp_path):
    uri, client = store
    folder = run_folder(tmp_path)
    play(MlflowSink(uri, "exp-crash"), folder, rounds=[], finish=False)  # create, params and input sent
    journal = Journal(folder / "mlflow")
    journal.save_state({"offset": 0, "uri": uri})  # killed after create_run, before its progress was saved
    assert sync(folder) == 3
    run = only_run(client, "exp-crash")
    assert len(run.inputs.dataset_inputs) == 1  # sent twice, one input
    assert run.data.tags["editwatch.journal"] == json.loads(journal.path.read_text().splitlines()[0])["tags"][
        "editwatch.journal"]
    play(MlflowSink(uri, "exp-crash"), folder, start=4, rounds=ROUNDS)  # and a resumed run continues it
    run = only_run(client, "exp-crash")
    assert history(client, run, "retention") == [(4, 1.0), (8, 0.75), (12, 0.5)] and run.info.status == "FINISHED"


def test_params_are_the_whole_config_flattened_with_the_runs_own_values_winning(store, tmp_path):
    uri, client = store
    play(MlflowSink(uri, "exp-params"), run_folder(tmp_path))
    assert only_run(client, "exp-params").data.params == {
        # config.json: every setting given a value, nested ones flattened, mlflow_tags left to the tags
        "stream": "edits.jsonl", "method": "ft-llm", "gap": "[1, 3]", "seed": "7", "follow": "false",
        "probe_every": "4", "collapse.ppl_ratio": "2.0", "collapse.agreement": "0.5",
        "mlflow_uri": "http://me:***@tracking.example:5000",  # the password is not a param
        # the run's own: the loaded model's name, the protocol's prompt format, the method's settings as run
        "model": "tiny", "prompt_format": "plain", "vlkeb_compat": "false", "method_config.lr": "0.5",
        "method_config.steps": "10", "mode": "sequential", "gaps": "[1, 3]", "data_hash": "abc",
        "editwatch_version": "0.1.0",
    }


def test_more_than_a_batch_of_params_and_a_value_past_mlflows_limit(store, tmp_path, caplog):
    uri, client = store
    many = {f"k{i:03d}": i for i in range(150)}  # MLflow takes 100 params per call
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.tracking"):
        play(MlflowSink(uri, "exp-many"), run_folder(tmp_path, images="x" * 7000),
             params={**PARAMS, "method_config": many})
    params = only_run(client, "exp-many").data.params
    assert {k: v for k, v in params.items() if k.startswith("method_config.")} == {
        f"method_config.{k}": str(v) for k, v in many.items()}
    assert len(params["images"]) == 6000 and params["images"].endswith("x…")
    assert "MLflow param images cut to 6000 characters (it has 7000)" in caplog.text


def test_the_stream_is_the_runs_dataset_input(store, tmp_path):
    uri, client = store
    play(MlflowSink(uri, "exp-input"), run_folder(tmp_path))
    inputs = only_run(client, "exp-input").inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("edits.jsonl", "abc", "local")
    assert json.loads(dataset.source) == {"uri": str(Path("edits.jsonl").resolve())}
    assert [(tag.key, tag.value) for tag in inputs[0].tags] == [("mlflow.data.context", "eval")]


def test_a_growing_or_piped_stream_has_no_dataset_input(store, tmp_path):
    uri, client = store
    play(MlflowSink(uri, "exp-no-input"), run_folder(tmp_path, follow=True), params={**PARAMS, "data_hash": None})
    assert only_run(client, "exp-no-input").inputs.dataset_inputs == []


def test_the_experiment_opens_in_mlflows_training_view_unless_its_kind_was_chosen(store, tmp_path):
    uri, client = store
    client.create_experiment("exp-old")  # made before editwatch tagged its experiments
    client.create_experiment("exp-genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("exp-kind", "exp-old", "exp-genai"):
        play(MlflowSink(uri, name), run_folder(tmp_path / name))
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind")
             for name in ("exp-kind", "exp-old", "exp-genai")}
    assert kinds == {"exp-kind": "custom_model_development", "exp-old": "custom_model_development",
                     "exp-genai": "genai_development"}


def test_base_accuracies_at_step_0_under_the_runs_metric_names(store, tmp_path):
    uri, client = store
    play(MlflowSink(uri, "exp-base"), run_folder(tmp_path))
    run = only_run(client, "exp-base")
    base = {key: history(client, run, key) for key in run.data.metrics if key.startswith("base/")}
    assert base == {"base/reliability": [(0, 0.75)], "base/t_gen": [(0, 0.5)], "base/i_gen": [(0, 0.25)],
                    "base/loc": [(0, 0.875)], "base/m_loc": [(0, 0.625)], "base/port_2hop": [(0, 0.125)]}
    assert history(client, run, "gap_1/reliability")[-1] == (12, 0.125)  # the edited model's, at the last step
    assert run.data.tags["editwatch.collapse_first_at"] == "8"


@pytest.mark.parametrize("follow, status", [(True, "FINISHED"), (False, "KILLED")])
def test_an_interrupted_run_is_killed_unless_it_follows_its_stream(store, tmp_path, follow, status):
    uri, client = store
    experiment = f"exp-stopped-{follow}"
    play(MlflowSink(uri, experiment), run_folder(tmp_path, follow=follow), summary={**SUMMARY, "stopped": "interrupted"})
    run = only_run(client, experiment)
    assert run.info.status == status and run.data.tags["editwatch.stopped"] == "interrupted"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (sqlite store behind it) and a client on it: the 4xx answers below are its own."""
    from mlflow import MlflowClient

    service = mlflow_service(tmp_path_factory.mktemp("mlflow-server")).start()
    yield url_of(service), MlflowClient(url_of(service))
    service.stop()


def dead_letters(folder):
    return [json.loads(line) for line in DeadLetters(folder / "mlflow").path.read_text().splitlines()]


def journaled_metrics(folder):
    """(key, step, value) of every metric the run journaled."""
    return [(key, step, float(value)) for op in map(json.loads, Journal(folder / "mlflow").path.read_text().splitlines())
            if op["op"] == "metrics" for key, value, _, step in op["metrics"]]


def test_rejected_writes_are_dead_letters_with_the_servers_answer_and_everything_else_arrives(server, tmp_path):
    uri, client = server
    folder = run_folder(tmp_path)
    sink = MlflowSink(uri, "exp-rejected", tags={"team": "vision", "bad?tag": "x"})  # MLflow refuses "?" in a key
    sink.on_start("run-a", PARAMS, folder, 0)
    sink.on_round(4, {"retention": 1.0, "ref_ppl_ratio": math.nan, "bad!key": 0.5}, 0.01, {"gap_1": {"reliability": 0.5}})
    sink.journal.append({"op": "params", "params": {"seed": "8", "late": "1"}})  # seed was 7: MLflow keeps a param
    sink.on_round(8, {"retention": 0.75, "ref_ppl_ratio": math.inf}, 0.01, {"../up": {"reliability": 0.25}})
    sink.on_finish(SUMMARY, folder)
    assert sink.flush() and sink.dead_letters() == 4  # final before close: what run.py writes into the summary
    sink.close()

    letters = dead_letters(folder)
    assert [(d["op"], d["status"], d["part"]) for d in letters] == [("tags", 400, 0), ("metrics", 400, 0),
                                                                    ("params", 400, 0), ("metrics", 400, 0)]
    assert letters[0]["tags"] == {"bad?tag": "x"} and "Names may only contain alphanumerics" in letters[0]["message"]
    assert [row[0::3] for row in letters[1]["metrics"]] == [["bad!key", 4]]
    assert letters[2]["params"] == {"seed": "8"} and "Changing param values is not allowed" in letters[2]["message"]
    assert [row[0::3] for row in letters[3]["metrics"]] == [["../up/reliability", 8]]
    assert "must not resolve to other names" in letters[3]["message"]
    run = only_run(client, "exp-rejected")
    assert {(d["run_id"], d["uri"]) for d in letters} == {(run.info.run_id, uri)}
    assert len({d["offset"] for d in letters}) == 4  # four operations, each rejected in part

    # Everything else arrived: the run, its tags, the other param, every other metric (NaN and infinity too).
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "vision" and "bad?tag" not in run.data.tags
    assert (run.data.params["seed"], run.data.params["late"]) == ("7", "1")
    rejected = {("bad!key", 4), ("../up/reliability", 8)}
    expected = [(key, step, value) for key, step, value in journaled_metrics(folder) if (key, step) not in rejected]
    assert len(expected) == 19  # 4 + 3 in the rounds; at the end 2 results, 4 counts, 6 base accuracies
    for key, step, value in expected:
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged[step] == value or (math.isnan(value) and math.isnan(logged[step])) or (
            value == math.inf and logged[step] == sys.float_info.max), (key, step)  # MLflow's infinity
    assert "bad!key" not in run.data.metrics and history(client, run, "gap_1/reliability")[0] == (4, 0.5)
    assert Journal(folder / "mlflow").unsent() == 0


def test_a_batch_with_a_few_bad_metrics_is_halved_until_only_they_are_left_out(server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri, client = server
    calls = []
    log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, run_id, **kw: (calls.append(kw), log_batch(
        self, run_id, **kw))[1])
    bad = {17, 500, 998}
    values = {f"m{i:03d}#" if i in bad else f"m{i:03d}": float(i) for i in range(999)}  # + probe_seconds: one batch
    sink = MlflowSink(uri, "exp-split")
    sink.on_start("run-a", PARAMS, run_folder(tmp_path), 0)
    sink.on_round(4, values, 0.01, {})
    assert sink.flush() and sink.dead_letters() == 3
    sink.close()
    assert sorted(d["metrics"][0][0] for d in dead_letters(tmp_path)) == ["m017#", "m500#", "m998#"]
    metrics = only_run(client, "exp-split").data.metrics
    assert metrics == {**{k: v for k, v in values.items() if "#" not in k}, "probe_seconds": 0.01}
    batches = [len(kw["metrics"]) for kw in calls if "metrics" in kw]
    assert batches[0] == 1000 and len(batches) <= 1 + 2 * 3 * 10  # halving: about 2k log2(n) calls, not n


def test_an_operation_sent_again_after_a_kill_adds_no_dead_letter_twice(server, store, tmp_path):
    uri, _ = server
    folder = run_folder(tmp_path)
    sink = MlflowSink(uri, "exp-again")
    sink.on_start("run-a", PARAMS, folder, 0)
    sink.on_round(4, {"a#": 1.0, "retention": 1.0, "b#": 2.0}, 0.01, {})
    sink.close()
    dead = DeadLetters(folder / "mlflow")
    first, second = dead.path.read_text().splitlines(keepends=True)
    # Killed while writing the second dead letter, before the operation was recorded as sent.
    dead.path.write_text(first + second[:25])
    journal = Journal(folder / "mlflow")
    journal.save_state({**journal.state(), "offset": json.loads(first)["offset"]})
    assert sync(folder) == 1 and dead.count() == 2
    assert [(d["part"], d["metrics"]) for d in dead_letters(folder)] == [
        (d["part"], d["metrics"]) for d in map(json.loads, (first, second))]
    assert sync(folder) == 0 and dead.count() == 2  # never sent again
    # Another tracking server gets the whole run anew: its own rejections, the first server's kept aside.
    assert sync(folder, store[0]) == 4 and dead.count() == 2
    (aside,) = (folder / "mlflow").glob("dead_letter-*.jsonl")
    assert {d["uri"] for d in dead_letters(folder)} == {store[0]} and len(aside.read_text().splitlines()) == 2


@pytest.mark.parametrize("code, retried", [("INVALID_PARAMETER_VALUE", False), ("RESOURCE_DOES_NOT_EXIST", False),
                                           ("UNAUTHENTICATED", True), ("PERMISSION_DENIED", True),
                                           ("REQUEST_LIMIT_EXCEEDED", True), ("INTERNAL_ERROR", True)])
def test_answers_about_credentials_rate_or_the_server_are_retried_not_dead_letters(tmp_path, monkeypatch, code,
                                                                                   retried):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    class Refusing:
        def log_batch(self, run_id, **kw):
            raise MlflowException(f"{code}: no", error_code=ErrorCode.Value(code))

    monkeypatch.setattr(tracking, "_client", lambda uri: Refusing())
    journal = Journal(tmp_path / "mlflow")
    journal.append({"op": "metrics", "metrics": [["a", 1.0, 1, 0]]})
    journal.save_state({"offset": 0, "uri": "http://tracking.example", "run_id": "r1"})
    if retried:
        with pytest.raises(tracking.TrackingUnavailable):
            tracking.send(journal)
        assert (journal.unsent(), DeadLetters(journal.folder).count()) == (1, 0)
    else:
        assert tracking.send(journal) == 1
        assert (journal.unsent(), DeadLetters(journal.folder).count()) == (0, 1)


def test_an_experiment_the_server_refuses_stops_the_sender_with_everything_kept(server, tmp_path, caplog):
    uri, _ = server
    with caplog.at_level(logging.WARNING, logger="monitor.exporters.tracking"):
        play(MlflowSink(uri, "x" * 600, flush_seconds=60), run_folder(tmp_path))  # MLflow takes 500 characters
    reported = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the MLflow sender stopped on an error")]
    assert len(reported) == 1 and "TrackingRejected" in reported[0] and "10 operations unsent" in reported[0]
    assert not DeadLetters(tmp_path / "mlflow").path.exists()


def test_a_flush_then_a_close_wait_flush_seconds_in_all_while_the_server_is_down(tmp_path):
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "exp-down", flush_seconds=2)
    folder = run_folder(tmp_path)
    sink.on_start("run-a", PARAMS, folder, 0)
    sink.on_finish(SUMMARY, folder)
    start = time.monotonic()
    assert not sink.flush() and sink.dead_letters() == 0  # nothing sent: nothing rejected yet
    sink.close()
    assert 2 <= time.monotonic() - start < 3.5  # not 2 + 2
    assert Journal(folder / "mlflow").unsent() == 7  # create, params, input, final metrics, tags, artifacts, end


def test_a_resume_that_raises_the_limit_is_compared_under_the_new_one(store, tmp_path):
    """MLflow keeps a param's first value: the limit the run ended under is a tag, which compare reads first."""
    from simulator.compare import RunView, _limit

    uri, client = store
    folder = run_folder(tmp_path, limit=6)
    play(MlflowSink(uri, "exp-limit"), folder, rounds=ROUNDS[:1], finish=False)
    run_folder(tmp_path, limit=12)  # `--resume --limit 12` writes its settings again
    play(MlflowSink(uri, "exp-limit"), folder, start=4, rounds=ROUNDS[1:])
    run = only_run(client, "exp-limit")
    assert run.data.params["limit"] == "6" and run.data.tags["editwatch.limit"] == "12"
    view = RunView(run.info.run_id, "run-a", "ft-llm", "m", {}, run.data.params, run.data.tags)
    assert _limit(view) == 12
    assert _limit(RunView("r", "n", "ft-llm", "m", {}, {"limit": "6"})) == 6  # a run logged before the tag
    assert _limit(RunView("r", "n", "ft-llm", "m", {}, {"limit": "None"}, {"editwatch.limit": "None"})) is None
