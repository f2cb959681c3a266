"""`simulate probe`: the run's own probe rounds (simulator.probing) on a schedule (monitor.schedule).

Rounds go to `--out` (default STATE/probes), where the schedule's job store also lives, and
to the exporters — never into the run's own rounds.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from memory.files import locked, write_text_atomically
from monitor.schedule import IntervalSchedule, ScheduleError, parse_interval
from simulator.command import ArgumentParser, CommandError, add_model_options, exporters, options
from simulator.config import RunConfig
from simulator.outputs import CONFIG, RunFiles
from simulator.signals import stopping_on_signals

if TYPE_CHECKING:
    from monitor.sink import Sink

log = logging.getLogger(__name__)

JOB_STORE = "jobs.sqlite"
SKIPPED_ROUNDS = 3  # rounds in a row that may find no readable checkpoint before the job gives up


_RUN = RunConfig.model_fields  # settings shared with `simulate`: same names, types and help


class ProbeOptions(BaseModel):
    """Settings of `simulate probe` (its flags are generated from these fields); unset ones follow the run's."""

    model_config = ConfigDict(extra="forbid")

    state: Path = Field(description="the run's folder (its --out): config.json and checkpoint/")
    every: str = Field("10m", description="interval, e.g. 30s, 10m, 1h")
    out: Path | None = Field(None, description="folder for rounds.jsonl, summary.json and the job store "
                             "(default: STATE/probes)")
    rounds: PositiveInt | None = Field(None, description="stop after this many rounds of this process (a restarted "
                                       "job numbers its rounds on from the last; default: run until stopped)")
    seed: int | None = Field(None, description="seed of the fixed retention sample (default: the run's)")
    run_name: str | None = Field(None, description="name in the exporters (default: the run's name + '-probe')")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: the run's)")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (default: the run's)")
    no_mlflow: bool = _RUN["no_mlflow"]
    prometheus_port: int | None = _RUN["prometheus_port"]
    prometheus_host: str = _RUN["prometheus_host"]
    pushgateway: str | None = Field(None, description="Pushgateway URL (default: the run's)")


def parser() -> argparse.ArgumentParser:
    """Options of `simulate probe`."""
    probe = ArgumentParser(
        prog="simulate probe",
        description="Run a run's probe suite (retention, reference set, collapse, retrieval) on a schedule "
        "against its latest checkpoint; results go to --out, Prometheus/Pushgateway and MLflow.",
    )
    add_model_options(probe, ProbeOptions)
    probe.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return probe


def main(namespace: argparse.Namespace) -> int:
    """`simulate probe`."""
    args = options(namespace, ProbeOptions)
    try:
        seconds = parse_interval(args.every)
    except ScheduleError as error:
        raise CommandError(str(error)) from None
    state = Path(args.state)
    if not (state / CONFIG).is_file():
        raise CommandError(f"{state} holds no run (missing {CONFIG}): give the --out folder of a `simulate` run")
    config = RunConfig.model_validate_json((state / CONFIG).read_text(encoding="utf-8"))
    out = Path(args.out) if args.out else state / "probes"
    overrides = {"prometheus_port": args.prometheus_port, "prometheus_host": args.prometheus_host,
                 "no_mlflow": args.no_mlflow or config.no_mlflow}
    for name in ("mlflow_uri", "mlflow_experiment", "pushgateway"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    sinks = exporters(config.model_copy(update=overrides), kind="probe")
    try:
        return _run(args, state, out, config, seconds, sinks)
    finally:
        for sink in sinks:
            sink.close()


def _run(args: ProbeOptions, state: Path, out: Path, config: RunConfig, seconds: float,
         sinks: list[Sink]) -> int:
    """Restore the run, announce the probe job to the exporters, probe on schedule, then summarise.

    The job holds its folder's lock: a second job there would take over the first one's schedule and interleave
    their rounds. A round that fails stops the job with the reason (Prometheus marks it failed); a checkpoint
    that cannot be read (the run replacing it) only skips the round, up to `SKIPPED_ROUNDS` in a row.
    """
    from simulator.checkpoint import CheckpointError
    from simulator.probing import ProbeError, ProbeJob
    from simulator.run import RunError, run_name

    seed = config.seed if args.seed is None else args.seed
    settings = {"state": str(state.resolve()), "every": args.every, "seed": seed, "run": config.model_dump(mode="json")}
    with locked(out):
        _check_same_job(out, settings)
        try:
            job = ProbeJob(state, out, config, seed, sinks)
        except (CheckpointError, RunError, ProbeError) as error:
            raise CommandError(str(error)) from None
        name = args.run_name or f"{run_name(config)}-probe"
        files = RunFiles(out)
        write_text_atomically(out / CONFIG, json.dumps(settings, indent=2) + "\n")
        params = {"method": config.method, "model": job.editor.lvlm.name, "mode": config.mode, "gaps": job.gaps,
                  "seed": seed, "state": settings["state"], "every": args.every, "every_seconds": seconds}
        for sink in sinks:
            sink.on_start(name, params, out, job.applied)
        stop = threading.Event()
        failure: list[str] = []
        skipped = 0
        first = job.rounds  # a restarted job numbers its rounds on; --rounds counts this process's

        def done() -> bool:
            return args.rounds is not None and job.rounds - first >= args.rounds

        def scheduled() -> None:
            nonlocal skipped
            try:
                job.round()
            except CheckpointError as error:  # the run is replacing it, or it is gone: the next round tries again
                skipped += 1
                log.warning("probe round skipped (%d in a row): %s", skipped, error)
                if skipped >= SKIPPED_ROUNDS:
                    failure.append(f"{skipped} rounds in a row could not read the checkpoint: {error}")
                    stop.set()
                return
            except Exception as error:  # not KeyboardInterrupt: one line, and the job ends as failed
                failure.append(f"{type(error).__name__}: {error}")
                stop.set()
                return
            skipped = 0
            if done():
                stop.set()

        with stopping_on_signals(stop):
            IntervalSchedule(scheduled, seconds, out / JOB_STORE).run(stop)
        if failure:
            raise RunError(f"probe job stopped after {job.rounds} rounds: {failure[0]}")
        summary = {"run": name, "state": settings["state"], "rounds": job.rounds, "edits_applied": job.applied,
                   "last_round": job.last, "alarms": job.alarms.as_dict(),
                   "stopped": "rounds" if done() else "stopped"}
        files.write_summary(summary)
        for sink in sinks:
            sink.on_finish(summary, out)
    log.info("%s: %d probe rounds; results in %s", name, job.rounds, out)
    return 0


def _check_same_job(out: Path, settings: dict[str, Any]) -> None:
    """CommandError when `out` holds the probe job of another run or seed: its rounds and MLflow run would go on."""
    path = out / CONFIG
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CommandError(f"{path} cannot be read ({error}): give another --out, or remove it") from None
    before = before if isinstance(before, dict) else {}
    if (before.get("state"), before.get("seed")) != (settings["state"], settings["seed"]):
        raise CommandError(f"{out} holds the probe job of {before.get('state')} with seed {before.get('seed')}; "
                           f"give another --out to probe {settings['state']} with seed {settings['seed']}")
