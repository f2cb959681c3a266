"""The offline MiniLM text embedder: what SERAC's text half of the key relies on."""

import os
import socket

import numpy as np
import pytest

from memory import Embedder, TextEmbedder

# src / rephrase templates of the default world's four image relations (simulator/world/schema.py).
TEMPLATES = [
    ("Where does the creature in the image live?", "Which city is home to the creature in the image?"),
    ("What does the creature in the image eat?", "Which food does the creature in the image like?"),
    ("Who keeps the creature in the image?", "Who is the keeper of the creature in the image?"),
    ("Which toy does the creature in the image play with?", "What toy belongs to the creature in the image?"),
]


def test_rephrases_are_closer_to_their_own_question_than_to_other_relations():
    embedder = TextEmbedder()
    assert isinstance(embedder, Embedder) and embedder.dim == 384
    src = embedder.embed([s for s, _ in TEMPLATES])
    rephrase = embedder.embed([r for _, r in TEMPLATES])
    np.testing.assert_allclose(np.linalg.norm(src, axis=1), 1.0, atol=1e-5)
    similarity = rephrase @ src.T  # (rephrase, src)
    assert (similarity.argmax(1) == np.arange(4)).all()
    assert (np.diag(similarity) - (similarity - 2 * np.eye(4)).max(1)).min() > 0.1  # margin seen: 0.18


def test_repeated_texts_are_encoded_once_and_identically():
    embedder = TextEmbedder(cache_size=2)
    first = embedder.embed(["a b", "c d", "a b"])
    np.testing.assert_array_equal(first[0], first[2])
    embedder.embed(["e f"])
    assert list(embedder._cache) == ["a b", "e f"]  # least recently used text evicted
    np.testing.assert_array_equal(embedder.embed(["c d"])[0], first[1])  # encoded again, alone: the same bits
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="Unknown text embedder 'bert'"):
        TextEmbedder("bert")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_text_embeds_to_the_same_bits_whatever_its_batch_and_the_cache(threads):
    """Issue 11: a resumed run embeds texts in other batches than the uninterrupted one (its cache starts cold), so
    a text's vector must not depend on its neighbours (padding to the longest of a batch changed its last bits)."""
    import torch

    texts = [text for pair in TEMPLATES for text in pair] + [
        "a b", "What language is spoken in Beval?", " ".join(["very"] * 40) + " long question?",
        " ".join(["word"] * 300),  # past the model's 256 tokens: cut, like any text that long
    ]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = TextEmbedder()
        alone = []
        for text in texts:
            embedder.clear()
            alone.append(embedder.embed([text])[0])
        embedder.clear()
        together = embedder.embed(texts)  # one call: every length at once
        embedder.clear()
        embedder.embed(texts[::3])  # a cache warmed by other batches
        warm = embedder.embed(texts[::-1])[::-1]
        small = TextEmbedder(batch_size=2)  # batches of two, neighbours of other lengths
        pairs = small.embed(texts[1:] + texts[:1])
    finally:
        torch.set_num_threads(previous)
    for batched in (together, warm, np.roll(pairs, 1, axis=0)):
        np.testing.assert_array_equal(batched, np.stack(alone))
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert len({row.tobytes() for row in together}) == len(texts)


def test_loads_from_its_package_without_the_network_or_touching_the_environment(monkeypatch):
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1:] or args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    environment = dict(os.environ)
    assert TextEmbedder().embed(["a b"]).shape == (1, 384)
    assert attempts == [] and dict(os.environ) == environment
