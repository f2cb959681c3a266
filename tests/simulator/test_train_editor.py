"""`simulate train-editor`: trains a learning editor on a train split and saves a loadable state."""

import json

import pytest
import torch

from editors import LVLM, EditorState, create_editor
from simulator.cli import main
from simulator.requests import edit_request
from simulator.stream import ImageRoot, load_records


def _accuracy(score) -> float:
    """The fraction of the answer's tokens predicted top-1."""
    return (score.argmax_ids == score.target_ids).float().mean().item()


def train(small_world, small_model, out, *extra):
    return main(["train-editor", "--train", str(small_world / "train.jsonl"), "--model", str(small_model),
                 "--out", str(out), *extra])


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_trains_saves_and_the_state_edits_in_a_fresh_editor(method, small_world, small_model, tmp_path, capsys):
    out = tmp_path / "state"
    code = train(small_world, small_model, out, "--method", method, "--limit", "5", "--seed", "3",
                 "--method-config", '{"epochs": 2, "batch_size": 2}')
    assert code == 0
    assert f"train {method}" in capsys.readouterr().err  # the progress bar
    state = EditorState.load(out)
    assert state.meta["config"]["seed"] == 3 and state.meta["config"]["epochs"] == 2
    model = state.meta["model"]  # what a run checks the state against
    assert (model["name"], model["config_class"], model["dtype"], model["prompt_format"]) == (
        str(small_model), "LlavaConfig", "float32", "plain")
    report = state.meta["report"]
    assert (report["examples"], report["epochs"]) == (5, 2)
    assert all(key.startswith("trained.") for key in state.tensors)  # no edits yet, only the network

    root = ImageRoot(small_world / "images")
    record = load_records(small_world / "eval.jsonl", images=root)[0]
    editor = create_editor(method, LVLM.load(small_model, prompt_format="plain"))
    editor.load_state(state)
    assert editor.report == report
    # train_edit_success, recomputed from the saved network: each of the 5 train edits applied alone,
    # the fraction of its answer tokens predicted top-1, averaged.
    hits, unedited = [], []
    for train_record in load_records(small_world / "train.jsonl", images=root)[:5]:
        edit = edit_request(train_record, root)
        unedited.append(_accuracy(editor.score([edit.query])[0]))
        assert editor.apply(edit).applied
        hits.append(_accuracy(editor.score([edit.query])[0]))
        editor.reset()
    assert report["train_edit_success"] == pytest.approx(sum(hits) / 5, abs=1e-12)
    # Not trivial: the untrained model answers none of them, and the edits install some (KE all: one normalised
    # step installs a one-token answer in this tiny model; MEND fewer).
    assert sum(unedited) == 0 < report["train_edit_success"]
    # weight_change is the Frobenius norm of what the edit did to the model's parameters.
    before = {name: p.detach().clone() for name, p in editor.lvlm.model.named_parameters()}
    assert editor.apply(edit_request(record, root)).applied
    moved = sum(float((p.detach() - before[name]).pow(2).sum()) for name, p in editor.lvlm.model.named_parameters())
    assert moved > 0 and editor.weight_change() == pytest.approx(moved**0.5, rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ft-llm"], "method 'ft-llm' learns nothing to train. Trainable methods: "),
        (["--method", "mnd"], "Unknown method 'mnd'. Did you mean 'mend'"),
        (["--method", "mend", "--method-config", '{"epochs": 0}'],
         "invalid --method-config for mend: epochs: Input should be"),
        (["--method", "mend", "--method-config", '{"rnk": 3}'], "rnk: Extra inputs are not permitted"),
        (["--method", "mend", "--method-config", "[1]"], "--method-config: Input should be a valid dictionary"),
        (["--method", "mend", "--limit", "0"], "--limit: Input should be greater than 0"),
        (["--method", "serac", "--seed", "3"], "--seed: serac draws nothing at random in training"),
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

    args = ["train-editor", "--method", "mend", "--limit", "3", "--method-config", '{"epochs": 1}', "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    world = cache_root() / "worlds" / WorldConfig().digest()
    assert (world / "train.jsonl").is_file() and len(list((world / "images").iterdir())) == 1200
    stamp = (world / "train.jsonl").stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (world / "train.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    a, b = EditorState.load(tmp_path / "a"), EditorState.load(tmp_path / "b")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # seeded: identical networks


def test_it_loads_with_the_runs_device_dtype_and_prompt_format(small_world, small_model, tmp_path, capsys):
    assert train(small_world, small_model, tmp_path / "s", "--method", "mend", "--prompt-format", "chat") == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"simulate: error: prompt_format='chat' but {small_model} has no chat template (in its "
                     "tokenizer or processor)"]  # refused before the weights are read: no loading bar either
    assert train(small_world, small_model, tmp_path / "s", "--method", "mend", "--device", "gpu") == 2
    assert "--device 'gpu' is not a torch device" in capsys.readouterr().err
    code = train(small_world, small_model, tmp_path / "s", "--method", "ke", "--limit", "2", "--quiet",
                 "--dtype", "bfloat16", "--method-config", '{"epochs": 1, "batch_size": 2}')
    assert code == 0
    assert EditorState.load(tmp_path / "s").meta["model"]["dtype"] == "bfloat16"


def test_the_trained_editor_cache_keeps_dtypes_apart(small_world, small_model, tmp_path):
    from simulator.config import RunConfig
    from simulator.run import prepare_editor
    from simulator.settings import cache_root

    root = ImageRoot(small_world / "images")
    split = tmp_path / "train.jsonl"
    split.write_text("".join((small_world / "train.jsonl").read_text().splitlines(keepends=True)[:3]))
    before = set((cache_root() / "editors").glob("*")) if (cache_root() / "editors").is_dir() else set()
    trained = {}
    for dtype in ("float32", "bfloat16", "float32"):
        config = RunConfig(stream=str(small_world / "eval.jsonl"), model=str(small_model), method="ke", dtype=dtype,
                           train=split, method_config={"epochs": 1, "batch_size": 3})
        editor, report = prepare_editor(config, LVLM.load(small_model, dtype=dtype), root)
        assert editor.model_identity["dtype"] == dtype
        trained.setdefault(dtype, report)
        assert report == trained[dtype]  # the second float32 editor comes from the cache
    assert len(set((cache_root() / "editors").glob("*")) - before) == 2  # one trained editor per dtype
