"""Which model a world runs on: the shipped default weights, or a model trained once into the cache.

The default world's model ships inside the package (`default_model/`), produced by
`simulate world train --out simulator/world/default_model`. Any other world trains its own
model on first use into `$EDITWATCH_CACHE/models/<key>`, where the key hashes the world and
the model and training configs; concurrent first runs each train into a temporary folder
and the first to rename it into place wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from editors import LVLM, InputError, PromptFormat
from memory.files import publishing
from simulator.settings import cache_root
from simulator.world.graph import WorldConfig, build_world
from simulator.world.model import ModelConfig, build_model
from simulator.world.training import TrainConfig, TrainResult, eval_sets, evaluate, train

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "default_model"
TRAINING_RECORD = "training.json"


class ModelNotReadyError(RuntimeError):
    """Training stopped at its step cap before the accuracy bars were met."""


def model_key(world: WorldConfig, model: ModelConfig, training: TrainConfig) -> str:
    """Cache key of a trained world model: hash of everything that determines its weights."""
    payload = json.dumps(
        {"world": world.digest(), "model": model.model_dump(), "train": training.model_dump()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def train_world_model(
    world_config: WorldConfig,
    out: str | Path,
    model: ModelConfig | None = None,
    training: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model of a world and save it (weights, tokenizer, processor, training.json) to `out`."""
    model, training = model or ModelConfig(), training or TrainConfig()
    world = build_world(world_config)
    lvlm = build_model(world, model, seed=training.seed)
    sampled = train(lvlm, world, training, progress=progress)
    # The bars are judged on the full evaluation sets, not the sample that stopped training.
    full = evaluate(lvlm, eval_sets(world))
    result = TrainResult(sampled.steps, sampled.seconds, full, all(full[k] >= v for k, v in training.bars.items()))
    log.info("trained %d steps in %.0f s; full evaluation: %s", result.steps, result.seconds,
             " ".join(f"{k}={v:.3f}" for k, v in full.items()))
    lvlm.save(out)
    record = {
        "key": model_key(world_config, model, training),
        "world": {**world_config.model_dump(), "digest": world_config.digest()},
        "model": model.model_dump(),
        "train": training.model_dump(),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "bars_met": result.met,
        "parameters": lvlm.parameter_count(),
        "evaluation": {k: round(v, 4) for k, v in full.items()},
    }
    (Path(out) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return result


def world_model_path(
    world_config: WorldConfig,
    model: ModelConfig | None = None,
    training: TrainConfig | None = None,
    progress: bool = True,
) -> Path:
    """Folder of the trained model of a world, training it into the cache on first use."""
    model, training = model or ModelConfig(), training or TrainConfig()
    key = model_key(world_config, model, training)
    if _record_key(SHIPPED) == key:
        return SHIPPED
    target = cache_root() / "models" / key
    if _record_key(target) == key:
        return target
    log.info("no model for world %s yet: training one into %s (once)", world_config.digest(), target)
    with publishing(target, ready=lambda found: _record_key(found) is not None) as tmp:
        result = train_world_model(world_config, tmp, model, training, progress=progress)
        if not result.met:
            raise ModelNotReadyError(
                f"the model of world {world_config.digest()} missed its accuracy bars after {result.steps} steps: "
                f"{result.metrics}; raise TrainConfig.max_steps"
            )
    return target


def load_world_model(
    world_config: WorldConfig,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_format: PromptFormat = "auto",
) -> LVLM:
    """The trained model of a world, loaded through the LVLM adapter like any hub model.

    It is trained on the plain prompt format, so "auto" means plain; "chat" needs a chat template.
    """
    path = world_model_path(world_config, progress=progress)
    try:
        return LVLM.load(path, dtype, device, "plain" if prompt_format == "auto" else prompt_format)
    except InputError as error:
        if prompt_format != "chat":
            raise
        raise InputError(
            f"the default model is trained on the plain prompt format and cannot use --prompt-format {prompt_format} "
            f"({error}); use --prompt-format plain"
        ) from None


def _record_key(folder: Path) -> str | None:
    path = folder / TRAINING_RECORD
    return json.loads(path.read_text())["key"] if path.is_file() else None
