"""LLaVA-style families: a CLIP/SigLIP tower, an MLP projector and any declared text decoder.

LLaVA-1.5 gives every image one fixed run of tokens. LLaVA-NeXT and LLaVA-OneVision tile the
image ("anyres"): a base view plus a grid of tiles chosen from `image_grid_pinpoints` by the
image's size, unpadded back to its aspect ratio, a newline embedding after every row of tile
features, and (OneVision's `anyres_max_N`) the grid shrunk when it holds more than N tiles'
worth of features. Their token count therefore follows each image's size (`image_sizes`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.nn import functional as F
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

from editors.families.base import Family, UnsupportedModelError, stack_features

# Tokens a tower puts before its patches: CLIP's class token; SigLIP has none. The model drops
# the first feature under vision_feature_select_strategy="default" (on SigLIP a patch) and keeps all under "full".
CLASS_TOKENS: dict[type[PreTrainedConfig], int] = {CLIPVisionConfig: 1, SiglipVisionConfig: 0}


def _view_features(family: str, config: PreTrainedConfig) -> int:
    """Features the projector gets from one view: the tower's patches and class token, less the first under "default"."""
    vision = config.vision_config
    tokens = CLASS_TOKENS.get(type(vision))
    if tokens is None:
        known = ", ".join(c.__name__ for c in CLASS_TOKENS)
        raise UnsupportedModelError(f"{family}: vision tower {type(vision).__name__} is not supported; supported: {known}")
    side = vision.image_size // vision.patch_size
    return side * side + tokens - (1 if config.vision_feature_select_strategy == "default" else 0)


def _last_read_block(config: PreTrainedConfig) -> int:
    """Index of the last tower block whose output the projector reads: hidden state k of the tower (0: the patch
    embeddings) is block k - 1's output, and `vision_feature_layer` names one hidden state or several."""
    layers = config.vision_feature_layer
    states = config.vision_config.num_hidden_layers + 1
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    if not all(-states <= layer < states for layer in layers):
        raise ValueError(f"vision_feature_layer {config.vision_feature_layer} is out of range for a tower of "
                         f"{states - 1} blocks")
    last = max(layer % states for layer in layers)
    if last == 0:
        raise ValueError("the projector reads the tower's patch embeddings only: no tower block reaches it")
    return last - 1


class Llava(Family):
    """LLaVA-1.5 / LLaVA-Interleave as ported to transformers (`llava-hf/*`): CLIP or SigLIP tower + MLP projector."""

    name = "llava"
    config_class = LlavaConfig
    model_class = LlavaForConditionalGeneration
    placement = "inline"
    image_token = "<image>"
    image_text = "<image>\n"
    decoder_path = "model.language_model"
    vision_parts = {
        "tower": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        # The last tower block whose output reaches the projector (`vision_part_paths`): LLaVA-1.5 and NeXT read
        # CLIP at vision_feature_layer=-2, so its last block is never read; Interleave and OneVision read SigLIP at -1.
        "last_block_mlp": ("model.vision_tower.encoder.layers.{last_read}.mlp",),
    }
    default_vision_parts = ("projector",)
    # VLKEB's LLaVA FT (Vis) tunes `mm_projector` (hparams/FT/llava_mmproj.yaml).
    vlkeb_vision_parts = ("projector",)
    shares_image_features = True  # per-image projector features (tiles packed with newlines on NeXT / OneVision)
    shares_image_prefix = True

    def check(self, config: PreTrainedConfig) -> None:
        """The decoder and the vision tower must both be declared."""
        super().check(config)
        _view_features(self.name, config)

    def vision_part_paths(self, config: PreTrainedConfig, part: str) -> tuple[str, ...]:
        """The declared paths, `last_block_mlp` in the last tower block that `vision_feature_layer` reads."""
        paths = super().vision_part_paths(config, part)
        if not any("{last_read}" in path for path in paths):
            return paths
        return tuple(path.format(last_read=_last_read_block(config)) for path in paths)

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Tower patches, plus CLIP's class token under "full" (SigLIP has none; "default" drops the first feature)."""
        return _view_features(self.name, config)

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector output over the selected tower layer (`get_image_features`), (B, patches, D)."""
        config = model.config
        out = model.get_image_features(
            pixel_values=pixels["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))


class LlavaNext(Llava):
    """LLaVA-NeXT (v1.6, `llava-hf/llava-v1.6-*`): CLIP tower over anyres tiles, Vicuna / Mistral / ... decoder."""

    name = "llava_next"
    config_class = LlavaNextConfig
    model_class = LlavaNextForConditionalGeneration
    vision_parts = {
        **Llava.vision_parts,
        # The learned embedding placed after every row of tile features; not part of LLaVA's mm_projector.
        "newline": ("model.image_newline",),
    }

    def check(self, config: PreTrainedConfig) -> None:
        """The tiles' features are laid out on the patch grid, so each tile must give exactly side x side of them."""
        super().check(config)
        if _view_features(self.name, config) != self._side(config) ** 2:
            raise UnsupportedModelError(
                f"{self.name}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} with a "
                f"{type(config.vision_config).__name__} tower does not give one feature per patch; anyres needs "
                f"'default' on CLIP or 'full' on SigLIP"
            )

    @staticmethod
    def _side(config: PreTrainedConfig) -> int:
        return config.vision_config.image_size // config.vision_config.patch_size

    def _grid(self, config: PreTrainedConfig, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tile features after unpadding to the image's aspect ratio.

        As `LlavaNextProcessor._get_unpadded_features` and the model's `unpad_image`: the grid
        is the best pinpoint over the tile size, then the rows (or columns) the resize padded away are cut.
        """
        side, tile = self._side(config), config.vision_config.image_size
        best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
        rows, columns = side * (best_height // tile), side * (best_width // tile)
        if width / height > columns / rows:
            rows -= (rows - int(round(height * (columns / width), 7))) // 2 * 2
        else:
            columns -= (columns - int(round(width * (rows / height), 7))) // 2 * 2
        return rows, columns

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Base view (side x side) + tile features + one newline per row of tile features."""
        height, width = (int(v) for v in pixels["image_sizes"].reshape(-1, 2)[0])
        rows, columns = self._grid(config, height, width)
        return self._side(config) ** 2 + rows * columns + rows

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pixels (1, tiles, C, H, W) per image, zero-padded to the batch's most tiles as the processor pads.

        The model reads each image's own tile count from `image_sizes` and ignores the padding.
        """
        most = max(item["pixel_values"].shape[1] for item in items)
        stacked = {}
        for key in items[0]:
            parts = [item[key] for item in items]
            if key == "pixel_values":
                parts = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in parts]
            stacked[key] = torch.cat(parts)
        return stacked

    def key_image_size(self, config: PreTrainedConfig, image_processor: Any) -> tuple[int, int]:
        """One tile's square (the tower's input size): every square image gets one grid, so one token count."""
        side = config.vision_config.image_size
        return side, side

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Packed per-image features (B, N, D) as the decoder receives them, newlines included.

        N follows each image's size; images of one batch must share it (memory keys resize to one size).
        """
        out = model.get_image_features(**pixels)
        return stack_features(out.pooler_output)


class LlavaOnevision(LlavaNext):
    """LLaVA-OneVision (`llava-hf/llava-onevision-qwen2-*`): SigLIP tower over anyres tiles, Qwen2 decoder."""

    name = "llava_onevision"
    config_class = LlavaOnevisionConfig
    model_class = LlavaOnevisionForConditionalGeneration

    def _grid(self, config: PreTrainedConfig, height: int, width: int) -> tuple[int, int]:
        """NeXT's grid, shrunk (bilinear) when it holds over 1.1x the features of N tiles (`anyres_max_N`).

        As `LlavaOnevisionProcessor._get_unpadded_features` and the model's `pack_image_features`.
        """
        rows, columns = super()._grid(config, height, width)
        most = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * columns / (most * self._side(config) ** 2))
        if ratio > 1.1:
            rows, columns = int(rows // ratio), int(columns // ratio)
        return rows, columns


DECLARED = (Llava(), LlavaNext(), LlavaOnevision())
