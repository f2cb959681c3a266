"""The Editor contract, run over every registered method on a tiny model."""

import pytest
import torch
from pydantic import ValidationError

from editors import METHODS, EditExample, EditorState, EditRequest, Query, UnknownMethodError, create_editor, editor_class
from tests.tiny_models import random_image, tiny_llava

EDITS = [
    EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), "a cat", key="e1"),
    EditRequest("what is the capital of France?", "Paris", random_image(12), "Lyon", key="e2"),
]
PROBES = [Query("which animal is shown in the picture?", "a brown dog", random_image(11)), Query("the quick brown", "fox")]


def editor_for(method):
    """A method's editor on a fresh tiny model, trained on the contract edits if it learns."""
    editor = create_editor(method, tiny_llava(seed=1))
    if editor.trainable:
        editor.train([EditExample(edit, locality=(PROBES[1],)) for edit in EDITS], progress=False)
    return editor


def scores(editor, queries=PROBES):
    return [s.target_logprobs for s in editor.score(queries)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reset_returns_to_the_unedited_model(method):
    editor = editor_for(method)
    before = scores(editor)
    outcomes = [editor.apply(edit) for edit in EDITS]
    assert all(o.applied for o in outcomes)
    assert all(isinstance(v, float) for o in outcomes for v in o.changed.values())
    editor.reset()
    for a, b in zip(before, scores(editor)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_round_trip_onto_a_fresh_model(method, tmp_path):
    editor = editor_for(method)
    for edit in EDITS:
        editor.apply(edit)
    editor.state().save(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "state.safetensors"]
    fresh = create_editor(method, tiny_llava(seed=1))
    fresh.load_state(EditorState.load(tmp_path / "state"))
    for a, b in zip(scores(editor), scores(fresh)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unedited_answers_as_before_and_restores_the_edits(method):
    editor = editor_for(method)
    before = scores(editor)
    for edit in EDITS:
        editor.apply(edit)
    edited = scores(editor)
    with editor.unedited():
        for a, b in zip(before, scores(editor)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(edited, scores(editor)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"none"}))
def test_edits_change_the_edit_queries_scores_and_unedited_undoes_it(method):
    editor = editor_for(method)
    queries = [edit.query for edit in EDITS]
    before = scores(editor, queries)
    for edit in EDITS:
        editor.apply(edit)
    # Tiny random models may move a score only slightly (FT-Vis), so this asserts a change, not its size.
    assert any(not torch.equal(a, b) for a, b in zip(before, scores(editor, queries)))
    with editor.unedited():
        for a, b in zip(before, scores(editor, queries)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


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
