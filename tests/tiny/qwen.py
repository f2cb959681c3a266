"""Tiny Qwen-VL-style models: a small dynamic-resolution ViT + a 2-layer M-RoPE decoder.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share the tokenizer and the PIL image processor
(`Qwen2VLImageProcessorPil`, as transformers maps all three); each processor is built with
the tiny model's patch and merge sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from editors import LVLM
from tests.tiny.tokenizers import HIDDEN, bytelevel_tokenizer

QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]


def _tokenizer() -> tuple[PreTrainedTokenizerFast, dict[str, Any], dict[str, Any]]:
    """Byte-level tokenizer, the text-config token ids and the top-level config token ids."""
    tok = bytelevel_tokenizer(SPECIALS, bos=None)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    text = dict(vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **HIDDEN)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return tok, text, tokens


def _lvlm(model_class: type, config: Any, tok: PreTrainedTokenizerFast, patch: int, max_side: int,
          seed: int) -> LVLM:
    """The seeded model with a processor resizing to multiples of patch x 2, 16 x 16 <= h x w <= max_side^2 pixels."""
    torch.manual_seed(seed)
    model = model_class(config)
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": 16 * 16, "longest_edge": max_side * max_side})
    return LVLM(model, tok, processor, chat_template=QWEN_CHAT, prompt_format="plain")


def tiny_qwen2vl(seed: int = 0) -> LVLM:
    """Qwen2-VL: 1-block ViT (4px patches, 2x2 merge) + 2-layer M-RoPE decoder."""
    tok, text, tokens = _tokenizer()
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                         **text),
        **tokens,
    )
    return _lvlm(Qwen2VLForConditionalGeneration, config, tok, 4, 32, seed)


def tiny_qwen2_5_vl(seed: int = 0) -> LVLM:
    """Qwen2.5-VL: 2-block ViT with window attention (block 0 windowed, block 1 full) + 2-layer decoder."""
    tok, text, tokens = _tokenizer()
    config = Qwen2_5_VLConfig(
        # window_size 16 px = 2x2 merged units of 4px patches: images above 16 px use several windows.
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        text_config=dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                         **text),
        **tokens,
    )
    return _lvlm(Qwen2_5_VLForConditionalGeneration, config, tok, 4, 32, seed)


def tiny_qwen3_vl(seed: int = 0) -> LVLM:
    """Qwen3-VL: 2-block ViT (8px patches, learned 4x4 positions, DeepStack from block 0) + 2-layer decoder."""
    tok, text, tokens = _tokenizer()
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        # head_dim 8: 4 rotary frequencies, interleaved over (t, h, w) as 2 + 1 + 1.
        text_config=dict(head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                      "mrope_interleaved": True, "rope_theta": 10000.0}, **text),
        **tokens,
    )
    return _lvlm(Qwen3VLForConditionalGeneration, config, tok, 8, 64, seed)


BUILDERS = {"qwen2_vl": tiny_qwen2vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
