"""What a sweep file holds (base scenario, grid, resources per cell) and the cells it expands to.

A sweep file is YAML or JSON:

    name: serac-gaps            # optional; default: the file's name
    base: {stream: w/eval.jsonl, method: serac, limit: 1000}   # the fields of `simulate --config`
    grid: {method: [serac, ike], seed: [0, 1]}                 # one cell per combination
    resources: {cpu: 1, gpu: 0.5}                              # per cell, fractions allowed
    max_failures: 2                                            # retries of a cell whose worker dies

Every cell is validated as a RunConfig (and its method's settings) before anything starts, and
every problem of the file is reported at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from simulator.command import CommandError, validation_problems
from simulator.config import RunConfig

# Settings the sweep sets for each cell: its folder, name, resume and MLflow parent.
OWNED = {
    "out": "each cell writes to <sweep folder>/cells/<cell>; give the sweep's folder with --out",
    "run_name": "a cell is named by its grid values",
    "resume": "use `simulate sweep --resume`",
    "mlflow_tags": "the sweep tags each cell with its parent run and grid values",
    "follow": "a cell must end",
    "prometheus_port": "cells run side by side and cannot share a port: use pushgateway",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
_MAX_NAME = 120  # characters of a cell's folder name before it is shortened with a digest


class Resources(BaseModel):
    """What Ray reserves for each cell."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(1.0, ge=0, description="CPU cores per cell (fractions allowed)")
    gpu: float = Field(0.0, ge=0, description="GPUs per cell; a fraction (e.g. 0.5) shares one GPU between cells")


class SweepFile(BaseModel):
    """A sweep file: the scenario every cell shares and the grid of what varies."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$",
                             description="name of the sweep (MLflow parent run); default: the file's name")
    base: dict[str, Any] = Field(default_factory=dict, description="settings every cell shares (`simulate --config`)")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        min_length=1, description="setting -> values; one cell per combination"
    )
    resources: Resources = Field(default_factory=Resources, description="per cell")
    max_failures: NonNegativeInt = Field(
        2, description="retries of a cell whose worker fails; each continues from the cell's last checkpoint"
    )


class SweepOptions(BaseModel):
    """Flags of `simulate sweep`: where and how the sweep file runs."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="Ray cluster: 'auto' (the one `ray start` runs on this machine) or HOST:PORT; "
        "default: a local Ray instance with this machine's cores"
    )
    out: Path | None = Field(None, description="sweep folder (cells/, compare/, Ray's state); "
                                               "default: runs/<sweep name>")
    resume: bool = Field(False, description="continue the sweep in --out: finished cells are kept, the others continue "
                                            "from their checkpoints")
    max_concurrent: PositiveInt | None = Field(None, description="cells running at once (default: as many as fit)")


@dataclass
class Cell:
    """One combination of the grid: its name, its grid values and its run's settings."""

    name: str
    values: dict[str, Any]
    config: RunConfig


@dataclass
class Sweep:
    """A validated sweep file and its cells, in grid order."""

    name: str
    spec: SweepFile
    cells: list[Cell]


def load_sweep(path: Path) -> Sweep:
    """Read and validate a sweep file and every cell; all problems in one CommandError."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise CommandError(f"cannot read sweep file {path}: {error}") from None
    if not isinstance(raw, dict):
        raise CommandError(f"sweep file {path} must hold a mapping (base, grid, resources, ...)")
    problems: list[str] = []
    spec: SweepFile | None = None
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as error:
        problems.append(validation_problems(error, flags=False))
    base, grid = raw.get("base", {}), raw.get("grid")
    # The cells are checked even when another part of the file is wrong, so every problem shows at once;
    # a malformed base or grid is already among the problems above.
    cells: list[Cell] = []
    if isinstance(base, dict) and isinstance(grid, dict) and grid and all(
            isinstance(values, list) and values for values in grid.values()):
        cells, cell_problems = _cells(base, grid, spec.resources if spec else None)
        problems += cell_problems
    if problems or spec is None:
        raise CommandError(f"invalid sweep file {path}: " + "; ".join(problems))
    return Sweep(spec.name or path.stem, spec, cells)


def _cells(base: dict[str, Any], grid: dict[str, list[Any]],
           resources: Resources | None) -> tuple[list[Cell], list[str]]:
    """Every combination of the grid over `base`, validated; and the problems, each named once."""
    problems: dict[str, None] = {}  # ordered and without repeats: a base mistake shows in every cell
    for part, keys in (("base", base), ("grid", grid)):
        for key in keys:
            if key in OWNED:
                problems[f"{part}.{key}: set by the sweep ({OWNED[key]})"] = None
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cells = []
    for name, values in zip(cell_names(combinations), combinations):
        settings = {**base, **values}
        problems.update(dict.fromkeys(_method_problems(settings, grid)))
        try:
            config = RunConfig.model_validate(settings)
        except ValidationError as error:
            for item in error.errors():
                field = next((str(p) for p in item["loc"][:1]), "")
                where = ".".join(str(p) for p in item["loc"] if isinstance(p, str))  # list indices left out
                part = "grid" if field in grid else "base"
                problems[f"{part}.{where}: {item['msg']}" if where else f"cell {name}: {item['msg']}"] = None
            continue
        if config.stream == "-":
            problems["base.stream: a sweep reads its streams from files, not standard input"] = None
        if config.device.startswith("cuda") and resources is not None and resources.gpu == 0:
            problems[f"resources.gpu: cells on {config.device} need a GPU share (Ray hides GPUs from a cell "
                     "without one)"] = None
        cells.append(Cell(name, values, _absolute_paths(config)))
    return cells, list(problems)


def _method_problems(settings: dict[str, Any], grid: dict[str, list[Any]]) -> list[str]:
    """A cell's method and its settings checked by the method's own model, as `simulate` does before loading."""
    from editors.registry import UnknownMethodError, editor_class

    method = settings.get("method", RunConfig.model_fields["method"].default)
    method_config = settings.get("method_config", {})
    if not isinstance(method, str) or not isinstance(method_config, dict):
        return []  # a wrong type: RunConfig reports it
    try:
        editor_class(method).Config.model_validate(method_config)
    except UnknownMethodError as error:  # its message suggests the closest names
        return [f"{'grid' if 'method' in grid else 'base'}.method: {error}"]
    except ValidationError as error:
        return [f"{'grid' if 'method_config' in grid else 'base'}.method_config ({method}): "
                f"{validation_problems(error, flags=False)}"]
    return []


def cell_names(combinations: list[dict[str, Any]]) -> list[str]:
    """Folder names from grid values, e.g. `method=ft-llm,seed=0`; a digest keeps long or clashing names apart."""
    readable = [",".join(f"{key}={_text(value)}" for key, value in values.items()) for values in combinations]
    names = []
    for text, values in zip(readable, combinations):
        if len(text) > _MAX_NAME or readable.count(text) > 1:
            digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
            text = f"{text[:_MAX_NAME - 9]}-{digest}"
        names.append(text)
    return names


def _text(value: Any) -> str:
    """A grid value as part of a folder name: `10+20` for a list, paths and ids with `-` for `/`."""
    if isinstance(value, list):
        return "+".join(_text(item) for item in value)
    shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return _UNSAFE.sub("-", shown).strip("-") or "-"


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Relative paths resolved against this folder, as `--config` reads them: cells run in other folders."""
    update: dict[str, Any] = {name: getattr(config, name).resolve()
                              for name in ("images", "train", "editor_state") if getattr(config, name) is not None}
    update["stream"] = str(Path(config.stream).resolve())
    if Path(config.model).exists():  # a local folder; hub ids and "default" stay as they are
        update["model"] = str(Path(config.model).resolve())
    return config.model_copy(update=update)
