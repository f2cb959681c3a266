"""`GenerationCache`: eviction a generation at a time, and a restore from saved generations that equals the cache."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.cache import GenerationCache


def test_the_oldest_generation_goes_whole_and_a_lookup_does_not_keep_a_value():
    cache = GenerationCache(max_entries=4, generation_entries=2)
    for key in "abcd":
        cache.put(key, key.upper())  # generations {a, b} {c, d}, then an empty open one
    assert cache.get("a") == "A"  # looked up: an LRU would now keep it
    cache.put("e", "E")  # five held: generation {a, b} goes whole, not just one entry
    assert [cache.get(k) for k in "abcde"] == [None, None, "C", "D", "E"] and len(cache) == 3
    cache.put("c", "C2")  # put again: moves to the open generation {e, c}, out of {c, d}
    cache.put("f", "F")  # open {f}
    cache.put("g", "G")  # {f, g} sealed, five held: {d} goes, c stays with its new value
    assert [cache.get(k) for k in "cdefg"] == ["C2", None, "E", "F", "G"] and len(cache) == 4
    assert cache.saved() == ({2: {"e": "E", "c": "C2"}, 3: {"f": "F", "g": "G"}}, 4, {})


def test_a_sealed_generation_whose_keys_all_moved_goes_and_clear_numbers_on():
    cache = GenerationCache(max_entries=10, generation_entries=2)
    for key in "abc":
        cache.put(key, 1)
    cache.put("a", 2)
    cache.put("b", 2)  # {a, b} is left empty
    assert cache.saved() == ({1: {"c": 1, "a": 2}}, 2, {"b": 2})
    cache.clear()
    cache.put("d", 3)
    assert cache.saved() == ({}, 3, {"d": 3})  # a file of generation 0, 1 or 2 is never confused with a new one
    with pytest.raises(ValueError, match="must come after"):
        cache.restore({3: {}}, 3, {})
    with pytest.raises(ValueError, match="a generation of 5 values in a cache of 4"):
        GenerationCache(4, 5)


def test_a_restore_takes_a_key_moved_out_of_a_generation_saved_before_the_move_from_the_newer_one():
    cache = GenerationCache(max_entries=8, generation_entries=2)
    cache.put("a", 1)
    cache.put("b", 1)
    first_file = cache.saved()[0][0]  # written at a checkpoint: {a, b}
    cache.put("a", 2)  # moves to the open generation; the file keeps the old value
    _, opened, values = cache.saved()
    restored = GenerationCache(max_entries=8, generation_entries=2)
    restored.restore({0: first_file}, opened, values)
    assert restored.saved() == cache.saved() == ({0: {"b": 1}}, 1, {"a": 2}) and restored.get("a") == 2


OPS = st.lists(st.one_of(st.tuples(st.just("put"), st.integers(0, 5), st.integers(0, 9)),
                         st.tuples(st.just("checkpoint")), st.tuples(st.just("resume")), st.tuples(st.just("clear"))),
               max_size=80)


@settings(max_examples=400, deadline=None)
@given(OPS, st.integers(1, 4), st.integers(4, 8))
def test_checkpoints_and_resumes_leave_the_cache_as_a_run_without_them(ops, per_generation, capacity):
    """As a memory editor saves its memo: a checkpoint (at any step, on a schedule or not) writes each sealed
    generation not on disk yet, never again afterwards though its keys may move out, and a copy of the open one; a
    resume (a killed process's successor) reads back what the last checkpoint named, deletes every other file and
    redoes the steps since that checkpoint. At every step the cache equals one that never checkpointed."""
    reference, cache = GenerationCache(capacity, per_generation), GenerationCache(capacity, per_generation)
    files: dict[int, dict] = {}
    written: set[int] = set()
    named, since = ({}, 0, {}), []

    def step(one, op):
        if op[0] == "put":
            one.put(op[1], op[2])
        elif op[0] == "clear":
            one.clear()

    for op in ops:
        step(reference, op)
        if op[0] == "checkpoint":
            sealed, opened, values = cache.saved()
            files.update({g: sealed[g] for g in sealed.keys() - written})
            written, named, since = set(sealed), (list(sealed), opened, values), []
        elif op[0] == "resume":
            files = {g: files[g] for g in named[0]}
            cache = GenerationCache(capacity, per_generation)
            cache.restore(dict(files), named[1], named[2])
            written = set(named[0])
            for redo in since:
                step(cache, redo)
        else:
            step(cache, op)
            since.append(op)
        assert len(cache) <= capacity
        assert [cache.get(k) for k in range(6)] == [reference.get(k) for k in range(6)]
        assert cache.saved() == reference.saved()
