"""VLKEB's protocol as data: prompt construction, parameter selection and settings per family."""

from __future__ import annotations

import pytest

from editors import Query, create_editor, editor_class
from editors.protocols import DEVIATIONS, PROTOCOLS, VLKEB, protocol
from simulator.config import RunConfig, apply_protocol
from tests.tiny_models import random_image, tiny


def test_vlkeb_prompt_puts_the_image_right_after_bos_and_the_bare_question_on_llava():
    lvlm = tiny("llava")
    inputs = lvlm.inputs
    inputs_format = inputs.prompt_format
    try:
        inputs.prompt_format = "vlkeb"
        encoded = inputs.encode(Query("what is the capital of France?", "Paris", random_image(0)))
        assert inputs.prompt_text(Query("what is the capital of France?", image=random_image(0))) == (
            "<image>what is the capital of France?"
        )
    finally:
        inputs.prompt_format = inputs_format
    ids = encoded.input_ids
    tok = inputs.tokenizer
    assert ids[0] == tok.bos_token_id and ids[1:17] == [inputs.image_token_id] * 16
    text = tok.decode(ids[17:])
    assert text.startswith("what is the capital") and "Question" not in text and text.endswith("Paris")


def test_vlkeb_prompt_on_blip2_keeps_the_image_before_bos():
    lvlm = tiny("blip2-opt")
    inputs = lvlm.inputs
    try:
        inputs.prompt_format = "vlkeb"
        ids = inputs.encode(Query("what is shown?", "a dog", random_image(0))).input_ids
    finally:
        inputs.prompt_format = "plain"
    assert ids[:4] == [inputs.image_token_id] * 4 and ids[4] == inputs.tokenizer.bos_token_id


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llava", {"modules": ["up", "down"], "lr": 1e-4, "steps": 10}),
        ("blip2-opt", {"modules": ["up", "down"], "lr": 2e-4, "steps": 15}),
        ("qwen2_vl", {"modules": ["gate", "up", "down"], "lr": 1e-4, "steps": 20}),
    ],
)
def test_ft_llm_settings_follow_the_nearest_vlkeb_model(family, expected):
    settings = VLKEB.method_config("ft-llm", tiny(family).family)
    assert {k: settings[k] for k in expected} == expected
    assert settings["layers"] == [-1] and settings["stop_loss"] == 0.0 and settings["weight_decay"] == 0.01


def test_ft_llm_under_vlkeb_trains_up_and_down_of_the_last_layer_only():
    lvlm = tiny("llava")
    editor = create_editor("ft-llm", lvlm, VLKEB.method_config("ft-llm", lvlm.family))
    assert sorted(editor.tracker.params) == [
        "model.language_model.layers.1.mlp.down_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight",
    ]
    default = create_editor("ft-llm", lvlm)
    assert len(default.tracker.params) == 3  # editwatch's default adds the gate


@pytest.mark.parametrize(("family", "parts"), [("llava", ["projector"]), ("blip2-opt", ["qformer_body"]),
                                               ("qwen2_vl", ["last_block_mlp"])])
def test_ft_vis_under_vlkeb_tunes_the_part_vlkeb_tuned(family, parts):
    lvlm = tiny(family)
    settings = VLKEB.method_config("ft-vis", lvlm.family)
    assert settings["parts"] == parts
    names = list(create_editor("ft-vis", lvlm, settings).tracker.params)
    if family == "blip2-opt":  # VLKEB's "Qformer" parameters leave the query tokens out
        assert "query_tokens" not in names and all(n.startswith("qformer.") for n in names)
    if family == "qwen2_vl":  # the last ViT block's MLP, weights and biases
        last = len(lvlm.model.model.visual.blocks) - 1
        assert names and all(n.startswith(f"model.visual.blocks.{last}.mlp.") for n in names)


def test_run_settings_take_the_protocol_but_explicit_choices_win():
    given = RunConfig(stream="s.jsonl", method="ft-llm", protocol="vlkeb", method_config={"steps": 3})
    family = tiny("llava").family
    resolved = apply_protocol(given, family)
    assert resolved.prompt_format == "vlkeb" and resolved.vlkeb_compat
    assert resolved.method_config["steps"] == 3 and resolved.method_config["modules"] == ["up", "down"]
    plain = apply_protocol(given.model_copy(update={"prompt_format": "plain"}), family)
    assert plain.prompt_format == "plain"
    own = apply_protocol(RunConfig(stream="s.jsonl"), family)
    assert own.prompt_format == "auto" and not own.vlkeb_compat and own.method_config == {}


def test_every_protocol_setting_is_valid_for_its_method_on_every_vlkeb_model():
    for name in ("llava", "blip2-opt", "qwen2_vl"):
        family = tiny(name).family
        for method in VLKEB.methods:
            editor_class(method).Config.model_validate(VLKEB.method_config(method, family))  # every key known


def test_unknown_protocol_and_documented_deviations():
    assert set(PROTOCOLS) == {"editwatch", "vlkeb"}
    with pytest.raises(ValueError, match="Unknown protocol 'vlkb'. Available: editwatch, vlkeb"):
        protocol("vlkb")
    assert {"serac", "ike"} <= set(DEVIATIONS)
