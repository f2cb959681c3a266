"""Qwen-VL families: a dynamic-resolution ViT with a patch merger and an M-RoPE text decoder.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share the prompt layout (`<|vision_start|>` + one
`<|image_pad|>` per merged patch + `<|vision_end|>`), the processor (`Qwen2VLImageProcessor`:
resize to multiples of patch x merge within a pixel range, flat patches + `image_grid_thw`) and
the M-RoPE inputs; they differ in the vision module's parts. Qwen2.5-VL adds window attention
inside the ViT (no new parameters at the module level named here); Qwen3-VL adds a learned
position embedding to the tower and DeepStack mergers that inject features of three ViT blocks
into the first decoder layers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from editors.families.base import Family, stack_features

# Merged tokens per side of a memory-key image: 16 x 16 = 256 tokens, as many as the 448-px
# image of the original Qwen-VL in VLKEB (Qwen2-VL: 448 px; Qwen3-VL, 16-px patches: 512 px).
KEY_GRID = 16


class Qwen2VL(Family):
    """Qwen2-VL: dynamic-resolution ViT with a patch merger, M-RoPE text decoder."""

    name = "qwen2_vl"
    config_class = Qwen2VLConfig
    model_class = Qwen2VLForConditionalGeneration
    placement = "inline"
    image_token = "<|image_pad|>"
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    # VLKEB feeds Qwen-VL 'Picture 1: <img>{path}</img>\n{q} {a}' (coco_caption.py collate_fn).
    vlkeb_image_text = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>\n"
    decoder_path = "model.language_model"
    vision_parts = {
        "tower": ("model.visual.patch_embed", "model.visual.blocks"),
        "projector": ("model.visual.merger",),
        "last_block_mlp": ("model.visual.blocks.-1.mlp",),
    }
    default_vision_parts = ("projector",)
    vlkeb_model = "qwenvl"
    vlkeb_vision_parts = ("last_block_mlp",)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Patches of the (t, h, w) grid after the spatial merger."""
        merge = config.vision_config.spatial_merge_size
        return int(pixels["image_grid_thw"].prod()) // (merge * merge)

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The patch merger's output (B, merged patches, D); images of one batch must share a grid."""
        out = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        return stack_features(out.pooler_output)

    def extra_inputs(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """M-RoPE needs to know which positions hold image tokens (1) and which text (0)."""
        return {"mm_token_type_ids": (input_ids == config.image_token_id).int()}

    def key_image_size(self, config: PreTrainedConfig, image_processor: Any) -> tuple[int, int]:
        """A square of KEY_GRID merged patches a side, brought into the processor's pixel range."""
        # The processor resizes to multiples of patch x merge with min_pixels <= h * w <= max_pixels;
        # asking its own rule for the square keeps the key image unchanged by the processor.
        factor = image_processor.patch_size * image_processor.merge_size
        side = KEY_GRID * factor
        size = image_processor.size
        return smart_resize(side, side, factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


class Qwen2_5_VL(Qwen2VL):
    """Qwen2.5-VL: Qwen2-VL with window attention in the ViT and an RMSNorm merger; same module paths."""

    name = "qwen2_5_vl"
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: a ViT with learned positions, a merger and DeepStack mergers feeding early decoder layers.

    Image features (keys) are the main merger's output, which replaces the image tokens' input
    embeddings; the DeepStack features are added to hidden states inside the decoder.
    """

    name = "qwen3_vl"
    config_class = Qwen3VLConfig
    model_class = Qwen3VLForConditionalGeneration
    vision_parts = {
        "tower": ("model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"),
        # Both map vision features into the language model: the merger into the input embeddings,
        # the DeepStack mergers into the hidden states of the first decoder layers.
        "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
        "last_block_mlp": ("model.visual.blocks.-1.mlp",),
    }


DECLARED = (Qwen2VL(), Qwen2_5_VL(), Qwen3VL())
