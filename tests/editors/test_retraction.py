"""Retraction and re-edits of the memory editors on the default model and world: what the model answers after."""

import numpy as np
import pytest

from editors import EditRequest, Query, create_editor
from monitor.metrics import token_accuracy
from simulator.requests import edit_example, edit_request


@pytest.mark.slow
@pytest.mark.parametrize("method", ["serac", "ike"])
def test_retracted_and_re_edited_facts_are_answered_as_the_memory_now_holds_them(method, default_world):
    """40 edits, 10 of them retracted: a retracted edit is never retrieved again and its question is no longer
    answered with the retracted value (SERAC: out of scope, so the untouched model answers, with the old `pred`),
    while the other edits keep theirs. A fact edited again is answered with its newest value, memory size unchanged;
    retracting that newest edit removes the fact: the older value does not come back."""
    lvlm, root, train, evals = default_world
    editor = create_editor(method, lvlm)
    if editor.trainable:
        editor.train([edit_example(r, root) for r in train[:200]], progress=False)
    records = evals[:40]
    for r in records:
        editor.apply(edit_request(r, root))
    # Retracted: edits of creatures edited once here. Another relation of the same creature may be in SERAC's
    # scope (same image, a close question: 0.84 against a threshold of 0.84 on the default model), which is
    # a matter of its scope, not of retraction.
    once = [r for r in records if sum(x.image == r.image for x in records) == 1]
    retracted = once[:10]
    kept = [r for r in records if r not in retracted]
    assert all(editor.retract(str(r.id)).applied for r in retracted) and editor.memory_size() == 30

    def asked(rows, answer, prompt=lambda r: r.src):
        return [Query(prompt(r), answer(r), root.open(r.image)) for r in rows]

    def accuracy(rows, answer, prompt=lambda r: r.src):
        return [token_accuracy(s) for s in editor.score(asked(rows, answer, prompt))]

    found = [x.key for x in editor.retrieve(asked(records, lambda r: r.alt))]
    assert not {str(r.id) for r in retracted} & set(found)
    if method == "serac":  # out of scope again: the untouched model answers, as it did before the edit
        assert [x.key for x in editor.retrieve(asked(retracted, lambda r: r.alt))] == [None] * 10
        assert np.mean(accuracy(retracted, lambda r: r.pred)) > 0.9
    assert np.mean(accuracy(retracted, lambda r: r.alt)) < 0.3
    assert np.mean(accuracy(kept, lambda r: r.alt)) >= (1.0 if method == "serac" else 0.95)

    fact = once[10]  # kept, and the only edit of its creature
    newest = next(r.alt for r in evals if r.src == fact.src and r.alt not in (fact.alt, fact.pred))
    outcome = editor.apply(EditRequest(fact.src, newest, root.open(fact.image), key=f"{fact.id}#2"))
    assert outcome.message.startswith(f"replaced edit '{fact.id}'") and editor.memory_size() == 30
    for prompt in (lambda r: r.src, lambda r: r.rephrase):  # the edit's question, and its rephrasing
        assert editor.retrieve(asked([fact], lambda r: newest, prompt))[0].key == f"{fact.id}#2"
        assert accuracy([fact], lambda r: newest, prompt) == [1.0]
        assert accuracy([fact], lambda r: r.alt, prompt)[0] < 1.0  # never the stale value (it may share a token)
    assert editor.retract(f"{fact.id}#2").applied and editor.memory_size() == 29
    assert editor.retrieve(asked([fact], lambda r: newest))[0].key in {None, *(str(r.id) for r in kept if r != fact)}
    assert accuracy([fact], lambda r: newest)[0] < 1.0 and accuracy([fact], lambda r: r.alt)[0] < 1.0
    if method == "serac":
        assert accuracy([fact], lambda r: r.pred) == [1.0]
