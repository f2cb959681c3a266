"""Tiny LLaVA-style models: CLIP or SigLIP tower + projector + a 2-layer decoder of each kind LLaVA checkpoints use.

Every tower sees 16px images in 4px patches (a 4x4 grid per view). NeXT and OneVision tile
larger images over pinpoints in multiples of 16px, so their token count follows the image size.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from editors import LVLM
from tests.tiny.tokenizers import HIDDEN, bytelevel_tokenizer, metaspace_tokenizer

LLAVA_CHAT = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA-Interleave / OneVision over Qwen2: ChatML turns, the image placeholder first in the user turn.
LLAVA_QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<image>"]
# Pinpoints in multiples of the 16px tile, as llava-v1.6 uses multiples of 336 (1x2, 2x1, 2x2, 3x1, 1x3 tiles).
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
# OneVision's 1x1 .. 3x3 tiles; with anyres_max_2 a 2x2 or larger grid is shrunk, a 1x2 one is not.
ONEVISION_PINPOINTS = [[h, w] for h in (16, 32, 48) for w in (16, 32, 48)]
TOWER = dict(num_hidden_layers=2, image_size=16, patch_size=4, **HIDDEN)


def _clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(projection_dim=32, **TOWER)


def _siglip() -> SiglipVisionConfig:
    return SiglipVisionConfig(vision_use_head=False, **TOWER)


def _metaspace(bos: str = "<s>", eos: str = "</s>") -> PreTrainedTokenizerFast:
    return metaspace_tokenizer(["<image>"], bos=bos, eos=eos)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return bytelevel_tokenizer(QWEN_SPECIALS, bos=None)


def _text(kind: type[PreTrainedConfig], tok: PreTrainedTokenizerFast, **extra: Any) -> PreTrainedConfig:
    """A 2-layer decoder of `kind` over `tok`'s vocabulary and special tokens."""
    return kind(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        **HIDDEN, **extra,
    )


def _llava(tok: PreTrainedTokenizerFast, vision: PreTrainedConfig, text: PreTrainedConfig, strategy: str,
           seed: int, chat: str) -> LVLM:
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if isinstance(vision, CLIPVisionConfig) else -1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, chat_template=chat, prompt_format="plain")


def tiny_llava(seed: int = 0, strategy: str = "default") -> LVLM:
    """LLaVA-1.5: CLIP tower (16px, 4px patches -> 16 image tokens) + 2-layer Llama."""
    tok = _metaspace()
    return _llava(tok, _clip(), _text(LlamaConfig, tok), strategy, seed, LLAVA_CHAT)


def tiny_llava_qwen2(seed: int = 0, strategy: str = "full") -> LVLM:
    """LLaVA-Interleave-Qwen: SigLIP tower (no class token, "full" -> 16 tokens) + 2-layer Qwen2, byte-level BPE."""
    tok = _qwen_tokenizer()
    return _llava(tok, _siglip(), _text(Qwen2Config, tok), strategy, seed, LLAVA_QWEN_CHAT)


def tiny_llava_mistral(seed: int = 0) -> LVLM:
    """LLaVA over Mistral: CLIP tower + 2-layer Mistral (sliding window off, as llava-v1.6-mistral)."""
    tok = _metaspace()
    return _llava(tok, _clip(), _text(MistralConfig, tok, sliding_window=None), "default", seed, LLAVA_CHAT)


def tiny_llava_gemma(seed: int = 0) -> LVLM:
    """LLaVA-Gemma: CLIP tower + 2-layer Gemma (scaled embeddings, its own `<bos>`/`<eos>`)."""
    tok = _metaspace(bos="<bos>", eos="<eos>")
    return _llava(tok, _clip(), _text(GemmaConfig, tok, head_dim=8), "default", seed, LLAVA_CHAT)


def tiny_llava_next(seed: int = 0) -> LVLM:
    """LLaVA-NeXT: CLIP tower over anyres tiles (16px base view + up to 3 tiles) + 2-layer Llama."""
    tok = _metaspace()
    config = LlavaNextConfig(
        vision_config=_clip(), text_config=_text(LlamaConfig, tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    return LVLM(model, tok, processor, chat_template=LLAVA_CHAT, prompt_format="plain")


def tiny_llava_onevision(seed: int = 0) -> LVLM:
    """LLaVA-OneVision: SigLIP tower over anyres tiles, shrunk above 2 tiles' worth (anyres_max_2) + 2-layer Qwen2."""
    tok = _qwen_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=_siglip(), text_config=_text(Qwen2Config, tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_2",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=ONEVISION_PINPOINTS)
    return LVLM(model, tok, processor, chat_template=LLAVA_QWEN_CHAT, prompt_format="plain")


BUILDERS = {
    "llava": tiny_llava,
    "llava-qwen2": tiny_llava_qwen2,
    "llava-mistral": tiny_llava_mistral,
    "llava-gemma": tiny_llava_gemma,
    "llava-next": tiny_llava_next,
    "llava-onevision": tiny_llava_onevision,
}


def reference_inputs(lvlm: LVLM, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
    """Model inputs of `text` (holding one `<image>`) and `image` as the checkpoint's transformers processor builds them.

    A check on `Family.image_tokens` that does not share its code: the processors' own prompt expansion.
    """
    config, tok, images = lvlm.model.config, lvlm.inputs.tokenizer, lvlm.inputs.image_processor
    # processor_config.json of llava-hf checkpoints: 1 extra token (CLIP's class token) before the patches.
    extra = 1 if isinstance(config.vision_config, CLIPVisionConfig) else 0
    strategy, patch = config.vision_feature_select_strategy, config.vision_config.patch_size
    if isinstance(config, LlavaOnevisionConfig):
        # LlavaOnevisionProcessor cannot be built without a video processor (torchvision): run its
        # image-token rule on an instance that holds only what that rule reads.
        pixels = dict(images(images=[image], return_tensors="pt"))
        rule = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        rule.image_processor, rule.image_token, rule.vision_feature_select_strategy = images, "<image>", strategy
        rule.num_image_tokens = (config.vision_config.image_size // patch) ** 2
        rule.vision_aspect_ratio = config.vision_aspect_ratio
        expanded = text.replace("<image>", rule.replace_image_token(pixels, 0))
        return {**tok(expanded, return_tensors="pt"), **pixels}
    kind = LlavaNextProcessor if isinstance(config, LlavaNextConfig) else LlavaProcessor
    processor = kind(image_processor=images, tokenizer=tok, patch_size=patch, num_additional_image_tokens=extra,
                     vision_feature_select_strategy=strategy)
    return dict(processor(images=image, text=text, return_tensors="pt"))
