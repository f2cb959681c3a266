"""Probe-round numbers: the retention estimate and its interval, and retrieval health of real memory editors."""

import math

import numpy as np
import pytest

from editors import LVLM, Editor, EditRequest, HasMemory, Query, create_editor
from monitor import CollapseThresholds, Estimate, PoolEntry, ProbeRound, ReferenceSet, estimate_mean, retrieval_health
from tests.tiny_models import random_image, tiny_llava

Z = 1.959964  # two-sided 95% normal quantile


def half_width(values: list[float], population: int) -> float:
    """Z * sqrt(s^2 / n * (N - n) / (N - 1)), s^2 the sample variance (n - 1 in the denominator)."""
    n = len(values)
    mean = sum(values) / n
    s2 = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Z * math.sqrt(s2 / n * (population - n) / (population - 1))


# -- estimate_mean ----------------------------------------------------------------------------


def test_small_sample_of_a_finite_population_by_hand():
    """[1, 0, 1, 1] of 10: mean 0.75, s^2 = 0.25, half = Z * sqrt(0.25 / 4 * 6 / 9); the top is clipped at 1."""
    estimate = estimate_mean([1.0, 0.0, 1.0, 1.0], population=10)
    half = Z * math.sqrt(0.25 / 4 * 6 / 9)
    assert half == pytest.approx(half_width([1.0, 0.0, 1.0, 1.0], 10), abs=1e-15)
    assert half == pytest.approx(0.400076, abs=1e-6)
    assert estimate.mean == 0.75 and estimate.n == 4 and estimate.population == 10
    assert estimate.low == pytest.approx(0.75 - half, abs=1e-12)
    assert estimate.high == 1.0  # 0.75 + 0.400 clipped


def test_an_unclipped_interval_uses_the_finite_population_correction():
    """Both ends inside [0, 1]: exactly mean -/+ the corrected half width, narrower than without the correction."""
    values = [0.5, 0.6, 0.7, 0.4, 0.5]
    estimate = estimate_mean(values, population=20)
    mean = 2.7 / 5
    s2 = (0.04**2 + 0.06**2 + 0.16**2 + 0.14**2 + 0.04**2) / 4  # deviations from 0.54: 0.013
    half = Z * math.sqrt(s2 / 5 * 15 / 19)
    assert s2 == pytest.approx(0.013, abs=1e-15)
    assert estimate.mean == pytest.approx(mean, abs=1e-15)
    assert (estimate.low, estimate.high) == pytest.approx((mean - half, mean + half), abs=1e-12)
    assert estimate.high - estimate.low == pytest.approx(0.177596, abs=1e-6)
    uncorrected = 2 * Z * math.sqrt(s2 / 5)  # 0.199955: an interval without the correction is 12% wider
    assert estimate.high - estimate.low == pytest.approx(uncorrected * math.sqrt(15 / 19), abs=1e-12)
    assert uncorrected - (estimate.high - estimate.low) > 0.02


def test_the_whole_population_measured_has_zero_width():
    """n = N: the mean is known exactly, whatever the spread of the values."""
    assert estimate_mean([1.0, 0.0, 1.0, 1.0], population=4) == Estimate(0.75, 0.75, 0.75, 4, 4)
    assert estimate_mean([0.3], population=1) == Estimate(0.3, 0.3, 0.3, 1, 1)


def test_one_draw_of_many_says_nothing_about_the_spread():
    """n = 1 of N > 1: the interval is the mean -/+ 1, clipped to [0, 1]: all of [0, 1]."""
    assert estimate_mean([0.4], population=50) == Estimate(0.4, 0.0, 1.0, 1, 50)
    assert estimate_mean([1.0], population=2) == Estimate(1.0, 0.0, 1.0, 1, 2)
    assert estimate_mean([0.0], population=1000) == Estimate(0.0, 0.0, 1.0, 1, 1000)


def test_the_interval_is_clipped_at_zero():
    """[0, 0, 0, 1] of 100: mean 0.25 - half 0.4825 would be negative; the top end is unclipped."""
    estimate = estimate_mean([0.0, 0.0, 0.0, 1.0], population=100)
    half = Z * math.sqrt(0.25 / 4 * 96 / 99)
    assert half == pytest.approx(0.482510, abs=1e-6)
    assert estimate.low == 0.0
    assert estimate.high == pytest.approx(0.25 + half, abs=1e-12)


def test_equal_values_give_a_point_interval():
    """No spread in a sample of several: s^2 = 0, so the interval is the mean itself."""
    assert estimate_mean([0.5, 0.5, 0.5], population=9) == Estimate(0.5, 0.5, 0.5, 3, 9)


def test_an_empty_sample_and_a_sample_larger_than_its_population_are_errors():
    """n = 0 has no mean; n > N cannot come from sampling without replacement."""
    with pytest.raises(ValueError, match="cannot estimate a mean from an empty sample"):
        estimate_mean([], population=5)
    with pytest.raises(ValueError, match="sample of 3 is larger than its population of 2"):
        estimate_mean([1.0, 0.0, 1.0], population=2)


# -- retrieval_health -------------------------------------------------------------------------

DOG = EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), key="dog")
PARIS = EditRequest("what is the capital of France?", "Paris", random_image(12), key="paris")
CAT = EditRequest("what colour is the mat?", "red", random_image(13), key="mat")
FOX = EditRequest("the quick brown", "fox", random_image(14), key="fox")
EDITS = [DOG, PARIS, CAT, FOX]


@pytest.fixture(scope="module")
def lvlm():
    """One tiny LLaVA for the memory editors (they never change its weights)."""
    return tiny_llava(seed=1)


def edited(name: str, lvlm: LVLM, **config: object) -> Editor:
    """A memory editor holding the four EDITS."""
    editor = create_editor(name, lvlm, config)
    for edit in EDITS:
        editor.apply(edit)
    return editor


OUT_OF_SCOPE = [
    Query(DOG.prompt, "a brown dog", random_image(30)),  # an edited question about another picture
    Query("the quick brown", "fox"),  # text only: no image, so never the image-keyed edit
    Query("who painted this?", "Monet", random_image(31)),
]


def test_serac_recall_and_false_hits_are_the_counts_of_right_keys_and_routed_outsiders(lvlm):
    """Four edited questions asked as edited: recall 4/4; one given a wrong key: 3/4; outsiders below the threshold."""
    editor = edited("serac", lvlm, threshold=0.99)
    in_scope = [(edit.query, edit.key) for edit in EDITS]
    values = retrieval_health(editor, in_scope, OUT_OF_SCOPE)
    assert set(values) == {"retrieval_latency_seconds", "retrieval_recall_at_1", "retrieval_false_hit_rate"}
    assert values["retrieval_recall_at_1"] == 1.0 and values["retrieval_false_hit_rate"] == 0.0
    assert values["retrieval_latency_seconds"] > 0

    wrong_key = [*in_scope[:3], (FOX.query, "dog")]  # routed to FOX, but the probe expects DOG's edit: a miss
    assert retrieval_health(editor, wrong_key, OUT_OF_SCOPE)["retrieval_recall_at_1"] == 0.75

    # An outsider that is an edited question about its own picture is a false hit: 1 of 4.
    routed = [*OUT_OF_SCOPE, PARIS.query]
    assert retrieval_health(editor, in_scope, routed)["retrieval_false_hit_rate"] == 0.25


def test_ike_routes_every_query_so_every_outsider_is_a_false_hit(lvlm):
    """IKE has no scope decision: its nearest edit is always returned, so the false-hit rate is 3/3."""
    editor = edited("ike", lvlm)
    in_scope = [(edit.query, edit.key) for edit in EDITS]
    values = retrieval_health(editor, in_scope, OUT_OF_SCOPE)
    assert values["retrieval_recall_at_1"] == 1.0
    assert values["retrieval_false_hit_rate"] == 1.0


def test_only_the_sides_given_are_measured(lvlm):
    """Without outsiders there is no false-hit rate, without in-scope queries no recall, without either nothing."""
    editor = edited("serac", lvlm, threshold=0.99)
    only_in = retrieval_health(editor, [(DOG.query, "dog"), (CAT.query, "paris")], [])
    assert set(only_in) == {"retrieval_latency_seconds", "retrieval_recall_at_1"}
    assert only_in["retrieval_recall_at_1"] == 0.5
    only_out = retrieval_health(editor, [], OUT_OF_SCOPE[:2] + [CAT.query])
    assert set(only_out) == {"retrieval_latency_seconds", "retrieval_false_hit_rate"}
    assert only_out["retrieval_false_hit_rate"] == pytest.approx(1 / 3, abs=1e-15)
    assert retrieval_health(editor, [], []) == {}


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_an_editor_without_memory_has_no_retrieval_health(lvlm):
    """`none` declares no memory, so a probe round reports no retrieval numbers at all (not zeros);
    the same round on SERAC holding the pool's edits reports recall 2/2 of the exact generality questions."""
    images = {"dog.png": DOG.image, "paris.png": PARIS.image}
    # Generality questions equal to the edits themselves: in scope at any threshold below 1.
    pool = [PoolEntry(key=e.key, src=e.prompt, alt=e.target, image=name, rephrase=e.prompt, image_rephrase=name,
                      at_edit=1.0) for e, name in ((DOG, "dog.png"), (PARIS, "paris.png"))]
    none = create_editor("none", lvlm)
    assert not isinstance(none, HasMemory)
    values = ProbeRound(none, images.__getitem__, CollapseThresholds(), 2)(pool, ReferenceSet(), rng()).values
    assert not {k for k in values if k.startswith(("retrieval_", "memory_"))}
    assert values["retention_sample"] == 2.0  # the round itself did run
    assert values["forgetting"] == pytest.approx(1.0 - values["retention"], abs=1e-12)

    serac = create_editor("serac", lvlm, {"threshold": 0.99})
    serac.apply(DOG)
    serac.apply(PARIS)
    assert isinstance(serac, HasMemory)
    values = ProbeRound(serac, images.__getitem__, CollapseThresholds(), 2)(pool, ReferenceSet(), rng()).values
    assert values["retrieval_recall_at_1"] == 1.0 and values["memory_size"] == 2.0
    assert "retrieval_false_hit_rate" not in values  # an empty reference set: nothing out of scope to ask
