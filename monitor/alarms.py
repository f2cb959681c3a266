"""Alarms a probe round raises: collapse thresholds and significant forgetting (light: no torch, for the CLI)."""

from __future__ import annotations

import math
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


NONFINITE = "nonfinite_parameters"  # the indicator of NaN/Inf weights, beside the metric keys


def crossed_checks(values: dict[str, float], nonfinite: Sequence[str], limits: CollapseThresholds) -> dict[str, str]:
    """The collapse indicators a round crossed, indicator (a metric key, or NONFINITE) -> reason; empty when healthy."""
    crossed = {NONFINITE: f"NaN/Inf in {', '.join(nonfinite)}"} if nonfinite else {}
    checks = [
        ("ref_ppl_ratio", limits.ppl_ratio, lambda v, t: v > t, "reference perplexity ratio {v:.3g} > {t}"),
        ("ref_agreement", limits.agreement, lambda v, t: v < t, "reference agreement {v:.3f} < {t}"),
        ("weight_change_norm", limits.weight_change, lambda v, t: v > t, "weight change norm {v:.3g} > {t}"),
        ("retention", limits.retention, lambda v, t: v < t, "retention {v:.3f} < {t}"),
    ]
    for key, threshold, above, message in checks:
        value = values.get(key)
        if threshold is not None and value is not None and (math.isnan(value) or above(value, threshold)):
            crossed[key] = message.format(v=value, t=threshold)
    return crossed


def collapse_alarms(values: dict[str, float], nonfinite: Sequence[str], limits: CollapseThresholds) -> list[str]:
    """Why a round counts as collapsed: one reason a crossed threshold, empty when healthy."""
    return list(crossed_checks(values, nonfinite, limits).values())


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
