"""Metric definitions: hand-checked numbers, and end-to-end on a tiny model with a real change."""

import math

import pytest
import torch

from editors import SpanScore, create_editor
from monitor import (
    METRICS,
    Reference,
    ReferenceStore,
    aggregate,
    base_probes,
    edit_probes,
    fill_references,
    get_metric,
    locality,
    measure,
    measure_base,
    token_accuracy,
    topk_kl,
    vlkeb_locality,
)
from simulator import parse_record
from tests.simulator.test_stream import vlkeb
from tests.tiny_models import random_image, tiny_llava


def span(argmax, target=None, topk=None, gathered=None, sequence=None):
    argmax = torch.tensor(argmax)
    return SpanScore(
        target_ids=torch.tensor(target) if target is not None else argmax,
        argmax_ids=argmax,
        target_logprobs=torch.zeros(len(argmax)),
        topk_ids=torch.tensor(topk) if topk is not None else argmax[:, None],
        topk_logprobs=torch.zeros(len(argmax), 1),
        entropy=torch.zeros(len(argmax)),
        gathered_logprobs=gathered,
        sequence_topk_ids=sequence,
    )


def test_every_design_key_is_defined_with_a_direction():
    design_keys = ["reliability", "t_gen", "i_gen", "t_loc", "i_loc", "port_1hop", "port_2hop", "port_3hop",
                   "port_4hop", "retention", "ref_ppl_ratio", "retrieval_recall_at_1", "retrieval_false_hit_rate"]
    assert set(design_keys) <= set(METRICS)
    assert not METRICS["retrieval_false_hit_rate"].higher_is_better and METRICS["reliability"].higher_is_better
    with pytest.raises(KeyError, match="Did you mean 'reliability'"):
        get_metric("reliabilty")


def test_token_accuracy_counts_answer_tokens():
    assert token_accuracy(span([5, 6, 9], target=[5, 6, 7])) == pytest.approx(2 / 3)


def test_topk_kl_is_exact_with_the_full_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    pre = torch.log_softmax(torch.randn(4, 12), -1)
    post = torch.log_softmax(torch.randn(4, 12), -1)
    exact = (pre.exp() * (pre - post)).sum(-1)
    order = pre.argsort(-1, descending=True)
    full = topk_kl(pre.gather(-1, order), post.gather(-1, order))
    torch.testing.assert_close(full, exact, atol=1e-5, rtol=0)
    top3 = topk_kl(pre.gather(-1, order[:, :3]), post.gather(-1, order[:, :3]))
    assert (top3 <= exact + 1e-6).all() and (top3 > 0).all()
    assert topk_kl(pre[:, :3], pre[:, :3]).abs().max() < 1e-6


def test_locality_compares_with_the_reference_not_the_target():
    reference = Reference(torch.tensor([[4, 1], [5, 2], [6, 3]], dtype=torch.int32), torch.log(torch.tensor([[0.6, 0.3]] * 3)))
    post = span([4, 9, 6], target=[7, 7, 7], gathered=torch.log(torch.tensor([[0.3, 0.6]] * 3)))
    agreement, kl = locality(post, reference)
    assert agreement == pytest.approx(2 / 3)
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6)  # the 0.1 tails are equal
    assert kl == pytest.approx(expected, abs=1e-5)


def test_vlkeb_locality_matches_rank_by_rank_on_the_common_tail():
    ref_seq = torch.tensor([[9, 9], [1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    post = span([0], sequence=torch.tensor([[1, 2], [3, 0], [5, 6]]))  # one position shorter
    reference = Reference(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1), ref_seq)
    assert vlkeb_locality(post, reference, k=1) == pytest.approx(1.0)
    assert vlkeb_locality(post, reference, k=2) == pytest.approx(5 / 6)


def test_aggregate_means_each_key_over_rows_that_have_it():
    rows = [{"reliability": 1.0, "port_1hop": 0.5}, {"reliability": 0.5}, {"reliability": 0.0, "port_1hop": 1.0}]
    assert aggregate(rows) == {"reliability": 0.5, "port_1hop": 0.75}


@pytest.fixture
def world(tmp_path):
    for rel in ("a/1.png", "a/2.png", "b/1.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        random_image(len(rel) + ord(rel[0])).save(tmp_path / rel)
    from simulator import ImageRoot

    return ImageRoot(tmp_path)


def test_measure_on_a_tiny_model_detects_a_real_weight_change(world):
    lvlm = tiny_llava(seed=3)
    editor = create_editor("none", lvlm)
    record = parse_record(vlkeb(), 1, images=world)
    probes = edit_probes(record, world.open)
    assert [p.metric for p in probes] == ["reliability", "t_gen", "i_gen", "t_loc", "i_loc", "port_1hop", "port_2hop"]
    store, full = ReferenceStore(), ReferenceStore()
    fill_references(editor, probes, store, vlkeb_compat=True)
    fill_references(editor, probes, full, top_k=lvlm.model.config.text_config.vocab_size)
    assert len(store) == 2

    unchanged = measure(editor, probes, store, vlkeb_compat=True)
    for key in ("t_loc", "i_loc", "t_loc_vlkeb", "i_loc_vlkeb"):
        assert unchanged[key] == 1.0
    assert unchanged["t_loc_kl"] < 1e-6 and unchanged["i_loc_kl"] < 1e-6
    expected = lvlm.score([probes[0].query])[0]
    assert unchanged["reliability"] == (expected.argmax_ids == expected.target_ids).float().mean().item()

    with torch.no_grad():  # a large change to the last decoder MLP must move locality
        for param in lvlm.parameter_group("llm").values():
            param.add_(torch.randn_like(param) * 2.0)
    changed = measure(editor, probes, store, vlkeb_compat=True)
    exact = measure(editor, probes, full)  # top-k over the whole vocabulary: the exact KL
    for key in ("t_loc_kl", "i_loc_kl"):
        assert 1e-4 < changed[key] <= exact[key] + 1e-6


def test_base_probes_score_the_original_answers(world):
    record = parse_record(vlkeb(), 1, images=world)
    probes = base_probes(record, world.open)
    assert [p.metric for p in probes] == ["pred_src", "pred_rephrase", "pred_image_rephrase", "loc", "m_loc",
                                          "port_1hop", "port_2hop"]
    assert probes[0].query.answer == "Eiffel Tower" and probes[2].query.image is not None
    values = measure_base(create_editor("none", tiny_llava()), probes)
    assert set(values) == {p.metric for p in probes} and all(0.0 <= v <= 1.0 for v in values.values())
    no_pred = parse_record({**vlkeb(), "pred": None}, 1)
    assert "pred_src" not in [p.metric for p in base_probes(no_pred, lambda _: random_image(0))]
