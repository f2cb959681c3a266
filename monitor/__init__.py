"""Monitor: metric definitions, pre-edit references, probes, alarms and exporters.

Public names resolve lazily (PEP 562), as in `editors`: the CLI reads the alarm thresholds
to build its help without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CollapseThresholds": "monitor.alarms",
    "collapse_alarms": "monitor.alarms",
    "LOCALITY": "monitor.metrics",
    "METRICS": "monitor.metrics",
    "Metric": "monitor.metrics",
    "Probe": "monitor.metrics",
    "RunningMeans": "monitor.metrics",
    "aggregate": "monitor.metrics",
    "base_probes": "monitor.metrics",
    "edit_probes": "monitor.metrics",
    "fill_references": "monitor.metrics",
    "get_metric": "monitor.metrics",
    "locality": "monitor.metrics",
    "measure": "monitor.metrics",
    "measure_base": "monitor.metrics",
    "token_accuracy": "monitor.metrics",
    "topk_kl": "monitor.metrics",
    "vlkeb_locality": "monitor.metrics",
    "Estimate": "monitor.probes",
    "ReferenceSet": "monitor.probes",
    "RetainedEdit": "monitor.probes",
    "estimate_mean": "monitor.probes",
    "nonfinite_parameters": "monitor.probes",
    "reference_health": "monitor.probes",
    "retention": "monitor.probes",
    "retrieval_health": "monitor.probes",
    "Reference": "monitor.reference",
    "ReferenceStore": "monitor.reference",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from monitor.alarms import CollapseThresholds, collapse_alarms
    from monitor.metrics import (
        LOCALITY,
        METRICS,
        Metric,
        Probe,
        RunningMeans,
        aggregate,
        base_probes,
        edit_probes,
        fill_references,
        get_metric,
        locality,
        measure,
        measure_base,
        token_accuracy,
        topk_kl,
        vlkeb_locality,
    )
    from monitor.probes import (
        Estimate,
        ReferenceSet,
        RetainedEdit,
        estimate_mean,
        nonfinite_parameters,
        reference_health,
        retention,
        retrieval_health,
    )
    from monitor.reference import Reference, ReferenceStore


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
