"""Memory keys of images of any size (editors/edit_memory.py): SERAC and IKE on dynamic-resolution families.

Qwen-VL processors give an image as many tokens as its size asks for; keys are embedded at the
family's key resolution, so edits and queries whose images have different sizes, mixed in one
batch, share one key layout, and the same picture at two sizes finds the same edit.
"""

import numpy as np
import pytest
from PIL import Image

from editors import EditExample, EditRequest, Query, create_editor
from editors.edit_memory import VisionKeys
from tests.tiny_models import BUILDERS, random_image, tiny

DYNAMIC = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
PROMPT = "which animal is shown in the picture?"
SIZES = [(20, 24), (32, 32), (48, 40), (16, 72), (61, 17)]  # (H, W) of each edit's image
TARGETS = ["a dog", "a cat", "a horse", "a bird", "a fox"]
# One prompt for every edit: only the image tells the edits apart.
EDITS = [EditRequest(PROMPT, target, random_image(100 + i, size), key=f"e{i}")
         for i, (target, size) in enumerate(zip(TARGETS, SIZES))]


def rescaled(image: Image.Image, height: int, width: int) -> Image.Image:
    """The same picture at another size (and aspect ratio)."""
    return image.resize((width, height), Image.Resampling.BILINEAR)


# Each edit's image at another size than its own; row i of the batch is edit i.
OTHER_SIZES = [(40, 48), (24, 56), (32, 32), (30, 60), (64, 64)]
SAME_AT_OTHER_SIZE = [Query(PROMPT, e.target, rescaled(e.image, *s)) for e, s in zip(EDITS, OTHER_SIZES)]


@pytest.mark.parametrize("family", DYNAMIC)
def test_key_resolution_gives_every_image_one_layout(family):
    lvlm = tiny(family)
    keys = VisionKeys(lvlm)
    # Tiny processors: Qwen2/2.5-VL 4px patches, 32x32 px at most; Qwen3-VL 8px patches, 64x64 px.
    # Both: 16 x 16 merged patches asked for, clamped to the pixel range: 4 x 4 merged tokens.
    assert keys.size == {"qwen3_vl": (64, 64)}.get(family, (32, 32))
    assert (keys.tokens, keys.token_dim) == (16, 32)
    images = [e.image for e in EDITS]
    together = keys.embed(images)
    assert together.shape == (len(images), 16 * 32)
    apart = np.concatenate([keys.embed([image]) for image in images])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    # A 32x32 image (the "cannot reshape array of size 512 into shape (1,4,32)") embeds too.
    assert keys.embed([random_image(5, (32, 32))]).shape == (1, 512)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_keys_of_mixed_sizes_on_every_family(family):
    """Every family's keys take images of several sizes in one batch; fixed-resolution ones as before."""
    lvlm = tiny(family)
    keys = VisionKeys(lvlm)
    images = [e.image for e in EDITS]
    got = keys.embed(images)
    assert got.shape == (len(images), keys.dim)
    if keys.size is None:
        # The processor fixes the resolution: keys are the plain flattened features of each image alone (one image
        # per forward, so a key does not depend on its batch), bit for bit.
        raw = np.concatenate([lvlm.embed_images([image], pooling="flat").numpy() for image in images])
        raw = raw.astype(np.float32)
        np.testing.assert_array_equal(got, raw / np.linalg.norm(raw, axis=1, keepdims=True))


@pytest.mark.parametrize("method", ["ike", "serac"])
@pytest.mark.parametrize("family", DYNAMIC)
def test_edits_of_several_image_sizes_are_applied_and_retrieved(family, method):
    editor = create_editor(method, tiny(family))
    if method == "serac":
        # The per-token LDA is fitted on pairs of one picture at two sizes; out of scope: text and other pictures.
        outsiders = [Query("which animal is this?", "a cow", random_image(200 + i, s)) for i, s in enumerate(SIZES)]
        examples = [EditExample(e, generality=(q,), locality=(Query("the quick brown", "fox"), o))
                    for e, q, o in zip(EDITS, SAME_AT_OTHER_SIZE, outsiders)]
        report = editor.train(examples, progress=False)
        assert report["train_recall_at_1"] == 1.0
    for edit in EDITS:
        assert editor.apply(edit).applied
    keys = [e.key for e in EDITS]

    own = [edit.query for edit in EDITS]  # five sizes in one batch
    found = editor.retrieve(own)
    assert [r.key for r in found] == keys
    # The stored key itself: cosine 1 (text and image parts alike).
    np.testing.assert_allclose([r.score for r in found], 1.0, atol=1e-5)

    found = editor.retrieve(SAME_AT_OTHER_SIZE)
    assert [r.key for r in found] == keys
    assert all(r.score < 1.0 - 1e-6 for r in found)  # another size: a near key, not the stored one

    # Scoring the mixed-size batch answers with the edits in context, as each query alone would.
    together = editor.score(SAME_AT_OTHER_SIZE)
    for query, score in zip(SAME_AT_OTHER_SIZE, together):
        np.testing.assert_allclose(score.target_logprobs, editor.score([query])[0].target_logprobs, atol=1e-4)
    with editor.unedited():
        before = editor.score(SAME_AT_OTHER_SIZE)
    assert all(not np.allclose(a.target_logprobs, b.target_logprobs) for a, b in zip(together, before))


def test_a_dynamic_family_without_a_key_resolution_is_named_in_the_error():
    lvlm = BUILDERS["qwen2_vl"]()  # a fresh model: its family is replaced below

    class Undeclared(type(lvlm.family)):
        def key_image_size(self, config, image_processor):
            return None

    lvlm.family = Undeclared()
    keys = VisionKeys(lvlm)  # probed with an 8x8 image: 2x2 merged tokens
    assert keys.tokens == 4
    with pytest.raises(ValueError, match="qwen2_vl: an image gave 16 image tokens where keys expect 4; "
                                         ".*key_image_size"):
        keys.embed([random_image(5, (32, 32))])
