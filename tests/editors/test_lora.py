"""LoRA through peft: base weights untouched, exact reset and unedited, the adapted modules, state, real edits."""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from editors import EditorState, EditRequest, Query, create_editor
from simulator.requests import edit_request
from tests.tiny_models import BUILDERS, random_image
from monitor.metrics import token_accuracy

EDITS = [
    EditRequest("which animal is shown in the picture?", "a brown dog", random_image(31), "a cat", key="e1"),
    EditRequest("what is the capital of France?", "Paris", random_image(32), "Lyon", key="e2"),
    EditRequest("the quick brown", "fox jumps", None, key="e3"),
]
PROBES = [edit.query for edit in EDITS] + [Query("what colour is the sky?", "blue", random_image(33))]
STRONG = {"lr": 1.0}  # tiny random decoders have small activations: EasyEdit's lr 0.1 barely moves them


def logprobs(editor, queries=PROBES):
    return [s.target_logprobs for s in editor.score(queries)]


def assert_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def adapted(lvlm):
    return {name for name, module in lvlm.model.named_modules() if isinstance(module, BaseTunerLayer)}


@pytest.mark.parametrize("family", ["llava", "blip2-opt", "qwen2_vl"])
def test_base_weights_stay_bit_identical_and_only_the_adapter_moves(family):
    lvlm = BUILDERS[family]()
    base = {name: p.detach().clone() for name, p in lvlm.model.named_parameters()}
    editor = create_editor("lora", lvlm, STRONG)
    outcomes = [editor.apply(edit) for edit in EDITS]
    assert all(o.applied for o in outcomes)
    lora_names = {name for name, _ in lvlm.model.named_parameters() if ".lora_" in name}
    expected = {f"{module}.lora_{ab}.default.weight" for module in editor.targets for ab in "AB"}
    assert set(outcomes[0].changed) == lora_names == expected
    # peft wraps each adapted linear: its weight is listed as `<module>.base_layer.weight`, the same tensor
    # `get_parameter("<module>.weight")` (and so `LVLM.parameter_group`) resolves to.
    now = {name.replace(".base_layer.", "."): p for name, p in lvlm.model.named_parameters() if ".lora_" not in name}
    assert now.keys() == base.keys()
    assert all(torch.equal(now[name], value) for name, value in base.items())
    assert all(lvlm.model.get_parameter(name) is now[name] for name in base)
    assert editor.weight_change() > 0.1
    assert not any(layer.lora_dropout["default"].training for layer in editor.layers.values())  # dropout: edits only


def test_weight_change_is_the_norm_of_peft_effective_delta_and_reset_zeroes_it():
    lvlm = BUILDERS["llava"]()
    before = logprobs(create_editor("none", lvlm))  # the base model, before any adapter exists
    editor = create_editor("lora", lvlm, STRONG)
    assert_equal(before, logprobs(editor))  # B = 0: injecting changes no score
    for edit in EDITS:
        editor.apply(edit)
    deltas = [layer.get_delta_weight("default").detach() for layer in editor.layers.values()]  # peft's s·B·A
    assert editor.weight_change() == pytest.approx(sum(float(d.double().pow(2).sum()) for d in deltas) ** 0.5, rel=1e-6)
    edited = logprobs(editor)
    assert sum(float(a.sum() - b.sum()) for a, b in zip(edited, before)) > 1.0
    with editor.unedited():
        assert_equal(before, logprobs(editor))
    assert_equal(edited, logprobs(editor))

    editor.reset()
    assert editor.weight_change() == 0.0
    assert all(not layer.get_delta_weight("default").any() for layer in editor.layers.values())
    assert_equal(before, logprobs(editor))


def test_an_edit_of_the_default_world_makes_its_answer_certain(default_world):
    lvlm, images, _, records = default_world
    editor = create_editor("lora", lvlm)  # EasyEdit's multimodal defaults: 5 SGD steps at lr 0.1
    for record in records[:3]:
        edit = edit_request(record, images)
        before = editor.score([edit.query])[0]
        assert editor.apply(edit).applied
        after = editor.score([edit.query])[0]
        # Measured: 5.5 - 14 nats gained, the answer at log-prob > -0.02 and every token top-1.
        assert float(after.target_logprobs.sum()) > float(before.target_logprobs.sum()) + 5.0
        assert float(after.target_logprobs.sum()) > -0.1 and token_accuracy(after) == 1.0
        editor.reset()


@pytest.mark.parametrize("family", ["llava", "blip2-opt"])
def test_only_the_configured_modules_get_adapters(family):
    lvlm = BUILDERS[family]()
    blocks = lvlm.family.decoder(lvlm.model.config)
    group = lvlm.parameter_group("llm", layers=(-1,), modules=("down",))
    editor = create_editor("lora", lvlm, {"layers": [-1], "target_modules": ["down"], "rank": 2})
    assert adapted(lvlm) == set(editor.targets) == {name.removesuffix(".weight") for name in group}
    assert all(layer.lora_A["default"].weight.shape[0] == 2 for layer in editor.layers.values())
    default = BUILDERS[family]()
    editor = create_editor("lora", default)
    n_layers = len(default.model.get_submodule(f"{default.family.decoder_path}.{blocks.layers}"))
    everything = default.parameter_group("llm", layers=range(n_layers), modules=("up", "down"))
    assert adapted(default) == {name.removesuffix(".weight") for name in everything}
    assert len(adapted(default)) == 2 * n_layers


def test_state_round_trip_and_sequential_training_continue_the_same_adapter(tmp_path):
    config = {**STRONG, "rank": 4, "dropout": 0.0}
    editor = create_editor("lora", BUILDERS["qwen2_vl"](), config)
    editor.apply(EDITS[0])
    editor.state().save(tmp_path / "one")
    editor.apply(EDITS[1])
    state = editor.state()
    assert set(state.tensors) == {f"{path}.lora_{ab}.default.weight" for path in editor.targets for ab in "AB"}
    state.save(tmp_path / "two")

    fresh = create_editor("lora", BUILDERS["qwen2_vl"]())  # default config: loading adopts the state's rank 4
    fresh.load_state(EditorState.load(tmp_path / "two"))
    assert fresh.config.rank == 4 and len(adapted(fresh.lvlm)) == len(editor.targets)
    assert_equal(logprobs(editor), logprobs(fresh))

    # One adapter accumulates edits: training edit 2 on the state after edit 1 gives the same adapter, bit for bit.
    resumed = create_editor("lora", BUILDERS["qwen2_vl"](), config)
    resumed.load_state(EditorState.load(tmp_path / "one"))
    resumed.apply(EDITS[1])
    assert all(torch.equal(resumed.state().tensors[k], v) for k, v in state.tensors.items())


def test_adapters_train_in_float32_on_a_bfloat16_model_and_reset_exactly():
    lvlm = BUILDERS["llava"]()
    lvlm.model.to(torch.bfloat16)
    before = logprobs(create_editor("none", lvlm))
    editor = create_editor("lora", lvlm, STRONG)
    assert {p.dtype for p in editor.tracker.params.values()} == {torch.float32}
    for edit in EDITS:
        assert editor.apply(edit).applied
    assert sum(float(a.sum() - b.sum()) for a, b in zip(logprobs(editor), before)) > 1.0
    editor.reset()
    assert_equal(before, logprobs(editor))


def test_a_second_lora_editor_on_the_same_model_is_refused():
    lvlm = BUILDERS["llava"]()
    create_editor("lora", lvlm)
    with pytest.raises(ValueError, match="already carries peft adapters"):
        create_editor("lora", lvlm)
