"""Records the model cannot take are quarantined with their reason; a vanished image root stops the run, resumably."""

import json
import shutil

import pytest

from monitor.sink import Sink
from simulator.config import RunConfig
from simulator.run import RunError, simulate

GOOD = 4


@pytest.fixture
def good(small_world):
    return [json.loads(line) for line in (small_world / "eval.jsonl").read_text().splitlines()[:GOOD]]


def config(stream, images, small_model, out, **extra):
    return RunConfig(stream=str(stream), images=images, model=str(small_model), method="ft-llm", gap=[1],
                     probe_every=2, checkpoint_every=2, retention_sample=3, reference_size=2, no_mlflow=True, out=out,
                     **extra)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_the_model_cannot_take_are_quarantined_and_change_nothing(good, small_world, small_model, tmp_path):
    hostile = [
        {**good[0], "id": "long", "src": " ".join(["what"] * 400)},  # far past the model's 256-token context
        {**good[1], "id": "placeholder", "rephrase": "<image> " + good[1]["rephrase"]},
        {**good[2], "id": "blank", "alt": "   "},
        {**good[3], "id": "eos", "loc_ans": good[3]["loc_ans"] + "</s>"},
    ]
    images = small_world / "images"
    clean = simulate(config(write(tmp_path / "clean.jsonl", good), images, small_model, tmp_path / "clean"),
                     progress=False)
    mixed = [good[0], hostile[0], good[1], hostile[1], hostile[2], good[2], hostile[3], good[3]]
    run = simulate(config(write(tmp_path / "mixed.jsonl", mixed), images, small_model, tmp_path / "mixed"),
                   progress=False)
    assert (run["edits_read"], run["edits_applied"], run["quarantined"], run["failed"]) == (GOOD, GOOD, 4, 0)
    reasons = {json.loads(line)["line"]: json.loads(line)["message"]
               for line in (tmp_path / "mixed" / "quarantine.jsonl").read_text().splitlines()}
    assert set(reasons) == {2, 4, 5, 7}  # every line accounted for: 4 applied + 4 quarantined = 8
    assert run["lines_read"] == 8 == run["edits_applied"] + run["failed"] + run["quarantined"]
    assert "at most 256" in reasons[2] and "'<image>'" in reasons[4] and "must not be blank" in reasons[5]
    assert "'</s>'" in reasons[7]
    # The good records were measured exactly as in a stream without the hostile ones.
    assert run["results"] == clean["results"] and run["base"] == clean["base"]


def test_bad_lines_after_the_last_record_reach_prometheus_and_a_sweep_does_not_count_an_unusable_run_finished(
        good, small_world, small_model, tmp_path):
    from prometheus_client import CollectorRegistry

    from monitor.exporters.prometheus import PrometheusSink
    from simulator.sweep import finished_summary

    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps(r) + "\n" for r in good[:2]) + "not json\n{}\n")
    sink = PrometheusSink(CollectorRegistry())
    summary = simulate(config(stream, small_world / "images", small_model, tmp_path / "run"), [sink], progress=False)
    assert summary["quarantined"] == 2
    assert sink.registry.get_sample_value("editwatch_edits_quarantined_total", sink.labels) == 2
    assert finished_summary(config(stream, small_world / "images", small_model, tmp_path / "run")) is not None
    bad = write(tmp_path / "bad.jsonl", [{"id": "x"}])
    with pytest.raises(RunError, match="no usable record"):
        simulate(config(bad, small_world / "images", small_model, tmp_path / "bad"), progress=False)
    assert (tmp_path / "bad" / "summary.json").is_file()  # written before the error, yet not a finished cell
    assert finished_summary(config(bad, small_world / "images", small_model, tmp_path / "bad")) is None


def test_max_tokens_lowers_the_longest_query(good, small_world, small_model, tmp_path):
    with pytest.raises(RunError, match="no usable record .*: 4 lines read, 4 quarantined"):
        simulate(config(write(tmp_path / "s.jsonl", good), small_world / "images", small_model, tmp_path / "r",
                        max_tokens=8), progress=False)
    reasons = [json.loads(line)["message"] for line in (tmp_path / "r" / "quarantine.jsonl").read_text().splitlines()]
    assert len(reasons) == GOOD and all(r.endswith("the model takes at most 8") for r in reasons)


class Vanish(Sink):
    """Moves the image root away after `after` edits, as a deleted or unmounted folder."""

    def __init__(self, images, after):
        self.images, self.after = images, after

    def on_edit(self, applied, seconds, step):
        if step == self.after:
            self.images.rename(self.images.with_name("gone"))


def test_a_vanished_image_root_stops_the_run_with_a_checkpoint_and_resume_finishes_it(good, small_world, small_model,
                                                                                       tmp_path):
    images = tmp_path / "images"
    shutil.copytree(small_world / "images", images)
    stream = write(tmp_path / "s.jsonl", good)
    whole = simulate(config(stream, images, small_model, tmp_path / "whole"), progress=False)
    with pytest.raises(RunError, match="the run stopped after 2 edits with a checkpoint: --resume continues"):
        simulate(config(stream, images, small_model, tmp_path / "run"), [Vanish(images, 2)], progress=False)
    assert not (tmp_path / "run" / "quarantine.jsonl").exists()  # nothing blamed on the records
    (tmp_path / "gone").rename(images)
    resumed = simulate(config(stream, images, small_model, tmp_path / "run", resume=True), progress=False)
    assert {k: v for k, v in resumed.items() if k not in ("run", "last_round")} == \
        {k: v for k, v in whole.items() if k not in ("run", "last_round")}


@pytest.mark.parametrize("when", ["after the third edit", "before the third edit"])
def test_an_image_root_vanishing_halfway_through_a_record_resumes_from_the_last_checkpoint(
        good, small_world, small_model, tmp_path, monkeypatch, when):
    """Images too large to stay cached are opened again where they are needed, so the root can vanish inside a
    record: after its edit was applied and before it was measured, or just before the edit's own image is opened.
    No checkpoint may be written then, nor the record failed, or resume would skip the rest of it."""
    import simulator.run
    import simulator.timeline
    from simulator.stream import ImageRoot

    class Uncached(ImageRoot):
        def __init__(self, root, **kwargs):
            super().__init__(root, cache_bytes=0)

    monkeypatch.setattr(simulator.run, "ImageRoot", Uncached)
    images = tmp_path / "images"
    shutil.copytree(small_world / "images", images)
    stream = write(tmp_path / "s.jsonl", good)
    whole = simulate(config(stream, images, small_model, tmp_path / "whole"), progress=False)
    request = simulator.timeline.edit_request

    def vanishing(record, root):
        if record.id == good[2]["id"]:
            images.rename(images.with_name("gone"))
        return request(record, root)

    with monkeypatch.context() as patch:
        if when.startswith("before"):
            patch.setattr(simulator.timeline, "edit_request", vanishing)
        with pytest.raises(RunError, match="halfway through a record: --resume continues from the last checkpoint"):
            simulate(config(stream, images, small_model, tmp_path / "run"),
                     [Vanish(images, 3)] if when.startswith("after") else [], progress=False)
    checkpoint = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())
    assert (checkpoint["edits_read"], checkpoint["line"]) == (2, 2)  # the periodic one, before the third record
    (tmp_path / "gone").rename(images)
    resumed = simulate(config(stream, images, small_model, tmp_path / "run", resume=True), progress=False)
    assert {k: v for k, v in resumed.items() if k not in ("run", "last_round")} == \
        {k: v for k, v in whole.items() if k not in ("run", "last_round")}
    for name in ("pool.jsonl", "rounds.jsonl"):
        rows = [(tmp_path / run / name).read_text().splitlines() for run in ("whole", "run")]
        assert len(rows[0]) == len(rows[1]) > 0, name


def test_an_exception_inside_the_method_fails_that_record_and_the_run_goes_on(good, small_world, small_model,
                                                                                tmp_path, monkeypatch, caplog):
    """Out of memory while applying one edit: the record fails with the reason, its weights are restored, and
    every other record is measured exactly as in a stream without it."""
    import torch

    from editors.ft import FineTune

    images = small_world / "images"
    others = [good[0], good[1], good[3]]
    clean = simulate(config(write(tmp_path / "clean.jsonl", others), images, small_model, tmp_path / "clean"),
                     progress=False)
    real = FineTune.apply

    def apply(self, edit):
        if edit.key == str(good[2]["id"]):
            # Inside the update, after the weights began to move: the tracker must put them back.
            def change():
                _touch(self)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

            return self.tracker.edit(change)
        return real(self, edit)

    def _touch(editor):
        for parameter in editor.tracker.params.values():
            parameter.data.add_(1.0)

    monkeypatch.setattr(FineTune, "apply", apply)
    run = simulate(config(write(tmp_path / "s.jsonl", good), images, small_model, tmp_path / "r"), progress=False)
    assert (run["edits_read"], run["edits_applied"], run["failed"], run["quarantined"]) == (GOOD, GOOD - 1, 1, 0)
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 40.00 GiB" in caplog.text
    assert run["results"] == clean["results"]
