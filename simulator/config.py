"""Run settings: one pydantic model, loadable from a YAML/JSON scenario file; CLI flags override it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from editors.prompts import PromptFormat, ProtocolName
from monitor.alarms import CollapseThresholds
from simulator.records import RecordFormat

if TYPE_CHECKING:
    from editors.families import Family


class RunConfig(BaseModel):
    """Settings of one `simulate` run (DESIGN.md, Command line)."""

    model_config = ConfigDict(extra="forbid")

    stream: str = Field(description="JSONL edit stream; '-' reads standard input")
    model: str = Field("default", description="'default' (embedded model), a hub id or a local folder")
    method: str = Field("ft-llm", description="editing method (see `simulate --help`)")
    method_config: dict[str, Any] = Field(default_factory=dict, description="the method's hyperparameters")
    mode: Literal["single", "sequential"] = Field("sequential", description="single: apply, measure, reset")
    gap: list[PositiveInt] = Field(default_factory=lambda: [10], description="sequential gaps, all in one pass")
    images: Path | None = Field(None, description="root folder of the records' image paths")
    out: Path | None = Field(None, description="output folder (summary.json, rounds.jsonl, quarantine.jsonl)")
    seed: int = Field(0, description="seed of every random choice")
    limit: PositiveInt | None = Field(None, description="stop after this many edits")
    resume: bool = Field(False, description="continue from the last checkpoint in --out")
    follow: bool = Field(False, description="keep reading a growing stream file until interrupted")
    record_format: RecordFormat = Field("vlkeb", description="record format of the stream")
    prompt_format: PromptFormat = Field(
        "auto", description="auto: chat template when the model has one, else plain; vlkeb: VLKEB's bare question"
    )
    protocol: ProtocolName = Field(
        "editwatch", description="editwatch: each method's own defaults; vlkeb: VLKEB's prompt, locality and "
        "per-model method settings (editors/protocols.py); --method-config still overrides them"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="model weights dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda:0")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the checkpoint (models transformers does not include); "
        "only for checkpoints you trust"
    )
    max_tokens: PositiveInt | None = Field(
        None, description="longest query (prompt, answer and image tokens) a record may bring; longer records are "
        "quarantined (default: the model's context)"
    )
    probe_every: PositiveInt | None = Field(None, description="edits between probe rounds (default: the smallest gap)")
    retention_sample: PositiveInt = Field(100, description="earlier edits re-measured per probe round (random sample)")
    reference_size: PositiveInt = Field(
        32, description="records whose locality questions form the fixed reference set (the stream's first ones)"
    )
    checkpoint_every: PositiveInt = Field(100, description="edits between checkpoints in --out")
    collapse: CollapseThresholds = Field(default_factory=CollapseThresholds, description="collapse alarm thresholds")
    stop_on_collapse: bool = Field(False, description="stop the run at the first collapse alarm")
    train: Path | None = Field(
        None, description="train split for methods that learn (default: train.jsonl beside the stream)"
    )
    editor_state: Path | None = Field(None, description="start from a saved editor state (e.g. from train-editor)")
    run_name: str | None = Field(None, description="name of the run in outputs and exporters (default: from --out)")
    vlkeb_compat: bool = Field(False, description="also report VLKEB's own locality (*_vlkeb keys)")
    one_hop_edit: bool = Field(False, description="VLKEB Table 3: also edit the one-hop fact, then test portability")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: MLflow's local default)")
    mlflow_experiment: str = Field("editwatch", description="MLflow experiment the run is logged to")
    mlflow_tags: dict[str, str] = Field(default_factory=dict, description="extra tags of the run's MLflow run")
    mlflow_flush_seconds: float = Field(
        30.0, ge=0, description="at the end, how long to wait for an unreachable MLflow server; what is still "
        "unsent stays in OUT/mlflow for `simulate compare --sync OUT`"
    )
    no_mlflow: bool = Field(False, description="do not log the run to MLflow")
    prometheus_port: int | None = Field(None, ge=1, le=65535, description="serve live Prometheus metrics on this port")
    prometheus_host: str = Field("127.0.0.1", description="address the metrics are served on (0.0.0.0 in a container)")
    pushgateway: str | None = Field(None, description="Pushgateway URL for batch metrics")
    prometheus_linger: float = Field(
        30.0, ge=0, description="after the run, how long to keep serving metrics until Prometheus has scraped its "
        "end (only when it scraped the run before), so alerts resolve because the run ended"
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        problems = []
        if self.resume and self.out is None:
            problems.append("--resume needs --out (the folder holding the checkpoint)")
        if self.follow and self.stream == "-":
            problems.append("--follow needs a stream file, not standard input")
        if self.one_hop_edit and self.record_format != "vlkeb":
            problems.append("--one-hop-edit needs VLKEB records (edit_onehop fields)")
        if self.one_hop_edit and self.mode != "sequential":
            problems.append("--one-hop-edit applies two edits in a row: use --mode sequential")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def apply_protocol(config: RunConfig, family: Family | None = None) -> RunConfig:
    """The settings with `protocol`'s prompt format and locality and, given the model's family, its method settings.

    Explicit choices win: a prompt format other than "auto" and every `method_config` key.
    """
    from editors.protocols import protocol

    chosen = protocol(config.protocol)
    update: dict[str, Any] = {"vlkeb_compat": config.vlkeb_compat or chosen.vlkeb_compat}
    if config.prompt_format == "auto":
        update["prompt_format"] = chosen.prompt_format
    if family is not None:
        update["method_config"] = {**chosen.method_config(config.method, family), **config.method_config}
    return config.model_copy(update=update)


def load_run_config(path: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Settings from a YAML/JSON scenario file (optional), with `overrides` taking precedence."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"scenario file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict) and key != "method_config":
            values[key] = {**values[key], **value}  # a nested settings group: flags override field by field
        else:
            values[key] = value
    return RunConfig.model_validate(values)
