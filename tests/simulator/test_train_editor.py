"""`simulate train-editor`: trains a learning editor on a train split and saves a loadable state."""

import json

import pytest
import torch

from editors import LVLM, EditorState, create_editor
from simulator.cli import main
from simulator.requests import edit_request
from simulator.stream import ImageRoot, load_records


def train(small_world, small_model, out, *extra):
    return main(["train-editor", "--train", str(small_world / "train.jsonl"), "--model", str(small_model),
                 "--out", str(out), *extra])


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_trains_saves_and_the_state_edits_in_a_fresh_editor(method, small_world, small_model, tmp_path, capsys):
    out = tmp_path / "state"
    code = train(small_world, small_model, out, "--method", method, "--limit", "5", "--seed", "3",
                 "--config", '{"epochs": 2, "batch_size": 2}')
    assert code == 0
    assert f"train {method}" in capsys.readouterr().err  # the progress bar
    state = EditorState.load(out)
    assert state.meta["config"]["seed"] == 3 and state.meta["config"]["epochs"] == 2
    report = state.meta["report"]
    assert report["examples"] == 5 and 0.0 <= report["train_edit_success"] <= 1.0
    assert all(key.startswith("trained.") for key in state.tensors)  # no edits yet, only the network

    root = ImageRoot(small_world / "images")
    record = load_records(small_world / "eval.jsonl", images=root)[0]
    editor = create_editor(method, LVLM.load(small_model, prompt_format="plain"))
    editor.load_state(state)
    assert editor.report == report
    assert editor.apply(edit_request(record, root)).applied and editor.weight_change() > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ft-llm"], "method 'ft-llm' learns nothing to train. Trainable methods: "),
        (["--method", "mnd"], "Unknown method 'mnd'. Did you mean 'mend'"),
        (["--method", "mend", "--config", '{"epochs": 0}'], "invalid --config for mend:\n  epochs: Input should be"),
        (["--method", "mend", "--config", '{"rnk": 3}'], "rnk: Extra inputs are not permitted"),
        (["--method", "mend", "--config", "[1]"], "--config must be a JSON object, got [1]"),
        (["--method", "mend", "--limit", "0"], "--limit must be at least 1, got 0"),
    ],
)
def test_bad_arguments_say_what_is_wrong(args, message, small_world, small_model, tmp_path, capsys):
    assert train(small_world, small_model, tmp_path / "s", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_bad_train_data_names_the_file_line_and_field(small_world, small_model, tmp_path, capsys):
    common = ["train-editor", "--method", "mend", "--model", str(small_model), "--out", str(tmp_path / "s")]
    assert main([*common, "--train", str(tmp_path / "missing.jsonl")]) == 2
    assert f"train split {tmp_path / 'missing.jsonl'} not found" in capsys.readouterr().err
    bad = tmp_path / "train.jsonl"
    lines = (small_world / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join([lines[0], json.dumps({**json.loads(lines[1]), "alt": ""})]) + "\n")
    assert main([*common, "--train", str(bad)]) == 2
    assert "is not a folder; give it with --images" in capsys.readouterr().err
    assert main([*common, "--train", str(bad), "--images", str(small_world / "images")]) == 2
    assert "line 2, field 'alt'" in capsys.readouterr().err


@pytest.mark.slow
def test_without_train_it_uses_the_embedded_world_written_once_into_the_cache(tmp_path):
    from simulator.settings import cache_root
    from simulator.world.graph import WorldConfig

    args = ["train-editor", "--method", "mend", "--limit", "3", "--config", '{"epochs": 1}', "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    world = cache_root() / "worlds" / WorldConfig().digest()
    assert (world / "train.jsonl").is_file() and len(list((world / "images").iterdir())) == 1200
    stamp = (world / "train.jsonl").stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (world / "train.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    a, b = EditorState.load(tmp_path / "a"), EditorState.load(tmp_path / "b")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # seeded: identical networks
