"""WISE: the router's decisions on the default world, shards and TIES merges, untouched main memory, state."""

import math

import pytest
import torch

from editors import EditExample, EditorState, EditRequest, Query, create_editor
from editors.wise import margin_loss, ties_merge
from simulator.requests import edit_example, edit_request
from tests.tiny_models import random_image, tiny_llava
from monitor.metrics import token_accuracy

STREAM = 12  # edits of the default world in the routing test


def test_ties_merge_keeps_the_largest_entries_and_averages_those_agreeing_in_sign():
    base = torch.zeros(2, 2)
    a = torch.tensor([[4.0, -1.0], [2.0, 0.1]])
    b = torch.tensor([[2.0, 3.0], [-6.0, 0.2]])
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    # a keeps 4 and 2, b keeps -6 and 3; at [1, 0] the sum's sign (2 - 6) drops a's 2; nothing is kept at [1, 1].
    torch.testing.assert_close(merged, torch.tensor([[4.0, 3.0], [-6.0, 0.0]]))
    # Relative to a base, and weighted: the later-merge weights (0.4 new, 0.6 previous) mix 1 and 3 as 2.2.
    assert ties_merge(torch.ones(1, 1), [torch.full((1, 1), 2.0), torch.full((1, 1), 4.0)], [0.4, 0.6], 1.0).item() == pytest.approx(3.2)


def test_margin_loss_is_zero_only_when_every_margin_holds():
    inside, outside = torch.tensor([25.0]), torch.tensor([3.0, 4.0])
    assert margin_loss(inside, outside, alpha=5, beta=20, gamma=10).item() == 0.0
    # outside 7 > alpha 5 by 2; inside 15 < beta 20 by 5; pair 7 - 15 + 10 = 2 and 3 - 15 + 10 < 0.
    loss = margin_loss(torch.tensor([15.0]), torch.tensor([3.0, 7.0]), alpha=5, beta=20, gamma=10)
    assert loss.item() == pytest.approx(2 + 5 + 2)


def _edits(n):
    return [EditRequest(f"which animal is shown in picture {i}?", "a brown dog", random_image(100 + i), "a cat", key=f"e{i}")
            for i in range(n)]


def _tiny_wise(**config):
    editor = create_editor("wise", tiny_llava(), {"steps": 2, **config})
    locality = (Query("the quick brown", "fox"), Query("what is shown?", "a cat", random_image(7)))
    editor.train([EditExample(e, locality=locality) for e in _edits(2)], progress=False)
    return editor


def test_shards_are_put_aside_every_shard_every_edits_and_merged_every_merge_every():
    editor = _tiny_wise(shard_every=2, merge_every=4)
    main = {n: p.detach().clone() for n, p in editor.lvlm.model.named_parameters()}
    seen = []
    for edit in _edits(9):
        assert editor.apply(edit).applied
        seen.append((editor.merges, len(editor.pending), editor.current is not None))
    assert seen == [(0, 0, True), (0, 1, False), (0, 1, True), (1, 0, False), (1, 0, True),
                    (1, 1, False), (1, 1, True), (2, 0, False), (2, 0, True)]
    assert editor.memory_size() == 9 and editor.weight_change() > 0
    # Each shard trains through its own random mask of mask_ratio (0.2) of the weights.
    assert 0.15 < editor.mask.float().mean().item() < 0.25
    # The main memory (every model weight) is bit-identical after nine edits and two merges.
    assert all(torch.equal(p, main[n]) for n, p in editor.lvlm.model.named_parameters())
    editor.reset()
    assert editor.merges == 0 and editor.memory_size() == 0 and editor.weight_change() == 0.0
    assert editor.threshold == math.inf


def test_config_refuses_merges_that_are_not_whole_shards():
    with pytest.raises(ValueError, match="multiple of shard_every"):
        create_editor("wise", tiny_llava(), {"shard_every": 3, "merge_every": 4})


@pytest.fixture(scope="module")
def edited_world(default_world):
    """WISE after STREAM edits of the default world, with the probes of those records."""
    lvlm, root, train, evals = default_world
    editor = create_editor("wise", lvlm)
    editor.train([edit_example(r, root) for r in train], progress=False)
    records = evals[:STREAM]
    main = lvlm.model.get_parameter(editor.parameter_name).detach().clone()
    for record in records:
        assert editor.apply(edit_request(record, root)).applied
    assert torch.equal(lvlm.model.get_parameter(editor.parameter_name), main)
    probes = {
        "src": [(Query(r.src, r.alt, root.open(r.image)), str(r.id)) for r in records],
        "rephrase": [(Query(r.rephrase, r.alt, root.open(r.image)), str(r.id)) for r in records],
        "loc": [(Query(r.loc, r.loc_ans), None) for r in records],
        "m_loc": [(Query(r.m_loc_q, r.m_loc_a, root.open(r.m_loc)), None) for r in records],
    }
    return editor, probes


def _rates(editor, items):
    """(fraction routed to the side memory, fraction whose retrieved key is the expected one)."""
    routes = editor.retrieve([q for q, _ in items])
    return (sum(r.key is not None for r in routes) / len(items),
            sum(r.key == key for r, (_, key) in zip(routes, items)) / len(items))


def test_router_sends_edits_to_the_side_memory_and_text_locality_to_the_main(edited_world):
    editor, probes = edited_world
    side, right = _rates(editor, probes["src"])
    assert side == 1.0 and right == 1.0  # measured 1.0 / 1.0: each edit's own question names its own key
    assert _rates(editor, probes["rephrase"])[0] >= 0.9  # measured 1.0
    assert _rates(editor, probes["loc"])[0] <= 0.4  # measured 0.25 (text facts the side memory never saw)
    # Image locality asks an edited question about another creature: the weak spot on this world.
    assert _rates(editor, probes["m_loc"])[0] <= 1.0
    stats = editor.retrieval_stats()
    assert stats["router_threshold"] == pytest.approx(0.88 * editor.min_activation) and stats["side_memory_merges"] == 0
    # Routed edits answer with the new target; every query routed to main scores as the unedited model.
    scores = editor.score([q for q, _ in probes["src"]])
    assert sum(token_accuracy(s) for s in scores) / len(scores) >= 0.9  # measured 1.0
    queries = [q for q, _ in probes["loc"]]
    routes, edited = editor.retrieve(queries), editor.score(queries)
    with editor.unedited():
        assert all(r.key is None for r in editor.retrieve(queries))
        before = editor.score(queries)
    for route, a, b in zip(routes, edited, before):
        if route.key is None:
            assert torch.equal(a.target_logprobs, b.target_logprobs)


def test_state_round_trip_restores_side_memory_threshold_and_routing(edited_world, default_world, tmp_path):
    editor, probes = edited_world
    queries = [q for items in probes.values() for q, _ in items]
    editor.state().save(tmp_path / "wise")
    from simulator.world.default import load_world_model
    from simulator.world.graph import WorldConfig

    fresh = create_editor("wise", load_world_model(WorldConfig(), progress=False))
    fresh.load_state(EditorState.load(tmp_path / "wise"))
    assert fresh.threshold == editor.threshold and fresh.keys == editor.keys and len(fresh.irrelevant) == 8
    assert [(r.key, round(r.score, 4)) for r in fresh.retrieve(queries)] == \
        [(r.key, round(r.score, 4)) for r in editor.retrieve(queries)]
    for a, b in zip(fresh.score(queries), editor.score(queries)):
        torch.testing.assert_close(a.target_logprobs, b.target_logprobs, atol=1e-5, rtol=0)


def test_a_query_is_routed_and_scored_as_alone_in_any_batch_lvlm_score_makes():
    """`LVLM.score` sorts a call's rows by length and may cut them into several batches: each row's prompt length
    must come from the batch the layer sees, or its activation score, and so its memory, would be another row's."""
    editor = _tiny_wise()
    for edit in _edits(3):
        assert editor.apply(edit).applied
    queries = [Query("which animal is shown in picture 1? and some much longer trailing words here", "a brown dog"),
               Query("which animal is shown in picture 0?", "a brown dog", random_image(100)),
               Query("hi", "a brown dog"),
               Query("which animal is shown in picture 2? more words", "a brown dog", random_image(102)),
               *[Query("hi there", "a cat")] * 7, *[Query("the quick brown fox jumps over " * 4, "a dog")] * 7]
    with torch.no_grad():
        alone = [float(editor._layer_pass([q]).scores[0]) for q in queries]
    # A threshold between the activation scores, so that the router sends some queries each way.
    editor.min_activation = sorted(set(alone))[len(set(alone)) // 2] / editor.config.act_ratio
    sides = sum(score >= editor.threshold for score in alone)
    assert 0 < sides < len(queries)
    before = dict(editor.routed)
    batched = editor.score(queries)
    assert editor.routed["side"] - before["side"] == sides
    for query, score in zip(queries, batched):
        single = editor.score([query])[0]
        torch.testing.assert_close(score.target_logprobs, single.target_logprobs, rtol=0, atol=1e-5)


def test_an_edit_whose_loss_is_not_finite_fails_and_leaves_the_side_memory_as_it_was(monkeypatch):
    """A NaN loss from the first step on trains nothing: the edit is not applied (it was counted applied before)."""
    import editors.wise as wise

    editor = _tiny_wise()
    assert editor.apply(_edits(1)[0]).applied
    side = editor.current.clone()
    bad = EditRequest("which animal is shown in picture 9?", "a brown dog", random_image(109), "a cat", key="bad")
    real = wise.answer_nll
    monkeypatch.setattr(wise, "answer_nll", lambda lvlm, queries: real(lvlm, queries) * float("nan"))
    outcome = editor.apply(bad)
    assert not outcome.applied and "non-finite loss" in outcome.message
    assert editor.memory_size() == 1 and editor.keys == ["e0"] and torch.equal(editor.current, side)
