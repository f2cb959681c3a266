"""The `simulate` command: the main run (flags generated from RunConfig) and its subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, Sequence

from pydantic import ValidationError

from editors.registry import METHODS
from simulator import compare, probe_job, report, sweep, train_editor
from simulator.command import (
    INTERRUPTED,
    USAGE_ERROR,
    ArgumentParser,
    CommandError,
    add_model_options,
    exporters,
    method_config_error,
    nested,
    options,
    print_error,
    user_errors,
    validated,
)
from simulator.config import RunConfig, load_run_config
from simulator.world.export import StreamConfig, write_world
from simulator.world.graph import WorldConfig

log = logging.getLogger("simulate")


def run_parser() -> argparse.ArgumentParser:
    """Parser of the main job: `simulate --stream FILE [options]`."""
    parser = ArgumentParser(
        prog="simulate",
        description="Stream a timeline of knowledge edits into one long-lived LVLM and monitor what they do to it.",
        epilog=(
            "subcommands:\n"
            "  simulate world --out DIR [--entities N] [--seed S] [--edits N] [--re-edits F] [--retractions F]\n"
            "                                                       write the synthetic world's data\n"
            "  simulate train-editor --method NAME ...              train MEND / KE / SERAC on a train split\n"
            "  simulate probe --state DIR --every 10m ...           scheduled regression probes\n"
            "  simulate compare [--mlflow-experiment NAME] [--runs ...]   tables and plots across MLflow runs\n"
            "  simulate sweep SWEEP.yaml [--address HOST:PORT]      a grid of runs on Ray (see sweeps/)\n"
            "  simulate report RUN_DIR [--against OTHER ...]        one HTML page: checks, plots, tables\n"
            f"\nmethods: {', '.join(sorted(METHODS))}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON scenario file; flags given here override it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_model_options(parser, RunConfig, aliases={"record_format": "--format"})
    return parser


def _subcommands() -> dict[str, tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]]:
    world = ArgumentParser(
        prog="simulate world",
        description="Write the synthetic multimodal world (train.jsonl, eval.jsonl, images/, world.json); "
        "`simulate world train` trains its model instead. --edits, --re-edits and --retractions make eval.jsonl "
        "a long stream that the world's model still reads, e.g. --edits 100000 --re-edits 0.1 --retractions 0.02.",
    )
    world.add_argument("action", nargs="?", choices=["train"], help="train the world's model into --out")
    world.add_argument("--out", required=True, help="output folder")
    add_model_options(world, WorldConfig)
    add_model_options(world, StreamConfig)

    return {
        "world": (world, world_main),
        "train-editor": (train_editor.parser(), train_editor.main),
        "probe": (probe_job.parser(), probe_job.main),
        "compare": (compare.parser(), compare.main),
        "sweep": (sweep.parser(), sweep.main),
        "report": (report.parser(), report.main),
    }


def world_main(args: argparse.Namespace) -> int:
    """`simulate world`: write a world's data, or train its model."""
    config = options(args, WorldConfig, skip=("verbose", "action", "out", *StreamConfig.model_fields))
    stream = options(args, StreamConfig, skip=("verbose", "action", "out", *WorldConfig.model_fields))
    if args.action == "train":
        if stream != StreamConfig():
            raise CommandError("--edits, --re-edits and --retractions shape the written eval.jsonl; "
                               "`simulate world train` trains on the world itself: leave them out")
        from simulator.world.default import train_world_model

        result = train_world_model(config, args.out)
        if not result.met:
            raise CommandError(f"training stopped after {result.steps} steps below the bars: {result.metrics}")
        log.info("model of world %s written to %s (%d steps, %.0f s)", config.digest(), args.out, result.steps,
                 result.seconds)
        return 0
    start = time.monotonic()
    write_world(config, args.out, stream)
    log.info("world %s written to %s in %.0f s", config.digest(), args.out, time.monotonic() - start)
    return 0


def run_main(args: argparse.Namespace) -> int:
    """The main job."""
    overrides = nested({k: v for k, v in vars(args).items() if k not in ("config", "verbose")})
    config = validated(lambda: load_run_config(args.config, overrides))
    log.debug("run config: %s", config.model_dump_json())
    from simulator.run import simulate

    sinks = exporters(config)
    try:
        summary = simulate(config, sinks=sinks)
    except user_errors() as error:
        raise CommandError(str(error)) from None
    except ValidationError as error:  # the method's own settings (--method-config)
        raise method_config_error(config.method, error) from None
    finally:
        for sink in sinks:
            sink.close()
    print(json.dumps({"results": summary["results"], "alarms": summary["alarms"]}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `simulate` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subcommands()
    if argv and argv[0] in commands:
        parser, handler = commands[argv[0]]
        argv = argv[1:]
    else:
        parser, handler = run_parser(), run_main
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad flag (2, already printed): a status, as from a run
        return int(done.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked: noise
    try:
        return handler(args)
    except CommandError as error:
        print_error(str(error))
        return USAGE_ERROR
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print_error(str(error))
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
