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
    np.testing.assert_allclose(embedder.embed(["c d"])[0], first[1], atol=1e-6)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="Unknown text embedder 'bert'"):
        TextEmbedder("bert")


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
