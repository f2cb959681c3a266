"""Idefics3-style families (Idefics3, SmolVLM): a SigLIP tower, pixel shuffle and image tiles in the prompt."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn.functional import pad
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from editors.families.base import Family, stack_features


class Idefics3(Family):
    """Idefics3: SigLIP tiles, pixel-shuffle connector, Llama decoder; an image is its tiles plus a global view."""

    name = "idefics3"
    config_class = Idefics3Config
    model_class = Idefics3ForConditionalGeneration
    placement = "inline"
    image_token = "<image>"
    image_text = "<image>"
    decoder_path = "model.text_model"
    vision_parts = {
        "tower": ("model.vision_model",),
        "projector": ("model.connector",),  # pixel shuffle + one linear layer
        "last_block_mlp": ("model.vision_model.encoder.layers.-1.mlp",),
    }
    default_vision_parts = ("projector",)
    vlkeb_vision_parts = ("projector",)  # a LLaVA-like connector: VLKEB's mm_projector choice
    # The tile grid decides the image's prompt string; checkpoints never save this flag (to_dict drops it).
    processor_kwargs = {"return_row_col_info": True}

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """`<image>` slots of one tile: the tile's patches after a scale_factor x scale_factor pixel shuffle."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2

    def image_tokens(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor], tokenizer: Any) -> list[int]:
        """The processor's image string (processing_idefics3.py / processing_smolvlm.py), tokenized.

        Split image: per tile `<fake_token_around_image><row_i_col_j>` + `<image>` * n, a newline after
        each row, then a newline and the global view; unsplit: `<fake_token_around_image><global-img>`
        + `<image>` * n + `<fake_token_around_image>`. It starts and ends with special tokens, so its
        ids spliced into the prompt equal the processor's tokenization of the whole text.
        """
        fake = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        image = getattr(tokenizer, "image_token", None) or self.image_token
        global_view = getattr(tokenizer, "global_image_token", None) or "<global-img>"
        tile = image * self.image_token_count(config, pixels)
        rows, cols = int(pixels["rows"][0]), int(pixels["cols"][0])
        text = ""
        for row in range(rows):
            text += "".join(f"{fake}<row_{row + 1}_col_{col + 1}>{tile}" for col in range(cols)) + "\n"
        text += ("\n" if rows else "") + f"{fake}{global_view}{tile}{fake}"
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def query_pixels(self, prompt: str, pixels: dict[str, Any], extras: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One row per image: (images, tiles, C, H, W) pixels and masks, and the tile grid as (images,) tensors.

        The processor reads a flat list of images as several images of one text, concatenating
        their tiles in one row; each image's tiles are cut back out (rows x cols + the global view).
        """
        per_image = []
        for sample, (rows, cols) in enumerate(zip(pixels["rows"], pixels["cols"])):
            start = 0
            for r, c in zip(rows, cols):
                n = r * c + 1 if r or c else 1
                tiles = slice(start, start + n)
                per_image.append({
                    "pixel_values": pixels["pixel_values"][sample : sample + 1, tiles],
                    "pixel_attention_mask": pixels["pixel_attention_mask"][sample : sample + 1, tiles],
                })
                start += n
        grid = {key: torch.tensor([n for per_text in pixels[key] for n in per_text]) for key in ("rows", "cols")}
        return {**self.stack_pixels(per_image), **grid}

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """(B, max tiles, C, H, W) pixels, (B, max tiles, H, W) masks; padding tiles are zero (the model skips them)."""
        tiles = max(item["pixel_values"].shape[1] for item in items)
        height = max(item["pixel_values"].shape[-2] for item in items)
        width = max(item["pixel_values"].shape[-1] for item in items)
        values, masks = [], []
        for item in items:
            p, m = item["pixel_values"], item["pixel_attention_mask"]
            values.append(pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2], 0, 0, 0, tiles - p.shape[1])))
            masks.append(pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2], 0, tiles - m.shape[1])))
        return {"pixel_values": torch.cat(values), "pixel_attention_mask": torch.cat(masks)}

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The connector output over all tiles of each image (B, tiles x n, D); one tile count per batch."""
        out = model.get_image_features(
            pixel_values=pixels["pixel_values"], pixel_attention_mask=pixels.get("pixel_attention_mask")
        )
        return stack_features(out.pooler_output)

    def key_image_size(self, config: PreTrainedConfig, image_processor: Any) -> tuple[int, int] | None:
        """A square of one tile's side when the processor splits images (every square gives one tile grid)."""
        # The processor first scales the longest edge to size["longest_edge"], so the grid follows only
        # the aspect ratio; unsplit images are always one square tile.
        if not image_processor.do_image_splitting:
            return None
        side = image_processor.max_image_size["longest_edge"]
        return side, side


class SmolVLM(Idefics3):
    """SmolVLM / SmolVLM2: Idefics3's layout with a SmolLM2 (Llama) decoder; same module paths and image string."""

    name = "smolvlm"
    config_class = SmolVLMConfig
    model_class = SmolVLMForConditionalGeneration


DECLARED = (Idefics3(), SmolVLM())
