"""The trained-editor cache of a run (`simulator.run.prepare_editor`): trained once, then loaded; missed on a change."""

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from editors import LVLM, Query, SpanScore
from editors.registry import editor_class
from simulator.config import RunConfig
from simulator.requests import edit_request
from simulator.run import prepare_editor
from simulator.stream import ImageRoot, load_records

METHOD = "ke"  # the cheapest trainable method with a trained network: one epoch over three edits
SETTINGS = {"epochs": 1, "batch_size": 3}


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty $EDITWATCH_CACHE of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EDITWATCH_CACHE", str(root))
    return root


@pytest.fixture
def trainings(monkeypatch) -> list[int]:
    """Counts calls of the method's `train` (the real one still runs)."""
    cls = editor_class(METHOD)
    real, calls = cls.train, []

    def counting(self, examples, progress=True):
        calls.append(len(examples))
        return real(self, examples, progress=progress)

    monkeypatch.setattr(cls, "train", counting)
    return calls


def split(small_world: Path, path: Path, lines: int) -> Path:
    """The first `lines` records of the world's train split, written to `path`."""
    path.write_text("".join((small_world / "train.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return path


def config(small_world: Path, small_model: Path, train: Path, **settings) -> RunConfig:
    return RunConfig(stream=str(small_world / "eval.jsonl"), model=str(small_model), method=METHOD, train=train,
                     method_config={**SETTINGS, **settings})


def files_under(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_scores(got: list[SpanScore], want: list[SpanScore]) -> None:
    """Every tensor of every span score equal bit for bit."""
    for a, b in zip(got, want, strict=True):
        for field in fields(SpanScore):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert (x is None and y is None) or torch.equal(x, y), field.name


def test_first_call_trains_into_the_cache_and_the_second_loads_it_without_training(
    small_world, small_model, tmp_path, cache, trainings, monkeypatch
):
    """Train once (files appear), then load: `train` is never called (it would raise), nothing is rewritten,
    the report is the same, and the loaded editor scores bit for bit like the freshly trained one."""
    root = ImageRoot(small_world / "images")
    run = config(small_world, small_model, split(small_world, tmp_path / "train.jsonl", 3))
    fresh, report = prepare_editor(run, LVLM.load(small_model), root)
    assert trainings == [3]
    written = files_under(cache)
    assert written and report["examples"] == 3.0 and report["epochs"] == 1.0

    def refuse(*_args, **_kwargs):
        raise AssertionError("trained again: the cache was not used")

    monkeypatch.setattr(editor_class(METHOD), "train", refuse)
    loaded, cached = prepare_editor(run, LVLM.load(small_model), root)
    assert cached == report
    assert files_under(cache) == written  # read, not rewritten

    trained, restored = fresh.state(), loaded.state()
    assert sorted(trained.tensors) == sorted(restored.tensors) and trained.tensors
    assert all(torch.equal(trained.tensors[k], restored.tensors[k]) for k in trained.tensors)
    record = load_records(small_world / "eval.jsonl", images=root)[0]
    queries = [Query(record.src, record.alt, root.open(record.image)),
               Query(record.rephrase, record.alt, root.open(record.image)),
               Query(record.loc, record.loc_ans)]
    unedited = fresh.score(queries)
    for editor in (fresh, loaded):
        assert editor.apply(edit_request(record, root)).applied
    after = fresh.score(queries)
    assert_same_scores(loaded.score(queries), after)
    assert not torch.equal(after[0].target_logprobs, unedited[0].target_logprobs)  # the edit did change scores


def test_a_changed_train_split_or_method_setting_misses_the_cache_and_the_same_bytes_hit_it(
    small_world, small_model, tmp_path, cache, trainings
):
    """The cache key holds the split's content and the method's settings: changing either trains anew
    (next to the earlier entry, which stays), while the same split under another path is a hit."""
    root = ImageRoot(small_world / "images")
    three = split(small_world, tmp_path / "three.jsonl", 3)
    prepare_editor(config(small_world, small_model, three), LVLM.load(small_model), root)
    first = files_under(cache)
    assert trainings == [3]

    two = split(small_world, tmp_path / "two.jsonl", 2)
    prepare_editor(config(small_world, small_model, two), LVLM.load(small_model), root)
    assert trainings == [3, 2]
    second = files_under(cache)
    assert set(first) < set(second) and all(second[name] == stamp for name, stamp in first.items())

    prepare_editor(config(small_world, small_model, three, lr=2e-3), LVLM.load(small_model), root)
    assert trainings == [3, 2, 3]
    assert set(second) < set(files_under(cache))

    copy = tmp_path / "elsewhere" / "train.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(three.read_bytes())
    prepare_editor(config(small_world, small_model, copy), LVLM.load(small_model), root)
    assert trainings == [3, 2, 3]  # the same bytes: the first entry, loaded
