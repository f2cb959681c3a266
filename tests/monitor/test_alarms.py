"""The alarms of a probe round: collapse thresholds at their boundaries, and the one definition of forgetting."""

import math

import pytest
from pydantic import ValidationError

from monitor import CollapseThresholds, crossed_checks, forgetting_significant


def collapse_alarms(values, nonfinite, limits):
    """The round's reasons, in reporting order (what rounds.jsonl holds as `alarms`)."""
    return list(crossed_checks(values, nonfinite, limits).values())


# Every check switched on, at thresholds that are exact in binary floating point.
ALL_ON = CollapseThresholds(ppl_ratio=2.0, agreement=0.5, weight_change=3.0, retention=0.75, entropy=4.0)
HEALTHY = {"ref_ppl_ratio": 1.0, "ref_agreement": 1.0, "weight_change_norm": 0.0, "retention": 1.0,
           "generation_entropy": 1.0}


# -- forgetting -------------------------------------------------------------------------------


def test_forgetting_is_significant_only_when_the_interval_lies_strictly_below_reliability_at_edit_time():
    """retention 0.5 + forgetting 0.25 = 0.75 at edit time: the CI's upper end must be strictly below 0.75."""
    base = {"retention": 0.5, "forgetting": 0.25, "retention_ci_low": 0.25}
    assert forgetting_significant({**base, "retention_ci_high": 0.7499}) is True
    assert forgetting_significant({**base, "retention_ci_high": 0.75}) is False  # touching: not excluded
    assert forgetting_significant({**base, "retention_ci_high": 0.7501}) is False


def test_no_retention_key_means_no_forgetting():
    """A round without retained edits (nothing sampled yet) never flags forgetting."""
    assert forgetting_significant({}) is False
    assert forgetting_significant({"ref_ppl_ratio": 5.0, "ref_agreement": 0.0}) is False


@pytest.mark.parametrize("forgetting", [0.0, -0.25])
def test_no_drop_is_no_forgetting_even_with_a_narrow_interval(forgetting):
    """forgetting <= 0 never flags, even when the CI's upper end is below retention + forgetting."""
    values = {"retention": 0.5, "forgetting": forgetting, "retention_ci_low": 0.0, "retention_ci_high": 0.1}
    assert values["retention_ci_high"] < values["retention"] + values["forgetting"]  # only the sign gate says no
    assert forgetting_significant(values) is False


# -- collapse ---------------------------------------------------------------------------------


def test_defaults_are_the_documented_thresholds():
    """ppl ratio 2, agreement 0.5 on; weight change, retention and entropy off."""
    limits = CollapseThresholds()
    assert (limits.ppl_ratio, limits.agreement, limits.weight_change, limits.retention, limits.entropy) == \
        (2.0, 0.5, None, None, None)


def test_a_healthy_round_and_values_exactly_at_each_threshold_raise_nothing():
    """The comparisons are strict: a value equal to its threshold is not a crossing."""
    assert collapse_alarms(HEALTHY, [], ALL_ON) == []
    at = {"ref_ppl_ratio": 2.0, "ref_agreement": 0.5, "weight_change_norm": 3.0, "retention": 0.75,
          "generation_entropy": 4.0}
    assert collapse_alarms(at, [], ALL_ON) == []


@pytest.mark.parametrize(
    ("key", "inside", "crossed", "reason"),
    [
        ("ref_ppl_ratio", 1.999, 2.5, "reference perplexity ratio 2.5 > 2.0"),
        ("ref_agreement", 0.501, 0.25, "reference agreement 0.250 < 0.5"),
        ("weight_change_norm", 2.999, 3.5, "weight change norm 3.5 > 3.0"),
        ("retention", 0.751, 0.5, "retention 0.500 < 0.75"),
        ("generation_entropy", 3.999, 5.5, "generation entropy 5.5 > 4.0"),
    ],
)
def test_each_threshold_crossed_gives_exactly_its_reason(key, inside, crossed, reason):
    """Just inside: nothing; crossed: one reason, worded exactly."""
    assert collapse_alarms({**HEALTHY, key: inside}, [], ALL_ON) == []
    assert collapse_alarms({**HEALTHY, key: crossed}, [], ALL_ON) == [reason]


def test_a_hair_past_the_boundary_is_crossed():
    """The smallest float past each threshold already raises it (strict > and <, nothing rounded first)."""
    values = {
        "ref_ppl_ratio": math.nextafter(2.0, math.inf),
        "ref_agreement": math.nextafter(0.5, -math.inf),
        "weight_change_norm": math.nextafter(3.0, math.inf),
        "retention": math.nextafter(0.75, -math.inf),
        "generation_entropy": math.nextafter(4.0, math.inf),
    }
    assert collapse_alarms(values, [], ALL_ON) == [
        "reference perplexity ratio 2 > 2.0",
        "reference agreement 0.500 < 0.5",
        "weight change norm 3 > 3.0",
        "retention 0.750 < 0.75",
        "generation entropy 4 > 4.0",
    ]


def test_nan_values_raise_the_alarm():
    """A NaN compares False with everything, so it must be caught explicitly: every NaN check raises."""
    nan = float("nan")
    values = {"ref_ppl_ratio": nan, "ref_agreement": nan, "weight_change_norm": nan, "retention": nan,
              "generation_entropy": nan}
    assert collapse_alarms(values, [], ALL_ON) == [
        "reference perplexity ratio nan > 2.0",
        "reference agreement nan < 0.5",
        "weight change norm nan > 3.0",
        "retention nan < 0.75",
        "generation entropy nan > 4.0",
    ]


def test_none_switches_a_check_off_even_for_nan_and_missing_values_are_skipped():
    """A switched-off check never fires (not even on NaN); a value absent from the round is not a crossing."""
    off = CollapseThresholds(ppl_ratio=None, agreement=None, weight_change=None, retention=None, entropy=None)
    awful = {"ref_ppl_ratio": 1e9, "ref_agreement": 0.0, "weight_change_norm": float("nan"), "retention": 0.0,
             "generation_entropy": 50.0}
    assert collapse_alarms(awful, [], off) == []
    assert collapse_alarms({}, [], ALL_ON) == []
    # The defaults leave weight change, retention and entropy off: only the two default checks fire.
    assert collapse_alarms(awful, [], CollapseThresholds()) == [
        "reference perplexity ratio 1e+09 > 2.0",
        "reference agreement 0.000 < 0.5",
    ]


def test_nonfinite_parameters_come_first_then_the_thresholds_in_order():
    """NaN/Inf parameter names are the first reason, even when every threshold is off."""
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    reason = "NaN/Inf in model.layers.1.mlp.down_proj.weight, lm_head.weight"
    off = CollapseThresholds(ppl_ratio=None, agreement=None)
    assert collapse_alarms(HEALTHY, names, off) == [reason]
    crossed = {"ref_ppl_ratio": 4.0, "ref_agreement": 0.125, "weight_change_norm": 8.0, "retention": 0.25}
    assert collapse_alarms(crossed, names, ALL_ON) == [
        reason,
        "reference perplexity ratio 4 > 2.0",
        "reference agreement 0.125 < 0.5",
        "weight change norm 8 > 3.0",
        "retention 0.250 < 0.75",
    ]


@pytest.mark.parametrize(
    "settings",
    [{"ppl_ratio": 1.0}, {"agreement": 1.5}, {"agreement": -0.1}, {"weight_change": 0.0}, {"retention": 2.0},
     {"ppl": 2.0}],
)
def test_thresholds_that_could_never_or_always_fire_are_refused(settings):
    """A ratio <= 1 would fire on a healthy model; agreement/retention live in [0, 1]; typos are errors."""
    with pytest.raises(ValidationError):
        CollapseThresholds(**settings)


def test_merged_alarm_logs_keep_each_alarm_as_first_raised():
    # A probe job's own alarm must survive the run's checkpoint, which holds the run's alarms only.
    from monitor.round import AlarmLog

    job = AlarmLog(collapse={"raised": True, "first_at": 40, "reasons": ["ref_agreement"]})
    run = AlarmLog(collapse={"raised": True, "first_at": 60, "reasons": ["ref_ppl_ratio"]},
                   forgetting={"detected": True, "first_at": 50})
    merged = job.merged(run)
    assert merged.collapse == {"raised": True, "first_at": 40, "reasons": ["ref_agreement"]}
    assert merged.forgetting == {"detected": True, "first_at": 50}
    assert run.merged(job).as_dict() == merged.as_dict()
    assert AlarmLog().merged(AlarmLog()).as_dict() == AlarmLog().as_dict()
