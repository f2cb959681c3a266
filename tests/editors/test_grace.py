"""GRACE: codebook placement (add / expand / split), radius-bounded routing, untouched unrelated outputs, state."""

import numpy as np
import pytest
import torch

from editors import EditorState, EditRequest, Query, create_editor
from editors.grace import Codebook, GraceConfig
from memory import MemoryConfig
from tests.tiny_models import random_image, tiny_llava
from monitor.metrics import token_accuracy

L2 = MemoryConfig(normalize=False, metric="l2")
# One-token answers: a random tiny model cannot be taught a multi-token answer by one value vector.
DOG = EditRequest("which animal is shown in the picture?", "dog", random_image(11), key="dog")
REPHRASE = Query("what animal does the picture show?", "dog", random_image(11))
OTHER_IMAGE = Query(DOG.prompt, "dog", random_image(30))  # same question, another picture
UNRELATED = Query("the quick brown", "fox")


def unit(i, dim=4):
    return np.eye(dim, dtype=np.float32)[i]


def test_placement_adds_expands_holds_splits_and_replaces_as_grace_algorithm_1():
    book = Codebook(4, 3, L2)
    value = torch.zeros(3)
    assert book.place(unit(0) * 0, "A", "a", value, 1.0) == (0, "add")
    assert book.place(unit(0) * 3, "B", "b", value, 1.0) == (1, "add")  # d 3 > eps_init 1 + eps 1: no overlap
    assert book.place(unit(1) * 1.4, "A", "a2", value, 1.0) == (0, "expand")  # same target, d 1.4 in (1, 2]
    assert book.radii.tolist() == pytest.approx([1.4, 1.0])
    assert book.place(unit(1) * 0.5, "A", "a3", value, 1.0) == (0, "hold")  # inside: nothing changes
    assert book.place(unit(2) * 0.6, "C", "c", value, 1.0) == (2, "split")  # another target at d 0.6
    assert book.radii.tolist() == pytest.approx([0.3, 1.0, 0.3])  # both halved to d / 2
    assert book.place(unit(2) * 0.6, "D", "d", value, 1.0) == (2, "replace")  # same key, newer answer
    assert (len(book), book.targets, book.edit_keys) == (3, ["A", "B", "D"], ["a", "b", "d"])
    ids, dist, inside = book.hits(np.stack([unit(3) * 0.25, unit(2) * 0.6 + unit(3) * 0.29, unit(1) * 2.0]))
    assert ids.tolist()[:2] == [0, 2] and inside.tolist() == [True, True, False]
    assert dist[0] == pytest.approx(0.25, abs=1e-6)


def test_split_never_grows_the_older_radius():
    book = Codebook(2, 1, L2)
    book.place(np.zeros(2, np.float32), "A", "a", torch.zeros(1), 1.0)
    book.place(np.array([0.1, 0], np.float32), "B", "b", torch.zeros(1), 1.0)  # radii 0.05, 0.05
    assert book.place(np.array([0.4, 0], np.float32), "C", "c", torch.zeros(1), 1.0) == (2, "split")
    # nearest is B at d 0.3 <= 1 + 0.05: GRACE's code would set B's radius to 0.15; here it stays 0.05.
    assert book.radii.tolist() == pytest.approx([0.05, 0.05, 0.15])


def test_euclidean_lookup_stays_exact_for_stored_keys_in_the_ivf_index():
    config = MemoryConfig(normalize=False, metric="l2", exact_below=256, background=False, lists_per_sqrt=1.0)
    book = Codebook(8, 1, config)
    keys = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32) * 5
    for i, key in enumerate(keys):
        book.place(key, f"t{i}", f"e{i}", torch.zeros(1), 1e-3)
    assert book.keys.index_kind == "ivf" and len(book) == 600
    ids, dist = book.nearest(keys[::50])
    assert ids.tolist() == list(range(0, 600, 50)) and np.allclose(dist, 0, atol=1e-3)
    brute = np.linalg.norm(keys - keys[7] - 0.01, axis=1).min()
    assert book.nearest((keys[7] + 0.01)[None])[1][0] == pytest.approx(brute, rel=1e-4)


def test_an_expanded_entry_holds_the_key_that_expanded_it():
    """Radii are float32 and distances float64: a radius rounded down would leave the edit outside its own entry."""
    for scale in np.linspace(1.01, 1.99, 99, dtype=np.float32):
        book = Codebook(4, 3, L2)
        book.place(unit(0) * 0, "A", "a", torch.zeros(3), 1.0)
        assert book.place(unit(1) * scale, "A", "a2", torch.zeros(3), 1.0) == (0, "expand")
        assert book.hits((unit(1) * scale)[None])[2].tolist() == [True], scale


def test_restore_undoes_every_placement_since_the_mark():
    book = Codebook(4, 3, L2)
    book.place(unit(0) * 0, "A", "a", torch.zeros(3), 1.0)
    book.place(unit(0) * 3, "B", "b", torch.zeros(3), 1.0)
    before = (len(book), book.radii.tolist(), list(book.targets), list(book.edit_keys))
    for key, target in ((unit(1) * 1.4, "A"), (unit(2) * 0.6, "C"), (unit(0) * 0, "D")):  # expand, split, replace
        mark = book.mark()
        book.place(key, target, "new", torch.ones(3), 1.0)
        book.restore(mark)
        assert (len(book), book.radii.tolist(), book.targets, book.edit_keys) == before
        assert book.nearest(np.stack([unit(1) * 1.4, unit(0) * 3]))[0].tolist() == [0, 1]
    book.place(unit(1) * 9, "E", "e", torch.ones(3), 1.0)  # the id an undone add had is taken again
    assert len(book) == 3 and book.nearest((unit(1) * 9)[None])[0].tolist() == [2]


@pytest.mark.parametrize("failure", ["diverged", "raised"])
def test_a_failed_edit_leaves_the_codebook_as_before(lvlm, monkeypatch, failure):
    import editors.grace

    editor = create_editor("grace", lvlm, {"steps": 2})
    assert editor.apply(DOG).applied
    book, rain = editor.codebook, Query("what is the weather like?", "rain")
    before = (len(book), book.radii.clone(), book.values.clone(), list(book.targets), list(book.edit_keys))
    routed = editor.retrieve([rain])
    if failure == "diverged":
        monkeypatch.setattr(editors.grace, "answer_nll", lambda *a, **k: torch.tensor(float("nan")))
        outcome = editor.apply(EditRequest(rain.prompt, "rain", None, key="rain"))
        assert not outcome.applied and "the codebook is as before the edit" in outcome.message
    else:
        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(editors.grace, "fit_answer", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            editor.apply(EditRequest(rain.prompt, "rain", None, key="rain"))
    assert len(book) == before[0] and torch.equal(book.radii, before[1]) and torch.equal(book.values, before[2])
    assert (book.targets, book.edit_keys) == (before[3], before[4])
    assert editor.retrieve([rain]) == routed


def test_config_refuses_a_cosine_store():
    with pytest.raises(ValueError, match="Euclidean"):
        GraceConfig(memory=MemoryConfig())
    with pytest.raises(ValueError, match="normalize=False"):
        MemoryConfig(metric="l2")


def down_outputs(editor, query):
    """The hooked layer's output (B, L, H) for one query, as `score` runs it."""
    seen = []
    module = editor.lvlm.model.get_submodule(editor.module_path)
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        editor.score([query])
    finally:
        handle.remove()
    return seen[0]


def key_distance(editor, a, b):
    return float(np.linalg.norm(editor._key_and_output(a)[0] - editor._key_and_output(b)[0]))


@pytest.fixture(scope="module")
def lvlm():
    return tiny_llava(seed=1)


def test_edit_is_answered_and_its_rephrase_only_within_the_radius(lvlm):
    probe = create_editor("grace", lvlm)
    d_in, d_out = key_distance(probe, DOG.query, REPHRASE), key_distance(probe, DOG.query, OTHER_IMAGE)
    assert 0 < d_in < d_out  # the image shapes the key: another picture is farther than a rephrase
    del probe  # its hooks go with it
    editor = create_editor("grace", lvlm, {"epsilon_init": (d_in + d_out) / 2})
    queries = [DOG.query, REPHRASE, OTHER_IMAGE, UNRELATED]
    before = editor.score(queries)
    assert token_accuracy(before[0]) < 1
    outcome = editor.apply(DOG)
    assert outcome.applied and outcome.message.startswith("add entry 0 of 1")
    after = editor.score(queries)
    assert token_accuracy(after[0]) == 1.0 and token_accuracy(after[1]) == 1.0
    for i in (2, 3):  # outside the radius: exactly the unedited scores
        assert torch.equal(after[i].target_logprobs, before[i].target_logprobs)
    routes = editor.retrieve(queries)
    assert [r.key for r in routes] == ["dog", "dog", None, None]
    assert routes[0].score == pytest.approx(0.0, abs=1e-3) and -routes[1].score == pytest.approx(d_in, rel=1e-3)
    # The same edit with the radius below the rephrase's distance: the rephrase keeps its unedited answer.
    stats = editor.retrieval_stats()
    assert (stats["memory_hits"], stats["memory_misses"]) == (2, 2)  # score's routing after the edit only
    layer = lvlm.model.get_submodule(editor.module_path)
    del editor
    assert not layer._forward_hooks and not lvlm.model._forward_pre_hooks  # a dropped editor unhooks the model
    tight = create_editor("grace", lvlm, {"epsilon_init": d_in / 2})
    tight.apply(DOG)
    assert [r.key for r in tight.retrieve(queries)] == ["dog", None, None, None]
    assert torch.equal(tight.score([REPHRASE])[0].target_logprobs, before[1].target_logprobs)


def test_key_is_the_last_prompt_token_and_unrelated_layer_output_is_bit_identical(lvlm):
    editor = create_editor("grace", lvlm, {"epsilon_init": 1e3, "steps": 3})  # a radius covering the edit only
    reference = down_outputs(editor, UNRELATED)
    editor.apply(EditRequest("the quick brown", "cat", key="cat"))  # same prompt, text only: edits UNRELATED's key
    encoded = lvlm.inputs.encode(UNRELATED)
    hidden = []
    module = lvlm.model.get_submodule(editor.module_path)
    handle = module.register_forward_hook(lambda m, a, out: hidden.append(a[0][0].detach().float().numpy()))
    with editor.unedited():
        editor.score([UNRELATED])
    handle.remove()
    key_token, answer_token = hidden[0][encoded.answer_start - 1], hidden[0][encoded.answer_start]
    assert editor.codebook.nearest(key_token[None])[1][0] < 1e-3 < editor.codebook.nearest(answer_token[None])[1][0]
    del editor
    # Every prompt ends in the template's answer cue, so a random model's keys differ only through
    # attention, by little: the radius is set below this pair's distance.
    radius = key_distance(create_editor("grace", lvlm), DOG.query, UNRELATED) / 2
    small = create_editor("grace", lvlm, {"steps": 3, "epsilon_init": radius})
    dog_reference = down_outputs(small, DOG.query)
    small.apply(DOG)
    assert small.retrieve([UNRELATED])[0].key is None
    assert torch.equal(down_outputs(small, UNRELATED), reference)  # bit for bit, not just close
    edited = down_outputs(small, DOG.query)
    start = lvlm.inputs.encode(DOG.query).answer_start - 1
    assert torch.equal(edited[:, :start], dog_reference[:, :start])  # before the key token: untouched
    assert not torch.equal(edited[:, start:], dog_reference[:, start:])
    assert torch.equal(edited[0, start], small.codebook.values[0]) and torch.equal(edited[0, -1], edited[0, start])
    with small.unedited():
        assert torch.equal(down_outputs(small, DOG.query), dog_reference)


def test_state_round_trip_restores_keys_values_radii_and_answers(lvlm, tmp_path):
    editor = create_editor("grace", lvlm, {"steps": 3, "epsilon_init": 50.0})
    editor.apply(DOG)
    editor.apply(EditRequest(DOG.prompt, "a cat", random_image(30), key="cat"))  # near: splits the dog's entry
    assert editor.memory_size() == 2 and editor.codebook.radii[0] < 50.0
    editor.state().save(tmp_path / "s")
    fresh = create_editor("grace", tiny_llava(seed=1))
    fresh.load_state(EditorState.load(tmp_path / "s"))
    assert torch.equal(fresh.codebook.values, editor.codebook.values)
    assert torch.equal(fresh.codebook.radii, editor.codebook.radii)
    assert fresh.codebook.targets == ["dog", "a cat"] and fresh.codebook.edit_keys == ["dog", "cat"]
    queries = [DOG.query, OTHER_IMAGE, UNRELATED]
    assert [r.key for r in fresh.retrieve(queries)] == [r.key for r in editor.retrieve(queries)]
    for a, b in zip(fresh.score(queries), editor.score(queries)):
        assert torch.equal(a.target_logprobs, b.target_logprobs)
    del editor
    fresh.reset()
    assert fresh.memory_size() == 0 and fresh.retrieve([DOG.query])[0].key is None
