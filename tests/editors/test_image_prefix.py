"""Rows that show the same image after the same tokens share one forward of that prefix (`Family.shares_image_prefix`):
their scores equal those of the rows run whole, on every family that declares it, and a memo keeps the prefixes
only while the weights stand."""

import pytest
import torch

from editors import Query
from editors.adapter import ScoreMemo
from tests.tiny_models import BUILDERS, random_image, tiny


def _queries():
    first, second, third = random_image(41), random_image(42, (24, 20)), random_image(43, (18, 30))
    return [Query("what does the creature eat?", "red berries", first),
            Query("which food is eaten by the creature shown in this picture?", "red berries", first),
            Query("who keeps the creature?", "a tall keeper named Rolf", second),
            Query("where does the creature live?", "Paris", first),
            Query("what colour is it?", "green", second),
            Query("how old is the creature?", "seven years", third),  # its image alone: runs whole
            Query("which country is the city of Paris in?", "France")]


def _whole(lvlm, queries, monkeypatch, **kw):
    with monkeypatch.context() as patch:
        patch.setattr(type(lvlm.family), "shares_image_prefix", False)
        return lvlm.score(queries, **kw)


def _assert_same(mine, theirs):
    for a, b in zip(mine, theirs, strict=True):
        assert a.argmax_ids.tolist() == b.argmax_ids.tolist()
        assert a.topk_ids.tolist() == b.topk_ids.tolist()
        torch.testing.assert_close(a.target_logprobs, b.target_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=0)
        if b.gathered_logprobs is not None:
            torch.testing.assert_close(a.gathered_logprobs, b.gathered_logprobs, atol=1e-5, rtol=0)


def _counting(lvlm, monkeypatch) -> tuple[list, list]:
    """Prefixes computed, and decoder tokens of the scoring forwards (prefixes excluded)."""
    prefixes, tokens = [], []
    compute, forward = lvlm._compute_prefixes, lvlm._forward
    monkeypatch.setattr(lvlm, "_compute_prefixes", lambda keys, *a: prefixes.extend(keys) or compute(keys, *a))
    monkeypatch.setattr(lvlm, "_forward",
                        lambda batch, *a, **kw: tokens.append(batch.inputs["input_ids"].numel()) or forward(batch, *a, **kw))
    return prefixes, tokens


@pytest.mark.parametrize("family", list(BUILDERS))
def test_shared_prefixes_score_as_whole_rows(family, monkeypatch):
    lvlm = tiny(family)
    queries = _queries()
    gather = [None, torch.tensor([[5, 9]] * 2), None, None, torch.tensor([[3]]), None, None]
    prefixes, tokens = _counting(lvlm, monkeypatch)
    shared = lvlm.score(queries, top_k=4, gather=gather)
    if not (lvlm.family.shares_image_prefix and lvlm.family.shares_image_features):
        assert prefixes == []
        return
    assert sorted(len(ids) for _, ids in prefixes) == sorted(len(ids) for _, ids in set(prefixes))
    assert len(prefixes) == 2  # the first and second images; the third is shown once
    prefixed_tokens = sum(tokens)
    tokens.clear()
    whole = _whole(lvlm, queries, monkeypatch, top_k=4, gather=gather)
    assert prefixed_tokens < sum(tokens)
    _assert_same(shared, whole)
    # Scores over the whole sequence need every position's logits: rows run whole.
    prefixes.clear()
    lvlm.score(queries, top_k=4, sequence_top_k=2)
    assert prefixes == []


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_the_memo_keeps_prefixes_while_the_weights_stand(family, monkeypatch):
    lvlm = tiny(family)
    queries = _queries()
    memo = ScoreMemo()
    prefixes, _ = _counting(lvlm, monkeypatch)
    lvlm.score(queries, memo=memo)
    assert len(prefixes) == 2 and len(memo.prefixes) == 2
    # A new question about the first image alone continues the prefix the memo holds.
    later = [Query("is the creature asleep?", "no", queries[0].image)]
    _assert_same(lvlm.score(later, memo=memo), _whole(lvlm, later, monkeypatch))
    assert len(prefixes) == 2
    # A decoder weight changed in place (its version moves): the memo forgets, the prefix is computed again.
    weight = next(iter(lvlm.parameter_group("llm").values()))
    with torch.no_grad():
        weight.add_(0.0)
    again = [Query("is the creature awake?", "yes", queries[0].image), Query("is it awake?", "yes", queries[0].image)]
    _assert_same(lvlm.score(again, memo=memo), _whole(lvlm, again, monkeypatch))
    assert len(prefixes) == 3 and len(memo.prefixes) == 1


def test_prefixes_too_large_for_the_cache_are_computed_for_each_batch(monkeypatch):
    lvlm = tiny("llava")
    queries = _queries()
    memo = ScoreMemo(prefix_bytes=1)  # keeps none
    prefixes, tokens = _counting(lvlm, monkeypatch)
    scores = lvlm.score(queries, memo=memo, batch_size=2)
    assert len(memo.prefixes) == 0
    assert len(prefixes) > 2  # computed up front, then again for each batch that needs them
    _assert_same(scores, _whole(lvlm, queries, monkeypatch, batch_size=2))


def test_a_hooked_model_runs_every_row_whole(monkeypatch):
    """An editor's hook may rewrite activations where a row's prompt ends (GRACE, WISE): it must see whole rows."""
    lvlm = tiny("llava")
    prefixes, _ = _counting(lvlm, monkeypatch)
    layer = lvlm.model.get_submodule(lvlm.family.decoder_path).layers[0]
    handle = layer.register_forward_hook(lambda *a: None)
    try:
        lvlm.score(_queries())
    finally:
        handle.remove()
    assert prefixes == []
    lvlm.score(_queries())
    assert len(prefixes) == 2


# Bytes of keys and values per token at the published sizes in float32 (the meta models' dtype), by hand:
# 2 (keys, values) x layers x key-value heads x head dim x 4.
PUBLISHED_CACHE_BYTES = {
    "llava-hf/llava-1.5-7b-hf": 2 * 32 * 32 * 128 * 4,
    "llava-hf/llava-1.5-13b-hf": 2 * 40 * 40 * 128 * 4,
    "llava-hf/llava-v1.6-mistral-7b-hf": 2 * 32 * 8 * 128 * 4,  # grouped-query attention: 8 key-value heads
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": 2 * 28 * 4 * 128 * 4,  # Qwen2-7B: 4 key-value heads of 3584 / 28
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CACHE_BYTES))
def test_prefix_bytes_per_token_at_published_sizes(name):
    """What bounds a batch of prefixed rows, pinned at real dimensions on the meta device."""
    from tests.editors.test_published_sizes import meta_lvlm

    lvlm = meta_lvlm(name)
    assert lvlm.family.shares_image_prefix
    assert lvlm._cache_bytes_per_token() == PUBLISHED_CACHE_BYTES[name]
