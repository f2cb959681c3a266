"""Editor state folders: atomic replacement that survives a crash at any point."""

import os

import torch

from editors import EditorState
from editors.state import write_atomically


def test_a_crash_between_the_two_renames_leaves_the_old_state_readable(tmp_path):
    EditorState("none", {"v": 1}, {"w": torch.ones(2)}).save(tmp_path / "s")
    os.replace(tmp_path / "s", tmp_path / ".s.old")  # the first rename happened, then the process died
    assert EditorState.load(tmp_path / "s").meta == {"v": 1}  # read from where the crash left it
    EditorState("none", {"v": 2}).save(tmp_path / "s")  # the next save supersedes it
    assert EditorState.load(tmp_path / "s").meta == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_stale_old_folder_does_not_block_the_next_save(tmp_path):
    EditorState("none", {"v": 1}).save(tmp_path / "s")
    (tmp_path / ".s.old").mkdir()
    (tmp_path / ".s.old" / "junk").write_text("left by a crash after the second rename")
    EditorState("none", {"v": 2}).save(tmp_path / "s")
    assert EditorState.load(tmp_path / "s").meta == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_files_are_replaced_in_one_rename(tmp_path):
    write_atomically(tmp_path / "f.txt", lambda tmp: tmp.write_text("one"))
    write_atomically(tmp_path / "f.txt", lambda tmp: tmp.write_text("two"))
    assert (tmp_path / "f.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
