"""Model families: how each transformers LVLM takes images and where its parameter groups live.

Families are declared by config class, never guessed from a model name (STYLE.md, point 4).
Adding a family means adding one `Family` subclass and one row in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig


class UnsupportedModelError(ValueError):
    """The model's config class is not one of the declared families."""


@dataclass(frozen=True)
class Decoder:
    """Where a text decoder keeps its blocks and the MLP weights of one block."""

    layers: str  # path of the ModuleList of blocks, relative to the decoder base model
    mlp: tuple[str, ...]  # parameter paths of the MLP inside one block


DECODERS: dict[type[PreTrainedConfig], Decoder] = {
    LlamaConfig: Decoder("layers", ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")),
    Qwen2VLTextConfig: Decoder("layers", ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")),
    OPTConfig: Decoder("decoder.layers", ("fc1.weight", "fc2.weight")),
}


class Family:
    """One LVLM family: its model class, image placeholders and parameter layout."""

    name: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    # "inline": the prompt text holds one placeholder token that is expanded to the image's
    # feature count; "prefix": the image tokens go before everything, BOS included (BLIP-2).
    placement: ClassVar[Literal["inline", "prefix"]]
    image_token: ClassVar[str]  # the placeholder token expanded into image feature slots
    image_text: ClassVar[str]  # what a plain-format prompt writes where the image goes
    decoder_path: ClassVar[str]  # module path of the text decoder's base model
    text_module: ClassVar[str] = ""  # module that runs text-only input ("" = the whole model)
    vision_parts: ClassVar[dict[str, tuple[str, ...]]]  # part name -> module/parameter paths
    # What VLKEB's FT (Vis) tunes: the part that maps vision features into the language model.
    default_vision_parts: ClassVar[tuple[str, ...]]

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Number of image-token slots one processed image fills in `input_ids`."""
        raise NotImplementedError

    def extra_inputs(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Family-specific model inputs derived from the token ids of an image batch."""
        return {}

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token image features (B, N, D) as the decoder receives them, before any pooling."""
        raise NotImplementedError

    def decoder(self, config: PreTrainedConfig) -> Decoder:
        """The decoder layout of this model's text config."""
        text_config = config.get_text_config()
        for config_class, decoder in DECODERS.items():
            if type(text_config) is config_class:
                return decoder
        known = ", ".join(c.__name__ for c in DECODERS)
        raise UnsupportedModelError(
            f"{self.name}: text decoder {type(text_config).__name__} has no declared layout; known: {known}"
        )


class Llava(Family):
    """LLaVA-1.5 as ported to transformers (`llava-hf/*`): CLIP tower + MLP projector + Llama."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    placement = "inline"
    image_token = "<image>"
    image_text = "<image>\n"
    decoder_path = "model.language_model"
    vision_parts = {"tower": ("model.vision_tower",), "projector": ("model.multi_modal_projector",)}
    default_vision_parts = ("projector",)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """CLIP patches, plus the CLS slot when the projector keeps it ("full")."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector output over the selected tower layer (`get_image_features`), (B, patches, D)."""
        config = model.config
        out = model.get_image_features(
            pixel_values=pixels["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))


class Blip2(Family):
    """BLIP-2: ViT + Q-Former + projection into an OPT or Llama decoder."""

    name = "blip2"
    model_class = Blip2ForConditionalGeneration
    placement = "prefix"
    image_token = "<image>"
    image_text = ""
    decoder_path = "language_model.model"
    text_module = "language_model"  # BLIP-2's own forward requires pixel_values
    vision_parts = {
        "tower": ("vision_model",),
        "qformer": ("qformer", "query_tokens"),
        "projector": ("language_projection",),
    }
    default_vision_parts = ("qformer",)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """One slot per Q-Former query token."""
        return config.num_query_tokens

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Q-Former output (B, query tokens, D_qformer), before the language projection."""
        return model.get_image_features(pixel_values=pixels["pixel_values"]).qformer_outputs.last_hidden_state


class Qwen2VL(Family):
    """Qwen2-VL: dynamic-resolution ViT with a patch merger, M-RoPE text decoder."""

    name = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    placement = "inline"
    image_token = "<|image_pad|>"
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    decoder_path = "model.language_model"
    vision_parts = {
        "tower": ("model.visual.patch_embed", "model.visual.blocks"),
        "projector": ("model.visual.merger",),
    }
    default_vision_parts = ("projector",)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Patches of the (t, h, w) grid after the spatial merger."""
        merge = config.vision_config.spatial_merge_size
        return int(pixels["image_grid_thw"].prod()) // (merge * merge)

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The patch merger's output (B, merged patches, D); images of one batch must share a grid."""
        out = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        sizes = {part.shape[0] for part in out.pooler_output}
        if len(sizes) != 1:
            raise ValueError(f"images of one batch have different token counts {sorted(sizes)}; embed them apart")
        return torch.stack(list(out.pooler_output))

    def extra_inputs(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """M-RoPE needs to know which positions hold image tokens (1) and which text (0)."""
        return {"mm_token_type_ids": (input_ids == config.image_token_id).int()}


FAMILIES: dict[type[PreTrainedConfig], Family] = {
    LlavaConfig: Llava(),
    Blip2Config: Blip2(),
    Qwen2VLConfig: Qwen2VL(),
}


def family_for(config: PreTrainedConfig) -> Family:
    """The declared family of a model config, or an error naming the supported ones."""
    family = FAMILIES.get(type(config))
    if family is None:
        known = ", ".join(f"{f.name} ({c.__name__})" for c, f in FAMILIES.items())
        raise UnsupportedModelError(f"Unsupported model config {type(config).__name__}. Supported: {known}")
    return family
