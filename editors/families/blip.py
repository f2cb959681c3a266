"""BLIP-2-style families: a ViT, a Q-Former of learned queries and a projection into the text decoder."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from editors.families.base import Family, UnsupportedModelError

QFORMER_TOKENIZER = "qformer_tokenizer"  # the subfolder InstructBLIP checkpoints ship it in, and its key in `extras`


class Blip2(Family):
    """BLIP-2: ViT + Q-Former + projection into an OPT or Llama decoder."""

    name = "blip2"
    config_class = Blip2Config
    model_class = Blip2ForConditionalGeneration
    placement = "prefix"
    image_token = "<image>"
    image_text = ""
    decoder_path = "language_model.model"
    text_module = "language_model"  # BLIP-2's own forward requires pixel_values
    vision_parts = {
        "tower": ("vision_model",),
        "qformer": ("qformer", "query_tokens"),
        "qformer_body": ("qformer",),  # VLKEB's "Qformer" parameters: the query tokens are not among them
        "projector": ("language_projection",),
        "last_block_mlp": ("vision_model.encoder.layers.-1.mlp",),
    }
    default_vision_parts = ("qformer",)
    vlkeb_model = "blip2"
    vlkeb_vision_parts = ("qformer_body",)

    def check(self, config: PreTrainedConfig) -> None:
        """Refuse an encoder-decoder language model (Flan-T5): only decoder-only LMs are supported."""
        if not config.use_decoder_only_language_model:
            raise UnsupportedModelError(
                f"{self.name} over {type(config.get_text_config()).__name__} (an encoder-decoder language model "
                "such as Flan-T5) is not supported: answer-span scoring and the MLP editors assume a decoder-only "
                "language model"
            )
        super().check(config)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """One slot per Q-Former query token."""
        return config.num_query_tokens

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Q-Former output (B, query tokens, D_qformer), before the language projection."""
        return model.get_image_features(pixel_values=pixels["pixel_values"]).qformer_outputs.last_hidden_state


class InstructBlip(Blip2):
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, tokenized by its own BERT tokenizer."""

    name = "instructblip"
    config_class = InstructBlipConfig
    model_class = InstructBlipForConditionalGeneration
    text_module = "language_model"  # InstructBLIP's own forward requires pixel_values too

    def load_extras(self, source: str) -> dict[str, Any]:
        """The Q-Former's tokenizer, shipped in the checkpoint's `qformer_tokenizer` subfolder."""
        return {QFORMER_TOKENIZER: AutoTokenizer.from_pretrained(source, subfolder=QFORMER_TOKENIZER)}

    def query_pixels(
        self, prompt: str, pixels: dict[str, torch.Tensor], extras: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Add the Q-Former ids of the question (never the answer: that would show it to the vision path)."""
        tokenizer = extras.get(QFORMER_TOKENIZER)
        if tokenizer is None:
            raise UnsupportedModelError(f"{self.name} needs its Q-Former tokenizer (extras['{QFORMER_TOKENIZER}'])")
        # One image per query here; the processor of a batch of images repeats the prompt for each.
        encoded = tokenizer([prompt] * pixels["pixel_values"].shape[0], return_tensors="pt", padding=True)
        return {
            **pixels,
            "qformer_input_ids": encoded["input_ids"],
            "qformer_attention_mask": encoded["attention_mask"],
        }

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate images; right-pad the Q-Former prompts (masked out, so the pad id never matters)."""
        width = max(item["qformer_input_ids"].shape[1] for item in items)
        stacked = {"pixel_values": torch.cat([item["pixel_values"] for item in items])}
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            stacked[key] = torch.cat(
                [torch.nn.functional.pad(item[key], (0, width - item[key].shape[1])) for item in items]
            )
        return stacked

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Q-Former output at the query positions (B, query tokens, D_qformer), before the language projection."""
        out = model.get_image_features(
            pixel_values=pixels["pixel_values"],
            qformer_input_ids=pixels["qformer_input_ids"],
            qformer_attention_mask=pixels["qformer_attention_mask"],
        )
        return out.qformer_outputs.last_hidden_state[:, : model.config.num_query_tokens]


DECLARED = (Blip2(), InstructBlip())
