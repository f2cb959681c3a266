"""`simulate sweep SWEEP.yaml`: a grid of `simulate` runs on Ray Tune, resumable cell by cell.

Ray Tune schedules the cells (resources per cell, retries); each cell is one editwatch run in its
own folder, run in-process by the Ray worker, so killing the worker kills the run. Fault tolerance
is the run's own: a retried cell whose folder holds a checkpoint continues from it (`--resume`
semantics), and a finished cell is never run again. So every start of the sweep, `--resume`
included, is a new Ray Tune experiment over all the cells: finished ones are kept as they are and
the others, failed ones too, continue from their checkpoints.
Ray is an optional extra (`editwatch[sweep]`), imported only inside what this command runs.

The sweep folder holds:
    config.json    the sweep file as read (the parent MLflow run's params)
    cells.json     each cell's grid values and settings (what `--resume` checks)
    summary.json   each cell's outcome
    cells/<cell>/  each cell's run folder (summary.json, rounds.jsonl, checkpoint/, mlflow/ ...)
    compare/       `simulate compare`'s table and plots of the cells
    mlflow/        the journal of the sweep's parent MLflow run
    ray/start-<n>/ Ray Tune's results and experiment state of the sweep's n-th start
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from memory.files import jsonable, write_text_atomically
from monitor.sink import Sink
from simulator import compare
from simulator.command import INTERRUPTED, ArgumentParser, CommandError, add_model_options, options, user_errors
from simulator.config import RunConfig
from simulator.outputs import CONFIG, SUMMARY
from simulator.sweep_config import Sweep, SweepOptions, load_sweep

if TYPE_CHECKING:
    from ray.tune import ResultGrid

log = logging.getLogger(__name__)

CELL_SETTINGS = "cells.json"
CELLS = "cells"
RAY = "ray"
CELL_ERROR = "cell_error"  # the metric a cell that failed for a reason of its own reports, with the message
FAILED_CELLS = 1  # exit status when a cell failed
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray runs as one node on the loopback address


def parser() -> argparse.ArgumentParser:
    """Options of `simulate sweep` (flags from SweepOptions)."""
    sweep = ArgumentParser(
        prog="simulate sweep",
        description="Run a grid of simulations (a base scenario x grid values) on Ray: this machine by default, "
        "a Ray cluster with --address. One run folder, checkpoints and MLflow child run per cell.",
    )
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file: name, base, grid, resources, max_failures")
    add_model_options(sweep, SweepOptions)
    sweep.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return sweep


def main(args: argparse.Namespace) -> int:
    """`simulate sweep`."""
    settings = options(args, SweepOptions, skip=("verbose", "sweep"))
    sweep = load_sweep(Path(args.sweep))
    out = (settings.out or Path("runs") / sweep.name).resolve()
    configs = _cell_configs(sweep, out, settings.resume)
    if settings.address not in (None, "auto"):
        _check_reachable(settings.address)
    first = next(iter(configs.values()))  # the MLflow settings the cells share
    _write(out / CONFIG, {**sweep.spec.model_dump(mode="json"), "name": sweep.name})
    if not first.no_mlflow:
        configs = _children(sweep, configs, *_start_parent(sweep, out, first, settings.resume))
    _write(out / CELL_SETTINGS, {cell.name: {"values": cell.values,
                                             "config": configs[cell.name].model_dump(mode="json")}
                                 for cell in sweep.cells})
    for name, config in configs.items():  # said here: a worker's log reaches the driver late, or not at all
        if finished_summary(config) is not None:
            log.info("cell %s finished before: kept as it is", name)
    outcomes = _outcomes(_run(sweep, configs, out, settings), configs)
    unfinished, failed, finished = ([name for name, outcome in outcomes.items() if outcome["status"] == status]
                                    for status in ("unfinished", "failed", "finished"))
    for name in failed:
        log.error("cell %s failed: %s", name, outcomes[name]["error"])
    summary = {"sweep": sweep.name, "stopped": "interrupted" if unfinished else "end of grid", "cells": outcomes}
    _write(out / SUMMARY, summary)
    if not first.no_mlflow:
        if finished and not unfinished:
            _compare(out, [configs[name] for name in finished])
        _finish_parent(sweep, out, first, summary)
    log.info("sweep %s: %d cells finished, %d failed, %d unfinished; outputs in %s", sweep.name, len(finished),
             len(failed), len(unfinished), out)
    if unfinished:
        log.warning("interrupted: `simulate sweep %s --out %s --resume` continues", args.sweep, out)
        return INTERRUPTED
    return FAILED_CELLS if failed else 0


def _cell_configs(sweep: Sweep, out: Path, resume: bool) -> dict[str, RunConfig]:
    """Each cell's settings in its folder under `out`; on --resume, checked against those the sweep started with."""
    configs = {cell.name: cell.config.model_copy(update={"out": out / CELLS / cell.name, "run_name": cell.name})
               for cell in sweep.cells}
    if not resume:
        if (out / CELL_SETTINGS).exists():
            raise CommandError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --out")
        return configs
    if not (out / CELL_SETTINGS).is_file():
        raise CommandError(f"no sweep in {out} to resume (run without --resume to start it)")
    from simulator.run import RunError, check_resumable

    saved = json.loads((out / CELL_SETTINGS).read_text(encoding="utf-8"))
    if set(saved) != set(configs):
        added, removed = sorted(set(configs) - set(saved)), sorted(set(saved) - set(configs))
        raise CommandError(f"the grid of {sweep.name} changed since the sweep started (cells added: {added}, "
                           f"removed: {removed}): start it in another --out")
    problems = []
    for name, config in configs.items():
        try:
            check_resumable(saved[name]["config"], config)
        except RunError as error:
            problems.append(f"cell {name}: {error}")
    if problems:
        raise CommandError("\n".join(problems))
    return configs


def _check_reachable(address: str) -> None:
    """Refuse a Ray address nothing answers on before anything is written (Ray itself retries for minutes)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not (host and port.isdigit()):
        raise CommandError(f"--address {address!r}: expected auto or HOST:PORT (the head's `ray start --port`)")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise CommandError(f"cannot reach the Ray cluster at {address}: {error}") from None


def _write(path: Path, data: dict[str, Any]) -> None:
    """A JSON file of the sweep folder, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(jsonable(data), indent=2) + "\n")


def _start_parent(sweep: Sweep, out: Path, settings: RunConfig, resume: bool) -> tuple[str, str]:
    """Create (or, resuming, reopen) the sweep's parent MLflow run now; its id and the tracking URI the cells use.

    The cells need the parent's id before they start, so the parent is sent at once rather than
    in the background like a run's own operations.
    """
    from monitor.exporters import MlflowSink

    sink = MlflowSink(settings.mlflow_uri, settings.mlflow_experiment, "sweep", settings.mlflow_flush_seconds)
    # step > 0 continues the run the folder's journal holds (MlflowSink.on_start)
    sink.on_start(sweep.name, {"cells": len(sweep.cells)}, out, int(resume))  # and config.json's settings
    sink.close()
    assert sink.journal is not None  # set by on_start
    state = sink.journal.state()
    if "run_id" not in state:
        raise CommandError(f"cannot create the sweep's MLflow run at {state.get('uri') or 'the default tracking URI'} "
                           "(see the warning above): start the tracking server, or set no_mlflow: true in the base")
    return state["run_id"], state["uri"]


def _children(sweep: Sweep, configs: dict[str, RunConfig], parent: str, uri: str) -> dict[str, RunConfig]:
    """The cells as child runs of the parent: at its tracking URI, tagged with its id and their grid values."""
    return {cell.name: configs[cell.name].model_copy(update={"mlflow_uri": uri, "mlflow_tags": {
        "mlflow.parentRunId": parent, "editwatch.sweep": sweep.name,
        **{key: value if isinstance(value, str) else json.dumps(value) for key, value in cell.values.items()},
    }}) for cell in sweep.cells}


def _finish_parent(sweep: Sweep, out: Path, settings: RunConfig, summary: dict[str, Any]) -> None:
    """End the parent run (KILLED when interrupted), with the sweep's config.json and summary.json as artifacts."""
    from monitor.exporters import MlflowSink

    sink = MlflowSink(settings.mlflow_uri, settings.mlflow_experiment, "sweep", settings.mlflow_flush_seconds)
    sink.on_start(sweep.name, {}, out, 1)
    sink.on_finish(summary, out)
    sink.close()


def _run(sweep: Sweep, configs: dict[str, RunConfig], out: Path, settings: SweepOptions) -> ResultGrid:
    """The grid on Ray Tune: a new experiment over every cell, under `out/ray/start-<n>` (`run_cell` keeps finished
    cells and continues the others from their checkpoints)."""
    if settings.address is None and "RAY_ADDRESS" not in os.environ:
        # A local instance is for this machine alone. Ray turns 127.0.0.1 into the machine's network address and
        # then listens on every interface; with multi-node clusters switched off (its switch for Windows and macOS,
        # read when Ray is imported and by every process it starts) the node is 127.0.0.1 and every server binds it.
        os.environ.setdefault(LOCAL_ONLY, "0")
    import ray
    from ray import tune

    try:
        ray.init(address=settings.address)  # None: a local instance with this machine's cores
    except ConnectionError as error:
        raise CommandError(f"cannot reach the Ray cluster at {settings.address}: {error}") from None
    cells = {name: config.model_dump_json() for name, config in configs.items()}
    trainable = tune.with_resources(tune.with_parameters(run_cell, cells=cells),
                                    {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu})
    # Not Tuner.restore: it keeps a cell that failed for a reason of its own (`run_cell` reports it and returns) as
    # finished, so that cell would never run again, even once its cause is fixed.
    starts = max((int(p.name.removeprefix("start-")) for p in (out / RAY).glob("start-*")
                  if p.name.removeprefix("start-").isdigit()), default=0)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(list(cells))},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=f"start-{starts + 1}", storage_path=str(out / RAY),
                                      failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures)),
        )
        return tuner.fit()
    finally:
        ray.shutdown()


def _trial_name(trial: Any) -> str:
    """Ray's name (and folder) of a trial: its cell's."""
    return trial.config["cell"]


def _outcomes(results: ResultGrid, configs: dict[str, RunConfig]) -> dict[str, dict[str, Any]]:
    """Each cell's status (finished, failed with its message, or unfinished), in grid order."""
    by_cell = {result.config["cell"]: result for result in results if result.config}
    outcomes: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        result = by_cell.get(name)
        if finished_summary(config) is not None:
            outcomes[name] = {"status": "finished"}
        elif result is not None and result.metrics.get(CELL_ERROR):
            outcomes[name] = {"status": "failed", "error": result.metrics[CELL_ERROR]}
        elif result is not None and result.error is not None:
            lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
            outcomes[name] = {"status": "failed", "error": f"{type(result.error).__name__}: "
                                                           f"{lines[0] if lines else 'no message'}"}
        else:
            outcomes[name] = {"status": "unfinished"}
    return outcomes


def _compare(out: Path, finished: list[RunConfig]) -> None:
    """`simulate compare` over the finished cells' MLflow runs, into `out/compare` (their unsent operations first)."""
    from monitor.exporters.journal import Journal, JournalError
    from monitor.exporters.tracking import FOLDER, TrackingUnavailable, sync

    runs = []
    for config in finished:
        try:
            sync(cell_folder(config))
        except (TrackingUnavailable, JournalError) as error:
            log.warning("no compare table: cell %s is not all in MLflow (%s); `simulate compare --sync` sends it later",
                        config.run_name, error)
            return
        runs.append(Journal(cell_folder(config) / FOLDER).state()["run_id"])
    settings = finished[0]  # the cells share the parent's tracking URI
    compare.main(compare.parser().parse_args(["--mlflow-uri", str(settings.mlflow_uri), "--out", str(out / "compare"),
                                              "--runs", *runs]))


def cell_folder(config: RunConfig) -> Path:
    """A cell's run folder (`out`, which the sweep sets for every cell)."""
    if config.out is None:
        raise ValueError(f"cell {config.run_name} has no run folder")
    return config.out


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """A cell's summary if its run ended normally: not interrupted, not stopped short of a larger --limit."""
    path = cell_folder(config) / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    if summary.get("stopped") == "interrupted" or not summary.get("edits_read"):
        return None  # also a run that found no usable record: it wrote its summary, then failed
    if summary.get("stopped") == "limit" and (config.limit is None or summary["edits_read"] < config.limit):
        return None
    return summary


def run_cell(params: dict[str, Any], cells: dict[str, str]) -> None:
    """Ray Tune trainable: one cell's run, continued from its checkpoint when its folder holds one."""
    from pydantic import ValidationError
    from ray import tune

    from memory.files import current_folder
    from monitor.exporters import build_sinks
    from simulator.checkpoint import FOLDER
    from simulator.run import simulate

    # What `simulate` reports as the user's to fix: the cell failed for a reason of its own, and
    # running it again would fail the same way, so it is reported, not retried.
    own_errors = (*user_errors(), ValidationError)
    # The run's own messages (resuming ... after line N) go to the worker's log, which Ray shows the driver.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = RunConfig.model_validate_json(cells[params["cell"]])
    done = finished_summary(config)
    if done is not None:  # the driver says so
        TuneReport().on_finish(done, cell_folder(config))
        return
    config = config.model_copy(update={"resume": current_folder(cell_folder(config) / FOLDER).exists()})
    sinks = [*build_sinks(config), TuneReport()]
    try:
        simulate(config, sinks, progress=False)
    except own_errors as error:
        tune.report({CELL_ERROR: " ".join(str(error).split())})
    finally:
        for sink in sinks:
            sink.close()


class TuneReport(Sink):
    """Sends a cell's probe rounds and final numbers to Ray Tune (progress view, result files); `edits` is the step."""

    def on_round(
        self, step: int, values: dict[str, float], seconds: float, results: dict[str, dict[str, float]],
        crossed: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        """Report the round's values and the running means per setting (`gap_10/reliability`)."""
        self._report(step, {**values, **_per_setting(results)})

    def on_finish(self, summary: dict[str, Any], folder: Path) -> None:
        """Report the final means per setting."""
        self._report(summary["edits_applied"], _per_setting(summary["results"]))

    @staticmethod
    def _report(step: int, metrics: dict[str, Any]) -> None:
        from ray import tune

        tune.report({"edits": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def _per_setting(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"gap_10": {"reliability": 0.5}} -> {"gap_10/reliability": 0.5}, as MLflow logs them."""
    return {f"{setting}/{key}": value for setting, row in results.items() for key, value in row.items()}
