"""The timeline: single mode, VLKEB gaps in one pass, probe rounds, alarms, quarantine, outputs."""

import dataclasses
import json
import math

import pytest
import torch
from editors.none import NoneConfig

from editors import LVLM, EditOutcome, Editor, EditorState, create_editor
from simulator import ImageRoot, load_records
from simulator.config import RunConfig
from simulator.outputs import RunFiles
from simulator.run import simulate
from simulator.timeline import Timeline
from monitor.metrics import token_accuracy


class Recording(Editor):
    """Applies nothing, but logs how many edits were applied whenever a query is scored."""

    name = "recording"
    Config = NoneConfig

    def __init__(self, lvlm, config=None):
        super().__init__(lvlm, config)
        self.count = 0
        self.log = []

    def apply(self, edit):
        self.count += 1
        return EditOutcome(applied=True)

    def score(self, queries, **kwargs):
        self.log += [(self.count, q.prompt, q.answer, id(q.image)) for q in queries]
        return super().score(queries, **kwargs)

    def state(self):
        return EditorState(self.name, {"count": self.count})

    def load_state(self, state):
        self.count = state.meta["count"]

    def reset(self):
        self.count = 0


class Noisy(Recording):
    """Adds large noise to the last decoder MLP at every edit: a real, damaging weight change."""

    name = "noisy"

    def apply(self, edit):
        with torch.no_grad():
            for param in self.lvlm.parameter_group("llm").values():
                param.add_(torch.randn_like(param) * 0.5)
        return super().apply(edit)


@pytest.fixture
def setup(small_world, small_model, tmp_path):
    images = ImageRoot(small_world / "images")
    records = load_records(small_world / "eval.jsonl", images=images)
    lvlm = LVLM.load(small_model)
    return lvlm, images, records, tmp_path


def config(world, **overrides):
    return RunConfig(**{"stream": str(world / "eval.jsonl"), **overrides})


def test_single_mode_measures_each_edit_on_the_unedited_model(setup, small_world):
    lvlm, images, records, out = setup
    editor = create_editor("none", lvlm)
    timeline = Timeline(editor, config(small_world, mode="single"), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records))
    summary = timeline.summary(0)
    from editors import Query

    by_hand = [token_accuracy(s) for s in lvlm.score([Query(r.src, r.alt, images.open(r.image)) for r in records])]
    pred = [token_accuracy(s) for s in lvlm.score([Query(r.src, r.pred, images.open(r.image)) for r in records])]
    single = summary["results"]["single"]
    assert single["edits_measured"] == len(records) == summary["edits_applied"]
    assert single["reliability"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-9)
    assert summary["base"]["pred_src"] == pytest.approx(sum(pred) / len(pred), abs=1e-9)
    assert single["t_loc"] == 1.0 and single["i_loc"] == 1.0 and summary["rounds"] == 0


def test_single_mode_measures_every_edit_alone(setup, small_world):
    lvlm, images, records, out = setup
    editor = Recording(lvlm)
    timeline = Timeline(editor, config(small_world, mode="single"), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records[:5]))
    # References and base accuracy on the unedited model, measurements with exactly one edit in.
    for record in records[:5]:
        t_gen = (record.rephrase, record.alt, id(images.open(record.image)))
        asked = {count for count, *query in editor.log if tuple(query) == t_gen}
        assert asked == {1}
    assert editor.count == 0 and timeline.summary(0)["edits_applied"] == 5


class FailingHop(Recording):
    """Every second apply (the one-hop edit) fails."""

    name = "failing-hop"

    def apply(self, edit):
        if self.count % 2 == 1:
            return EditOutcome(applied=False, message="no")
        return super().apply(edit)


def test_a_failed_one_hop_edit_rolls_back_its_visual_edit_too(setup, small_world):
    lvlm, images, records, out = setup
    editor = FailingHop(lvlm)
    timeline = Timeline(editor, config(small_world, gap=[1], one_hop_edit=True), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records[:3]))
    summary = timeline.summary(0)
    assert summary["failed"] == 3 and summary["edits_applied"] == 0 and editor.count == 0


def test_each_gap_is_measured_after_exactly_gap_further_edits(setup, small_world):
    lvlm, images, records, out = setup
    records = records[:12]
    editor = Recording(lvlm)
    timeline = Timeline(editor, config(small_world, gap=[1, 3, 5], probe_every=100), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records))
    summary = timeline.summary(0)
    for gap in (1, 3, 5):
        assert summary["results"][f"gap_{gap}"]["edits_measured"] == len(records) - gap
    # Edit i's i_gen query (src + alt on image_rephrase) is asked exactly when i + gap + 1 edits are in.
    for i, record in enumerate(records):
        key = (record.src, record.alt, id(images.open(record.image_rephrase)))
        asked_at = sorted(count for count, *query in editor.log if tuple(query) == key)
        assert asked_at == [i + gap + 1 for gap in (1, 3, 5) if i + gap + 1 <= len(records)]
    assert len(timeline.pending) <= 5


def test_probe_rounds_sample_a_bounded_number_of_earlier_edits(setup, small_world):
    lvlm, images, records, out = setup
    files = RunFiles(out)
    timeline = Timeline(Recording(lvlm), config(small_world, gap=[2], probe_every=5, retention_sample=3),
                        images, files)
    timeline.run((i + 1, r) for i, r in enumerate(records[:20]))
    rounds = list(files.rows("rounds.jsonl"))
    assert [r["edits_applied"] for r in rounds] == [5, 10, 15, 20]
    for row in rounds:
        assert row["retention_sample"] == 3
        assert row["ref_agreement"] == 1.0 and row["ref_ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert row["collapse_alarm"] == 0 and row["alarms"] == []
    assert len(list(files.rows("pool.jsonl"))) == 20


class Forgetful(Recording):
    """Knows each edit while it is the newest; later only the edits applied 1st, 3rd, 5th, ... stay known.

    Scores of an applied edit's own question (src, alt, image) are rewritten: every answer token right
    (known) or every token wrong (forgotten). So an edit's reliability is 1 right after it is applied
    and 1 or 0 when a probe round re-asks it, which makes the retention interval computable by hand.
    """

    name = "forgetful"

    def __init__(self, lvlm, config=None):
        super().__init__(lvlm, config)
        self.edits = []  # [prompt, target, id(image)] in the order applied

    def apply(self, edit):
        self.edits.append([edit.prompt, edit.target, id(edit.image)])
        return super().apply(edit)

    def score(self, queries, **kwargs):
        order = {tuple(e): j for j, e in enumerate(self.edits)}
        scores = super().score(queries, **kwargs)
        for i, (query, score) in enumerate(zip(queries, scores)):
            j = order.get((query.prompt, query.answer, id(query.image)))
            if j is not None:
                known = j % 2 == 0 or j == len(self.edits) - 1
                scores[i] = dataclasses.replace(score, argmax_ids=score.target_ids + (0 if known else 1))
        return scores

    def state(self):
        return EditorState(self.name, {"count": self.count, "edits": [list(e) for e in self.edits]})

    def load_state(self, state):
        super().load_state(state)
        self.edits = [list(e) for e in state.meta["edits"]]

    def reset(self):
        super().reset()
        self.edits = []


def test_the_retention_interval_is_the_normal_interval_with_population_correction_by_hand(setup, small_world):
    """Each round's retention, interval and forgetting equal a hand computation: the sample mean of 0/1
    reliabilities, mean -/+ Z * sqrt(s^2 / n * (N - n) / (N - 1)) clipped to [0, 1], N = edits applied."""
    lvlm, images, records, out = setup
    files = RunFiles(out)
    timeline = Timeline(Forgetful(lvlm), config(small_world, gap=[2], probe_every=5, retention_sample=6),
                        images, files)
    timeline.run((i + 1, r) for i, r in enumerate(records[:20]))
    assert [row["at_edit"] for row in files.rows("pool.jsonl")] == [1.0] * 20
    rounds = list(files.rows("rounds.jsonl"))
    assert [(r["edits_applied"], r["retention_sample"]) for r in rounds] == [(5, 5), (10, 6), (15, 6), (20, 6)]
    unclipped = 0
    for row in rounds:
        big_n, n = row["edits_applied"], int(row["retention_sample"])
        known = sum(1 for j in range(big_n) if j % 2 == 0 or j == big_n - 1)  # 1s in the pool, the rest 0s
        k = round(row["retention"] * n)
        assert max(0, n - (big_n - known)) <= k <= min(n, known)  # a sample the pool can give
        values = [1.0] * k + [0.0] * (n - k)
        mean = sum(values) / n
        if n == big_n:  # every edit re-asked: no sampling error
            half = 0.0
        else:
            s2 = sum((v - mean) ** 2 for v in values) / (n - 1)
            half = 1.959964 * math.sqrt(s2 / n * (big_n - n) / (big_n - 1))
        low, high = max(0.0, mean - half), min(1.0, mean + half)
        assert row["retention"] == pytest.approx(mean, abs=1e-12)
        assert (row["retention_ci_low"], row["retention_ci_high"]) == pytest.approx((low, high), abs=1e-12)
        assert row["forgetting"] == pytest.approx(1.0 - mean, abs=1e-12)  # every edit was 1 at edit time
        assert bool(row["forgetting_significant"]) == (mean < 1.0 and high < 1.0)
        unclipped += 0.0 < low < high < 1.0
    assert rounds[0]["retention"] == rounds[0]["retention_ci_low"] == rounds[0]["retention_ci_high"] == 0.6  # 3 of 5
    assert unclipped >= 1  # the seed draws at least one sample whose interval is clipped at neither end


def test_damaging_edits_raise_the_collapse_alarm_and_can_stop_the_run(setup, small_world):
    lvlm, images, records, out = setup
    torch.manual_seed(0)
    cfg = config(small_world, gap=[1], probe_every=4, stop_on_collapse=True, collapse={"ppl_ratio": 1.5})
    timeline = Timeline(Noisy(lvlm), cfg, images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records))
    summary = timeline.summary(0)
    assert summary["alarms"]["collapse"]["raised"] and summary["stopped"] == "collapse"
    assert summary["alarms"]["collapse"]["first_at"] == summary["edits_applied"] < len(records)
    assert any("perplexity" in reason or "agreement" in reason for reason in summary["alarms"]["collapse"]["reasons"])
    assert summary["last_round"]["ref_agreement"] < 1.0


def test_nan_weights_are_reported_as_collapse(setup, small_world):
    lvlm, images, records, out = setup
    timeline = Timeline(Recording(lvlm), config(small_world, gap=[1], probe_every=2), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records[:2]))
    with torch.no_grad():
        next(iter(lvlm.parameter_group("llm").values()))[0, 0] = float("nan")
    row = timeline.probe_round()
    assert row["collapse_alarm"] == 1 and any("NaN/Inf" in reason for reason in row["alarms"])


def test_a_run_writes_summary_rounds_and_quarantine(small_world, small_model, tmp_path):
    stream = tmp_path / "stream.jsonl"
    lines = (small_world / "eval.jsonl").read_text().splitlines()[:9]
    lines[3] = "{not json"
    lines[5] = lines[5].replace('"image": "c', '"image": "../../etc/passwd').replace('.png"', '"', 1)
    stream.write_text("\n".join(lines) + "\n")
    summary = simulate(config(small_world, stream=str(stream), model=str(small_model), images=small_world / "images",
                              gap=[2], probe_every=3, out=tmp_path / "out"), progress=False)
    assert summary["edits_read"] == summary["edits_applied"] == 7 and summary["quarantined"] == 2
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {(q["line"], q["field"]) for q in quarantine} == {(4, None), (6, "image")}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary["results"]["gap_2"]["edits_measured"] == 5 and summary["rounds"] == 2
    with pytest.raises(Exception, match="already holds a run"):
        simulate(config(small_world, stream=str(stream), model=str(small_model), out=tmp_path / "out"), progress=False)


def test_one_hop_edit_applies_the_one_hop_fact_too_and_tests_its_portability(setup, small_world):
    lvlm, images, records, out = setup
    editor = Recording(lvlm)
    timeline = Timeline(editor, config(small_world, gap=[1], one_hop_edit=True), images, RunFiles(out))
    timeline.run((i + 1, r) for i, r in enumerate(records[:4]))
    assert editor.count == 8  # the visual edit and its one-hop text edit, per record
    summary = timeline.summary(0)
    assert summary["edits_applied"] == 4 and "port_onehop" in summary["results"]["gap_1"]
    asked = {(prompt, answer) for _, prompt, answer, _ in editor.log}
    assert all((r.port_q, r.port_a) in asked for r in records[:3])


def test_a_bad_line_after_a_stop_is_quarantined_once_across_resume(small_world, small_model, tmp_path):
    stream = tmp_path / "stream.jsonl"
    lines = (small_world / "eval.jsonl").read_text().splitlines()[:9]
    lines[3] = "{not json"
    stream.write_text("\n".join(lines) + "\n")
    settings = dict(stream=str(stream), model=str(small_model), images=small_world / "images", gap=[1],
                    out=tmp_path / "out", no_mlflow=True)
    first = simulate(config(small_world, limit=2, **settings), progress=False)
    assert first["quarantined"] == 0  # nothing past the records it stopped at was read
    summary = simulate(config(small_world, resume=True, **settings), progress=False)
    assert summary["quarantined"] == 1 and summary["edits_read"] == 8
    assert len((tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()) == 1
