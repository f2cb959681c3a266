"""Checkpoints of a run: editor state, stream position, RNG and everything measured so far.

A checkpoint is one folder written through a temporary sibling and a rename, so a crash at
any instant leaves the previous checkpoint or the new one. Append-only outputs (rounds,
quarantine, the pool of applied edits) are recorded by byte size and cut back to it on
resume, so nothing measured after the checkpoint is counted twice. A memory editor's memory
(`HasJournal`) is not rewritten whole each time: its changes go to a journal beside the
checkpoint (`memory.MemoryJournal`), whose position the editor's state records the same way.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from editors import EditorState, HasJournal, editor_class
from monitor.metrics import RunningMeans
from monitor.plan import make_probe
from monitor.probes import ReferenceSet
from monitor.reference import ReferenceStore
from monitor.round import AlarmLog, Pool
from simulator.records import RECORD_FORMATS
from simulator.timeline import Pending, Timeline
from memory.files import current_folder, fsync_tree, write_atomically
from memory import JournalError

FOLDER = "checkpoint"
META = "checkpoint.json"
TENSORS = "tensors.safetensors"
EDITOR = "editor"
JOURNAL = "memory-journal"  # beside FOLDER: a `HasJournal` editor's memory, as snapshots and changes since
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message says why."""


@dataclass
class Checkpoint:
    """What a run needs to continue: JSON-able progress, the editor's state and extra tensors."""

    progress: dict[str, Any]
    editor: EditorState
    tensors: dict[str, torch.Tensor]

    def save(self, out: Path) -> None:
        """Write into `out/checkpoint`, atomically."""

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            self.editor.save(tmp / EDITOR)
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp / TENSORS)
            (tmp / META).write_text(json.dumps({"version": VERSION, **self.progress}))
            fsync_tree(tmp)

        write_atomically(out / FOLDER, write)

    @classmethod
    def load(cls, out: Path) -> Checkpoint:
        """Read `out/checkpoint`, the editor's state made whole from its journal; CheckpointError when there is
        none, it is from another version, or its journal does not hold what it names."""
        return cls.read(out).made_whole(out)

    @classmethod
    def read(cls, out: Path) -> Checkpoint:
        """`load` without the journal: a `HasJournal` editor's state names its memory by journal position only, so
        this reads only the checkpoint folder, however large the memory is."""
        folder = current_folder(out / FOLDER)
        if not (folder / META).is_file():
            raise CheckpointError(f"no checkpoint in {out} to resume from (run without --resume to start anew)")
        progress = json.loads((folder / META).read_text())
        if progress.pop("version", None) != VERSION:
            raise CheckpointError(f"checkpoint in {out} was written by another editwatch version")
        return cls(progress, EditorState.load(folder / EDITOR), load_file(str(folder / TENSORS)))

    def made_whole(self, out: Path) -> Checkpoint:
        """This checkpoint (`read` from `out`) with a `HasJournal` editor's memory read from the journal beside it."""
        method = editor_class(self.editor.method)
        if not issubclass(method, HasJournal):
            return self
        try:
            state = method.whole_state(self.editor, out / JOURNAL)
        except JournalError as error:
            raise CheckpointError(f"the memory journal of the checkpoint in {out}: {error}") from None
        return Checkpoint(self.progress, state, self.tensors)


def truncate(path: Path, size: int) -> None:
    """Cut an append-only file back to `size` bytes (what it held at the checkpoint)."""
    if not path.exists():
        if size:
            raise CheckpointError(f"{path} is missing but the checkpoint recorded {size} bytes of it")
        return
    if path.stat().st_size < size:
        raise CheckpointError(f"{path} is shorter than the checkpoint recorded ({size} bytes)")
    with path.open("r+b") as handle:
        handle.truncate(size)


def save_timeline(timeline: Timeline, extra: dict[str, Any]) -> None:
    """Checkpoint everything `timeline` needs to continue after its current record, plus the reader's `extra`."""
    tensors: dict[str, torch.Tensor] = {"torch_rng": torch.get_rng_state()}
    pending = []
    for item in timeline.pending:
        tensors.update(item.references.to_tensors(prefix=f"pending/{item.index}/"))
        pending.append({"index": item.index, "record": item.record.model_dump(mode="json", by_alias=True)})
    refset, refset_tensors = _refset_saved(timeline.refset)
    tensors.update(refset_tensors)
    progress = {
        "line": timeline.line, "stopped": timeline.stopped, "edits_read": timeline.edits_read,
        "applied": timeline.applied,
        "failed": timeline.failed, "unmeasured": timeline.unmeasured, "retracted": timeline.retracted,
        "rounds": timeline.rounds, "last_round": timeline.last_round,
        "alarms": timeline.alarms.as_dict(), "results": {k: m.data for k, m in timeline.results.items()},
        "base": timeline.base.data, "retractions": timeline.retractions.data,
        "hop_answers": {k: sorted(v) for k, v in timeline.hop_answers.items()},
        "pending": pending, "pool": timeline.pool.rows,
        "rng": timeline.rng.bit_generator.state, "refset": {**refset, "records": timeline.refset_records},
        "files": timeline.files.durable_sizes(), **extra,
    }
    editor, out = timeline.editor, timeline.files.folder
    journaled = isinstance(editor, HasJournal)
    Checkpoint(progress, editor.journal_state(out / JOURNAL) if journaled else editor.state(), tensors).save(out)
    if journaled:
        editor.journal_committed()  # only now may the journal drop what the previous checkpoint named


def restore_timeline(timeline: Timeline, checkpoint: Checkpoint, pool: Iterable[dict[str, Any]]) -> None:
    """Continue `timeline` from a checkpoint: editor state, counters, pending edits, pool, RNG, reference set.

    `pool` is the run's pool file; its first rows (as many as the checkpoint counted) are the pool.
    """
    p, tensors = checkpoint.progress, checkpoint.tensors
    timeline.editor.load_state(checkpoint.editor)
    if isinstance(timeline.editor, HasJournal):  # cut back what was journaled after the checkpoint, and go on
        try:
            timeline.editor.resume_journal(checkpoint.editor, timeline.files.folder / JOURNAL)
        except JournalError as error:
            raise CheckpointError(f"the memory journal of the checkpoint in {timeline.files.folder}: {error}") from None
    torch.set_rng_state(tensors["torch_rng"])
    timeline.line, timeline.edits_read, timeline.applied = p["line"], p["edits_read"], p["applied"]
    timeline.failed, timeline.rounds, timeline.last_round = p["failed"], p["rounds"], p["last_round"]
    # Checkpoints written before these were kept had none.
    timeline.unmeasured, timeline.retracted = p.get("unmeasured", 0), p.get("retracted", 0)
    timeline.retractions = RunningMeans(p.get("retractions", {}))
    timeline.hop_answers = {k: set(v) for k, v in p.get("hop_answers", {}).items()}
    timeline.alarms = AlarmLog(**p["alarms"])
    timeline.results = {k: RunningMeans(v) for k, v in p["results"].items()}
    timeline.base = RunningMeans(p["base"])
    timeline.rng.bit_generator.state = p["rng"]
    record_class = RECORD_FORMATS[timeline.config.record_format]
    timeline.pending = [
        Pending(item["index"], record_class.model_validate(item["record"]),
                ReferenceStore.from_tensors(tensors, prefix=f"pending/{item['index']}/"))
        for item in p["pending"]
    ]
    timeline.pool = read_pool(pool, p["pool"])
    timeline.refset = restored_refset(checkpoint, timeline.images.open)
    timeline.refset_records = p["refset"]["records"]


def read_pool(rows: Iterable[dict[str, Any]], count: int) -> Pool:
    """The pool the first `count` rows of a pool file describe."""
    return Pool.from_rows(itertools.islice(rows, count))


def restored_refset(checkpoint: Checkpoint, open_image: Callable[[str], Any]) -> ReferenceSet:
    """The reference set a checkpoint saved, its images opened again from their names."""
    saved = checkpoint.progress["refset"]
    probes = [make_probe(item["metric"], item["prompt"], item["answer"], item["image"], open_image)
              for item in saved["items"]]
    references = ReferenceStore.from_tensors(checkpoint.tensors, prefix="refset/")
    return ReferenceSet(probes, references, saved["base_nll"], saved["tokens"])


def _refset_saved(refset: ReferenceSet) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A reference set as JSON (its questions by image name) and tensors (the unedited model's references)."""
    items = [{"metric": p.metric, "prompt": p.query.prompt, "answer": p.query.answer, "image": p.image, "key": p.key}
             for p in refset.probes]
    return ({"items": items, "base_nll": refset.base_nll, "tokens": refset.tokens},
            refset.references.to_tensors(prefix="refset/"))
