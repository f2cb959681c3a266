"""LLaVA, LLaVA-NeXT and LLaVA-OneVision: image tokens that follow the image size, mixed sizes in one batch."""

import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig

from editors import EditExample, EditRequest, Query, UnsupportedModelError, create_editor, family_for
from editors.edit_memory import VisionKeys
from tests.published.llava import PUBLISHED
from tests.tiny.llava import reference_inputs, tiny_llava, tiny_llava_qwen2
from tests.tiny_models import random_image, tiny

ANYRES = ["llava-next", "llava-onevision"]
# (H, W): square, wide, tall, smaller than a tile, and large enough for OneVision's anyres_max shrink.
SIZES = [(16, 16), (20, 24), (24, 20), (32, 16), (16, 40), (50, 20), (8, 8), (60, 60), (47, 33)]


@pytest.mark.parametrize("family", ["llava", "llava-qwen2", *ANYRES])
def test_image_tokens_follow_the_processor_rule_at_every_size(family):
    lvlm = tiny(family)
    counts = set()
    for size in SIZES:
        query = Query("what is shown?", "a dog", random_image(1, size))
        expected = reference_inputs(lvlm, lvlm.inputs.prompt_text(query) + " a dog", query.image)["input_ids"][0]
        ids = lvlm.inputs.encode(query).input_ids
        assert ids == expected.tolist(), size
        counts.add(ids.count(lvlm.inputs.image_token_id))
    # CLIP (class token dropped) and SigLIP (none) both give 4 x 4 patches; anyres counts vary with the size.
    if family in ANYRES:
        assert len(counts) >= 5
    else:
        assert counts == {16}


def test_default_strategy_drops_the_first_feature_of_either_tower():
    """CLIP: the class token (16 patches left); SigLIP has none, so "default" drops a patch (15), as LlavaProcessor counts."""
    for lvlm, expected in ((tiny_llava(strategy="default"), 16), (tiny_llava_qwen2(strategy="default"), 15),
                           (tiny_llava(strategy="full"), 17)):
        query = Query("what is shown?", "a dog", random_image(1))
        ids = lvlm.inputs.encode(query).input_ids
        assert ids == reference_inputs(lvlm, lvlm.inputs.prompt_text(query) + " a dog", query.image)["input_ids"][0].tolist()
        assert ids.count(lvlm.inputs.image_token_id) == expected
        assert lvlm.score([query])[0].target_logprobs.isfinite().all()  # the model agrees: features fill every slot


def test_anyres_counts_by_hand():
    """20x24 on NeXT: 2x2 tiles of 4x4 patches = 8x8, unpadded to 6x8 rows x columns, + 6 newlines + 16 base = 70.
    OneVision (anyres_max_2) shrinks the 6x8 by sqrt(48/32): 4x6 + 4 newlines + 16 base = 44."""
    for family, expected in (("llava-next", 70), ("llava-onevision", 44)):
        lvlm = tiny(family)
        pixels = lvlm.inputs.pixels([random_image(1, (20, 24))])
        assert lvlm.family.image_token_count(lvlm.model.config, pixels) == expected


@pytest.mark.parametrize("family", ANYRES)
def test_a_padded_batch_of_sizes_scores_as_each_image_alone(family):
    lvlm = tiny(family)
    queries = [
        Query("what is the capital of France?", "Paris", random_image(3, (20, 24))),
        Query("describe the image", "a small cat sitting on a red mat", random_image(4, (16, 16))),
        Query("which animal is shown in the picture?", "a brown dog", random_image(5, (60, 60))),
        Query("what colour?", "red", random_image(6, (16, 40))),
    ]
    batch = lvlm._batch(queries)
    tiles = [lvlm.inputs.encode(q).pixels["pixel_values"].shape[1] for q in queries]
    assert len(set(tiles)) >= 3 and batch.inputs["pixel_values"].shape[1] == max(tiles)
    together = lvlm.score(queries, top_k=4, sequence_top_k=2, batch_size=8)
    for query, score in zip(queries, together):
        alone = lvlm.score([query], top_k=4, sequence_top_k=2)[0]
        assert score.target_ids.tolist() == alone.target_ids.tolist()
        torch.testing.assert_close(score.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(score.topk_logprobs, alone.topk_logprobs, atol=1e-5, rtol=0)
        assert score.sequence_topk_ids.tolist() == alone.sequence_topk_ids.tolist()


@pytest.mark.parametrize("family", ANYRES)
def test_image_features_need_one_count_and_keys_resize_to_one_tile(family):
    lvlm = tiny(family)
    with pytest.raises(ValueError, match="different token counts"):
        lvlm.embed_images([random_image(1, (20, 24)), random_image(2, (16, 40))], pooling="flat")
    keys = VisionKeys(lvlm)
    assert keys.size == (16, 16)
    # One tile's square: base view 4x4 + a 1x2 grid unpadded to 4x4 + 4 newlines = 36 tokens of 32 features.
    assert (keys.tokens, keys.token_dim) == (36, 32)
    mixed = keys.embed([random_image(1, (20, 24)), random_image(2, (16, 40)), random_image(3, (60, 60))])
    assert mixed.shape == (3, 36 * 32)
    torch.testing.assert_close(torch.from_numpy(mixed).norm(dim=1), torch.ones(3))


# Index of the last block the projector reads in the tiny 2-block towers: LLaVA-1.5 and NeXT read CLIP at
# vision_feature_layer -2, OneVision and LLaVA-Interleave (llava-qwen2) read SigLIP at -1.
LAST_READ_BLOCK = {"llava": 0, "llava-next": 0, "llava-onevision": 1, "llava-qwen2": 1}


@pytest.mark.parametrize("family", sorted(LAST_READ_BLOCK))
def test_last_block_mlp_is_a_block_the_projector_reads(family):
    """Tuning a block past the feature layer would change nothing: the declared block must move the features."""
    lvlm = tiny(family)
    params = lvlm.parameter_group("vision", parts=["last_block_mlp"])
    assert params and all(f"encoder.layers.{LAST_READ_BLOCK[family]}.mlp." in name for name in params)
    features = lvlm.family.image_features(lvlm.model, lvlm.inputs.pixels([random_image(1, (16, 16))]))
    grads = torch.autograd.grad(features.square().sum(), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_anyres_needs_one_feature_per_patch():
    lvlm = tiny("llava-next")
    config = LlavaNextConfig.from_dict({**lvlm.model.config.to_dict(), "vision_feature_select_strategy": "full"})
    with pytest.raises(UnsupportedModelError, match="one feature per patch"):
        lvlm.family.check(config)


def test_newline_embedding_is_its_own_vision_part():
    lvlm = tiny("llava-next")
    assert list(lvlm.parameter_group("vision", parts=["newline"])) == ["model.image_newline"]
    assert not any("image_newline" in name for name in lvlm.parameter_group("vision", parts=["projector"]))


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("llava-hf/llava-1.5-7b-hf", (480, 640), 576),  # 24 x 24 CLIP patches, class token dropped
        # 672 x 672: 2x2 tiles of 24 x 24 = 48 x 48 + 48 newlines + 576 base.
        ("llava-hf/llava-v1.6-mistral-7b-hf", (672, 672), 2928),
        # 480 x 640 -> 672 x 672 grid unpadded to 36 x 48 rows x columns: 1,728 + 36 newlines + 576 base.
        ("llava-hf/llava-v1.6-mistral-7b-hf", (480, 640), 2340),
        # 384 x 384: one 27 x 27 tile + 27 newlines + 729 base.
        ("llava-hf/llava-onevision-qwen2-7b-ov-hf", (384, 384), 1485),
        # 2304 x 2304: 6x6 tiles = 162 x 162, over 9 tiles' worth: shrunk by 2 to 81 x 81, + 81 newlines + 729 base.
        ("llava-hf/llava-onevision-qwen2-7b-ov-hf", (2304, 2304), 7371),
    ],
)
def test_image_tokens_of_published_checkpoints(name, size, expected):
    config = PUBLISHED[name].config()
    family = family_for(config)
    family.check(config)
    assert family.image_token_count(config, {"image_sizes": torch.tensor([size])}) == expected


PROMPT = "which animal is shown in the picture?"
EDIT_SIZES = [(20, 24), (32, 32), (48, 40), (16, 72), (61, 17)]  # tile grids 2x2, 2x2, 3x1, 1x3, ...
EDITS = [EditRequest(PROMPT, target, random_image(100 + i, size), key=f"e{i}")
         for i, (target, size) in enumerate(zip(["a dog", "a cat", "a horse", "a bird", "a fox"], EDIT_SIZES))]
# Each edit's picture at another size and aspect ratio; one prompt for all, so only the image tells them apart.
RESIZED = [Query(PROMPT, e.target, e.image.resize((w, h), Image.Resampling.BILINEAR))
           for e, (h, w) in zip(EDITS, [(40, 48), (24, 56), (32, 32), (30, 60), (64, 64)])]


@pytest.mark.parametrize("method", ["ike", "serac"])
@pytest.mark.parametrize("family", ANYRES)
def test_memory_editors_take_edits_and_queries_of_several_sizes_in_one_batch(family, method):
    editor = create_editor(method, tiny(family))
    if method == "serac":
        outsiders = [Query("which animal is this?", "a cow", random_image(200 + i, s)) for i, s in enumerate(EDIT_SIZES)]
        examples = [EditExample(e, generality=(q,), locality=(Query("the quick brown", "fox"), o))
                    for e, q, o in zip(EDITS, RESIZED, outsiders)]
        assert editor.train(examples, progress=False)["train_recall_at_1"] == 1.0
    assert all(editor.apply(edit).applied for edit in EDITS)
    keys = [e.key for e in EDITS]
    assert [r.key for r in editor.retrieve([e.query for e in EDITS])] == keys
    assert [r.key for r in editor.retrieve(RESIZED)] == keys
    together = editor.score(RESIZED)
    for query, score in zip(RESIZED, together):
        torch.testing.assert_close(score.target_logprobs, editor.score([query])[0].target_logprobs, atol=1e-4, rtol=0)
    with editor.unedited():
        before = editor.score(RESIZED)
    assert all(not torch.allclose(a.target_logprobs, b.target_logprobs) for a, b in zip(together, before))


@pytest.mark.parametrize(("feature_layer", "block"), [(-2, 22), (-1, 23), ([-2, -5, -8], 22), ([3, -20], 4), (3, 2)])
def test_last_block_mlp_follows_the_feature_layer_at_published_depth(feature_layer, block):
    """LLaVA-1.5's 24-block CLIP tower read at -2 tunes block 22; hidden state k is block k - 1's output."""
    from editors.families import family_for
    from transformers import LlavaConfig

    config = LlavaConfig(vision_feature_layer=feature_layer, vision_config={"model_type": "clip_vision_model",
                                                                            "num_hidden_layers": 24})
    paths = family_for(LlavaConfig()).vision_part_paths(config, "last_block_mlp")
    assert paths == (f"model.vision_tower.encoder.layers.{block}.mlp",)
    family = family_for(LlavaConfig())
    config.vision_feature_layer = 0
    with pytest.raises(ValueError, match="no tower block"):
        family.vision_part_paths(config, "last_block_mlp")
    assert family.vision_part_paths(config, "projector") == ("model.multi_modal_projector",)  # other parts unaffected
    for outside in (25, -26, [-2, 30]):
        config.vision_feature_layer = outside
        with pytest.raises(ValueError, match="out of range for a tower of 24 blocks"):
            family.vision_part_paths(config, "last_block_mlp")
