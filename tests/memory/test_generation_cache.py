"""`GenerationCache`: eviction a generation at a time, and a restore from saved generations that equals the cache."""

from hypothesis import given, settings
from hypothesis import strategies as st

from memory.cache import GenerationCache


def test_the_oldest_generation_goes_whole_and_a_lookup_does_not_keep_a_value():
    cache = GenerationCache(max_entries=4, generation_entries=2)
    for key in "abcd":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # looked up: an LRU would now keep it
    cache.put("e", "E")  # five held: generation {a, b} goes whole, not just one entry
    assert [cache.get(k) for k in "abcde"] == [None, None, "C", "D", "E"] and len(cache) == 3
    cache.put("c", "C2")  # put again: moves to the open generation, out of {c, d}
    cache.put("f", "F")  # {e, c} sealed; open {f}
    cache.put("g", "G")  # {f, g} sealed, five held: {d} goes, c stays with its new value
    assert [cache.get(k) for k in "cdefg"] == ["C2", None, "E", "F", "G"] and len(cache) == 4


def test_seal_closes_only_a_generation_that_holds_something():
    cache = GenerationCache(max_entries=10, generation_entries=5)
    cache.seal()
    assert cache.sealed() == {}
    cache.put("a", 1)
    cache.seal()
    cache.seal()
    assert cache.sealed() == {0: {"a": 1}}
    cache.drop_open()
    cache.put("b", 2)
    cache.drop_open()
    assert cache.get("b") is None and cache.get("a") == 1
    cache.clear()
    cache.put("c", 3)
    cache.seal()
    assert cache.sealed() == {2: {"c": 3}}  # numbered on: a file of generation 0 or 1 is never confused with it


OPS = st.lists(st.one_of(st.tuples(st.just("put"), st.integers(0, 11), st.integers(0, 99)),
                         st.tuples(st.just("checkpoint")), st.tuples(st.just("clear"))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 4), st.integers(4, 8), st.integers(0, 5))
def test_a_cache_restored_from_the_generations_a_checkpoint_saved_goes_on_as_the_original(ops, per_generation,
                                                                                          capacity, resume_after):
    """As a memory editor saves its memo: at a checkpoint, seal and write each sealed generation not written yet
    (never again afterwards, though its keys may move out); a run resumed from it reads back the ones it names,
    and both then go through the same steps."""
    cache, restored = GenerationCache(capacity, per_generation), None
    files: dict[int, dict] = {}
    checkpoints = 0
    for op in ops:
        for one in (cache, restored) if restored is not None else (cache,):
            if op[0] == "put":
                one.put(op[1], op[2])
            elif op[0] == "clear":
                one.clear()
            else:
                one.seal()
        if op[0] == "checkpoint":
            sealed = cache.sealed()
            files.update({g: values for g, values in sealed.items() if g not in files})
            if checkpoints == resume_after:
                restored = GenerationCache(capacity, per_generation)
                restored.restore({g: files[g] for g in sealed}, cache.opened)
            checkpoints += 1
        assert len(cache) <= capacity
        if restored is not None:
            assert [restored.get(k) for k in range(12)] == [cache.get(k) for k in range(12)]
            assert restored.sealed() == cache.sealed() and len(restored) == len(cache)
            assert restored.opened == cache.opened
