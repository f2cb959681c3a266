"""The edit memory shared by IKE and SERAC: short IVF rows, routing statistics, re-edits, retraction, journaling
of the memory and of the score memo."""

from dataclasses import fields

import numpy as np
import pytest
import torch

from editors import EditRequest, Query, create_editor
from editors.adapter import ScoreMemo, SpanScore
from editors.edit_memory import EditMemory, KeyConfig
from editors.editor import StateMismatchError
from editors.memo_files import load_generation, save_generation
from memory import JournalError, MemoryConfig
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


def test_a_fact_edited_again_as_a_rebuild_fails_leaves_every_stored_key_owned(monkeypatch):
    # The new entry's add reaches exact_below: the rebuild fails in the caller's thread; the older entry's removal
    # must still happen, or its key stays stored with no edit to return (a KeyError at the next search).
    from memory import store

    config = KeyConfig(memory=MemoryConfig(exact_below=12, background=False))
    edits = EditMemory.for_model(tiny_llava(seed=1), config)
    for i, (prompt, target) in enumerate(FACTS[:11]):
        edits.add(EditRequest(prompt, target, key=str(i)))

    def broken(*args, **kwargs):
        raise MemoryError("no room for the new index")

    monkeypatch.setattr(store, "build", broken)
    entry, replaced = edits.add(EditRequest(FACTS[0][0], "Lyon", key="lyon"))
    assert replaced.key == "0" and set(edits.memory.ids().tolist()) == set(edits.edits) and len(edits.edits) == 11
    queries = [Query(prompt, target) for prompt, target in FACTS[:11]]
    assert [found[0].key for found in edits.nearest(queries, k=1)[1]] == ["lyon", *map(str, range(1, 11))]
    with pytest.raises(RuntimeError, match="rebuild of the memory index failed"):  # the next edit, before changing
        edits.add(EditRequest(FACTS[11][0], FACTS[11][1], key="11"))
    assert set(edits.memory.ids().tolist()) == set(edits.edits) and len(edits.edits) == 11


@pytest.mark.parametrize("method", ["ike", "serac"])
def test_an_edit_of_a_fact_held_replaces_it_and_retract_deletes_one(method):
    editor = create_editor(method, tiny_llava(seed=1), {"threshold": 0.99} if method == "serac" else {})
    asked = Query(DOG.prompt, "a dog", DOG.image)
    editor.apply(DOG)
    editor.apply(EditRequest(FACTS[0][0], FACTS[0][1], key="paris"))
    editor.score([asked, Query("the quick brown", "fox")])
    counted = editor.retrieval_stats()
    # The same question about the same picture (another image object, same pixels): the newest answer replaces it.
    again = EditRequest(DOG.prompt, "a black cat", random_image(11), key="dog-2")
    outcome = editor.apply(again)
    assert (outcome.applied, outcome.message) == (True, "replaced edit 'dog' of the same fact; 2 edits in memory")
    assert editor.memory_size() == 2 == len(editor.edits.memory)
    (routed, score), = editor.edits.route([asked], None, count=False)
    assert (routed.key, routed.target) == ("dog-2", "a black cat") and score == pytest.approx(1.0, abs=1e-5)
    assert sorted(e.target for e in editor.edits.edits.values()) == ["Paris", "a black cat"]  # no stale answer left
    # Another picture, or no picture, with the same question is another fact.
    editor.apply(EditRequest(DOG.prompt, "a bird", random_image(12), key="bird"))
    editor.apply(EditRequest(DOG.prompt, "a fish", key="fish"))
    assert editor.memory_size() == 4

    refused = editor.retract("dog")
    assert not refused.applied and refused.message.startswith(f"{method} holds no edit 'dog' to retract")
    outcome = editor.retract("dog-2")
    assert (outcome.applied, outcome.message) == (True, "retracted edit 'dog-2'; 3 edits in memory")
    # The fact is gone: the older answer it replaced does not come back.
    assert {e.key for e in editor.edits.edits.values()} == {"paris", "bird", "fish"}
    assert editor.retrieve([asked])[0].key != "dog-2" and len(editor.edits.memory) == 3
    assert not editor.retract("dog-2").applied and not editor.retract("never").applied
    assert editor.retrieval_stats()["memory_hits"] == counted["memory_hits"]  # counters run on through changes
    editor.apply(again)  # the fact can be edited anew
    assert editor.retrieve([asked])[0].key == "dog-2" and editor.memory_size() == 4


@pytest.mark.parametrize("method", ["ike", "serac"])
def test_a_stream_key_given_to_two_facts_names_its_newest_live_edit_live_and_restored_alike(method):
    """Retracting key "k" removes its newest edit; the next retraction of "k" removes the older one, in the live
    memory and in one restored from a state saved between the two (a restored memory used to map "k" to the older
    edit while the live one had forgotten it)."""
    lvlm = tiny_llava(seed=1)
    editor = create_editor(method, lvlm)
    editor.apply(EditRequest(FACTS[0][0], FACTS[0][1], key="k"))
    editor.apply(EditRequest(FACTS[1][0], FACTS[1][1], key="other"))
    editor.apply(EditRequest(FACTS[2][0], FACTS[2][1], key="k"))  # another fact under the same key
    assert editor.retract("k").applied
    assert {e.key: e.target for e in editor.edits.edits.values()} == {"k": "Paris", "other": "Madrid"}
    restored = create_editor(method, lvlm)
    restored.load_state(editor.state())
    for memory in (editor, restored):
        outcome = memory.retract("k")
        assert outcome.applied and [e.target for e in memory.edits.edits.values()] == ["Madrid"]
        assert not memory.retract("k").applied


@pytest.mark.parametrize("method", ["ike", "serac"])
def test_a_journaled_checkpoint_restores_the_memory_a_whole_state_holds(method, tmp_path):
    lvlm, folder = tiny_llava(seed=1), tmp_path / "journal"
    editor = create_editor(method, lvlm)
    edits = [EditRequest(p, t, random_image(20 + i) if i % 2 else None, key=str(i)) for i, (p, t) in enumerate(FACTS)]
    for edit in edits[:10]:
        editor.apply(edit)
    first = editor.journal_state(folder)
    editor.journal_committed()
    assert first.meta["memory"]["journal"] == {"generation": 1, "log_bytes": 0}  # the first write is a snapshot
    editor.apply(EditRequest(FACTS[0][0], "Lyon", key="0b"))  # a re-edit: an add and a removal
    editor.retract("3")
    editor.apply(edits[10])
    editor.score([edit.query for edit in edits])
    second = editor.journal_state(folder)
    editor.journal_committed()
    assert second.meta["memory"]["journal"]["generation"] == 1 and second.meta["memory"]["journal"]["log_bytes"] > 0
    assert "memory.index" not in second.tensors and "edits" not in second.meta["memory"]  # the state is small
    with pytest.raises(StateMismatchError, match="keeps its memory in the journal"):
        create_editor(method, lvlm).load_state(second)

    whole, reference = type(editor).whole_state(second, folder), editor.state()
    for part in ("ids", "edits", "manifest", "counters"):
        assert whole.meta["memory"][part] == reference.meta["memory"][part], part
    assert torch.equal(whole.tensors["memory.index"], reference.tensors["memory.index"])  # the same index bytes
    fresh = create_editor(method, lvlm)
    fresh.load_state(whole)
    fresh.resume_journal(whole, folder)
    queries = [edit.query for edit in edits] + [Query("which animal is shown?", "a dog", random_image(21))]
    # The editor's image keys are warm (computed along with other images), the fresh one's cold: one image per
    # vision forward makes them equal bit for bit.
    assert fresh.retrieve(queries) == editor.retrieve(queries)
    assert fresh.retrieval_stats()["memory_hits"] == editor.retrieval_stats()["memory_hits"] > 0
    # The resumed journal goes on where the checkpoint left it.
    for one in (editor, fresh):
        one.apply(edits[11])
    third = fresh.journal_state(folder)
    assert third.meta["memory"]["journal"]["log_bytes"] > second.meta["memory"]["journal"]["log_bytes"]
    assert torch.equal(type(fresh).whole_state(third, folder).tensors["memory.index"],
                       editor.state().tensors["memory.index"])
    # After `reset` or `load_state`, what changed is unknown: the next checkpoint writes a snapshot.
    fresh.load_state(editor.state())
    assert fresh.journal_state(folder).meta["memory"]["journal"] == {"generation": 2, "log_bytes": 0}


@pytest.mark.parametrize("method", ["ike", "serac"])
def test_a_checkpoint_saves_the_score_memo_and_a_resumed_editor_looks_up_the_same_scores(method, tmp_path,
                                                                                       monkeypatch):
    folder, memo = tmp_path / "journal", tmp_path / "journal" / "memo"

    def editor_with_small_memo():
        one = create_editor(method, tiny_llava(seed=1), {"threshold": 0.99} if method == "serac" else {})
        one._memo = ScoreMemo(capacity=256)  # generations of 4 scores: a few sealed ones and an open one
        return one

    def files():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in memo.iterdir()}

    editor = editor_with_small_memo()
    edits = [EditRequest(p, t, random_image(30 + i) if i % 2 else None, key=str(i)) for i, (p, t) in enumerate(FACTS)]
    for edit in edits[:6]:
        editor.apply(edit)
    queries = [edit.query for edit in edits] + [Query("which animal is this?", "a cat", random_image(50))]
    first = editor.score(queries, top_k=5)
    state = editor.journal_state(folder)
    editor.journal_committed()
    editor.clear_caches(keep_saved=True)  # as the timeline does after a checkpoint: the scores stay
    saved = state.meta["memo"]
    assert len(saved["generations"]) == 3 and saved["opened"] == saved["generations"][-1] + 1 and saved["open"] == 1
    assert sorted(files()) == sorted([f"{g}.safetensors" for g in saved["generations"]] + ["open-1.safetensors"])

    fresh = editor_with_small_memo()  # another process: the same weights in other tensors
    whole = type(editor).whole_state(state, folder)
    fresh.load_state(whole)
    fresh.resume_journal(whole, folder)
    forwards = []
    for one in (editor, fresh):
        monkeypatch.setattr(one.lvlm, "_forward", lambda *a, **k: forwards.append(1))
    for one in (editor, fresh):
        again = one.score(queries, top_k=3)  # fewer top-k entries: read from the stored score
        for old, new in zip(first, again):
            assert torch.equal(old.target_logprobs, new.target_logprobs) and torch.equal(old.argmax_ids, new.argmax_ids)
            assert torch.equal(old.topk_logprobs[:, :3], new.topk_logprobs)
    assert forwards == []  # every score came from the memo, in the editor and in the resumed one
    monkeypatch.undo()

    # The resumed editor's next checkpoint writes its open generation anew and no sealed one it read back.
    before = files()
    fresh.score([Query("which animal is that?", "a dog", random_image(51))])
    later = fresh.journal_state(folder).meta["memo"]
    assert later["generations"] == saved["generations"] and later["open"] == 2
    assert files() == {**before, "open-2.safetensors": files()["open-2.safetensors"]}
    # That checkpoint was not written (the run was killed): a resume from the last one deletes what came after it,
    # and the leftovers of a killed write, but nothing that is not the memo's.
    (memo / f".{saved['opened'] + 5}.safetensors.tmp-4242").write_bytes(b"half")
    (memo / "notes.txt").write_text("mine")
    again = editor_with_small_memo()
    again.load_state(whole)
    again.resume_journal(whole, folder)
    assert files() == {**before, "notes.txt": files()["notes.txt"]}
    (memo / f"{saved['generations'][0]}.safetensors").unlink()
    with pytest.raises(JournalError, match=f"{saved['generations'][0]}.safetensors: the checkpoint names this memo"):
        editor_with_small_memo().resume_journal(whole, folder)


def test_a_memo_generation_reads_back_bit_for_bit_with_its_optional_parts(tmp_path):
    scores = [SpanScore(torch.tensor([5, 6]), torch.tensor([5, 7]), torch.tensor([-0.1, -2.3]),
                        torch.tensor([[5, 1, 2], [7, 6, 0]]), torch.randn(2, 3), torch.rand(2)),
              SpanScore(torch.tensor([9]), torch.tensor([9]), torch.tensor([-1e-9]), torch.tensor([[9, 3]]),
                        torch.randn(1, 2), torch.rand(1), gathered_logprobs=torch.randn(1, 4),
                        sequence_topk_ids=torch.tensor([[1], [2], [9]], dtype=torch.int32))]
    values = {("q0", "a0", None, 0): (scores[0], 3, None),
              ("q1", "a1", "d1g35t", 1): (scores[1], 2, torch.tensor([[9, 3, 4, 8]]))}
    save_generation(tmp_path / "7.safetensors", values)
    read = load_generation(tmp_path / "7.safetensors")
    assert list(read) == list(values)
    for (score, top_k, gather), (old, old_top_k, old_gather) in zip(read.values(), values.values()):
        assert top_k == old_top_k and (gather is None) == (old_gather is None)
        assert gather is None or (torch.equal(gather, old_gather) and gather.dtype == old_gather.dtype)
        for field in fields(SpanScore):
            new, was = getattr(score, field.name), getattr(old, field.name)
            assert (new is None and was is None) or (torch.equal(new, was) and new.dtype == was.dtype), field.name
