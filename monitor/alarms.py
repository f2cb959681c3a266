"""Alarms a probe round raises: collapse thresholds and significant forgetting (light: no torch, for the CLI)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field


class CollapseThresholds(BaseModel):
    """When a probe round raises the collapse alarm; None switches a check off."""

    model_config = ConfigDict(extra="forbid")

    ppl_ratio: float | None = Field(2.0, gt=1, description="alarm when reference perplexity grows by this factor")
    agreement: float | None = Field(
        0.5, ge=0, le=1, description="alarm when top-1 agreement with the unedited model on the reference set falls below"
    )
    weight_change: float | None = Field(None, gt=0, description="alarm when the accumulated weight-change norm exceeds")
    retention: float | None = Field(None, ge=0, le=1, description="alarm when retention of earlier edits falls below")
    entropy: float | None = Field(
        None, gt=0, description="alarm when the mean next-token entropy on the reference set exceeds this (nats)"
    )


NONFINITE = "nonfinite_parameters"  # the indicator of NaN/Inf weights, beside the metric keys


@dataclass(frozen=True)
class Check:
    """One collapse check: the metric it reads, its threshold, and whether the alarm is above or below it."""

    metric: str
    threshold: float
    above: bool  # True: alarm when the value exceeds the threshold; False: when it falls below
    what: str  # how the reason names the metric

    def crossed(self, value: float) -> bool:
        """Whether `value` raises the alarm (NaN always does)."""
        return math.isnan(value) or (value > self.threshold if self.above else value < self.threshold)

    def reason(self, value: float) -> str:
        """The alarm's reason, e.g. "reference perplexity ratio 3.2 > 2.0"."""
        shown = f"{value:.3g}" if self.above else f"{value:.3f}"
        return f"{self.what} {shown} {'>' if self.above else '<'} {self.threshold}"


def collapse_checks(limits: CollapseThresholds) -> list[Check]:
    """The checks `limits` switches on, in reporting order: the one mapping of thresholds to metrics."""
    declared = [("ref_ppl_ratio", limits.ppl_ratio, True, "reference perplexity ratio"),
                ("ref_agreement", limits.agreement, False, "reference agreement"),
                ("weight_change_norm", limits.weight_change, True, "weight change norm"),
                ("retention", limits.retention, False, "retention"),
                ("generation_entropy", limits.entropy, True, "generation entropy")]
    return [Check(metric, threshold, above, what) for metric, threshold, above, what in declared
            if threshold is not None]


def crossed_checks(values: dict[str, float], nonfinite: Sequence[str], limits: CollapseThresholds) -> dict[str, str]:
    """The collapse indicators a round crossed, indicator (a metric key, or NONFINITE) -> reason; empty when healthy."""
    crossed = {NONFINITE: f"NaN/Inf in {', '.join(nonfinite)}"} if nonfinite else {}
    for check in collapse_checks(limits):
        value = values.get(check.metric)
        if value is not None and check.crossed(value):
            crossed[check.metric] = check.reason(value)
    return crossed


def forgetting_significant(values: dict[str, float]) -> bool:
    """The sampled edits are reliably worse now than right after they were applied.

    The one definition of forgetting: `forgetting` > 0 and the upper end of the 95% interval of
    `retention` below their reliability at edit time (retention + forgetting). The run flags it
    in each round and exports it as `forgetting_significant`; the alert rule fires on that flag.
    """
    if "retention" not in values:
        return False
    at_edit = values["retention"] + values["forgetting"]
    return values["forgetting"] > 0 and values["retention_ci_high"] < at_edit
