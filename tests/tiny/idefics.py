"""Tiny Idefics3-style models: a 1-layer SigLIP tower, 2x2 pixel shuffle and a 2-layer Llama decoder.

The Idefics3 model's image processor splits images into tiles (up to 2x2 plus the global view);
the SmolVLM one does not (one square tile), so both prompt strings are exercised.
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from editors import LVLM
from tests.tiny.tokenizers import HIDDEN, metaspace_tokenizer

# The real tokenizers carry <row_i_col_j> for grids up to 6 x 6.
SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def _tiny(config_class, vision_class, model_class, processor, seed: int) -> LVLM:
    tok = metaspace_tokenizer(SPECIALS)
    text = LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
    )
    # 16px tiles, 4px patches: 16 patches, pixel-shuffled 2x2 into 4 <image> tokens per tile.
    vision = vision_class(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN)
    config = config_class(
        vision_config=vision, text_config=text, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>")
    )
    torch.manual_seed(seed)
    model = model_class(config)
    return LVLM(model, tok, processor, prompt_format="plain")


def tiny_idefics3(seed: int = 0) -> LVLM:
    """Idefics3 with image splitting: longest edge scaled to 32px, so 1x2, 2x1 or 2x2 tiles + the global view."""
    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True
    )
    return _tiny(Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, processor, seed)


def tiny_smolvlm(seed: int = 0) -> LVLM:
    """SmolVLM without image splitting: every image is one 16px square tile."""
    processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False
    )
    return _tiny(SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, processor, seed)


BUILDERS = {"idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}
