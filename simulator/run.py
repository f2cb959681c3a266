"""One `simulate` run: model, editor, stream, timeline, outputs, checkpoints and exporters put together."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel
from tqdm import tqdm

from editors import LVLM, EditExample, Editor, EditorState, HasMemory, HasWeightDelta, create_editor, editor_class
from editors.editor import StateMismatchError
from memory.files import current_folder, locked, publishing, remove_stale, write_text_atomically
from monitor.metrics import reduce_rounds
from monitor.probes import edit_success
from monitor.sink import Sink
from simulator.checkpoint import FOLDER, Checkpoint, restore_timeline, save_timeline, truncate
from simulator.config import RunConfig, apply_protocol
from simulator.outputs import CONFIG, POOL, QUARANTINE, ROUNDS, SUMMARY, RunFiles
from simulator.records import EditRecord
from simulator.requests import edit_example
from simulator.settings import cache_root
from simulator.signals import stopping_on_signals
from simulator.stream import ImageRoot, ImageRootError, StreamReader, is_json_array, load_records
from simulator.timeline import Timeline
from simulator.world.default import load_world_model
from simulator.world.export import read_manifest
from simulator.world.graph import WorldConfig

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start or go on as configured; the message says what to change."""


# Faults of the disk under the run, not of a record: the run stops (its last checkpoint intact) and says so.
DISK_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def image_root(config: RunConfig) -> ImageRoot:
    """`--images`, else `images/` beside the stream file (the layout `simulate world` writes)."""
    if config.images is not None:
        return ImageRoot(config.images)
    beside = Path(config.stream).parent / "images" if config.stream != "-" else None
    if beside is None or not beside.is_dir():
        raise RunError("no --images given and no images/ folder beside the stream: pass --images DIR")
    log.info("images from %s", beside)
    return ImageRoot(beside)


def load_model(config: RunConfig) -> LVLM:
    """`default`: the model of the stream's synthetic world (the embedded one unless the world says
    otherwise); anything else loads as a hub id or folder through the adapter. `--max-tokens` lowers
    the longest query it takes."""
    _check_device(config.device)
    try:
        world = read_manifest(Path(config.stream).parent) if config.model == "default" and config.stream != "-" else None
    except ValueError as error:  # a world written by another version of the generator
        raise RunError(str(error)) from None
    except OSError as error:  # an unreadable world.json
        raise RunError(f"cannot read the world beside the stream: {error}") from None
    try:
        if config.model != "default":
            lvlm = LVLM.load(config.model, config.dtype, config.device, config.prompt_format, config.trust_remote_code)
        else:
            lvlm = load_world_model(world or WorldConfig(), device=config.device, dtype=config.dtype,
                                    prompt_format=config.prompt_format)
    except OSError as error:  # a missing folder or file, a hub id that cannot be reached
        raise RunError(f"cannot load model {config.model!r}: {error}") from None
    if config.max_tokens is not None:
        context = lvlm.inputs.max_tokens
        lvlm.inputs.max_tokens = config.max_tokens if context is None else min(context, config.max_tokens)
    return lvlm


def _check_device(name: str) -> None:
    """Refuse a device torch cannot parse, or one this machine (or this torch build) does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a torch device (e.g. cpu, cuda:0, mps)") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "is_available") and not backend.is_available():
        raise RunError(f"--device {name}: no {device.type} device is available to this torch ({torch.__version__})")


def train_split(config: RunConfig) -> Path:
    """The train split for methods that learn: `--train`, else train.jsonl beside the stream."""
    if config.train is not None:
        return config.train
    beside = Path(config.stream).parent / "train.jsonl" if config.stream != "-" else None
    if beside is None or not beside.is_file():
        raise RunError(
            f"method {config.method!r} learns from a train split: pass --train FILE, or --editor-state DIR "
            "from `simulate train-editor`"
        )
    return beside


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def prepare_editor(config: RunConfig, lvlm: LVLM, images: ImageRoot) -> tuple[Editor, dict[str, float]]:
    """The configured editor: from `--editor-state`, else trained on the train split (cached), else fresh."""
    editor = create_editor(config.method, lvlm, config.method_config)
    if config.editor_state is not None:
        requested = editor.config
        try:
            editor.load_state(EditorState.load(config.editor_state))
        except (StateMismatchError, ValueError) as error:
            raise RunError(f"--editor-state {config.editor_state}: {error}") from None
        if editor.config != requested:  # a state carries the settings it was made with
            log.warning("--editor-state %s was made with other %s settings; its own are used: %s",
                        config.editor_state, config.method, editor.config.model_dump_json())
        return editor, {}
    if not editor.trainable:
        return editor, {}
    split = train_split(config)
    # The model is named by its identity (config hash, dtype, prompt format), not its name alone.
    key = hashlib.sha256(json.dumps(
        [CACHE_VERSION, config.method, editor.config.model_dump(mode="json"), editor.model_identity,
         file_digest(split)],
        sort_keys=True,
    ).encode()).hexdigest()[:20]
    cached = cache_root() / "editors" / key
    if (cached / "report.json").is_file():
        log.info("trained %s editor from the cache: %s", config.method, cached)
        editor.load_state(EditorState.load(cached / "state"))
        return editor, json.loads((cached / "report.json").read_text())
    log.info("training the %s editor on %s (once; cached in %s)", config.method, split, cached)
    examples = [edit_example(record, images) for record in load_records(split, config.record_format, images)]
    report = train(editor, examples)
    # State and report appear together in one rename: a cache entry is whole or absent, and a run
    # training the same editor at the same time keeps whichever was published first.
    with publishing(cached, ready=lambda found: (found / "report.json").is_file()) as tmp:
        editor.state().save(tmp / "state")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return editor, report


EDIT_SUCCESS_SAMPLE = 32  # train edits re-applied one by one for the report's `train_edit_success`
CACHE_VERSION = 2  # of trained-editor cache entries: 2 measures train_edit_success by applying edits (monitor)


def train(editor: Editor, examples: list[EditExample], progress: bool = True) -> dict[str, float]:
    """Train `editor` on `examples`; the report of a method that learns to change weights (MEND, KE) gains
    `train_edit_success`: the mean reliability of the first train edits, each applied alone right after training.

    Memory editors are left out: their edits would pass through the memory's routing counters.
    """
    report = editor.train(examples, progress=progress)
    if isinstance(editor, HasWeightDelta) and not isinstance(editor, HasMemory):
        sample = [example.edit for example in examples[:EDIT_SUCCESS_SAMPLE]]
        report["train_edit_success"] = edit_success(editor, sample)
    return report


# Settings a resumed run may change: how it runs and reports, not what it measures.
RESUMABLE = frozenset({
    "resume", "limit", "follow", "checkpoint_every", "stop_on_collapse", "device", "run_name", "mlflow_uri",
    "mlflow_experiment", "mlflow_tags", "mlflow_flush_seconds", "no_mlflow", "prometheus_port", "prometheus_host",
    "pushgateway", "prometheus_linger", "trust_remote_code",
})


def check_resumable(saved: dict[str, Any], config: RunConfig) -> None:
    """Refuse to resume with settings that change what is measured (another stream, gap, seed ...)."""
    now = json.loads(config.model_dump_json())
    # A setting added after the run started (also inside a group such as --collapse) is read as its default, so
    # older runs still resume.
    saved = {key: _with_default(key, saved[key]) if key in saved else _default(key) for key in now}
    changed = [f"--{key.replace('_', '-')}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
               for key in sorted(now) if key not in RESUMABLE and saved[key] != now[key]]
    if changed:
        raise RunError("cannot resume with other settings than the run was started with:\n  " + "\n  ".join(changed))


def _default(key: str) -> Any:
    """The JSON value of a RunConfig field's default (None for a required field)."""
    field = RunConfig.model_fields[key]
    if field.is_required():
        return None
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json")
    return json.loads(json.dumps(default, default=str))


def _with_default(key: str, value: Any) -> Any:
    """A saved setting with the fields its group gained since read as their defaults."""
    default = _default(key)
    return {**default, **value} if isinstance(default, dict) and isinstance(value, dict) else value


def run_name(config: RunConfig) -> str:
    """`--run-name`, else the output folder's name."""
    return config.run_name or (config.out.name if config.out else f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def simulate(config: RunConfig, sinks: list[Sink] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the configured simulation to its end; returns the summary written to `out/summary.json`.

    The run holds the lock of its folder throughout: a second run or `--resume` on it is refused.
    """
    out = config.out or Path("runs") / run_name(config)
    if config.stream != "-" and Path(config.stream).is_dir():
        raise RunError(f"--stream {config.stream} is a folder: give a JSONL or JSON file (or - for standard input)")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file: give a folder for the run's outputs")
    try:
        with locked(out):
            for path in remove_stale(out):
                log.info("removed %s, left by a run killed while writing it", path)
            checkpoint = _checkpoint_to_resume(config, out)
            if checkpoint is not None and (summary := _finished(config, out, checkpoint)) is not None:
                return summary
            return _simulate(config, out, checkpoint, sinks or [], progress)
    except OSError as error:
        if error.errno not in DISK_FAULTS:
            raise
        # Every file is written atomically: the last checkpoint, the caches and the outputs it counts stay usable.
        where = f" ({error.filename})" if error.filename else ""
        raise RunError(f"cannot write the run's files in {out}: {error.strerror}{where}; the last checkpoint is kept, "
                       "--resume continues once this is fixed") from None


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects alive once a run is set up (imported modules, the model, MiniLM) left out of garbage collection
    while it runs, as `gc.freeze` does, and handed back after.

    Most live as long as the run, yet every full collection walked them: ~500k objects (torch, transformers,
    sentence-transformers), ~150 ms a collection on a 2-core machine. On the default model a 400-edit run made one
    more full collection than a 100-edit run (~1 ms of collector time an edit in all). Frozen, the run's own
    objects still set off full collections (two in the 400-edit run, 80-120 ms each), and the young generations'
    ~0.3 ms an edit remain (`benchmarks/edit_cost.py`, its GC column). No collection comes with the freeze: one
    before it walks the whole heap (0.3-0.4 s a run), one after it resets the collector's count of long-lived
    objects to the few left unfrozen, so that full collections come more often. Cyclic garbage of the set-up
    (~200 objects on the default model) waits for the run's end. A process that froze objects itself (one that
    forks after `gc.freeze`, or a second run in another thread) is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    try:
        gc.freeze()
        yield
    finally:
        gc.unfreeze()


def _simulate(config: RunConfig, out: Path, checkpoint: Checkpoint | None, sinks: list[Sink],
              progress: bool) -> dict[str, Any]:
    """The run itself, from its checkpoint or from the start."""
    name = run_name(config)
    files = RunFiles(out)
    # Settings errors first: loading (or training) a model takes a while.
    editor_class(config.method).Config.model_validate(config.method_config)
    images = image_root(config)
    given, config = config, apply_protocol(config)
    lvlm = load_model(config)
    config = apply_protocol(given, lvlm.family)  # the protocol's method settings depend on the model's family
    if checkpoint is None:
        editor, report = prepare_editor(config, lvlm, images)
    else:  # the checkpoint's editor state holds the trained parts: no training again
        editor, report = create_editor(config.method, lvlm, config.method_config), checkpoint.progress["train_report"]
    timeline = Timeline(editor, config, images, files, sinks)  # its reject hook is the reader's, set below
    start_line, quarantined = 0, 0
    if checkpoint is not None:
        for file_name, size in checkpoint.progress["files"].items():
            truncate(files.path(file_name), size)
        restore_timeline(timeline, checkpoint, files.rows(POOL))
        start_line, quarantined = checkpoint.progress["line"], checkpoint.progress["quarantined"]
        log.info("resuming %s after line %d (%d edits applied)", name, start_line, timeline.applied)
    else:
        for file_name in files.sizes():
            files.path(file_name).unlink(missing_ok=True)
    write_text_atomically(out / CONFIG, given.model_dump_json(indent=2) + "\n")  # as given: what --resume compares
    stop = threading.Event()
    reader = StreamReader(config.stream, config.record_format, images, files.path(QUARANTINE), start_line,
                          config.follow, stop=stop)
    reader.quarantined = quarantined
    timeline.reject = reader.reject
    stream_file = Path(config.stream) if config.stream != "-" else None
    params = {"method": config.method, "model": lvlm.name, "protocol": config.protocol, "mode": config.mode,
              "gaps": timeline.gaps,
              "seed": config.seed, "stream": config.stream,
              "data_hash": file_digest(stream_file) if stream_file and not config.follow else None,
              # resolved by the protocol and the method (config.json holds them as given): exporters log these
              "prompt_format": config.prompt_format, "vlkeb_compat": config.vlkeb_compat,
              "method_config": editor.config.model_dump(mode="json")}
    for sink in sinks:
        sink.on_start(name, params, out, timeline.applied)
        if checkpoint is not None:
            sink.on_resume({"applied": timeline.applied, "failed": timeline.failed, "quarantined": reader.quarantined,
                            "rounds": timeline.rounds})

    def counters() -> dict[str, Any]:
        return {"quarantined": reader.quarantined, "train_report": report}

    bar = tqdm(total=_expected_edits(config, stream_file), initial=timeline.edits_read, unit="edit", desc=name,
               disable=not progress)
    # The summary of an earlier end goes once the run is set up and starts on its records: it ends again, and
    # writes its own then (a start refused before this point leaves it).
    files.path(SUMMARY).unlink(missing_ok=True)
    try:
        with stopping_on_signals(stop, "stopping after the current edit (checkpoint and summary follow); "
                                 "Ctrl-C again stops at once"):
            with _frozen_heap():
                timeline.run(_tracked(reader, bar, timeline, sinks), lambda: save_timeline(timeline, counters()), stop)
    except ImageRootError as error:  # a fault of the run, not of a record
        if timeline.in_record:  # met halfway through a record (a due edit's or a probe round's image): not savable
            raise RunError(f"{error}; the run stopped halfway through a record: --resume continues from "
                           "the last checkpoint once the images are back") from None
        timeline.line = reader.line  # met by the reader, between records: stop where the stream was, checkpointed
        save_timeline(timeline, counters())
        raise RunError(f"{error}; the run stopped after {timeline.applied} edits with a checkpoint: --resume "
                       "continues once the images are back") from None
    except KeyboardInterrupt:
        log.warning("stopped at once: outputs past the last checkpoint are incomplete; --resume continues from it")
        raise
    finally:
        bar.close()
    if not timeline.held_back:
        timeline.line = reader.line  # the reader's position: bad lines after the last record are counted already
    if timeline.stopped == "interrupted":
        log.warning("interrupted after %d edits: --resume continues", timeline.applied)
    save_timeline(timeline, counters())
    result = {"run": name, **params, "method_config": editor.config.model_dump(mode="json"),  # as run, state included
              "train_report": report, **timeline.summary(reader.quarantined),
              "health": reduce_rounds(files.rows(ROUNDS)),  # probe-round metrics, each by its aggregation
              "lines_read": timeline.line}  # stream position consumed: applied + failed + quarantined records
    files.write_summary(result)
    for sink in sinks:
        sink.on_finish(result, out)
    settled = {key: value for sink in sinks for key, value in sink.settle().items()}
    if settled:  # e.g. MLflow writes the server rejected (kept in OUT/mlflow/dead_letter.jsonl): counted, not lost
        result.update(settled)
        files.write_summary(result)
    log.info("%s: %d edits applied, %d failed, %d quarantined; outputs in %s", name, timeline.applied,
             timeline.failed, reader.quarantined, out)
    # Nothing usable is an error (a wrong --format, a file that is not records), but a user
    # stopping a --follow run before anything arrived is not.
    if timeline.edits_read == 0 and (reader.quarantined or timeline.stopped != "interrupted"):
        seen = f" (see {files.path(QUARANTINE)})" if reader.quarantined else ""
        raise RunError(f"no usable record in {config.stream}: {reader.tally()}{seen}")
    return result


def _checkpoint_to_resume(config: RunConfig, out: Path) -> Checkpoint | None:
    """The checkpoint `--resume` continues from (checked against the settings), or None for a new run.

    `--resume` where no checkpoint was written yet (a run killed early) starts the run from the
    beginning, so a supervisor that always passes `--resume` recovers.
    """
    has_run = current_folder(out / FOLDER).exists()
    if not config.resume:
        if has_run:
            raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        return None
    if not has_run:
        log.warning("%s holds no checkpoint yet: the run starts from the beginning", out)
        return None
    checkpoint = Checkpoint.load(out)
    check_resumable(json.loads((out / CONFIG).read_text()), config)
    return checkpoint


def _finished(config: RunConfig, out: Path, checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The summary of a run that `--resume` would not change (it reached its --limit, or stopped on collapse)."""
    progress, summary = checkpoint.progress, out / SUMMARY
    done = (progress.get("stopped") == "limit" and config.limit is not None and progress["edits_read"] >= config.limit
            or progress.get("stopped") == "collapse" and config.stop_on_collapse)
    if not done or not summary.is_file():
        return None
    log.warning("%s finished (%s after %d edits): --resume has nothing to do; raise --limit to go on", out,
                progress["stopped"], progress["applied"])
    return json.loads(summary.read_text(encoding="utf-8"))


def _expected_edits(config: RunConfig, stream_file: Path | None) -> int | None:
    """Length of the progress bar: --limit, else the stream file's non-empty lines (unknown when following or
    for a JSON array, which would cost a second parse)."""
    if config.limit is not None or stream_file is None or config.follow or is_json_array(stream_file):
        return config.limit
    with stream_file.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _tracked(reader: StreamReader, bar: tqdm, timeline: Timeline, sinks: list[Sink]) -> Iterator[tuple[int, EditRecord]]:
    """(line, record) pairs from the reader, updating the progress bar and quarantine count on the way."""
    seen_quarantined = reader.quarantined
    for record in reader:
        if reader.quarantined != seen_quarantined:
            seen_quarantined = reader.quarantined
            for sink in sinks:
                sink.on_quarantine(seen_quarantined)
        yield reader.line, record
        bar.update()
        bar.set_postfix(_postfix(timeline), refresh=False)


def _postfix(timeline: Timeline) -> dict[str, str]:
    """The latest numbers for the progress bar."""
    first = next(iter(timeline.results.values())).means()
    shown = {k: f"{first[k]:.2f}" for k in ("reliability", "t_loc", "i_loc") if k in first}
    if "retention" in timeline.last_round:
        shown["retention"] = f"{timeline.last_round['retention']:.2f}"
    return shown
