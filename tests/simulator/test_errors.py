"""Every user error through `simulate` is one line, `simulate: error: ...`, exit status 2, no traceback."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from editors import FAMILIES, LVLM, create_editor
from simulator.cli import main
from simulator.world.graph import build_world
from simulator.world.model import ModelConfig, build_model
from tests.simulator.conftest import SMALL_WORLD
from tests.tiny.llava import tiny_llava


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """transformers' weight-loading bar also goes to stderr; these tests read stderr for the error alone."""
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def error_line(capsys) -> str:
    """The one line on stderr; fails if there is anything else (a traceback, a usage block)."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("simulate: error: ")
    return lines[0]


def run(world, tmp_path, *args: str) -> int:
    return main(["--stream", str(world / "eval.jsonl"), "--images", str(world / "images"), "--no-mlflow",
                 "--method", "ft-llm", "--limit", "2", "--out", str(tmp_path / "out"), *args])


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A folder of another LLaVA over the small world's vocabulary: one decoder layer more than `small_model`."""
    folder = tmp_path_factory.mktemp("other") / "m"
    build_model(build_world(SMALL_WORLD), ModelConfig(vision_hidden=16, vision_layers=1, hidden=32, layers=3, heads=2),
                seed=0).save(folder)
    return folder


def test_an_undeclared_config_names_the_supported_families(small_world, tmp_path, capsys):
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)
    assert run(small_world, tmp_path, "--model", str(folder)) == 2
    line = error_line(capsys)
    assert "unsupported model config LlamaConfig" in line
    assert all(f"{family.name} ({config.__name__})" in line for config, family in FAMILIES.items())


def test_an_unknown_model_type_names_the_supported_families(small_world, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    assert run(small_world, tmp_path, "--model", str(folder)) == 2
    line = error_line(capsys)
    assert "model type `frobnicator`" in line and "Supported families: llava (LlavaConfig)" in line


def test_a_folder_without_its_image_processor_names_the_missing_file(small_world, small_model, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(small_model, folder)
    (folder / "preprocessor_config.json").unlink()
    assert run(small_world, tmp_path, "--model", str(folder)) == 2
    line = error_line(capsys)
    assert f"cannot load model '{folder}'" in line and "preprocessor_config.json" in line


def test_a_missing_model_folder_says_so(small_world, tmp_path, capsys):
    assert run(small_world, tmp_path, "--model", str(tmp_path / "nowhere")) == 2
    assert f"model folder {tmp_path / 'nowhere'} does not exist" in error_line(capsys)
    assert main(["train-editor", "--method", "mend", "--train", str(small_world / "train.jsonl"),
                 "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 2
    assert f"model folder {tmp_path / 'nowhere'} does not exist" in error_line(capsys)


def test_an_editor_state_of_another_model_is_refused_naming_both(small_world, small_model, other_model, tmp_path,
                                                                  capsys):
    create_editor("ft-llm", LVLM.load(small_model)).state().save(tmp_path / "state")
    assert run(small_world, tmp_path, "--model", str(other_model), "--editor-state", str(tmp_path / "state")) == 2
    line = error_line(capsys)
    assert f"editor state was trained on model '{small_model}' (LlavaConfig, config " in line
    assert f"with prompt format 'plain'; this run uses '{other_model}' (LlavaConfig, config " in line
    assert not (tmp_path / "out" / "summary.json").exists()


def test_an_editor_state_of_another_prompt_format_is_refused(small_world, tmp_path, capsys):
    folder = tmp_path / "chatty"
    tiny_llava().save(folder)  # has a chat template
    create_editor("ft-llm", LVLM.load(folder, prompt_format="plain")).state().save(tmp_path / "state")
    assert run(small_world, tmp_path, "--model", str(folder), "--prompt-format", "chat",
               "--editor-state", str(tmp_path / "state")) == 2
    line = error_line(capsys)
    assert f"with prompt format 'plain'; this run uses '{folder}' (LlavaConfig, config " in line
    assert line.endswith("with 'chat'")


def test_chat_format_on_the_default_model_is_refused(small_world, tmp_path, capsys):
    stream = tmp_path / "edits.jsonl"  # no world.json beside it: the embedded default model
    stream.write_text((small_world / "eval.jsonl").read_text().splitlines()[0] + "\n")
    assert main(["--stream", str(stream), "--images", str(small_world / "images"), "--no-mlflow",
                 "--prompt-format", "chat", "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "the default model is trained on the plain prompt format" in line and "use --prompt-format plain" in line


def test_a_device_this_machine_lacks_is_refused(small_world, small_model, tmp_path, capsys):
    assert run(small_world, tmp_path, "--model", str(small_model), "--device", "gpu") == 2
    assert "--device 'gpu' is not a torch device" in error_line(capsys)
    if not torch.cuda.is_available():
        assert run(small_world, tmp_path, "--model", str(small_model), "--device", "cuda:0") == 2
        assert "--device cuda:0: no cuda device is available" in error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stream", "s.jsonl", "--bogus"], "simulate: error: unrecognized arguments: --bogus"),
        (["--stream", "s.jsonl", "--mode", "twice"], "simulate: error: argument --mode: invalid choice: 'twice'"),
        (["--gap", "0"], "simulate: error: invalid settings: --stream: Field required; --gap: Input should be"),
        (["train-editor", "--out", "x"], "simulate: error: invalid settings: --method: Field required"),
        (["train-editor", "--method", "mend", "--out", "x", "--dtype", "float8"],
         "simulate: error: train-editor: argument --dtype: invalid choice: 'float8'"),
        (["probe"], "simulate: error: invalid settings: --state: Field required"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert error_line(capsys).startswith(message)


def test_probe_refuses_a_checkpoint_of_another_model(small_world, small_model, other_model, tmp_path, capsys):
    assert run(small_world, tmp_path, "--model", str(small_model), "--method", "none") == 0
    capsys.readouterr()
    settings = tmp_path / "out" / "config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model": str(other_model)}))
    assert main(["probe", "--state", str(tmp_path / "out"), "--rounds", "1", "--no-mlflow"]) == 2
    line = error_line(capsys)
    assert f"trained on model '{small_model}'" in line and f"this run uses '{other_model}'" in line


def test_a_run_saved_before_a_setting_existed_resumes_and_a_changed_setting_is_refused(tmp_path):
    """Settings added since (a top-level flag, a field of --collapse) read as their defaults; a changed one is named."""
    from simulator.config import RunConfig
    from simulator.run import RunError, check_resumable

    config = RunConfig(stream="s.jsonl", out=tmp_path / "out")
    saved = json.loads(config.model_dump_json())
    del saved["checkpoint_every"], saved["collapse"]["entropy"]
    check_resumable(saved, config)
    saved["collapse"]["ppl_ratio"] = 3.0
    with pytest.raises(RunError, match=r"--collapse: \{'ppl_ratio': 3.0, .* in the checkpoint, \{'ppl_ratio': 2.0"):
        check_resumable(saved, config)
