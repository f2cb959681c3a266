"""Monitor: metric definitions, the probe plan and round, pre-edit references, alarms and exporters.

Public names resolve lazily (PEP 562), as in `editors`: the CLI reads the alarm thresholds
to build its help without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CollapseThresholds": "monitor.alarms",
    "crossed_checks": "monitor.alarms",
    "forgetting_significant": "monitor.alarms",
    "METRICS": "monitor.metrics",
    "Metric": "monitor.metrics",
    "RunningMeans": "monitor.metrics",
    "aggregate": "monitor.metrics",
    "fill_references": "monitor.metrics",
    "base_values": "monitor.metrics",
    "edit_values": "monitor.metrics",
    "keep_references": "monitor.metrics",
    "score_probes": "monitor.metrics",
    "get_metric": "monitor.metrics",
    "locality": "monitor.metrics",
    "measure": "monitor.metrics",
    "measure_base": "monitor.metrics",
    "token_accuracy": "monitor.metrics",
    "topk_kl": "monitor.metrics",
    "vlkeb_locality": "monitor.metrics",
    "LOCALITY": "monitor.plan",
    "Probe": "monitor.plan",
    "base_probes": "monitor.plan",
    "edit_probes": "monitor.plan",
    "planned": "monitor.plan",
    "Estimate": "monitor.probes",
    "ReferenceSet": "monitor.probes",
    "edit_success": "monitor.probes",
    "estimate_mean": "monitor.probes",
    "reference_health": "monitor.probes",
    "retention": "monitor.probes",
    "retrieval_health": "monitor.probes",
    "Reference": "monitor.reference",
    "ReferenceStore": "monitor.reference",
    "PoolEntry": "monitor.round",
    "ProbeRound": "monitor.round",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from monitor.alarms import CollapseThresholds, crossed_checks, forgetting_significant
    from monitor.metrics import (
        METRICS,
        Metric,
        RunningMeans,
        aggregate,
        fill_references,
        base_values,
        edit_values,
        keep_references,
        score_probes,
        get_metric,
        locality,
        measure,
        measure_base,
        token_accuracy,
        topk_kl,
        vlkeb_locality,
    )
    from monitor.plan import LOCALITY, Probe, base_probes, edit_probes, planned
    from monitor.probes import (
        Estimate,
        ReferenceSet,
        edit_success,
        estimate_mean,
        reference_health,
        retention,
        retrieval_health,
    )
    from monitor.reference import Reference, ReferenceStore
    from monitor.round import PoolEntry, ProbeRound


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
