"""Tiny Gemma-based models: a 1-layer SigLIP tower + a 2-layer Gemma (PaliGemma) or Gemma 3 decoder."""

from __future__ import annotations

import torch
from tokenizers import decoders, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from editors import LVLM
from tests.tiny.tokenizers import HIDDEN, metaspace_tokenizer

GEMMA3_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def gemma_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    """Gemma-style: Metaspace BPE with BOS but no dummy prefix, so text reads the same after any special token."""
    tok = metaspace_tokenizer(specials, bos="<bos>", eos="<eos>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.backend_tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return tok


def _siglip() -> SiglipVisionConfig:
    # 16px images, 4px patches: 16 patches.
    return SiglipVisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, vision_use_head=False, **HIDDEN)


def tiny_paligemma(seed: int = 0) -> LVLM:
    """PaliGemma: SigLIP (16 patches -> 16 image tokens before BOS) + 2-layer Gemma."""
    tok = gemma_tokenizer(["<image>"])
    text = GemmaConfig(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
    )
    config = PaliGemmaConfig(
        vision_config=_siglip(), text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32, hidden_size=32, vocab_size=len(tok),
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, prompt_format="plain")


def tiny_gemma3(seed: int = 0) -> LVLM:
    """Gemma 3: SigLIP (16 patches, 2x2 average pool -> 4 soft tokens) + 2-layer Gemma 3 (sliding + full)."""
    tok = gemma_tokenizer(GEMMA3_SPECIALS)
    ids = {s: tok.convert_tokens_to_ids(s) for s in GEMMA3_SPECIALS}
    text = Gemma3TextConfig(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=256, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
    )
    config = Gemma3Config(
        vision_config=_siglip(), text_config=text, mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the projector weight to zero: randomise it so images matter.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    processor = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, prompt_format="plain")


BUILDERS = {"paligemma": tiny_paligemma, "gemma3": tiny_gemma3}
