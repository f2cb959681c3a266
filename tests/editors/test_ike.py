"""IKE: k retrieved edits prefixed to every query, closest next to the question."""

import torch

from editors import EditRequest, Query, create_editor
from editors.prompts import in_context_prompt
from tests.tiny_models import random_image, tiny_llava

EDITS = [
    EditRequest("which animal is shown in the picture?", "a brown dog", random_image(11), key="dog"),
    EditRequest("what is the capital of France?", "Paris", random_image(12), key="paris"),
    EditRequest("the quick brown fox jumps", "over", None, key="fox"),
]


def logprobs(scores):
    return [s.target_logprobs for s in scores]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def prefixed(query: Query, *edits: EditRequest) -> Query:
    return Query(in_context_prompt([(e.prompt, e.target) for e in edits], query.prompt), query.answer, query.image)


def test_every_query_gets_its_nearest_edit_as_prefix():
    lvlm = tiny_llava(seed=1)
    editor = create_editor("ike", lvlm)
    query = Query(EDITS[1].prompt, "Paris", EDITS[1].image)
    unrelated = Query("describe the image", "a small cat", random_image(40))
    assert_same(logprobs(editor.score([query])), logprobs(lvlm.score([query])))  # no edits: no prefix
    for edit in EDITS:
        editor.apply(edit)
    assert [r.key for r in editor.retrieve([query, Query(EDITS[2].prompt, "over")])] == ["paris", "fox"]
    # Even an unrelated query is prefixed (IKE has no scope decision): locality is not protected.
    nearest = editor.retrieve([unrelated])[0]
    assert nearest.key is not None
    expected = [prefixed(query, EDITS[1]), prefixed(unrelated, next(e for e in EDITS if e.key == nearest.key))]
    assert_same(logprobs(editor.score([query, unrelated])), logprobs(lvlm.score(expected)))
    assert editor.memory_size() == 3


def test_k_demonstrations_put_the_closest_next_to_the_question():
    lvlm = tiny_llava(seed=1)
    editor = create_editor("ike", lvlm, {"k": 2})
    for edit in EDITS:
        editor.apply(edit)
    query = Query(EDITS[0].prompt, "a brown dog", EDITS[0].image)
    _, nearest = editor.edits.nearest([query], 2)
    assert nearest[0][0].key == "dog"
    second = next(e for e in EDITS if e.key == nearest[0][1].key)
    got = logprobs(editor.score([query]))[0]
    want = logprobs(lvlm.score([prefixed(query, second, EDITS[0])]))[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with editor.unedited():  # the base model, unprompted
        assert_same(logprobs(editor.score([query])), logprobs(lvlm.score([query])))
