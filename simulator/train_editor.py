"""`simulate train-editor`: train a learning editor (MEND, KE, ...) on a train split and save its state.

The saved folder is an ordinary editor state (`state.json` + `state.safetensors`): loading it
restores the trained hypernetwork, and its `meta.report` holds the training report.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from editors.prompts import PromptFormat
from simulator.command import ArgumentParser, CommandError, add_model_options, method_config_error, options
from simulator.config import RunConfig
from simulator.records import RecordFormat

if TYPE_CHECKING:
    from editors import LVLM, EditExample

log = logging.getLogger("simulate.train-editor")


_RUN = RunConfig.model_fields  # settings shared with `simulate`: same names, types, defaults and help


class TrainEditorOptions(BaseModel):
    """Settings of `simulate train-editor` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="a method that learns (trainable), e.g. mend or ke")
    out: Path = Field(description="folder for the trained editor state")
    train: Path | None = Field(None, description="train split (JSON array or JSONL of records); default: the "
                               "embedded world's")
    images: Path | None = Field(None, description="image root of --train (default: the folder 'images' beside it)")
    record_format: RecordFormat = Field("vlkeb", description="record format of --train")
    model: str = _RUN["model"]
    # The same choices and defaults as a run's, so a state trains on the model the run will use.
    device: str = _RUN["device"]
    dtype: Literal["float32", "float16", "bfloat16"] = _RUN["dtype"]
    prompt_format: PromptFormat = _RUN["prompt_format"]
    trust_remote_code: bool = _RUN["trust_remote_code"]
    method_config: dict[str, Any] = _RUN["method_config"]
    seed: int | None = Field(None, description="training seed (overrides the method setting)")
    limit: PositiveInt | None = Field(None, description="train on the first N records only")
    quiet: bool = Field(False, description="no progress bar")


def parser() -> argparse.ArgumentParser:
    """Arguments of `simulate train-editor`."""
    p = ArgumentParser(
        prog="simulate train-editor",
        description="Train a learning editor (e.g. mend, ke) on a train split and save its state to --out. "
        "Runs using the state must use the same --prompt-format.",
    )
    add_model_options(p, TrainEditorOptions, aliases={"record_format": "--format"})
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(namespace: argparse.Namespace) -> int:
    """Train `--method` on the records of `--train` and save its state to `--out`."""
    args = options(namespace, TrainEditorOptions)
    from editors.registry import METHODS, UnknownMethodError, editor_class
    from simulator.run import train

    try:
        cls = editor_class(args.method)
    except UnknownMethodError as error:
        raise CommandError(str(error)) from None
    if not cls.trainable:
        learners = sorted(m for m in METHODS if editor_class(m).trainable)
        raise CommandError(f"method {args.method!r} learns nothing to train. Trainable methods: {', '.join(learners)}")
    settings: dict[str, Any] = dict(args.method_config)
    if args.seed is not None:
        if "seed" not in cls.Config.model_fields:
            raise CommandError(f"--seed: {args.method} draws nothing at random in training, so it takes no seed")
        settings["seed"] = args.seed
    try:
        config = cls.Config.model_validate(settings)
    except ValidationError as error:
        raise method_config_error(args.method, error) from None

    examples = _examples(args)
    editor = cls(_model(args), config)
    log.info("training %s on %d edits of %s (model %s, %s, prompt format %s)", args.method, len(examples),
             args.train or "the embedded world", editor.lvlm.name, editor.model_identity["dtype"],
             editor.model_identity["prompt_format"])
    report = train(editor, examples, progress=not args.quiet)
    state = editor.state()  # its meta["model"] records the model, dtype and prompt format
    state.meta["report"] = report  # the whole report, train_edit_success included
    state.save(args.out)
    log.info("trained %s: %s; state written to %s", args.method,
             " ".join(f"{k}={v:.4g}" for k, v in report.items()), args.out)
    return 0


def _examples(args: TrainEditorOptions) -> list[EditExample]:
    """The train records of `--train` (or the embedded world's) as editor training examples."""
    from simulator.requests import edit_example
    from simulator.stream import ImageRoot, RecordsError, load_records

    train = Path(args.train) if args.train else _default_world() / "train.jsonl"
    images = Path(args.images) if args.images else train.parent / "images"
    if not train.is_file():
        raise CommandError(f"train split {train} not found")
    if not images.is_dir():
        raise CommandError(f"image root {images} is not a folder; give it with --images")
    root = ImageRoot(images)
    try:
        records = load_records(train, args.record_format, images=root)
    except RecordsError as error:
        raise CommandError(str(error)) from None
    if not records:
        raise CommandError(f"train split {train} holds no records")
    return [edit_example(record, root) for record in records[: args.limit]]


def _default_world() -> Path:
    """The embedded world's data, written once into the cache."""
    from memory.files import publishing
    from simulator.settings import cache_root
    from simulator.world.export import write_world
    from simulator.world.graph import WorldConfig

    config = WorldConfig()
    target = cache_root() / "worlds" / config.digest()
    if (target / "train.jsonl").is_file():
        return target
    log.info("writing the embedded world's data into %s (once)", target)
    with publishing(target, ready=lambda found: (found / "train.jsonl").is_file()) as tmp:
        write_world(config, tmp, progress=False)
    return target


def _model(args: TrainEditorOptions) -> LVLM:
    """The LVLM to train on, loaded as a run with the same settings would load it."""
    from simulator.run import RunError, load_model

    # `default` is the model of the world the train split belongs to (its world.json), as for a run
    # on that world's stream; without --train, the embedded world's.
    stream = str(Path(args.train)) if args.train else "-"
    settings = RunConfig(stream=stream, model=args.model, device=args.device, dtype=args.dtype,
                         prompt_format=args.prompt_format, trust_remote_code=args.trust_remote_code)
    try:
        return load_model(settings)
    except RunError as error:
        raise CommandError(str(error)) from None
