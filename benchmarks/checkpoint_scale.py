"""Checkpoint time of a memory editor against memory size: incremental (journal) against whole state.

For each size N, a SERAC editor on the shipped default model is filled with N edits, then checkpointed
the way a run does it (`simulator.checkpoint.Checkpoint`, every `--every` edits, default 100 as
`--checkpoint-every`): the first checkpoint writes a journal snapshot (O(N), once), each later one appends
the changes since the last (`--rounds` of them: medians and maxima are printed). Each round applies
`--every` edits of which one in ten edits a fact again (the newest value replaces the old entry: an add
and a removal in the log) and one retracts an edit. The same memory is then checkpointed whole
(`Editor.state()`, as before journals) for comparison, and the journal read back as `simulate probe`
and `--resume` read it (`Checkpoint.load`).

Keys are synthetic: Gaussian vectors of the dimension SERAC's keys have on the default model after
`train` (384 text + image tokens x 8 discriminant directions), with a random projection set in place
of a trained one; only the memory's size and key dimension matter to checkpoint cost. Edits are
text-only synthetic questions. The rest of a run's checkpoint (reference set, pending edits) does not
depend on N and is left out, as is the MiniLM / vision embedding of real edits.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_scale.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from editors import EditRequest, LVLM, create_editor
from editors.edit_memory import MemoryEditor
from simulator.checkpoint import JOURNAL, Checkpoint
from simulator.world.default import SHIPPED

COMPONENTS = 8  # SeracConfig.image_components: discriminant directions per image token


def synthetic_serac(lvlm: LVLM, seed: int) -> MemoryEditor:
    """A SERAC editor whose keys have the trained dimension and come from a seeded Gaussian, not from embedders."""
    editor = create_editor("serac", lvlm)
    vision = editor.edits.vision
    rng = np.random.default_rng(seed)
    vision.center = np.zeros(vision.token_dim, np.float32)
    vision.projection = rng.normal(size=(vision.token_dim, COMPONENTS)).astype(np.float32)
    editor.edits.reset()  # the key dimension follows the projection
    dim = editor.edits.memory.dim
    editor.edits.embed = lambda queries: rng.normal(size=(len(queries), dim)).astype(np.float32)
    return editor


def edit(i: int, value: int = 0) -> EditRequest:
    """Synthetic text-only edit `i` (its fact: question i); `value` tells re-edits of it apart."""
    return EditRequest(f"synthetic question number {i}?", f"answer {value}", key=f"{i}#{value}" if value else str(i))


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkpoint(editor: MemoryEditor, out: Path, progress: dict, tensors: dict) -> tuple[float, int, int]:
    """Seconds, bytes written and journal generation of one journaled checkpoint, as `save_timeline` writes it."""
    journal = out / JOURNAL
    before = folder_bytes(journal) if journal.exists() else 0
    start = time.perf_counter()
    state = editor.journal_state(journal)
    Checkpoint(progress, state, tensors).save(out)
    editor.journal_committed()
    seconds = time.perf_counter() - start
    # The checkpoint folder is rewritten whole; the journal grows by what was appended (or a new snapshot).
    written = folder_bytes(out / "checkpoint") + max(folder_bytes(journal) - before, 0)
    return seconds, written, state.meta["memory"]["journal"]["generation"]


def measure(lvlm: LVLM, size: int, rounds: int, every: int, seed: int, root: Path) -> dict[str, float]:
    """Fill a memory of `size` edits, checkpoint it `rounds` times incrementally, then whole; read it back."""
    editor = synthetic_serac(lvlm, seed)
    start = time.perf_counter()
    for i in range(size):
        editor.apply(edit(i))
    editor.edits.memory.wait()
    fill = time.perf_counter() - start
    progress, tensors = {"line": size}, {"torch_rng": torch.get_rng_state()}
    out = root / f"run-{size}"
    first, first_bytes, _ = checkpoint(editor, out, progress, tensors)  # the journal's first snapshot
    rng = np.random.default_rng(seed)
    times, written, generations = [], [], set()
    added = size
    for _ in range(rounds):
        for j in range(every):
            if j % 10 == 0:  # a re-edit of a fact held: the newest value replaces the old entry
                editor.apply(edit(int(rng.integers(added)), value=int(rng.integers(1, 10**6))))
            elif j == every - 1:
                editor.retract(str(int(rng.integers(added))))  # may name an edit re-edited or retracted: refused
            else:
                editor.apply(edit(added))
                added += 1
        seconds, bytes_, generation = checkpoint(editor, out, progress, tensors)
        times.append(seconds)
        written.append(bytes_)
        generations.add(generation)
    whole_out = root / f"whole-{size}"
    start = time.perf_counter()
    Checkpoint(progress, editor.state(), tensors).save(whole_out)
    whole = time.perf_counter() - start
    whole_bytes = folder_bytes(whole_out / "checkpoint")
    start = time.perf_counter()
    loaded = Checkpoint.load(out)
    read = time.perf_counter() - start
    if loaded.editor.meta["memory"]["ids"] != sorted(editor.edits.edits):
        raise RuntimeError("the journal read back does not hold the memory's entries")
    result = {
        "entries": float(editor.memory_size()), "fill_seconds": fill,
        "incremental_p50_seconds": statistics.median(times), "incremental_max_seconds": max(times),
        "incremental_p50_bytes": statistics.median(written), "snapshots_in_rounds": float(len(generations) - 1),
        "first_snapshot_seconds": first, "first_snapshot_bytes": float(first_bytes),
        "whole_seconds": whole, "whole_bytes": float(whole_bytes), "read_back_seconds": read,
    }
    shutil.rmtree(out)
    shutil.rmtree(whole_out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=10, help="incremental checkpoints timed per size")
    parser.add_argument("--every", type=int, default=100, help="edits between checkpoints (--checkpoint-every)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lvlm = LVLM.load(SHIPPED, "float32", "cpu", "plain")
    rows = []
    with tempfile.TemporaryDirectory(prefix="checkpoint-scale-") as tmp:
        for size in args.sizes:
            rows.append(measure(lvlm, size, args.rounds, args.every, args.seed, Path(tmp)))
            r = rows[-1]
            print(f"N={size:>7}: incremental {r['incremental_p50_seconds'] * 1e3:7.1f} ms p50 "
                  f"({r['incremental_max_seconds'] * 1e3:.1f} max, {r['incremental_p50_bytes'] / 1e3:.0f} kB), "
                  f"whole {r['whole_seconds'] * 1e3:8.1f} ms ({r['whole_bytes'] / 1e6:.1f} MB)", flush=True)
    print()
    print("| entries | incremental checkpoint p50 / max | bytes written (p50) | snapshots in the rounds "
          "| first snapshot | whole-state checkpoint | bytes | read back (probe, resume) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {int(r['entries']):,} "
              f"| {r['incremental_p50_seconds'] * 1e3:.1f} / {r['incremental_max_seconds'] * 1e3:.1f} ms "
              f"| {r['incremental_p50_bytes'] / 1e3:.0f} kB | {int(r['snapshots_in_rounds'])} "
              f"| {r['first_snapshot_seconds']:.2f} s, {r['first_snapshot_bytes'] / 1e6:.1f} MB "
              f"| {r['whole_seconds']:.2f} s | {r['whole_bytes'] / 1e6:.1f} MB | {r['read_back_seconds']:.2f} s |")
    base, top = rows[0]["incremental_p50_seconds"], rows[-1]["incremental_p50_seconds"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nincremental p50 at {int(rows[-1]['entries']):,} entries / at {int(rows[0]['entries']):,}: "
          f"{top / base:.2f}x (target: within 2x); peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
