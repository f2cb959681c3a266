"""The Editor contract, run over every registered method on every tiny model family.

Registering a method (editors/registry.py) or adding a tiny family (tests/tiny/) puts it here:
one test per (family, method) pair runs the whole contract in sequence, so a family's model
is built once per pair and the suite stays fast.
"""

import pytest
import torch
from pydantic import ValidationError

from editors import (
    METHODS,
    EditExample,
    EditorState,
    EditRequest,
    HasMemory,
    HasWeightDelta,
    Query,
    UnknownMethodError,
    capabilities,
    create_editor,
    editor_class,
)
from editors.editor import CanRetract
from tests.tiny_models import BUILDERS, random_image, tiny_llava

EDITS = [
    EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), "a cat", key="e1"),
    EditRequest("what is the capital of France?", "Paris", random_image(12), "Lyon", key="e2"),
]
PROBES = [Query("which animal is shown in the picture?", "a brown dog", random_image(11)), Query("the quick brown", "fox")]


def editor_for(method, build):
    """A method's editor on a fresh tiny model, trained on the contract edits if it learns."""
    editor = create_editor(method, build())
    if editor.trainable:
        editor.train([EditExample(edit, locality=(PROBES[1],)) for edit in EDITS], progress=False)
    return editor


def scores(editor, queries=PROBES):
    return [s.target_logprobs for s in editor.score(queries)]


def assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_contract(family, method, tmp_path):
    run_contract(method, BUILDERS[family], tmp_path)


def run_contract(method, build, tmp_path):
    """apply / score / unedited / reset / state round trip onto a fresh model from `build`, in that order."""
    editor = editor_for(method, build)
    before, queries = scores(editor), [edit.query for edit in EDITS]
    before_edits = scores(editor, queries)

    outcomes = [editor.apply(edit) for edit in EDITS]
    assert all(o.applied for o in outcomes), [o.message for o in outcomes]
    assert all(isinstance(v, float) for o in outcomes for v in o.changed.values())
    edited, edited_edits = scores(editor), scores(editor, queries)
    if method != "none":
        # Tiny random models may move a score only slightly (FT-Vis): a change, not its size.
        assert any(not torch.equal(a, b) for a, b in zip(before_edits, edited_edits))

    with editor.unedited():
        assert_same(before, scores(editor))
        assert_same(before_edits, scores(editor, queries))
    assert_same(edited, scores(editor))

    editor.state().save(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "state.safetensors"]
    fresh = create_editor(method, build())
    fresh.load_state(EditorState.load(tmp_path / "state"))
    assert_same(edited, scores(fresh))

    # Declared capabilities hold their promise on every family (no sentinel values to fall back on).
    if isinstance(editor, HasWeightDelta):
        assert editor.weight_change() > 0 or method == "ft-vis"  # FT-Vis may move a tiny model's weights by ~0
    if isinstance(editor, HasMemory):
        assert editor.memory_size() == len(EDITS)
        assert len(editor.retrieve(queries)) == len(queries)

    # Retraction: editors that can undo one edit do; the others refuse with their reason and change nothing.
    outcome = editor.retract("e1")
    if isinstance(editor, CanRetract):
        assert outcome.applied, outcome.message
        assert editor.memory_size() == len(EDITS) - 1 and "e1" not in [r.key for r in editor.retrieve(queries)]
        assert not editor.retract("e1").applied  # gone already
    else:
        assert not outcome.applied and outcome.message.startswith(f"{method} cannot retract an edit: ")
        assert_same(edited, scores(editor))

    editor.reset()
    assert_same(before, scores(editor))
    if isinstance(editor, HasWeightDelta):
        assert editor.weight_change() == 0.0
    if isinstance(editor, HasMemory):
        assert editor.memory_size() == 0


# What each method declares; a new method must be added here on purpose.
MEMORY_EDITOR = ["memory", "retract", "journal", "scores_unedited"]
CAPABILITIES = {"none": [], "ike": MEMORY_EDITOR, "serac": MEMORY_EDITOR,
                "grace": ["memory"], "wise": ["memory", "weight_delta"], "ft-llm": ["weight_delta"],
                "ft-vis": ["weight_delta"], "mend": ["weight_delta"], "ke": ["weight_delta"], "lora": ["weight_delta"]}
# Why the others cannot retract an edit: each says so in one line.
REFUSALS = {
    "none": "none cannot retract an edit: it applies no edit",
    "ft-llm": "ft-llm cannot retract an edit: it is written into the weights",
    "ft-vis": "ft-vis cannot retract an edit: it is written into the weights",
    "mend": "mend cannot retract an edit: its update is written into the weights",
    "ke": "ke cannot retract an edit: its update is written into the weights",
    "lora": "lora cannot retract an edit: every edit trains the same adapter weights",
    "wise": "wise cannot retract an edit: its edits are trained into shared side-memory weights and merged",
    "grace": "grace cannot retract an edit: a codebook entry is shared by the edits that grew or split it",
}


def test_every_method_declares_its_capabilities():
    assert {method: capabilities(editor_class(method)) for method in METHODS} == CAPABILITIES


@pytest.mark.parametrize("method", sorted(REFUSALS))
def test_an_editor_that_cannot_retract_says_why(method):
    editor = create_editor(method, tiny_llava())
    outcome = editor.retract("e1")
    assert (outcome.applied, outcome.message, outcome.changed) == (False, REFUSALS[method], {})
    assert set(REFUSALS) | {m for m, c in CAPABILITIES.items() if "retract" in c} == set(METHODS)
    editor = create_editor("none", tiny_llava())
    assert not hasattr(editor, "retrieve") and not hasattr(editor, "weight_change")  # no sentinel methods left


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_rejects_unknown_settings(method):
    with pytest.raises(ValidationError):
        create_editor(method, tiny_llava(), {"no_such_setting": 1})


def test_registry_names_and_errors():
    assert "none" in METHODS and editor_class("none").name == "none"
    with pytest.raises(UnknownMethodError, match="Did you mean 'none'.*Available: .*none"):
        editor_class("nnoe")


def test_state_of_another_method_is_refused(tmp_path):
    EditorState("ft-llm", {"lr": 1e-4}, {"w": torch.zeros(2)}).save(tmp_path / "s")
    state = EditorState.load(tmp_path / "s")
    assert state.meta == {"lr": 1e-4} and torch.equal(state.tensors["w"], torch.zeros(2))
    with pytest.raises(ValueError, match="saved by method 'ft-llm'"):
        create_editor("none", tiny_llava()).load_state(state)
    EditorState("none").save(tmp_path / "s")  # overwrite in place, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    with pytest.raises(FileNotFoundError, match="no editor state"):
        EditorState.load(tmp_path / "missing")
