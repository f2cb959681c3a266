"""The `simulate` command: the main run (flags generated from RunConfig) and its subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from typing import Any, Callable, Literal, Sequence, Union, get_args, get_origin

from pydantic import ValidationError

from editors.registry import METHODS
from simulator.config import RunConfig, load_run_config

log = logging.getLogger("simulate")

USAGE_ERROR = 2


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, so a scenario file and the command line share names."""
    for name, field in RunConfig.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = f" (default: {default})" if default not in (None, False, {}) else ""
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"{field.description}{shown}"}
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif get_origin(annotation) is list:
            kwargs.update(nargs="+", type=int, metavar="N")
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        elif get_origin(annotation) is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        flags = ["--" + name.replace("_", "-")]
        if name == "record_format":
            flags.append("--format")
        parser.add_argument(*flags, **kwargs)


def run_parser() -> argparse.ArgumentParser:
    """Parser of the main job: `simulate --stream FILE [options]`."""
    parser = argparse.ArgumentParser(
        prog="simulate",
        description="Stream a timeline of knowledge edits into one long-lived LVLM and monitor what they do to it.",
        epilog=(
            "subcommands:\n"
            "  simulate world --out DIR [--entities N] [--seed S]   write the synthetic world's data\n"
            "  simulate train-editor --method NAME ...              train MEND / KE / SERAC on a train split\n"
            "  simulate probe --state DIR --every 10m ...           scheduled regression probes\n"
            "  simulate compare [--experiment NAME] [--runs ...]    tables and plots across MLflow runs\n"
            f"\nmethods: {', '.join(sorted(METHODS))}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON scenario file; flags given here override it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_run_options(parser)
    return parser


def _not_yet(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise CommandError(f"`simulate {name}` is not available in this version yet: it lands with {issue}.")

    return handler


def _subcommands() -> dict[str, tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]]:
    world = argparse.ArgumentParser(
        prog="simulate world",
        description="Write the synthetic multimodal world (train.jsonl, eval.jsonl, images/, world.json); "
        "`simulate world train` trains its model instead.",
    )
    world.add_argument("action", nargs="?", choices=["train"], help="train the world's model into --out")
    world.add_argument("--out", required=True, help="output folder")
    world.add_argument("--entities", type=int, default=400, help="number of creatures (default: 400, the embedded model's)")
    world.add_argument("--seed", type=int, default=0, help="generator seed (default: 0, the embedded model's)")

    train = argparse.ArgumentParser(prog="simulate train-editor", description="Train a hypernetwork / scope editor.")
    train.add_argument("--method", required=True, help="mend, ke or serac")
    train.add_argument("--train", help="train split (JSONL); default: the embedded world's")
    train.add_argument("--out", help="checkpoint folder")

    probe = argparse.ArgumentParser(prog="simulate probe", description="Run regression probes on a schedule.")
    probe.add_argument("--state", required=True, help="saved editor state folder")
    probe.add_argument("--every", default="10m", help="interval, e.g. 30s, 10m, 1h")

    compare = argparse.ArgumentParser(prog="simulate compare", description="Compare MLflow runs.")
    compare.add_argument("--experiment", help="MLflow experiment name")
    compare.add_argument("--runs", nargs="+", help="run ids")
    return {
        "world": (world, world_main),
        "train-editor": (train, _not_yet("train-editor", "the parameter-update editors issue (#5)")),
        "probe": (probe, _not_yet("probe", "the monitoring issue (#7)")),
        "compare": (compare, _not_yet("compare", "the monitoring issue (#7)")),
    }


def world_main(args: argparse.Namespace) -> int:
    """`simulate world`: write a world's data, or train its model."""
    from simulator.world.graph import WorldConfig

    try:
        config = WorldConfig(entities=args.entities, seed=args.seed)
    except ValidationError as error:
        raise CommandError(f"invalid world: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
    if args.action == "train":
        from simulator.world.default import train_world_model

        result = train_world_model(config, args.out)
        if not result.met:
            raise CommandError(f"training stopped after {result.steps} steps below the bars: {result.metrics}")
        log.info("model of world %s written to %s (%d steps, %.0f s)", config.digest(), args.out, result.steps,
                 result.seconds)
        return 0
    from simulator.world.export import write_world

    write_world(config, args.out)
    log.info("world %s written to %s", config.digest(), args.out)
    return 0


def run_main(args: argparse.Namespace) -> int:
    """The main job."""
    overrides = {k: v for k, v in vars(args).items() if k in RunConfig.model_fields}
    config = _validated(lambda: load_run_config(args.config, overrides))
    log.debug("run config: %s", config.model_dump_json())
    raise CommandError(
        f"the streaming timeline (`simulate --stream {config.stream}`) lands with the simulator issue (#6)."
    )


def _validated(build: Callable[[], RunConfig]) -> RunConfig:
    """Build settings, turning every validation problem into one readable CommandError."""
    try:
        return build()
    except ValidationError as error:
        lines = []
        for item in error.errors():
            flag = "--" + str(item["loc"][0]).replace("_", "-") if item["loc"] else "settings"
            lines.append(f"  {flag}: {item['msg']}")
        raise CommandError("invalid settings:\n" + "\n".join(lines)) from None
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `simulate` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subcommands()
    if argv and argv[0] in commands:
        parser, handler = commands[argv[0]]
        args = parser.parse_args(argv[1:])
    else:
        parser, handler = run_parser(), run_main
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return handler(args)
    except CommandError as error:
        print(f"simulate: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
