"""The memory journal: replay equals the live memory (ids, storage, search), compaction, crash leftovers, SIGKILL."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from memory import MemoryConfig, VectorMemory
from memory.journal import Change, JournalError, JournalPosition, MemoryJournal, read_journal
from tests.services import one_thread_env

DIM = 16
# IVF from 60 entries (8 lists, 2 scanned: approximate, so list assignment shows in the results), rebuilt at 2x.
SMALL_IVF = MemoryConfig(exact_below=60, lists_per_sqrt=1.0, nprobe=2, grow_factor=2.0, background=False)


class Mirror:
    """A memory changed one call at a time, as an editor changes it, with the changes since the last write."""

    def __init__(self, config: MemoryConfig, seed: int) -> None:
        self.memory = VectorMemory(DIM, config)
        self.payloads: dict[int, object] = {}
        self.changes: list[Change] | None = None
        self.rng = np.random.default_rng(seed)

    def add(self) -> None:
        vector = self.rng.normal(size=DIM).astype(np.float32) * 3.0  # not unit: the memory normalises it
        entry = int(self.memory.add(vector[None])[0])
        self.payloads[entry] = ["edit", entry, {"n": float(vector[0])}]
        if self.changes is not None:
            self.changes.append(Change(entry, vector, self.payloads[entry]))

    def remove(self) -> None:
        entry = int(self.rng.choice(self.memory.ids()))
        self.memory.remove([entry])
        del self.payloads[entry]
        if self.changes is not None:
            self.changes.append(Change(entry))

    def step(self) -> None:
        """One change: mostly adds, a removal now and then (when there is something to remove)."""
        self.remove() if len(self.memory) and self.rng.random() < 0.3 else self.add()

    def write(self, journal: MemoryJournal) -> JournalPosition:
        position = journal.write(self.memory, self.changes, lambda: dict(self.payloads))
        self.changes = []
        return position


def assert_same_memory(got: VectorMemory, want: VectorMemory) -> None:
    """Same ids, same index bytes (so same storage order and plan), same search results."""
    assert np.array_equal(got.ids(), want.ids()) and got.plan == want.plan
    assert np.array_equal(got.to_bytes()[0], want.to_bytes()[0])
    queries = np.random.default_rng(99).normal(size=(40, DIM)).astype(np.float32)
    a, b = got.search(queries, k=5), want.search(queries, k=5)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)


@pytest.mark.parametrize("config", [MemoryConfig(background=False), SMALL_IVF], ids=["flat", "ivf"])
def test_every_checkpointed_position_replays_to_the_memory_it_recorded(config, tmp_path):
    mirror, journal = Mirror(config, seed=1), MemoryJournal(tmp_path / "j")
    positions, plans = [], set()
    for checkpoint in range(40):
        for _ in range(8):
            mirror.step()
        position = mirror.write(journal)
        journal.commit()
        positions.append(position)
        plans.add(mirror.memory.plan)
        memory, payloads = read_journal(tmp_path / "j", position)
        assert_same_memory(memory, mirror.memory)
        assert payloads == mirror.payloads
        # Only the generation the last checkpoint names is kept.
        assert sorted(p.name for p in (tmp_path / "j").iterdir()) == [f"log-{position.generation}.bin",
                                                                      f"snapshot-{position.generation}"]
    appended = [p for p in positions if p.log_bytes > 0]
    # Logs grow between snapshots; a snapshot comes when a log would outgrow its snapshot (and, for IVF, after a
    # rebuild), so there are few generations, each with a log shorter than its snapshot.
    assert len(appended) >= 25 and 3 <= positions[-1].generation <= 12
    snapshot_bytes = sum(p.stat().st_size for p in (tmp_path / "j" / f"snapshot-{positions[-1].generation}").iterdir())
    assert positions[-1].log_bytes <= snapshot_bytes
    if config.exact_below == 60:
        assert len(plans) >= 3 and mirror.memory.index_kind == "ivf"  # flat, then IVF rebuilt at least once


def test_a_rebuild_or_an_unknown_change_set_writes_a_snapshot(tmp_path):
    mirror, journal = Mirror(SMALL_IVF, seed=2), MemoryJournal(tmp_path / "j")
    for _ in range(50):
        mirror.add()
    assert mirror.write(journal) == JournalPosition(generation=1, log_bytes=0)  # the first write is a snapshot
    mirror.add()
    assert mirror.write(journal).generation == 1  # appended
    for _ in range(9):  # crosses exact_below = 60: rebuilt as IVF
        mirror.add()
    assert mirror.memory.index_kind == "ivf"
    assert mirror.write(journal) == JournalPosition(generation=2, log_bytes=0)
    mirror.add()
    mirror.changes = None  # e.g. the memory was loaded from a whole state: what changed is not known
    assert mirror.write(journal) == JournalPosition(generation=3, log_bytes=0)


def test_leftovers_of_a_crash_are_ignored_by_readers_and_removed_on_resume(tmp_path):
    folder = tmp_path / "j"
    mirror, journal = Mirror(MemoryConfig(background=False), seed=3), MemoryJournal(folder)
    for _ in range(30):
        mirror.add()
    mirror.write(journal)
    for _ in range(5):
        mirror.step()
    position = mirror.write(journal)
    journal.commit()
    assert position.generation == 1 and position.log_bytes > 0
    expected, expected_payloads = VectorMemory.from_bytes(*mirror.memory.to_bytes()), dict(mirror.payloads)

    # What a writer killed after this checkpoint leaves: more records (the last one torn) appended to the log, a
    # snapshot that was written but never named by a checkpoint, one killed inside write_atomically.
    for _ in range(3):
        mirror.step()
    mirror.write(journal)
    log = folder / "log-1.bin"
    with log.open("ab") as handle:
        handle.write(b"\x01\x07torn")
    mirror.changes = None
    assert mirror.write(journal).generation == 2
    (folder / ".snapshot-3.tmp-4242").mkdir()
    (folder / ".snapshot-3.tmp-4242" / "index.faiss").write_bytes(b"half")
    assert log.stat().st_size > position.log_bytes

    # A reader reads only what the checkpoint recorded.
    memory, payloads = read_journal(folder, position)
    assert_same_memory(memory, expected)
    assert payloads == expected_payloads
    # A resumed writer cuts the log back, deletes every generation no checkpoint names, and appends from there.
    resumed = MemoryJournal(folder)
    resumed.resume(position, memory)
    assert log.stat().st_size == position.log_bytes
    assert sorted(p.name for p in folder.iterdir()) == ["log-1.bin", "snapshot-1"]
    mirror.memory, mirror.payloads, mirror.changes = memory, payloads, []
    mirror.add()
    later = mirror.write(resumed)
    assert later.generation == 1 and later.log_bytes > position.log_bytes
    again, _ = read_journal(folder, later)
    assert_same_memory(again, mirror.memory)


def test_damage_within_the_recorded_length_is_an_error_not_a_change(tmp_path):
    mirror, journal = Mirror(MemoryConfig(background=False), seed=4), MemoryJournal(tmp_path / "j")
    for _ in range(30):
        mirror.add()
    mirror.write(journal)
    mirror.add()
    mirror.add()
    position = mirror.write(journal)
    log = tmp_path / "j" / "log-1.bin"
    data = bytearray(log.read_bytes())
    data[30] ^= 0xFF  # inside the first record's key
    log.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="record at byte 0 is damaged"):
        read_journal(tmp_path / "j", position)
    log.write_bytes(bytes(data[: position.log_bytes - 10]))
    with pytest.raises(JournalError, match=f"holds {position.log_bytes - 10} bytes; the checkpoint recorded"):
        read_journal(tmp_path / "j", position)
    with pytest.raises(JournalError, match="byte 0 is damaged or cut short: it does not end within the 7 bytes"):
        read_journal(tmp_path / "j", JournalPosition(generation=1, log_bytes=7))
    with pytest.raises(JournalError, match="holds no snapshot 5"):
        read_journal(tmp_path / "j", JournalPosition(generation=5, log_bytes=0))
    log.unlink()
    for call in (lambda: read_journal(tmp_path / "j", position), lambda: journal.resume(position, mirror.memory)):
        with pytest.raises(JournalError, match=f"log-1.bin is missing; the checkpoint recorded {position.log_bytes}"):
            call()



def test_a_none_payload_replays_and_can_be_removed(tmp_path):
    # A payload is any JSON value: null too. Its removal was taken for the removal of an entry never held.
    memory, journal = VectorMemory(DIM, MemoryConfig(background=False)), MemoryJournal(tmp_path / "j")
    keep, gone = np.eye(DIM, dtype=np.float32)[:2]
    journal.write(memory, None, dict)
    a, b = (int(memory.add(v[None])[0]) for v in (keep, gone))
    memory.remove([b])
    position = journal.write(memory, [Change(a, keep, None), Change(b, gone, None), Change(b)], lambda: {a: None})
    replayed, payloads = read_journal(tmp_path / "j", position)
    assert payloads == {a: None}
    assert_same_memory(replayed, memory)


def test_a_damaged_snapshot_or_a_log_of_another_memory_is_a_journal_error(tmp_path):
    # The probe job re-reads a checkpoint on CheckpointError (a JournalError's) and OSError: FAISS's RuntimeError,
    # a KeyError or a MemoryInputError crashed it.
    mirror, journal = Mirror(MemoryConfig(background=False), seed=5), MemoryJournal(tmp_path / "j")
    for _ in range(5):
        mirror.add()
    position = mirror.write(journal)
    held = int(mirror.memory.ids()[0])
    again = journal.write(mirror.memory, [Change(held, np.ones(DIM, np.float32), ["dup"])], lambda: mirror.payloads)
    with pytest.raises(JournalError, match=f"log-1.bin: the log adds entry {held}, which the memory cannot take"):
        read_journal(tmp_path / "j", again)
    snapshot = tmp_path / "j" / "snapshot-1"
    entries = (snapshot / "entries.json").read_text()
    (snapshot / "entries.json").write_text(json.dumps({"ids": json.loads(entries)["ids"]}))
    with pytest.raises(JournalError, match="snapshot-1 cannot be read: KeyError"):
        read_journal(tmp_path / "j", position)
    (snapshot / "entries.json").write_text(entries)
    (snapshot / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(JournalError, match="snapshot-1 cannot be read: RuntimeError"):
        read_journal(tmp_path / "j", position)

# A writer that checkpoints after every write, as a run does: journal write, then the checkpoint (its position and
# how many steps it holds) replaced atomically, then commit. Every step is one seeded change, so the memory a
# checkpoint names can be rebuilt here from its step count alone.
WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from memory.files import write_text_atomically
from memory.journal import MemoryJournal, JournalPosition, read_journal
from tests.memory.test_journal import Mirror, STEPS_PER_WRITE, WRITER_CONFIG
import json
folder, checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
mirror, journal, steps = Mirror(WRITER_CONFIG, seed=5), MemoryJournal(folder), 0
if checkpoint.exists():  # resumed: the memory the checkpoint names, and the mirror's random state after its steps
    saved = json.loads(checkpoint.read_text())
    position = JournalPosition.model_validate(saved["position"])
    for _ in range(saved["steps"]):
        mirror.step()
    mirror.memory, mirror.payloads = read_journal(folder, position)
    journal.resume(position, mirror.memory)
    mirror.changes, steps = [], saved["steps"]
while True:
    for _ in range(STEPS_PER_WRITE):
        mirror.step()
    steps += STEPS_PER_WRITE
    if steps % (7 * STEPS_PER_WRITE) == 0:
        mirror.changes = None  # a snapshot now and then besides the log's own
    position = mirror.write(journal)
    write_text_atomically(checkpoint, json.dumps({{"position": position.model_dump(), "steps": steps}}))
    journal.commit()
    print(steps, flush=True)
"""
STEPS_PER_WRITE = 40
WRITER_CONFIG = MemoryConfig(exact_below=2000, lists_per_sqrt=1.0, nprobe=4, background=False)


@pytest.mark.slow
def test_a_writer_killed_at_any_instant_leaves_a_journal_that_resumes(tmp_path):
    """SIGKILL a journaling process at random instants (mid-append and mid-snapshot, as timing falls), resume it
    from its last checkpoint each time, and check the journal against a memory rebuilt from the step count."""
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=root))
    folder, checkpoint = tmp_path / "j", tmp_path / "checkpoint.json"
    rng = np.random.default_rng(0)
    env = one_thread_env()
    for kill in range(6):
        process = subprocess.Popen([sys.executable, str(script), str(folder), str(checkpoint)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = process.stdout.readline()  # it has written at least once: the kill lands inside the loop
        assert first, process.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.4)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = json.loads(checkpoint.read_text())
        position = JournalPosition.model_validate(saved["position"])
        expected = Mirror(WRITER_CONFIG, seed=5)
        for _ in range(saved["steps"]):
            expected.step()
        memory, payloads = read_journal(folder, position)
        assert_same_memory(memory, expected.memory)
        assert payloads == expected.payloads
    assert saved["steps"] > 7 * STEPS_PER_WRITE  # it got past a forced snapshot


def test_a_new_writer_never_overwrites_a_generation_in_its_folder(tmp_path):
    folder = tmp_path / "j"
    mirror = Mirror(MemoryConfig(background=False), seed=6)
    for _ in range(5):
        mirror.add()
    named = mirror.write(MemoryJournal(folder))
    (folder / ".snapshot-7.tmp-31").mkdir()  # a dead writer's half-written snapshot numbers past it too
    mirror.add()
    assert mirror.write(MemoryJournal(folder)) == JournalPosition(generation=8, log_bytes=0)
    memory, _ = read_journal(folder, named)  # what a checkpoint may still name is intact
    assert len(memory) == 5
