"""Exporters: MLflow (journaled, offline-safe), Prometheus (live HTTP and Pushgateway), plots."""

from __future__ import annotations

from typing import Protocol

from monitor.exporters.prometheus import PrometheusSink
from monitor.exporters.tracking import MlflowSink, sync
from monitor.sink import Sink

__all__ = ["ExportSettings", "MlflowSink", "PrometheusSink", "build_sinks", "sync"]


class ExportSettings(Protocol):
    """Where a run's metrics go (the fields of simulator's RunConfig of the same names)."""

    no_mlflow: bool
    mlflow_uri: str | None
    mlflow_experiment: str
    mlflow_flush_seconds: float
    mlflow_tags: dict[str, str]
    prometheus_port: int | None
    prometheus_host: str
    pushgateway: str | None
    prometheus_linger: float


def build_sinks(settings: ExportSettings, kind: str = "simulate") -> list[Sink]:
    """The exporters a run (`kind` "simulate") or a probe job ("probe") asks for; the caller closes them.

    Serving Prometheus metrics starts here, so a busy port raises OSError before any model loads.
    """
    sinks: list[Sink] = []
    if settings.prometheus_port is not None or settings.pushgateway is not None:
        job = "editwatch" if kind == "simulate" else f"editwatch-{kind}"
        sinks.append(PrometheusSink(port=settings.prometheus_port, host=settings.prometheus_host,
                                    pushgateway=settings.pushgateway, job=job,
                                    linger_seconds=settings.prometheus_linger))
    if not settings.no_mlflow:
        sinks.append(MlflowSink(settings.mlflow_uri, settings.mlflow_experiment, kind, settings.mlflow_flush_seconds,
                                settings.mlflow_tags))
    return sinks
