"""Rows that show the same image after the same tokens share one forward of that prefix (`Family.shares_image_prefix`):
their scores equal those of the rows run whole, on every family that declares it, and a memo keeps the prefixes
only while the weights stand."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editors import LVLM, Query, adapter
from editors.adapter import SpanScore
from editors.adapter import ScoreMemo
from editors.inputs import Encoded
from editors.prefixes import Unit, bytes_per_token, merge, pack_layout, prefix_cache, shared_prefixes
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


def _whole(lvlm: LVLM, queries: list[Query], monkeypatch: pytest.MonkeyPatch, **kw) -> list[SpanScore]:
    with monkeypatch.context() as patch:
        patch.setattr(type(lvlm.family), "shares_image_prefix", False)
        return lvlm.score(queries, **kw)


def _assert_same(mine: list[SpanScore], theirs: list[SpanScore]) -> None:
    for a, b in zip(mine, theirs, strict=True):
        assert a.argmax_ids.tolist() == b.argmax_ids.tolist()
        assert a.topk_ids.tolist() == b.topk_ids.tolist()
        torch.testing.assert_close(a.target_logprobs, b.target_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=0)
        if b.gathered_logprobs is not None:
            torch.testing.assert_close(a.gathered_logprobs, b.gathered_logprobs, atol=1e-5, rtol=0)


def _counting(lvlm: LVLM, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Prefixes computed, and decoder tokens of each forward (new prefixes in a pack or in forwards of their own)."""
    prefixes, tokens = [], []
    layout, score_batch = adapter.pack_layout, lvlm._score_batch

    def packed(*args, **kwargs):
        out = layout(*args, **kwargs)
        prefixes.extend(key for key, _, _ in out.computed)
        tokens.append(out.input_ids.numel())
        return out

    monkeypatch.setattr(adapter, "pack_layout", packed)
    compute = lvlm._compute_prefixes
    monkeypatch.setattr(lvlm, "_compute_prefixes", lambda keys, *a: prefixes.extend(keys) or tokens.append(
        sum(len(ids) for _, ids in keys)) or compute(keys, *a))
    monkeypatch.setattr(lvlm, "_score_batch", lambda batch, *a, **kw:
                        tokens.append(batch.inputs["input_ids"].numel()) or score_batch(batch, *a, **kw))
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
    prefixes, tokens = _counting(lvlm, monkeypatch)
    lvlm.score(queries, memo=memo)
    assert len(prefixes) == 2 and len(memo.prefixes) == 2
    # A new question about the first image alone continues the prefix the memo holds (up to its last answer token,
    # which predicts nothing read).
    later = [Query("is the creature asleep?", "no", queries[0].image)]
    tokens.clear()
    continued = lvlm.score(later, memo=memo)
    assert len(prefixes) == 2 and tokens == [len(lvlm.inputs.encode(later[0]).input_ids) - len(prefixes[0][1]) - 1]
    _assert_same(continued, _whole(lvlm, later, monkeypatch))
    # A decoder weight changed in place (its version moves): the memo forgets, the prefix is computed again from the
    # new weights.
    weight = next(iter(lvlm.parameter_group("llm").values()))
    saved = weight.detach().clone()
    again = [Query("is the creature awake?", "yes", queries[0].image), Query("is it awake?", "yes", queries[0].image)]
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        changed = lvlm.score(again, memo=memo)
        assert len(prefixes) == 3 and len(memo.prefixes) == 1
        _assert_same(changed, _whole(lvlm, again, monkeypatch))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert changed[0].target_logprobs.tolist() != lvlm.score(again[:1])[0].target_logprobs.tolist()


def _prefix_bytes(lvlm: LVLM, query: Query) -> int:
    """What one prefix of `query`'s image costs in the cache."""
    ids = lvlm.inputs.encode(query).input_ids
    end = len(ids) - ids[::-1].index(lvlm.inputs.image_token_id)
    return end * bytes_per_token(lvlm.model.config, lvlm.dtype)


def test_a_prefix_the_cache_dropped_is_computed_again_in_the_pack_of_its_rows(monkeypatch):
    lvlm = tiny("llava")
    images = [random_image(50 + i) for i in range(6)]

    def ask(*questions: str) -> list[Query]:
        return [Query(q, "yes", image) for image in images for q in questions]

    memo = ScoreMemo(prefix_bytes=4 * _prefix_bytes(lvlm, ask("is it here?")[0]))  # four prefixes
    prefixes, tokens = _counting(lvlm, monkeypatch)
    columns = []
    layout = adapter.pack_layout
    monkeypatch.setattr(adapter, "pack_layout", lambda packs, *a: columns.append(
        [unit.key for units in packs for unit in units if unit.held]) or layout(packs, *a))
    first = lvlm.score(ask("is it here?", "is it there now?"), memo=memo)
    assert len(prefixes) == 6 and len(memo.prefixes) == 4  # each computed once, in its rows' pack
    # The two pushed out are computed again; the four held are handed on, at most two a forward (half the cache's
    # bound), even where an earlier forward's new prefixes push them out of the cache meanwhile.
    later = ask("is it near?", "is it far away now?")
    columns.clear()
    scores = lvlm.score(later, memo=memo)
    assert len(prefixes) == 8 and set(prefixes[6:]) < set(prefixes[:6])
    held = [key for forward in columns for key in forward]
    assert len(held) == 4 and set(held).isdisjoint(prefixes[6:]) and max(map(len, columns)) <= 2
    assert len(memo.prefixes) == 4
    _assert_same(first, _whole(lvlm, ask("is it here?", "is it there now?"), monkeypatch))
    _assert_same(scores, _whole(lvlm, later, monkeypatch))


def test_rows_run_whole_where_the_cache_fits_fewer_than_two_rows_prefixes(monkeypatch):
    lvlm = tiny("llava")
    queries = _queries()
    memo = ScoreMemo(prefix_bytes=4 * _prefix_bytes(lvlm, queries[0]) - 1)
    prefixes, tokens = _counting(lvlm, monkeypatch)
    scores = lvlm.score(queries, memo=memo)
    assert prefixes == [] and len(tokens) == 1  # one batch of whole rows, as without sharing
    _assert_same(scores, _whole(lvlm, queries, monkeypatch))


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hooked_model_runs_every_row_whole(kind, monkeypatch):
    """An editor's hook may rewrite activations where a row's prompt ends (GRACE, WISE): it must see whole rows."""
    lvlm = tiny("llava")
    prefixes, _ = _counting(lvlm, monkeypatch)
    layer = lvlm.model.get_submodule(lvlm.family.decoder_path).layers[0]
    handle = getattr(layer, f"register_{kind}_hook")(lambda *a: None)
    try:
        lvlm.score(_queries())
    finally:
        handle.remove()
    assert prefixes == []
    lvlm.score(_queries())
    assert len(prefixes) == 2


def test_rows_longer_than_a_sliding_window_run_whole(monkeypatch):
    """Past the window a layer keeps only the last keys: a prefix could not be handed on whole."""
    lvlm = tiny("llava-mistral")
    queries = _queries()
    prefixes, _ = _counting(lvlm, monkeypatch)
    text = lvlm.model.config.get_text_config(decoder=True)
    longest = max(len(lvlm.inputs.encode(q).input_ids) for q in queries)
    monkeypatch.setattr(text, "sliding_window", longest + 1)
    _assert_same(lvlm.score(queries), _whole(lvlm, queries, monkeypatch))
    assert len(prefixes) == 2
    prefixes.clear()
    monkeypatch.setattr(text, "sliding_window", longest)
    lvlm.score(queries)
    assert prefixes == []


def test_a_prefix_ends_before_the_logit_of_the_first_answer_token():
    lvlm = tiny("llava")
    image = lvlm.inputs.image_token_id
    ids = [1, image, image, 7, 8, 9]

    def row(answer_start: int) -> Encoded:
        return Encoded(ids, answer_start, len(ids) - answer_start, None, "digest")

    # The image's last slot is token 2: a row whose answer starts at token 3 needs the logit at token 2.
    assert shared_prefixes({0: row(3), 1: row(3)}, image, prefix_cache()) == {}
    assert shared_prefixes({0: row(4), 1: row(5)}, image, prefix_cache()) == {0: ("digest", (1, image, image)),
                                                                             1: ("digest", (1, image, image))}


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
    assert bytes_per_token(lvlm.model.config, lvlm.dtype) == PUBLISHED_CACHE_BYTES[name]


def test_a_pack_lets_each_row_see_only_its_own_tokens_and_its_prefix():
    """Two packs by hand: a new prefix inline ahead of two rows that begin alike, a row run whole, and a held prefix
    as columns ahead of three rows, two of which ask for the same logit."""
    new, held = ("a", (1, 4, 4)), ("b", (1, 4))
    items = {0: Encoded([7, 8, 9], 1, 2, None, None), 1: Encoded([7, 10, 11], 2, 1, None, None),
             2: Encoded([1, 12, 13, 14], 2, 2, None, None), 3: Encoded([15, 16], 1, 1, None, None),
             4: Encoded([15, 17, 18], 2, 1, None, None), 5: Encoded([15, 19], 1, 1, None, None)}
    keys = torch.arange(4.0).reshape(1, 1, 2, 2)
    packs = [[Unit(new, [0, 1], False), Unit(None, [2], False)], [Unit(held, [3, 4, 5], True)]]
    layout = pack_layout(packs, items, {held: [(keys, -keys)]}, pad_id=0, device=torch.device("cpu"))
    # Rows stop before their last answer token; rows 0 and 1 share 7 after the prefix, rows 3, 4 and 5 share 15.
    assert layout.input_ids.tolist() == [[1, 4, 4, 7, 8, 10, 1, 12, 13], [15, 17] + [0] * 7]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 0, 1, 2], [2, 3] + [0] * 7]
    assert layout.computed == [(new, 0, 0)]
    (k, v), = layout.layers
    assert k.shape == (2, 1, 2, 2) and k[1].tolist() == keys[0].tolist() and v[1].tolist() == (-keys[0]).tolist()
    assert not k[0].any()
    allowed = layout.allowed[:, 0]  # (packs, W, 2 columns + W)
    seen = {(p, q): [c for c in range(allowed.shape[2]) if allowed[p, q, c]] for p, q in
            [(0, 0), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 8), (1, 0), (1, 1), (1, 5)]}
    own = lambda *tokens: [2 + t for t in tokens]  # noqa: E731 - the pack's tokens come after the 2 columns
    assert seen == {(0, 0): own(0), (0, 2): own(0, 1, 2), (0, 3): own(0, 1, 2, 3), (0, 4): own(0, 1, 2, 3, 4),
                    (0, 5): own(0, 1, 2, 3, 5), (0, 6): own(6), (0, 8): own(6, 7, 8),
                    (1, 0): [0, 1, *own(0)], (1, 1): [0, 1, *own(0, 1)], (1, 5): own(5)}
    # Each row's answer logits: at the position before each answer token, the last repeated past a shorter span;
    # rows 3 and 5 read the same one, computed once.
    kept = layout.keep[layout.pack[:, None], layout.slots]
    assert layout.rows == [0, 1, 2, 3, 4, 5]
    assert kept.tolist() == [[3, 4], [5, 5], [7, 8], [0, 0], [1, 1], [0, 0]]
    assert layout.keep[1, :2].tolist() == [0, 1] and layout.slots[3].tolist() == layout.slots[5].tolist()
    assert layout.targets.tolist() == [[8, 9], [11, 0], [13, 14], [16, 0], [18, 0], [19, 0]]
    assert layout.mask.tolist() == [[True, True], [True, False], [True, True], [True, False], [True, False],
                                    [True, False]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=8))
def test_a_trie_holds_each_sequence_once_per_distinct_beginning(sequences):
    """Every sequence reads back along its path, each distinct beginning is one node, and a node sees (by its span)
    exactly the nodes of its path up to it."""
    trie = merge(sequences)
    beginnings = {tuple(seq[: d + 1]) for seq in sequences for d in range(len(seq))}
    assert len(trie.ids) == len(beginnings)
    for seq, path in zip(sequences, trie.paths, strict=True):
        assert [trie.ids[node] for node in path] == seq and [trie.depth[node] for node in path] == list(range(len(seq)))
        for d, node in enumerate(path):
            assert [k for k in range(len(trie.ids)) if k <= node < trie.end[k]] == path[: d + 1]


def test_a_decoder_on_a_flash_attention_kernel_runs_rows_whole(monkeypatch):
    """Packs need an arbitrary attention mask, which flash-attention kernels do not take."""
    lvlm = tiny("llava")
    encoded = dict(enumerate(lvlm.inputs.encode_many(_queries())))
    assert len(lvlm._plan_prefixes(encoded, prefix_cache(), 0, False)[0]) == 5
    text = lvlm.model.config.get_text_config(decoder=True)
    monkeypatch.setattr(text, "_attn_implementation_internal", "flash_attention_2")
    assert text._attn_implementation == "flash_attention_2"
    assert lvlm._plan_prefixes(encoded, prefix_cache(), 0, False) == ({}, 0)


def test_a_prefix_wider_than_a_pack_runs_in_a_forward_of_its_own(monkeypatch):
    """LLaVA-1.5's 577-token prefixes: inline, the dense mask over them would cost more than the forward."""
    lvlm = tiny("llava")
    queries = _queries()
    memo = ScoreMemo()
    layouts = []
    layout = adapter.pack_layout
    monkeypatch.setattr(adapter, "pack_layout", lambda *a: layouts.append(layout(*a)) or layouts[-1])
    monkeypatch.setattr(adapter, "PACK_TOKENS", 4)  # narrower than the tiny model's prefixes
    prefixes, _ = _counting(lvlm, monkeypatch)
    scores = lvlm.score(queries, memo=memo)
    assert len(prefixes) == 2 and len(memo.prefixes) == 2
    assert [computed for out in layouts for computed in out.computed] == []  # none inline
    assert sum(out.layers[0][0].shape[0] for out in layouts if out.layers is not None) >= 1  # handed on as columns
    _assert_same(scores, _whole(lvlm, queries, monkeypatch))
