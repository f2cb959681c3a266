"""The edit memory shared by IKE and SERAC: short IVF rows, and which routing its statistics count."""

import numpy as np
import pytest

from editors import EditRequest, Query, create_editor
from editors.edit_memory import EditMemory, KeyConfig
from memory import MemoryConfig
from tests.tiny_models import random_image, tiny_llava

FACTS = [
    ("what is the capital of France?", "Paris"), ("what is the capital of Spain?", "Madrid"),
    ("what is the capital of Italy?", "Rome"), ("which animal barks?", "a dog"),
    ("which animal purrs?", "a cat"), ("which animal neighs?", "a horse"),
    ("what colour is the sky?", "blue"), ("what colour is grass?", "green"),
    ("what colour is snow?", "white"), ("who wrote Hamlet?", "Shakespeare"),
    ("who painted the Mona Lisa?", "Leonardo"), ("who discovered penicillin?", "Fleming"),
]
DOG = EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), key="dog")


def test_nearest_drops_the_padding_of_an_ivf_index_that_finds_fewer_than_k():
    # 12 edits pass exact_below=8: an IVF index of 4 lists, of which each query scans one.
    config = KeyConfig(memory=MemoryConfig(exact_below=8, nprobe=1, background=False))
    edits = EditMemory.for_model(tiny_llava(seed=1), config)
    for i, (prompt, target) in enumerate(FACTS):
        edits.add(EditRequest(prompt, target, key=str(i)))
    assert edits.memory.index_kind == "ivf"
    queries = [Query(prompt, target) for prompt, target in FACTS]
    scores, found = edits.nearest(queries, k=len(FACTS))
    assert scores.shape == (len(FACTS), len(FACTS))
    assert any(len(row) < len(FACTS) for row in found)  # the short rows FAISS padded with id -1
    for i, (row, score) in enumerate(zip(found, scores)):
        assert row[0].key == str(i)  # its own edit sits in the one list the query scans
        assert len({e.key for e in row}) == len(row)
        assert np.isfinite(score[: len(row)]).all() and np.isneginf(score[len(row) :]).all()
    assert [edit.key for edit, _ in edits.route(queries, None)] == [str(i) for i in range(len(FACTS))]


@pytest.mark.parametrize("method", ["ike", "serac"])
def test_score_counts_its_routing_and_retrieve_does_not(method):
    editor = create_editor(method, tiny_llava(seed=1), {"threshold": 0.99} if method == "serac" else {})
    editor.apply(DOG)
    same, text_only = Query(DOG.prompt, DOG.target, DOG.image), Query("the quick brown", "fox")
    editor.retrieve([same, text_only])
    stats = editor.retrieval_stats()
    assert (stats["memory_hits"], stats["memory_misses"]) == (0.0, 0.0)  # probes look, they do not route
    editor.score([same, text_only])
    editor.score([same])
    # SERAC: the text-only query is out of scope; IKE prefixes the nearest edit to every query.
    hits = {"serac": 2.0, "ike": 3.0}[method]
    stats = editor.retrieval_stats()
    assert (stats["memory_hits"], stats["memory_misses"]) == (hits, 3.0 - hits)
    assert stats["memory_rebuilds"] == 0.0
    # Latency counts every search (retrieve's too): quantiles are bucket bounds, p50 <= p99.
    assert 0 < stats["memory_search_seconds_p50"] <= stats["memory_search_seconds_p99"]
    assert set(stats) == {"memory_search_seconds_p50", "memory_search_seconds_p99", "memory_hits", "memory_misses",
                          "memory_rebuilds"}
    editor.reset()
    assert editor.retrieval_stats()["memory_hits"] == hits  # counters run across reset
