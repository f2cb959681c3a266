"""The one home of parameter snapshots: unedited values, per-edit rollback, accumulated change, NaN guard."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from editors import Query, create_editor
from editors.weights import StateMismatchError, WeightTracker, span_logits_with, trainable_only
from monitor.plan import edit_probes
from simulator.requests import edit_example, edit_request
from tests import zygote
from tests.tiny_models import BUILDERS, random_image, tiny_llava

QUERY = Query("which animal is shown in the picture?", "a brown dog", random_image(3))
ROUND_TRIP_EDITS = 20


def tracked(seed=0):
    lvlm = tiny_llava(seed=seed)
    return lvlm, WeightTracker(lvlm.parameter_group("llm", layers=(-1,)))


def add(tracker, deltas):
    def change():
        with torch.no_grad():
            for name, delta in deltas.items():
                tracker.params[name].add_(delta)

    return change


def test_edits_accumulate_report_their_own_change_and_reset_bit_exactly():
    _, tracker = tracked()
    original = {n: p.detach().clone() for n, p in tracker.params.items()}
    first, second = list(tracker.params)[:2]
    d1 = {first: torch.full_like(original[first], 0.01)}
    d2 = {first: torch.full_like(original[first], -0.03), second: torch.full_like(original[second], 0.02)}
    out1 = tracker.edit(add(tracker, d1))
    out2 = tracker.edit(add(tracker, d2))
    assert out1.applied and out2.applied
    # Each outcome reports the norm of its own change, per parameter (0 for untouched ones).
    assert out1.changed[first] == pytest.approx(0.01 * math.sqrt(original[first].numel()), rel=1e-3)
    assert out1.changed[second] == 0.0
    assert out2.changed[second] == pytest.approx(0.02 * math.sqrt(original[second].numel()), rel=1e-3)
    # The accumulated change is the norm of the summed deltas, over every tracked parameter.
    expected = math.sqrt((0.02**2) * original[first].numel() + (0.02**2) * original[second].numel())
    assert tracker.weight_change() == pytest.approx(expected, rel=1e-3)
    assert set(tracker.edited()) == {first, second}
    tracker.reset()
    assert all(torch.equal(p, original[n]) for n, p in tracker.params.items())
    assert tracker.weight_change() == 0.0 and tracker.edited() == {}


def test_non_finite_edit_is_rolled_back_alone_and_the_stream_goes_on():
    _, tracker = tracked()
    name = next(iter(tracker.params))
    assert tracker.edit(add(tracker, {name: torch.full_like(tracker.params[name], 0.5)})).applied
    after_first = tracker.params[name].detach().clone()

    def poison():
        with torch.no_grad():
            tracker.params[name][0, 0] = float("nan")
            tracker.params[name][1, 1] += 3.0

    outcome = tracker.edit(poison)
    assert not outcome.applied and outcome.changed == {}
    assert name in outcome.message and "rolled back" in outcome.message
    assert torch.equal(tracker.params[name], after_first)  # the earlier edit stays
    assert tracker.edit(add(tracker, {name: torch.full_like(after_first, float("inf"))})).applied is False
    overflow = tracker.edit(add(tracker, {name: torch.full_like(after_first, 1e20)}))  # finite, norm overflows
    assert not overflow.applied and "overflowing" in overflow.message
    assert torch.equal(tracker.params[name], after_first)
    assert tracker.edit(add(tracker, {name: torch.full_like(after_first, 0.5)})).applied


def test_a_failing_edit_is_rolled_back_and_the_error_surfaces():
    _, tracker = tracked()
    name = next(iter(tracker.params))
    before = tracker.params[name].detach().clone()

    def broken():
        with torch.no_grad():
            tracker.params[name].add_(1.0)
        raise RuntimeError("optimiser exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        tracker.edit(broken)
    assert torch.equal(tracker.params[name], before)


def test_load_and_unedited_swap():
    _, tracker = tracked()
    name = next(iter(tracker.params))
    tracker.edit(add(tracker, {name: torch.ones_like(tracker.params[name])}))
    saved = tracker.edited()
    _, other = tracked()
    other.load(saved)
    assert torch.equal(other.params[name], tracker.params[name])
    with tracker.unedited():
        assert tracker.weight_change() == 0.0
    assert torch.equal(tracker.params[name], saved[name])
    with pytest.raises(StateMismatchError, match="does not track: model.vision"):
        other.load({"model.vision_tower.x": torch.zeros(1)})
    with pytest.raises(StateMismatchError, match=r"has shape \(\d+, \d+\), the state holds \(2,\)"):
        other.load({name: torch.zeros(2)})
    with pytest.raises(ValueError, match="at least one parameter"):
        WeightTracker({})


def test_trainable_only_restores_every_flag():
    lvlm, tracker = tracked()
    params = list(tracker.params.values())
    lvlm.model.get_input_embeddings().weight.requires_grad_(False)
    flags = [p.requires_grad for p in lvlm.model.parameters()]
    with trainable_only(lvlm.model, params):
        assert sum(p.requires_grad for p in lvlm.model.parameters()) == len(params)
    assert [p.requires_grad for p in lvlm.model.parameters()] == flags


@pytest.mark.parametrize("family", ["llava", "blip2-opt", "qwen2_vl"])
@pytest.mark.parametrize("query", [QUERY, Query("the quick brown", "fox")], ids=["image", "text"])
def test_overridden_weights_score_like_in_place_ones_and_leave_the_model_alone(family, query):
    lvlm = BUILDERS[family]()
    tracker = WeightTracker(lvlm.parameter_group("llm", layers=(-1,)))
    name = list(tracker.params)[-1]
    delta = torch.randn_like(tracker.params[name]) * 0.5
    new = (tracker.params[name].detach() + delta).requires_grad_(True)
    with torch.no_grad():
        unedited = lvlm.span_logits([query]).logits
    span = span_logits_with(lvlm, [query], {name: new})
    assert torch.equal(tracker.params[name], tracker._unedited[name])  # untouched
    span.logits.sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0  # the override is differentiable
    tracker.edit(add(tracker, {name: delta}))
    with torch.no_grad():
        in_place = lvlm.span_logits([query]).logits
    torch.testing.assert_close(span.logits.detach(), in_place, atol=1e-5, rtol=0)
    assert (in_place - unedited).abs().max() > 1e-3  # the override did change the answer's logits


def probe_scores(editor, records, root):
    """Answer-span log-probs of every metric probe of `records`, as plain floats."""
    queries = [p.query for r in records for p in edit_probes(r, root.open)]
    return [s.target_logprobs.tolist() for s in editor.score(queries)]


def _load_and_score_in_this_process(method, state, world, threads):
    """Child side of the round trip: a fresh model, the saved state, the same probes (JSON on stdout)."""
    torch.set_num_threads(threads)
    from editors import EditorState, create_editor
    from simulator.stream import ImageRoot, load_records
    from simulator.world.default import load_world_model
    from simulator.world.graph import WorldConfig

    root = ImageRoot(f"{world}/images")
    records = load_records(f"{world}/eval.jsonl", images=root)[:ROUND_TRIP_EDITS]
    editor = create_editor(method, load_world_model(WorldConfig(), progress=False))
    editor.load_state(EditorState.load(state))
    print(json.dumps(probe_scores(editor, records, root)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft-llm", "mend"])
def test_twenty_edits_saved_and_loaded_in_a_fresh_process_score_identically(method, default_world, tmp_path):
    lvlm, root, train, evals = default_world
    editor = create_editor(method, lvlm)
    if editor.trainable:
        editor.train([edit_example(r, root) for r in train[:16]], progress=False)
    records = evals[:ROUND_TRIP_EDITS]
    for record in records:
        assert editor.apply(edit_request(record, root)).applied
    expected = probe_scores(editor, records, root)
    editor.state().save(tmp_path / "state")
    editor.reset()
    assert probe_scores(editor, records, root) != expected  # the edits did change the scores
    world = root.root.parent
    child = (f"from tests.editors.test_weights import _load_and_score_in_this_process as run; "
             f"run({method!r}, {str(tmp_path / 'state')!r}, {str(world)!r}, {torch.get_num_threads()})")
    # A new process, forked from the zygote, which has imported modules and loaded no model.
    result = zygote.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                        cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
