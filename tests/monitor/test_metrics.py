"""Metric definitions: numbers worked out by hand, and on a tiny model against its own forward pass.

Nothing here computes an expected value through `LVLM.score` (the path the metrics read): the
end-to-end tests build the model inputs with the tokenizer and transformers' own LLaVA processor,
call `model(**inputs).logits`, and take argmax / log-softmax at the answer positions themselves.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from editors import LVLM, Query, SpanScore, create_editor
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
from simulator import ImageRoot, parse_record
from tests.simulator.test_stream import vlkeb
from tests.tiny.llava import reference_inputs
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
    """DESIGN.md's metric keys all exist, with the right direction, and a typo names the closest key."""
    design_keys = ["reliability", "t_gen", "i_gen", "t_loc", "i_loc", "port_1hop", "port_2hop", "port_3hop",
                   "port_4hop", "retention", "ref_ppl_ratio", "retrieval_recall_at_1", "retrieval_false_hit_rate"]
    assert set(design_keys) <= set(METRICS)
    assert not METRICS["retrieval_false_hit_rate"].higher_is_better and METRICS["reliability"].higher_is_better
    with pytest.raises(KeyError, match="Did you mean 'reliability'"):
        get_metric("reliabilty")


@pytest.mark.parametrize(
    ("argmax", "target", "hits"),
    [([5, 6, 9], [5, 6, 7], 2), ([1, 2, 3, 4], [1, 2, 3, 4], 4), ([1, 2, 3, 4], [4, 3, 2, 1], 0),
     ([7, 2, 2, 2], [7, 1, 1, 1], 1), ([3], [3], 1)],
)
def test_token_accuracy_is_the_fraction_of_answer_tokens_predicted_top1(argmax, target, hits):
    """k of n answer positions right -> exactly k/n (position by position, not as sets)."""
    assert token_accuracy(span(argmax, target=target)) == pytest.approx(hits / len(target), abs=1e-7)


def test_token_accuracy_is_bit_for_bit_the_float32_mean_of_the_matches():
    """Counted on the host, k of n is the very float a float32 mean on torch gives, for every k <= n <= 64: the
    values a run records do not move with how they are counted."""
    for n in range(1, 65):
        for k in range(n + 1):
            score = span(list(range(n)), target=[i if i < k else -1 for i in range(n)])
            assert token_accuracy(score) == (score.argmax_ids == score.target_ids).float().mean().item()


# Three-token vocabulary, one position: p = pre-edit, q = post-edit (ids sorted by p).
P = torch.tensor([[0.5, 0.3, 0.2]])
Q = torch.tensor([[0.2, 0.3, 0.5]])
EXACT = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.3) + 0.2 * math.log(0.2 / 0.5)  # 0.274887
TOP1 = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)  # ids {0} + one bucket {1, 2}: 0.223144


def test_topk_kl_by_hand_on_a_three_token_vocabulary():
    """k = 3 (whole vocabulary) and k = 2 (the rest is one token) are exact; k = 1 is strictly below."""
    logp, logq = P.log(), Q.log()
    assert EXACT == pytest.approx(0.274887, abs=1e-6) and TOP1 == pytest.approx(0.223144, abs=1e-6)
    assert topk_kl(logp, logq).item() == pytest.approx(EXACT, abs=1e-6)
    assert topk_kl(logp[:, :2], logq[:, :2]).item() == pytest.approx(EXACT, abs=1e-6)
    top1 = topk_kl(logp[:, :1], logq[:, :1]).item()
    assert top1 == pytest.approx(TOP1, abs=1e-6)
    assert EXACT - top1 > 0.05  # a strict lower bound here, not equality
    # Dropping the rest bucket would give 0.458, above the exact KL: no longer a bound at all.
    assert 0.5 * math.log(0.5 / 0.2) > EXACT
    assert topk_kl(logp, logp).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_kl_on_random_distributions_is_exact_with_the_whole_vocabulary_and_strictly_below_with_top3():
    """Per position: the full sort gives torch's KL; top-3 gives the coarsened KL computed here, below it."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.log_softmax(torch.randn(4, 12, generator=generator), -1)
    post = torch.log_softmax(torch.randn(4, 12, generator=generator), -1)
    exact = (pre.exp() * (pre - post)).sum(-1)
    torch.testing.assert_close(exact, torch.nn.functional.kl_div(post, pre, log_target=True, reduction="none").sum(-1))
    order = pre.argsort(-1, descending=True)
    torch.testing.assert_close(topk_kl(pre.gather(-1, order), post.gather(-1, order)), exact, atol=1e-5, rtol=0)
    p, q = pre.exp().gather(-1, order[:, :3]), post.exp().gather(-1, order[:, :3])
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    coarse = (p * (p / q).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    top3 = topk_kl(pre.gather(-1, order[:, :3]), post.gather(-1, order[:, :3]))
    torch.testing.assert_close(top3, coarse, atol=1e-5, rtol=0)
    assert ((exact - top3) > 1e-3).all()


def test_locality_compares_with_the_reference_not_the_target():
    """Agreement counts post argmax == pre top-1 (2 of 3, whatever the target); KL includes the rest bucket."""
    ids = torch.tensor([[4, 1], [5, 2], [6, 3]], dtype=torch.int32)
    reference = Reference(ids, torch.log(torch.tensor([[0.6, 0.3]] * 3)))
    post = span([4, 9, 6], target=[7, 7, 7], gathered=torch.log(torch.tensor([[0.3, 0.6]] * 3)))
    agreement, kl = locality(post, reference)
    assert agreement == pytest.approx(2 / 3, abs=1e-7)
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6)  # the 0.1 tails are equal
    assert kl == pytest.approx(expected, abs=1e-5)
    # Unequal tails: post keeps 0.4 outside the reference's top-2, pre 0.1.
    post = span([4, 5, 6], gathered=torch.log(torch.tensor([[0.3, 0.3]] * 3)))
    agreement, kl = locality(post, reference)
    assert agreement == 1.0
    assert kl == pytest.approx(0.6 * math.log(0.6 / 0.3) + 0.1 * math.log(0.1 / 0.4), abs=1e-5)


def test_localities_of_many_pairs_are_bit_for_bit_each_pair_alone():
    """One KL pass over pairs of several lengths and two top-k widths gives each pair the floats it gets alone."""
    from monitor.metrics import localities

    generator = torch.Generator().manual_seed(1)
    pairs = []
    for rows, width in [(1, 10), (3, 10), (2, 4), (5, 10), (1, 4), (4, 10)]:
        pre = torch.log_softmax(torch.randn(rows, 30, generator=generator) * 2, -1).topk(width, -1)
        post = torch.log_softmax(torch.randn(rows, 30, generator=generator) * 2, -1)
        argmax = [int(pre.indices[i, 0]) if i % 2 == 0 else int(post[i].argmax()) for i in range(rows)]
        pairs.append((span(argmax, gathered=post.gather(-1, pre.indices)), Reference(pre.indices.int(), pre.values)))
    alone = [((s.argmax_ids == r.topk_ids[:, 0].long()).float().mean().item(),
              topk_kl(r.topk_logprobs, s.gathered_logprobs).mean().item()) for s, r in pairs]
    assert localities(pairs) == alone
    assert len({kl for _, kl in alone}) == len(alone) and any(0 < agreement < 1 for agreement, _ in alone)
    # Rows joined in one pass must pair up: a reference of two rows against log-probs of one is refused, not broadcast.
    score, reference = pairs[1]
    with pytest.raises(ValueError, match=r"\(3, 10\) against the reference's \(2, 10\)"):
        localities([pairs[0], (score, Reference(reference.topk_ids[:2], reference.topk_logprobs[:2]))])


def test_vlkeb_locality_matches_rank_by_rank_on_the_common_tail():
    """Sequences of unequal length are aligned at their ends; k = 2 counts 5 of 6 (rank, position) pairs."""
    ref_seq = torch.tensor([[9, 9], [1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    post = span([0], sequence=torch.tensor([[1, 2], [3, 0], [5, 6]]))  # one position shorter
    reference = Reference(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1), ref_seq)
    assert vlkeb_locality(post, reference, k=1) == pytest.approx(1.0)
    assert vlkeb_locality(post, reference, k=2) == pytest.approx(5 / 6)


def test_aggregate_means_each_key_over_rows_that_have_it():
    """A key missing from a row does not count as 0 for that row."""
    rows = [{"reliability": 1.0, "port_1hop": 0.5}, {"reliability": 0.5}, {"reliability": 0.0, "port_1hop": 1.0}]
    assert aggregate(rows) == {"reliability": 0.5, "port_1hop": 0.75}


# -- on a tiny model, against its own forward pass --------------------------------------------

PLAIN = "Question: {prompt} Short answer:"  # MMEdit's E-VQA template: editwatch's plain prompt format
LLAVA_IMAGE = "<image>\n"  # where a LLaVA plain prompt puts the image


@dataclass
class HandScore:
    """One query scored by hand: T answer tokens, L sequence positions, V vocabulary."""

    logprobs: torch.Tensor  # (T, V) log-softmax of the logits that predict each answer token
    targets: torch.Tensor  # (T,) the answer's token ids
    sequence: torch.Tensor  # (L, V) logits at every position of prompt + answer

    @property
    def hits(self) -> int:
        return int((self.logprobs.argmax(-1) == self.targets).sum())


def _inputs(lvlm: LVLM, text: str, image) -> dict[str, torch.Tensor]:
    if image is None:
        return dict(lvlm.inputs.tokenizer(text, return_tensors="pt"))
    return reference_inputs(lvlm, LLAVA_IMAGE + text, image)  # transformers' LlavaProcessor expands the image


@torch.no_grad()
def by_hand(lvlm: LVLM, query: Query) -> HandScore:
    """Teacher-forced: input = prompt + " " + answer; the answer tokens are those after the prompt's,
    less a lone "▁" (the separating space, when the answer's first word is not in the vocabulary)."""
    tokenizer = lvlm.inputs.tokenizer
    prompt = PLAIN.format(prompt=query.prompt)
    full = _inputs(lvlm, f"{prompt} {query.answer}", query.image)
    ids, prompt_ids = full["input_ids"][0], _inputs(lvlm, prompt, query.image)["input_ids"][0]
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)  # the answer only appends tokens
    start = len(prompt_ids) + (tokenizer.convert_ids_to_tokens(int(ids[len(prompt_ids)])) == "▁")
    logits = lvlm.model(**full).logits[0].float()  # (L, V)
    return HandScore(logits[start - 1 : len(ids) - 1].log_softmax(-1), ids[start:], logits)


@torch.no_grad()
def greedy_words(lvlm: LVLM, prompt: str, image, most: int = 3) -> str:
    """The model's own greedy answer, as far as it is made of whole words (tokens starting with "▁")."""
    inputs = _inputs(lvlm, PLAIN.format(prompt=prompt), image)
    words = []
    for _ in range(most):
        ids = inputs["input_ids"]
        token = int(lvlm.model(**{**inputs, "attention_mask": torch.ones_like(ids)}).logits[0, -1].argmax())
        piece = lvlm.inputs.tokenizer.convert_ids_to_tokens(token)
        if not piece.startswith("▁") or len(piece) == 1:
            break
        words.append(piece[1:])
        inputs = {**inputs, "input_ids": torch.cat([ids, torch.tensor([[token]])], 1)}
    assert len(words) >= 2, f"the tiny model's greedy answer starts with too few whole words: {words}"
    return " ".join(words)


def kl_exact(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Mean over positions of KL(pre || post) over the whole vocabulary, from log-probs (T, V)."""
    return float((pre.exp() * (pre - post)).sum(-1).mean())


def kl_top_k(pre: torch.Tensor, post: torch.Tensor, k: int) -> float:
    """The same over the pre-edit top-k ids plus one bucket holding the rest of the vocabulary."""
    ids = pre.topk(k, -1).indices
    p, q = pre.exp().gather(-1, ids), post.exp().gather(-1, ids)
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    return float(((p * (p / q).log()).sum(-1) + p_rest * (p_rest / q_rest).log()).mean())


@pytest.fixture
def world(tmp_path):
    """Three different noise images under an image root."""
    for seed, rel in ((104, "a/1.png"), (205, "a/2.png"), (306, "b/1.png")):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        random_image(seed).save(tmp_path / rel)
    return ImageRoot(tmp_path)


def test_measure_equals_the_models_own_forward_before_and_after_a_real_weight_change(world):
    """Token accuracies are the k/n of a hand forward pass; locality, KL and VLKEB locality too, after
    a real change to the decoder MLP; the top-10 KL is the coarsened value, strictly below the exact KL."""
    lvlm = tiny_llava(seed=2)
    answer = greedy_words(lvlm, vlkeb()["src"], world.open("a/1.png"))  # reliability 1 by construction
    record = parse_record(vlkeb(alt=answer), 1, images=world)
    editor = create_editor("none", lvlm)
    probes = edit_probes(record, world.open)
    assert [p.metric for p in probes] == ["reliability", "t_gen", "i_gen", "t_loc", "i_loc", "port_1hop", "port_2hop"]
    vocab = lvlm.model.config.text_config.vocab_size
    store, full = ReferenceStore(), ReferenceStore()
    fill_references(editor, probes, store, vlkeb_compat=True)  # top-10, and sequence top-10
    fill_references(editor, probes, full, top_k=vocab)  # the whole vocabulary: exact KL
    assert len(store) == 2
    before = {p.metric: by_hand(lvlm, p.query) for p in probes}
    accuracy = {m: (s.hits, len(s.targets)) for m, s in before.items() if m not in ("t_loc", "i_loc")}
    assert accuracy["reliability"][0] == accuracy["reliability"][1] == len(answer.split())
    assert len({k / n for k, n in accuracy.values()}) > 1  # not all equal: a constant would not pass

    unchanged = measure(editor, probes, store, vlkeb_compat=True)
    for metric, (k, n) in accuracy.items():
        assert unchanged[metric] == pytest.approx(k / n, abs=1e-7), metric
    for key in ("t_loc", "i_loc", "t_loc_vlkeb", "i_loc_vlkeb"):
        assert unchanged[key] == 1.0
    assert abs(unchanged["t_loc_kl"]) < 1e-6 and abs(unchanged["i_loc_kl"]) < 1e-6

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a change to the last decoder MLP, small enough to leave some answers right
        for param in lvlm.parameter_group("llm").values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.04)
    after = {p.metric: by_hand(lvlm, p.query) for p in probes}
    changed = measure(editor, probes, store, vlkeb_compat=True)
    exact = measure(editor, probes, full)
    for metric, k in (("t_loc", 1), ("i_loc", 10)):
        pre, post = before[metric], after[metric]
        agree = int((post.logprobs.argmax(-1) == pre.logprobs.argmax(-1)).sum())
        assert changed[metric] == pytest.approx(agree / len(pre.targets), abs=1e-7)
        true_kl, coarse_kl = kl_exact(pre.logprobs, post.logprobs), kl_top_k(pre.logprobs, post.logprobs, 10)
        # A batched forward and a one-row one round differently: a KL of ~1e-3 moves by ~1e-6 (1.4e-3 of it on one
        # CPU); the top-10 one is below half of it.
        assert exact[f"{metric}_kl"] == pytest.approx(true_kl, rel=1e-2)
        assert changed[f"{metric}_kl"] == pytest.approx(coarse_kl, rel=1e-3)
        assert coarse_kl < true_kl / 2  # top-10 of the vocabulary: a strict lower bound, well below here
        # VLKEB: top-k ids rank by rank at every position of the sequence (k = 1 text, 10 image).
        same = post.sequence.topk(k, -1).indices == pre.sequence.topk(k, -1).indices
        assert changed[f"{metric}_vlkeb"] == pytest.approx(same.float().mean().item(), abs=1e-7)
    for metric in accuracy:
        assert changed[metric] == pytest.approx(after[metric].hits / len(after[metric].targets), abs=1e-7)
    # The case discriminates: some agreement lost but not all, reliability neither 0 nor 1 any more.
    assert 0.0 < changed["t_loc"] < 1.0 and 0.0 < changed["reliability"] < 1.0


def test_base_probes_score_the_original_answers(world):
    """measure_base is the hand forward's k/n on the original answers (`pred` on src, rephrase, image rephrase)."""
    lvlm = tiny_llava(seed=2)
    pred = greedy_words(lvlm, vlkeb()["src"], world.open("a/1.png"))
    record = parse_record(vlkeb(pred=pred), 1, images=world)
    probes = base_probes(record, world.open)
    assert [p.metric for p in probes] == ["pred_src", "pred_rephrase", "pred_image_rephrase", "loc", "m_loc",
                                          "port_1hop", "port_2hop"]
    assert probes[0].query.answer == pred and probes[2].query.image is world.open("a/2.png")
    values = measure_base(create_editor("none", lvlm), probes)
    expected = {p.metric: by_hand(lvlm, p.query) for p in probes}
    assert set(values) == set(expected)
    for metric, score in expected.items():
        assert values[metric] == pytest.approx(score.hits / len(score.targets), abs=1e-7), metric
    assert values["pred_src"] == 1.0  # the model's own greedy answer
    no_pred = parse_record({**vlkeb(), "pred": None}, 1)
    assert "pred_src" not in [p.metric for p in base_probes(no_pred, lambda _: random_image(0))]


def test_a_runs_rounds_reduce_by_each_metrics_aggregation():
    """mean for retrieval latency, last for retention, max for the alarms; per-edit and unknown keys ignored."""
    from monitor.metrics import reduce_rounds

    rows = [{"retention": 0.5, "retrieval_latency_seconds": 0.25, "collapse_alarm": 0.0, "reliability": 1.0, "x": 3},
            {"retention": 0.25, "retrieval_latency_seconds": 0.75, "collapse_alarm": 1.0, "alarms": ["a"]},
            {"retention": 0.125, "collapse_alarm": 0.0}]
    assert reduce_rounds(rows) == {"retention": 0.125, "retrieval_latency_seconds": 0.5, "collapse_alarm": 1.0}
    # A final NaN (null in the rounds file) is the run's value, not hidden behind an older finite one.
    rows.append({"ref_ppl_ratio": None, "retention": None})
    rows[0]["ref_ppl_ratio"] = 1.5
    reduced = reduce_rounds(rows)
    assert math.isnan(reduced["ref_ppl_ratio"]) and math.isnan(reduced["retention"])
