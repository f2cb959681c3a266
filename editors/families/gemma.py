"""Gemma-based families (PaliGemma, Gemma 3): a SigLIP tower and a Gemma decoder."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from editors.families.base import Family, UnsupportedModelError

# Both towers are a transformers SiglipVisionModel: its blocks live at encoder.layers.
_SIGLIP_PARTS = {
    "tower": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "last_block_mlp": ("model.vision_tower.encoder.layers.-1.mlp",),
}


class PaliGemma(Family):
    """PaliGemma 1/2: SigLIP + linear projector + Gemma/Gemma2; the image and prompt form a bidirectional prefix."""

    name = "paligemma"
    config_class = PaliGemmaConfig
    model_class = PaliGemmaForConditionalGeneration
    # PaliGemmaProcessor writes "<image>" * N + "<bos>" + prompt + "\n" (+ answer): the image goes before BOS.
    placement = "prefix"
    image_token = "<image>"
    image_text = ""
    prompt_end = "\n"
    decoder_path = "model.language_model"
    vision_parts = _SIGLIP_PARTS
    default_vision_parts = ("projector",)
    vlkeb_vision_parts = ("projector",)  # a LLaVA-like connector: VLKEB's mm_projector choice

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """One slot per SigLIP patch (no pooling): (image_size / patch_size)^2."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Only `pixel_values` reaches the model."""
        return {"pixel_values": torch.cat([item["pixel_values"] for item in items])}

    def prefix_inputs(
        self, config: PreTrainedConfig, input_ids: torch.Tensor, prompt_lengths: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Prefix-LM attention: image + prompt (0) attend bidirectionally, the answer (1) causally.

        This is what PaliGemma sees when it generates the answer (its processor marks the prompt 0
        and generation appends 1s), so teacher forcing scores the answer as generation would; a 0
        on the answer would let the prompt attend to it. Padding is 1 (and masked anyway).
        """
        positions = torch.arange(input_ids.shape[1])
        prefix = positions[None, :] < torch.tensor(list(prompt_lengths))[:, None]
        return {"token_type_ids": (~prefix).long()}

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector output over the SigLIP patches (B, patches, D_text)."""
        return model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output


class Gemma3(Family):
    """Gemma 3: SigLIP, pooled soft-token projector, Gemma 3; images are <start_of_image> soft tokens <end_of_image>."""

    name = "gemma3"
    config_class = Gemma3Config
    model_class = Gemma3ForConditionalGeneration
    placement = "inline"
    image_token = "<image_soft_token>"
    # Gemma3Processor's full image sequence is "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n";
    # the placeholder stands for the soft tokens and `image_tokens` adds the boi/eoi around them.
    image_text = "\n\n<image_soft_token>\n\n"
    chat_image_marker = "<start_of_image>"  # what Gemma 3's chat template writes (Gemma3Processor expands it)
    decoder_path = "model.language_model"
    vision_parts = _SIGLIP_PARTS
    default_vision_parts = ("projector",)
    vlkeb_vision_parts = ("projector",)  # a LLaVA-like connector: VLKEB's mm_projector choice

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Soft tokens per image after the projector's average pooling (`mm_tokens_per_image`)."""
        return config.mm_tokens_per_image

    def image_tokens(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor], tokenizer: Any) -> list[int]:
        """`<start_of_image>`, the soft tokens, `<end_of_image>` (ids from the config, as the model reads them)."""
        crops = pixels.get("num_crops")
        if crops is not None and int(crops.sum()) > 0:
            raise UnsupportedModelError(f"{self.name}: pan-and-scan crops are not supported; set do_pan_and_scan=False")
        soft = [config.image_token_id] * self.image_token_count(config, pixels)
        return [config.boi_token_id, *soft, config.eoi_token_id]

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Only `pixel_values` reaches the model (`num_crops` is the processor's bookkeeping)."""
        return {"pixel_values": torch.cat([item["pixel_values"] for item in items])}

    def extra_inputs(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft tokens (1) attend bidirectionally within their image, as Gemma3Processor's token_type_ids say."""
        return {"token_type_ids": (input_ids == config.image_token_id).long()}

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled, projected soft tokens (B, mm_tokens_per_image, D_text)."""
        return model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output


DECLARED = (PaliGemma(), Gemma3())
