"""Monitor: metric definitions, pre-edit references, probes and exporters."""

from monitor.metrics import (
    LOCALITY,
    METRICS,
    Metric,
    Probe,
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
from monitor.reference import Reference, ReferenceStore

__all__ = [
    "LOCALITY",
    "METRICS",
    "Metric",
    "Probe",
    "Reference",
    "ReferenceStore",
    "aggregate",
    "base_probes",
    "edit_probes",
    "fill_references",
    "get_metric",
    "locality",
    "measure",
    "measure_base",
    "token_accuracy",
    "topk_kl",
    "vlkeb_locality",
]
