"""SERAC: multimodal scope decision, calibration, routing to the counterfactual prompt, state."""

import json
from dataclasses import fields

import numpy as np
import pytest
import torch

from editors import EditExample, EditorState, EditRequest, Query, SpanScore, create_editor
from editors.prompts import in_context_prompt
from editors.serac import _calibrate
from monitor import ReferenceStore, aggregate, edit_probes, fill_references, measure
from simulator.requests import edit_example, edit_request
from tests.tiny_models import random_image, tiny_llava

DOG = EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), key="dog")
PARIS = EditRequest("what is the capital of France?", "Paris", random_image(12), key="paris")


def assert_same_scores(got: list[SpanScore], want: list[SpanScore]) -> None:
    """Every tensor of every span score equal bit for bit."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for field in fields(SpanScore):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert (x is None and y is None) or torch.equal(x, y), field.name


def test_calibration_picks_the_middle_of_the_widest_best_gap():
    assert _calibrate(np.array([0.9, 0.95, 1.0]), np.array([0.2, 0.5, 0.7])) == pytest.approx(0.8)
    # Overlap: cutting at 0.45 (one false hit) or at 0.775 (one miss) balance equally; the wider gap wins.
    threshold = _calibrate(np.array([0.6, 0.9, 0.95, 1.0]), np.array([0.1, 0.2, 0.3, 0.65]))
    assert threshold == pytest.approx(0.45)
    with pytest.raises(ValueError, match="cannot separate"):
        _calibrate(np.array([]), np.array([0.1]))


def test_key_similarity_mixes_text_and_image_and_text_only_queries_stay_out():
    editor = create_editor("serac", tiny_llava(seed=1), {"image_weight": 0.3})
    keys = editor.edits.keys
    a, b = keys.embed([DOG.prompt, PARIS.prompt], [DOG.image, PARIS.image])
    t = keys.text.embed([DOG.prompt, PARIS.prompt])
    i = keys.image.embed([DOG.image, PARIS.image])
    assert float(a @ b) == pytest.approx(0.7 * float(t[0] @ t[1]) + 0.3 * float(i[0] @ i[1]), abs=1e-5)
    text_only = keys.embed([DOG.prompt], [None])[0]
    assert float(text_only @ a) == pytest.approx(np.sqrt(0.7), abs=1e-5)


def test_in_scope_queries_get_the_edit_and_others_the_untouched_model():
    """Routing follows the key cosine (computed here from the keys); routed queries are scored as the
    base model with the edit in context, the others as the untouched base model, bit for bit."""
    lvlm = tiny_llava(seed=1)
    editor = create_editor("serac", lvlm, {"threshold": 0.99})
    editor.apply(DOG)
    editor.apply(PARIS)
    same = Query(DOG.prompt, "a brown dog", DOG.image)
    other_image = Query(DOG.prompt, "a brown dog", random_image(30))  # same question, another picture
    text_only = Query("the quick brown", "fox")
    routes = editor.retrieve([same, other_image, text_only])
    assert [r.key for r in routes] == ["dog", None, None]
    keys = editor.edits.embed([DOG, PARIS, other_image, text_only])
    assert routes[0].score == pytest.approx(1.0, abs=1e-5)
    assert routes[1].score == pytest.approx(float(keys[2] @ keys[0]), abs=1e-5)  # nearest is DOG, below 0.99
    assert routes[2].score == pytest.approx(float(max(keys[3] @ keys[0], keys[3] @ keys[1])), abs=1e-5)
    expected = [Query(in_context_prompt([(DOG.prompt, DOG.target)], same.prompt), same.answer, same.image),
                other_image, text_only]
    assert_same_scores(editor.score([same, other_image, text_only]), lvlm.score(expected))
    memoised = editor.score([other_image])[0]  # asked before: the score of its earlier batch, without a forward
    assert memoised is editor.score([same, other_image, text_only])[1]
    editor.clear_caches()  # asked afresh, alone: the untouched model's score bit for bit
    assert_same_scores(editor.score([other_image]), lvlm.score([other_image]))  # out of scope: the unedited model
    snapshot = editor.edits.memory.snapshot()
    assert (snapshot.hits, snapshot.misses) == (2, 6)  # score routed eight queries; retrieve only looked


def test_train_calibrates_and_the_state_keeps_it(tmp_path):
    examples = [
        EditExample(DOG, generality=(Query("which animal is in the picture?", "a brown dog", DOG.image),),
                    locality=(Query("the quick brown", "fox"), Query(DOG.prompt, "a cat", random_image(31)))),
        EditExample(PARIS, generality=(Query("which city is the capital of France?", "Paris", PARIS.image),),
                    locality=(Query("what colour is the mat?", "red"), Query(PARIS.prompt, "Lyon", random_image(32)))),
    ]
    editor = create_editor("serac", tiny_llava(seed=1), {"image_components": 3, "image_weight": 0.4})
    report = editor.train(examples, progress=False)
    assert report["threshold"] == editor.threshold and editor.threshold != editor.config.threshold
    assert (report["train_edits"], report["in_scope_queries"], report["out_of_scope_queries"]) == (2, 4, 4)
    vision = editor.edits.vision
    assert vision.projection.shape == (vision.token_dim, 3) and editor.edits.memory.dim == 384 + vision.tokens * 3
    assert editor.train(examples, progress=False) == report  # deterministic
    # The report's numbers, recomputed from the trained editor holding the same edits.
    editor.apply(DOG)
    editor.apply(PARIS)
    in_scope = [(q, e.edit.key) for e in examples for q in (e.edit.query, *e.generality)]
    inside = editor.retrieve([q for q, _ in in_scope])
    outside = editor.retrieve([q for e in examples for q in e.locality])
    assert report["train_recall_at_1"] == np.mean([r.key == key for r, (_, key) in zip(inside, in_scope)]) == 1.0
    assert report["train_false_hit_rate"] == np.mean([r.key is not None for r in outside]) == 0.0
    lowest_in, highest_out = min(r.score for r in inside), max(r.score for r in outside)
    assert report["in_scope_min_score"] == pytest.approx(lowest_in, abs=1e-6)
    assert report["out_of_scope_max_score"] == pytest.approx(highest_out, abs=1e-6)
    # Perfectly separated: the widest best gap is the one between the two sets, cut in its middle.
    assert report["threshold"] == pytest.approx((lowest_in + highest_out) / 2, abs=1e-6)
    with pytest.raises(RuntimeError, match="train SERAC before applying edits"):
        editor.train(examples, progress=False)
    editor.state().save(tmp_path / "s")
    fresh = create_editor("serac", tiny_llava(seed=1))
    fresh.load_state(EditorState.load(tmp_path / "s"))
    assert fresh.threshold == editor.threshold and fresh.config == editor.config
    np.testing.assert_array_equal(fresh.edits.vision.projection, editor.edits.vision.projection)
    queries = [Query(DOG.prompt, "a brown dog", DOG.image), Query(PARIS.prompt, "Paris", PARIS.image)]
    assert fresh.retrieve(queries) == editor.retrieve(queries)
    assert json.loads((tmp_path / "s" / "state.json").read_text())["meta"]["threshold"] == editor.threshold
    editor.reset()
    assert editor.memory_size() == 0 and editor.threshold == report["threshold"]
    assert editor.edits.vision.projection is not None  # trained parts survive reset


@pytest.mark.slow
def test_default_model_scope_is_decided_by_image_and_question(default_world):
    """On the default world: the calibrated threshold is the midpoint between in- and out-of-scope scores;
    every rephrasing finds its own edit as its nearest, in scope but for one creature's stray render, and outsiders
    none; routed answers are the edit's alt token by token (reliability and T-Gen exactly 1, I-Gen 39 of 40) and
    outsiders get the untouched model (locality exactly 1)."""
    lvlm, root, train, evals = default_world
    editor = create_editor("serac", lvlm)
    report = editor.train([edit_example(r, root) for r in train[:200]], progress=False)
    # Train-split separation is wide on the default world (in scope >= 0.89, out of scope <= 0.815).
    assert report["train_recall_at_1"] == 1.0 and report["train_false_hit_rate"] == 0.0
    assert report["threshold"] == pytest.approx(
        (report["in_scope_min_score"] + report["out_of_scope_max_score"]) / 2, abs=1e-6)
    records = evals[:120]  # 30 creatures x 4 relations: same images, same question templates
    store = ReferenceStore()
    probes = [edit_probes(r, root.open) for r in records]
    for p in probes:
        fill_references(editor, p, store)
    for r in records:
        editor.apply(edit_request(r, root))
    ids = [str(r.id) for r in records]
    rephrase = [Query(r.rephrase, r.alt, root.open(r.image)) for r in records]
    image_rephrase = [Query(r.src, r.alt, root.open(r.image_rephrase)) for r in records]
    # m_loc asks an edited question's exact template about a creature never edited: only the image says no.
    other_creature = [Query(r.m_loc_q, r.m_loc_a, root.open(r.m_loc)) for r in records]
    text_only = [Query(r.loc, r.loc_ans) for r in records]
    assert [x.key for x in editor.retrieve(rephrase)] == ids
    # Another render of the creature: its nearest edit is always its own, and it is in scope but for one creature
    # whose second render strays from its first (key cosine 0.72, against >= 0.89 for every train pair).
    assert [found[0].key for found in editor.edits.nearest(image_rephrase, 1)[1]] == ids
    routed = [x.key for x in editor.retrieve(image_rephrase)]
    missed = [i for i, key in enumerate(routed) if key is None]
    assert [ids[i] for i in missed] == ["eval-00195-food", "eval-00195-keeper"] and missed[0] < 40
    assert all(routed[i] == ids[i] for i in range(len(ids)) if i not in missed)
    assert all(x.key is None for x in editor.retrieve(other_creature + text_only))
    # What a routed query is scored as: the base model with its own edit stated in context; a missed one is
    # scored as the untouched model, which answers the old value.
    stated = [q if i in missed else Query(in_context_prompt([(r.src, r.alt)], q.prompt), q.answer, q.image)
              for i, (r, q) in enumerate(zip(records[:40], image_rephrase[:40]))]
    scores = editor.score(image_rephrase[:40])
    assert_same_scores(scores, lvlm.score(stated))
    # The alt, token by token, where routed
    assert [torch.equal(s.argmax_ids, s.target_ids) for s in scores] == [i not in missed for i in range(40)]
    results = aggregate(measure(editor, p, store) for p in probes[:40])
    assert results["reliability"] == results["t_gen"] == 1.0 and results["i_gen"] == 39 / 40  # one missed of 40
    assert results["t_loc"] == 1.0 and results["i_loc"] == 1.0  # out of scope: the untouched model
