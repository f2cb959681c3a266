"""Pre-edit references are compact and survive a save/load round trip."""

import torch

from editors import Query
from monitor import Reference, ReferenceStore
from tests.tiny_models import random_image, tiny


def test_a_reference_holds_top_k_of_the_answer_span_only():
    lvlm = tiny("llava")
    query = Query("which animal is shown in the picture?", "a brown dog", random_image(1))
    score = lvlm.score([query], top_k=10)[0]
    reference = Reference.from_score(score)
    t = len(score.target_ids)
    assert reference.topk_ids.shape == (t, 10) and reference.topk_ids.dtype == torch.int32
    assert reference.nbytes == t * 10 * (4 + 4)
    vocab = lvlm.model.config.text_config.vocab_size
    assert reference.nbytes * 10 < t * vocab * 4  # full span logits: V/20 times larger (10x for this vocab of 214)

    with_sequence = Reference.from_score(lvlm.score([query], top_k=10, sequence_top_k=10)[0])
    length = len(lvlm.inputs.encode(query).input_ids)
    assert with_sequence.nbytes == reference.nbytes + length * 10 * 4


def test_store_round_trip(tmp_path):
    store = ReferenceStore()
    store["a"] = Reference(torch.arange(6, dtype=torch.int32).view(2, 3), torch.randn(2, 3))
    store["b"] = Reference(torch.ones(1, 3, dtype=torch.int32), torch.randn(1, 3), torch.zeros(4, 10, dtype=torch.int32))
    store.save(tmp_path / "refs.safetensors")
    loaded = ReferenceStore.load(tmp_path / "refs.safetensors")
    assert len(loaded) == 2 and "b" in loaded
    for key in ("a", "b"):
        assert torch.equal(loaded[key].topk_ids, store[key].topk_ids)
        assert torch.equal(loaded[key].topk_logprobs, store[key].topk_logprobs)
    assert loaded["a"].sequence_topk_ids is None and loaded["b"].sequence_topk_ids.shape == (4, 10)
    assert (tmp_path / "refs.safetensors").stat().st_size < store.nbytes + 1024
    assert list(tmp_path.iterdir()) == [tmp_path / "refs.safetensors"]
