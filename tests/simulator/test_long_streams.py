"""Long-stream behaviour of the timeline: batched probing, re-edits (stale_rate), retractions, hop chance levels."""

import json

import pytest
from prometheus_client import CollectorRegistry

from editors import LVLM, Query, adapter, create_editor
from monitor.exporters.prometheus import PrometheusSink
from monitor.metrics import token_accuracy
from monitor.round import Pool
from simulator import ImageRoot, load_records
from simulator.config import RunConfig
from simulator.outputs import RunFiles
from simulator.records import Retraction
from simulator.timeline import Timeline


@pytest.fixture
def setup(small_world, small_model, tmp_path):
    images = ImageRoot(small_world / "images")
    records = load_records(small_world / "eval.jsonl", images=images)
    return LVLM.load(small_model), images, records, tmp_path


def timeline(editor, world, images, out, **overrides):
    config = RunConfig(**{"stream": str(world / "eval.jsonl"), "probe_every": 1000, **overrides})
    return Timeline(editor, config, images, RunFiles(out))


def test_each_record_costs_two_score_calls_each_in_the_fewest_batches(setup, small_world, monkeypatch):
    """Pre-edit references, base accuracy and the reference set in one call; the new edit's reliability and
    every due edit's probes in another; each call runs at most ceil(n / batch size) forwards (rows packed side by side
    may take fewer)."""
    lvlm, images, records, out = setup
    editor = create_editor("none", lvlm)
    calls, forwards = [], []
    score, forward, layout = editor.score, lvlm._forward, adapter.pack_layout
    editor.score = lambda queries, **kw: calls.append(list(queries)) or forwards.append(0) or score(queries, **kw)
    lvlm._forward = lambda *a, **kw: forwards.append(1) or forward(*a, **kw)  # rows run whole
    monkeypatch.setattr(adapter, "pack_layout", lambda *a: forwards.append(1) or layout(*a))  # rows packed
    run = timeline(editor, small_world, images, out, gap=[1, 3])
    run.run((i + 1, r) for i, r in enumerate(records[:6]))
    assert len(calls) == 2 * 6
    # LLaVA takes image features, so text-only and image queries share batches; other families split them.
    assert lvlm.family.shares_image_features
    per_call = [len(run) for run in "".join(map(str, forwards)).split("0")[1:]]
    padded = [-(-len(group) // 16) for group in calls]  # batches of 16 rows, each padded to its longest
    assert all(1 <= n <= most for n, most in zip(per_call, padded)) and sum(per_call) < sum(padded)
    # The edited call of record k holds its reliability, then also edit k-1's probes (gap 1), then edit k-3's (gap 3).
    assert len(calls[1]) == 1 and len(calls[7]) > len(calls[3]) > len(calls[1])


def test_a_re_edited_fact_answered_with_its_older_value_counts_as_stale(setup, small_world):
    """The first edit's value is what the model already answers; the unedited model ('none') keeps answering it
    after the fact is re-edited, so every measured re-edit is stale (1.0), which the scores confirm by hand."""
    lvlm, images, records, out = setup
    first = records[0]
    said = lvlm.generate([Query(first.src, "", images.open(first.image))], max_new_tokens=4)[0]
    first = first.model_copy(update={"alt": said, "id": "first"})
    again = first.model_copy(update={"alt": records[1].alt, "id": "again"})
    assert again.alt != said
    stream = [first, *records[2:5], again, *records[5:8]]
    run = timeline(create_editor("none", lvlm), small_world, images, out, gap=[2])
    run.run((i + 1, r) for i, r in enumerate(stream))
    older = token_accuracy(lvlm.score([Query(first.src, said, images.open(first.image))])[0])
    assert older == 1.0  # the model answers the first value in full
    results = run.summary(0)["results"]["gap_2"]
    assert results["stale_rate"] == 1.0
    # The superseded first edit was not re-asked: the pool holds one live entry per fact.
    assert [e.key for e in run.pool.live()].count("first") == 0 and len(run.pool) == len(stream) - 1


def test_retraction_deletes_a_memory_edit_and_measures_what_the_model_answers_now(setup, small_world):
    lvlm, images, records, out = setup
    editor = create_editor("serac", lvlm)
    edit = records[0]
    stream = [edit, *records[1:3], Retraction(op="retract", id=edit.id), Retraction(op="retract", id="nowhere")]
    run = timeline(editor, small_world, images, out, gap=[1])
    run.run((i + 1, r) for i, r in enumerate(stream))
    summary = run.summary(0)
    assert summary["retracted"] == 1 and summary["failed"] == 1  # an unknown id is a failed line
    assert summary["edits_read"] == 5 and summary["edits_applied"] == 3
    assert editor.memory_size() == 2 and str(edit.id) not in {e.key for e in run.pool.live()}
    # Retracted: the query reaches the base model again, whose answers are known by hand.
    base = lvlm.score([Query(edit.src, edit.alt, images.open(edit.image)),
                       Query(edit.src, edit.pred, images.open(edit.image))])
    assert summary["retractions"] == {"retracted_recall": token_accuracy(base[0]),
                                      "retraction_restore": token_accuracy(base[1])}
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert pool[-1] == {"retracted": str(edit.id)}


def test_an_editor_that_cannot_retract_fails_the_line_with_its_reason(setup, small_world, caplog):
    lvlm, images, records, out = setup
    prometheus = PrometheusSink(CollectorRegistry())
    run = timeline(create_editor("ft-llm", lvlm), small_world, images, out, gap=[1])
    run.sinks.append(prometheus)
    prometheus.on_start("r", {"method": "ft-llm", "model": "m"}, out, 0)
    run.run([(1, records[0]), (2, Retraction(op="retract", id=records[0].id)), (3, Retraction(op="retract", id="no"))])
    summary = run.summary(0)
    assert (summary["failed"], summary["retracted"], summary["edits_applied"]) == (2, 0, 1)
    assert "ft-llm cannot retract an edit" in caplog.text
    # The live counter and the run's total agree with the summary (a resumed run's total starts from it).
    assert prometheus.registry.get_sample_value("editwatch_edits_failed_total", prometheus.labels) == 2
    assert prometheus.registry.get_sample_value("editwatch_edits_failed_in_run", prometheus.labels) == 2


def test_port_chance_is_one_over_the_distinct_answers_of_each_hop(setup, small_world):
    lvlm, images, records, out = setup
    run = timeline(create_editor("none", lvlm), small_world, images, out, mode="single")
    run.run((i + 1, r) for i, r in enumerate(records))
    expected = {f"port_{k}hop": 1 / len({r.hop(k).answer for r in records if r.hop(k)}) for k in range(1, 5)}
    assert run.summary(0)["port_chance"] == pytest.approx(expected, abs=0)


def test_a_failure_while_measuring_an_applied_edit_is_counted_and_the_run_goes_on(setup, small_world):
    """The edited model's scoring raises for one record (as a rewritten query too long for the model would): what
    that call measured is lost and counted per edit, nothing else; the record stays live, unasked by rounds."""
    lvlm, images, records, out = setup
    editor = create_editor("none", lvlm)
    score, calls = editor.score, []

    def failing(queries, **kwargs):
        calls.append(len(queries))
        if len(calls) == 6:  # the edited call of the third record (record 2), which measures record 1 (gap 1)
            raise RuntimeError("out of memory")
        return score(queries, **kwargs)

    editor.score = failing
    run = timeline(editor, small_world, images, out, gap=[1])
    run.run((i + 1, r) for i, r in enumerate(records[:5]))
    summary = run.summary(0)
    assert (summary["edits_applied"], summary["unmeasured"], summary["failed"]) == (5, 2, 0)
    # Lost: record 1's values at gap 1 (due in that call) and record 2's reliability right after its edit. Record 2
    # is still measured at gap 1 (with record 3), so three of the four due measurements are taken.
    assert summary["results"]["gap_1"]["edits_measured"] == 3
    for pool in (run.pool, Pool.from_rows(json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines())):
        assert [e.key for e in pool.live()] == [str(r.id) for i, r in enumerate(records[:5]) if i != 2]
        assert pool.live_entry(str(records[2].id)).at_edit is None  # rounds cannot re-ask it; a retraction can name it


def _run_apart(monkeypatch, editor, world, images, out, records, **overrides):
    """A run that scores the unedited and edited probes in separate calls, as for weight editors."""
    import simulator.timeline

    with monkeypatch.context() as patch:
        patch.setattr(simulator.timeline, "ScoresUnedited", type("Never", (), {}))
        run = timeline(editor, world, images, out, **overrides)
        run.run((i + 1, r) for i, r in enumerate(records))
    return run


def test_a_memory_editor_scores_each_record_in_one_call_with_the_results_of_two(setup, small_world, monkeypatch):
    """IKE never changes the weights: a record's pre-edit references and base accuracy join its post-edit probes
    (rewritten with a demonstration) in one `score_mixed` call after the edit, and every metric equals that of the
    two-call path."""
    lvlm, images, records, out = setup
    editor = create_editor("ike", lvlm)
    mixed, plain = [], []
    score_mixed, score = editor.score_mixed, editor.score
    editor.score_mixed = lambda queries, unedited, **kw: mixed.append(list(unedited)) or score_mixed(queries, unedited,
                                                                                                      **kw)
    editor.score = lambda queries, **kw: plain.append(len(queries)) or score(queries, **kw)
    run = timeline(editor, small_world, images, out / "together", gap=[1, 3])
    run.run((i + 1, r) for i, r in enumerate(records[:8]))
    together = run.summary(0)
    assert (len(mixed), plain) == (8, [])
    assert all(any(flags) and not all(flags) for flags in mixed)  # both kinds in every call
    editor.reset()
    run_apart = _run_apart(monkeypatch, editor, small_world, images, out / "apart", records[:8], gap=[1, 3])
    apart = run_apart.summary(0)
    # Apart: two `score` calls per record (which reach `score_mixed` with every flag False), no mixed one.
    assert len(plain) == 2 * 8 and sum(any(flags) for flags in mixed) == 8 and len(mixed) == 8 + 2 * 8
    assert together["base"] == apart["base"]
    for setting in ("gap_1", "gap_3"):
        assert together["results"][setting].keys() == apart["results"][setting].keys()
        for key, value in together["results"][setting].items():
            assert value == pytest.approx(apart["results"][setting][key], abs=1e-6), (setting, key)
    assert run.pool.live() == run_apart.pool.live() and len(run.pool.live()) == 8
    # Not all trivially 0: the untrained model answers nothing right, but its KLs are real numbers to compare.
    assert together["results"]["gap_1"]["i_loc_kl"] > 0 and together["results"]["gap_1"]["t_loc_kl"] > 0


def test_when_the_one_call_fails_the_record_is_measured_in_two(setup, small_world, monkeypatch):
    lvlm, images, records, out = setup
    editor = create_editor("ike", lvlm)
    score_mixed, failures = editor.score_mixed, []

    def failing(queries, unedited, **kwargs):
        if any(unedited) and len(failures) < 2:  # the first two one-call measurements; `score` goes through too
            failures.append(1)
            raise RuntimeError("out of memory")
        return score_mixed(queries, unedited, **kwargs)

    editor.score_mixed = failing
    run = timeline(editor, small_world, images, out / "failing", gap=[1])
    run.run((i + 1, r) for i, r in enumerate(records[:5]))
    summary = run.summary(0)
    editor.reset()
    apart = _run_apart(monkeypatch, editor, small_world, images, out / "apart", records[:5], gap=[1]).summary(0)
    assert len(failures) == 2  # two records fell back to two calls
    assert (summary["unmeasured"], summary["results"]["gap_1"]["edits_measured"]) == (0, 4)
    assert summary["base"] == apart["base"] and summary["results"]["gap_1"]["i_loc_kl"] > 0
    for key, value in summary["results"]["gap_1"].items():
        assert value == pytest.approx(apart["results"]["gap_1"][key], abs=1e-6), key
