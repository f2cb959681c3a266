"""`simulate train-editor`: train a learning editor (MEND, KE, ...) on a train split and save its state.

The saved folder is an ordinary editor state (`state.json` + `state.safetensors`): loading it
restores the trained hypernetwork, and its `meta.report` holds the training report.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from simulator.command import ArgumentParser, CommandError
from simulator.config import RunConfig
from simulator.records import RECORD_FORMATS

if TYPE_CHECKING:
    from editors import LVLM, EditExample

log = logging.getLogger("simulate.train-editor")


def parser() -> argparse.ArgumentParser:
    """Arguments of `simulate train-editor`."""
    p = ArgumentParser(
        prog="simulate train-editor",
        description="Train a learning editor (e.g. mend, ke) on a train split and save its state to --out.",
    )
    p.add_argument("--method", required=True, help="a method that learns (trainable), e.g. mend or ke")
    p.add_argument("--out", required=True, help="folder for the trained editor state")
    p.add_argument("--train", help="train split (JSON array or JSONL of records); default: the embedded world's")
    p.add_argument("--images", help="image root of --train (default: the folder 'images' beside it)")
    p.add_argument("--format", dest="record_format", default="vlkeb", choices=sorted(RECORD_FORMATS),
                   help="record format of --train (default: vlkeb)")
    p.add_argument("--model", default="default", help="'default' (the embedded model), a hub id or a folder")
    # The same choices and defaults as a run's (RunConfig), so a state trains on the model the run will use.
    for name, note in (("device", ""), ("dtype", ""), ("prompt_format", "; runs using the state must use the same")):
        field = RunConfig.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), default=field.default, choices=get_args(field.annotation) or None,
                       help=f"{field.description} (default: {field.default}){note}")
    p.add_argument("--trust-remote-code", action="store_true",
                   help=RunConfig.model_fields["trust_remote_code"].description)
    p.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                   help='method settings as JSON, e.g. \'{"epochs": 5}\'')
    p.add_argument("--seed", type=int, help="training seed (overrides the method setting)")
    p.add_argument("--limit", type=int, help="train on the first N records only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(args: argparse.Namespace) -> int:
    """Train `--method` on the records of `--train` and save its state to `--out`."""
    from editors.registry import METHODS, UnknownMethodError, editor_class
    from simulator.run import train

    try:
        cls = editor_class(args.method)
    except UnknownMethodError as error:
        raise CommandError(str(error)) from None
    if not cls.trainable:
        learners = sorted(m for m in METHODS if editor_class(m).trainable)
        raise CommandError(f"method {args.method!r} learns nothing to train. Trainable methods: {', '.join(learners)}")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be at least 1, got {args.limit}")
    if not isinstance(args.config, dict):
        raise CommandError(f"--config must be a JSON object, got {json.dumps(args.config)}")
    settings: dict[str, Any] = dict(args.config)
    if args.seed is not None:
        settings["seed"] = args.seed
    try:
        config = cls.Config.model_validate(settings)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise CommandError(f"invalid --config for {args.method}: {problems}") from None

    examples = _examples(args)
    editor = cls(_model(args), config)
    log.info("training %s on %d edits of %s (model %s, %s, prompt format %s)", args.method, len(examples),
             args.train or "the embedded world", editor.lvlm.name, editor.model_identity["dtype"],
             editor.model_identity["prompt_format"])
    report = train(editor, examples, progress=not args.quiet)
    editor.state().save(args.out)  # its meta["model"] records the model, dtype and prompt format
    log.info("trained %s: %s; state written to %s", args.method,
             " ".join(f"{k}={v:.4g}" for k, v in report.items()), args.out)
    return 0


def _examples(args: argparse.Namespace) -> list[EditExample]:
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


def _model(args: argparse.Namespace) -> LVLM:
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
