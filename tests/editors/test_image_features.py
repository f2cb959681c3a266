"""Scoring with image features computed once per image (`Family.shares_image_features`), text-only queries in the same
batches, gives what the model's own pixel path gives, on every family that declares it; the cache follows the vision
weights."""

import pytest
import torch

from editors import Query
from tests.tiny_models import BUILDERS, random_image, tiny


def _queries():
    first, second = random_image(31), random_image(32, (24, 20))
    return [Query("what does the creature eat?", "red berries", first),
            Query("which food is eaten by the creature shown here?", "red berries", first),
            Query("who keeps the creature?", "a tall keeper named Rolf", second),
            Query("where does the creature live?", "Paris", first),
            Query("which country is the city of Paris in?", "France")]  # text-only: shares the batch where features do


def _pixel_path(lvlm, queries, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(type(lvlm.family), "shares_image_features", False)
        return lvlm.score(queries, top_k=3)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_shared_image_features_score_as_the_pixels_do_and_follow_the_vision_weights(family, monkeypatch):
    lvlm = tiny(family)  # cached and shared: its weights are put back below, its feature cache starts empty
    lvlm.features.clear()
    monkeypatch.setattr(type(lvlm.family), "shares_image_prefix", False)  # rows run whole (test_image_prefix.py)
    queries = _queries()
    if not lvlm.family.shares_image_features:
        lvlm.score(queries)
        assert len(lvlm.features) == 0  # the model's own vision path, every time
        return
    computed, forwards = [], []
    features, forward = lvlm.family.image_features, lvlm._forward
    monkeypatch.setattr(lvlm.family, "image_features", lambda *a: computed.append(1) or features(*a))
    monkeypatch.setattr(lvlm, "_forward", lambda *a, **kw: forwards.append(1) or forward(*a, **kw))
    shared = lvlm.score(queries, top_k=3)
    assert (len(computed), len(forwards)) == (2, 1)  # two distinct images among five queries, one batch
    for mine, theirs in zip(shared, _pixel_path(lvlm, queries, monkeypatch)):
        assert mine.argmax_ids.tolist() == theirs.argmax_ids.tolist()
        assert mine.topk_ids.tolist() == theirs.topk_ids.tolist()
        torch.testing.assert_close(mine.target_logprobs, theirs.target_logprobs, atol=1e-5, rtol=0)
    lvlm.score(queries[:2])
    assert len(computed) == 2  # cached across calls
    # A text-decoder weight changed in place (as FT-LLM does) leaves the image features as they are.
    weight = next(iter(lvlm.parameter_group("llm").values()))  # an MLP weight of the last decoder block
    with torch.no_grad():
        weight.add_(0.0)  # bumps its version counter, changes no value
    lvlm.score(queries[:2], top_k=4)
    assert len(computed) == 2
    # A vision weight changed in place (as FT-Vis does): the features are computed again, from the new weights.
    projector = next(p for name, p in lvlm.model.named_parameters() if "projector" in name)
    saved = projector.detach().clone()
    try:
        with torch.no_grad():
            projector.mul_(3.0)
        changed = lvlm.score(queries, top_k=3)
        assert len(computed) == 4
        for mine, theirs in zip(changed, _pixel_path(lvlm, queries, monkeypatch)):
            torch.testing.assert_close(mine.target_logprobs, theirs.target_logprobs, atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            projector.copy_(saved)
    assert changed[0].target_logprobs.tolist() != shared[0].target_logprobs.tolist()


def test_image_keys_read_the_features_scoring_computed(monkeypatch):
    lvlm = tiny("llava")
    lvlm.features.clear()
    computed = []
    features = lvlm.family.image_features
    monkeypatch.setattr(lvlm.family, "image_features", lambda *a: computed.append(1) or features(*a))
    queries = _queries()
    lvlm.score(queries)
    pooled = lvlm.embed_images([queries[0].image, queries[2].image], pooling="flat")
    assert len(computed) == 2  # no vision forward for the keys
    with monkeypatch.context() as patch:
        patch.setattr(type(lvlm.family), "shares_image_features", False)
        torch.testing.assert_close(pooled, lvlm.embed_images([queries[0].image, queries[2].image], pooling="flat"),
                                   atol=1e-6, rtol=0)
