"""FT (LLM) and FT (Vis): what they tune on every family, the NaN guard, sequential accumulation."""

import pytest
import torch

from editors import EditorState, EditRequest, Query, create_editor
from editors.families import FAMILIES as DECLARED_FAMILIES
from simulator.requests import edit_request
from tests.tiny_models import BUILDERS, random_image
from monitor.metrics import token_accuracy

EDIT = EditRequest("which animal is shown in the picture?", "a brown dog", random_image(21), "a cat", key="e1")
OTHER = EditRequest("what is the capital of France?", "Paris", random_image(22), "Lyon", key="e2")
TEXT = Query("the quick brown", "fox")
FAMILIES = ["llava", "blip2-opt", "qwen2_vl", "qwen3_vl"]
VISION_PREFIXES = {"llava": "model.multi_modal_projector.", "blip2-opt": ("qformer.", "query_tokens"),
                   "qwen2_vl": "model.visual.merger.",
                   "qwen3_vl": ("model.visual.merger.", "model.visual.deepstack_merger_list.")}


def snapshot(lvlm):
    return {n: p.detach().clone() for n, p in lvlm.model.named_parameters()}


def moved(lvlm, before):
    return {n for n, p in lvlm.model.named_parameters() if not torch.equal(p, before[n])}


def logprob(editor, query):
    return editor.score([query])[0].target_logprobs.sum().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_llm_tunes_only_the_last_decoder_mlp_and_resets_bit_exactly(family):
    lvlm = BUILDERS[family]()
    editor = create_editor("ft-llm", lvlm)
    before = snapshot(lvlm)
    assert token_accuracy(editor.score([EDIT.query])[0]) < 1
    outcome = editor.apply(EDIT)
    assert outcome.applied and token_accuracy(editor.score([EDIT.query])[0]) == 1.0
    group = lvlm.parameter_group("llm", layers=(-1,))
    assert moved(lvlm, before) == set(group) == set(outcome.changed)
    for name, norm in outcome.changed.items():
        assert norm == pytest.approx((group[name].detach() - before[name]).norm().item(), rel=1e-5)
    assert editor.weight_change() == pytest.approx(sum(v * v for v in outcome.changed.values()) ** 0.5, rel=1e-5)
    editor.reset()
    assert moved(lvlm, before) == set() and editor.weight_change() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_vis_tunes_the_family_vision_part_and_leaves_text_alone(family):
    lvlm = BUILDERS[family]()
    # Tiny random decoders barely read the image, so a strong step shows the edit's direction.
    editor = create_editor("ft-vis", lvlm, {"lr": 0.05, "steps": 10})
    before, text_before, edit_before = snapshot(lvlm), logprob(editor, TEXT), logprob(editor, EDIT.query)
    outcome = editor.apply(EDIT)
    assert outcome.applied and outcome.changed
    assert moved(lvlm, before) <= set(outcome.changed)
    assert all(name.startswith(VISION_PREFIXES[family]) for name in outcome.changed)
    assert logprob(editor, EDIT.query) > edit_before + 0.1  # the new answer became likelier
    assert logprob(editor, TEXT) == text_before  # text-only queries never see the vision parts
    refused = editor.apply(EditRequest("the quick brown", "cat"))
    assert not refused.applied and "text-only" in refused.message


def test_every_family_declares_its_ft_vis_default_among_its_vision_parts():
    for family in DECLARED_FAMILIES.values():
        assert family.default_vision_parts and set(family.default_vision_parts) <= set(family.vision_parts)


def test_choosing_layers_and_parts_and_their_errors():
    lvlm = BUILDERS["llava"]()
    two = create_editor("ft-llm", lvlm, {"layers": [0, -1]})
    assert {n.split(".")[3] for n in two.tracker.params} == {"0", "1"}
    tower = create_editor("ft-vis", lvlm, {"parts": ["tower"]})
    assert all(n.startswith("model.vision_tower.") for n in tower.tracker.params)
    with pytest.raises(ValueError, match="layer 5 out of range: the decoder has 2 layers"):
        create_editor("ft-llm", lvlm, {"layers": [5]})
    with pytest.raises(ValueError, match="Unknown vision part 'qformer' for llava. Available: tower, projector"):
        create_editor("ft-vis", lvlm, {"parts": ["qformer"]})


def test_an_exploding_edit_is_rolled_back_and_the_stream_goes_on():
    lvlm = BUILDERS["llava"]()
    editor = create_editor("ft-llm", lvlm)
    assert editor.apply(EDIT).applied
    after_first = snapshot(lvlm)
    editor.config = editor.config.model_copy(update={"lr": 1e36})  # AdamW steps of ~1e36 per weight
    outcome = editor.apply(OTHER)
    assert not outcome.applied and "rolled back" in outcome.message
    assert moved(lvlm, after_first) == set()  # only the failed edit was undone
    editor.config = editor.config.model_copy(update={"lr": 1e-2})
    assert editor.apply(OTHER).applied
    assert token_accuracy(editor.score([EDIT.query, OTHER.query])[1]) == 1.0


def test_sequential_edits_accumulate_and_a_state_adopts_its_config(tmp_path):
    lvlm = BUILDERS["llava"]()
    editor = create_editor("ft-llm", lvlm, {"layers": [0, 1]})
    editor.apply(EDIT)
    one = editor.weight_change()
    editor.apply(OTHER)
    assert editor.weight_change() > one
    editor.state().save(tmp_path / "s")
    scores = [s.target_logprobs for s in editor.score([EDIT.query, OTHER.query, TEXT])]
    editor.reset()
    fresh = create_editor("ft-llm", lvlm)  # default config (last layer only) until the state is loaded
    fresh.load_state(EditorState.load(tmp_path / "s"))
    assert fresh.config.layers == (0, 1) and len(fresh.tracker.params) == 6
    for a, b in zip(scores, fresh.score([EDIT.query, OTHER.query, TEXT])):
        assert torch.equal(a, b.target_logprobs)


@pytest.mark.slow
def test_sequential_ft_llm_forgets_its_earliest_edits(default_world):
    """Measured on the model retrained for equal hop pools: over 100 sequential edits the first 20 fall
    from 1.0 (single editing) to 0.725 on one CPU and 0.8 on another (float rounding differs between them, and
    training follows it; 0.45 on the previous model). At least 4 of the 20 forgotten leaves room for both."""
    lvlm, root, _, evals = default_world
    editor = create_editor("ft-llm", lvlm)
    records, early = evals[:100], 20
    requests = [edit_request(r, root) for r in records]

    def reliability(indices):
        return sum(token_accuracy(editor.score([requests[i].query])[0]) for i in indices) / len(indices)

    single = []
    for i in range(early):
        editor.apply(requests[i])
        single.append(reliability([i]))
        editor.reset()
    for request in requests:
        assert editor.apply(request).applied
    retained = reliability(range(early))
    latest = reliability(range(len(records) - early, len(records)))
    editor.reset()
    assert sum(single) / early >= 0.95 and latest >= 0.9  # each edit takes; the last ones are still there
    assert round((sum(single) / early - retained) * early) >= 4  # the earliest ones were forgotten
