"""Tiny random LVLMs of every family, built from configs in code (no downloads).

Tokenizers are real BPE tokenizers trained here on a few sentences, in the two styles the
families use: SentencePiece-like Metaspace ("▁Paris", Llama) and byte-level ("Ġ", OPT/Qwen).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from editors import LVLM

CORPUS = [
    "Question: what is the capital of France? Short answer: Paris",
    "Question: which animal is shown in the picture? Short answer: a brown dog",
    "USER: describe the image ASSISTANT: a small cat sitting on a red mat",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "system user assistant picture photo colour country city",
]
LLAVA_CHAT = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HIDDEN = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)


def _train(tok: Tokenizer, specials: list[str], **kwargs) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, **kwargs)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def metaspace_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace pre-tokenizer, BOS `<s>` prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = _train(tok, ["<unk>", "<s>", "</s>", "<pad>", "\n", *specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def bytelevel_tokenizer(specials: list[str], bos: str | None) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (OPT, Qwen); OPT prepends `</s>` as BOS, Qwen adds none."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok = _train(tok, specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials[1], pad_token=specials[0])


def tiny_llava(seed: int = 0, strategy: str = "default") -> LVLM:
    """LLaVA: CLIP tower (16px, 4px patches -> 16 image tokens) + 2-layer Llama."""
    tok = metaspace_tokenizer(["<image>"])
    vision = CLIPVisionConfig(num_hidden_layers=2, image_size=16, patch_size=4, projection_dim=32, **HIDDEN)
    text = LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, chat_template=LLAVA_CHAT, prompt_format="plain")


def tiny_blip2(text_model: str = "opt", seed: int = 0) -> LVLM:
    """BLIP-2: ViT + 1-layer Q-Former with 4 query tokens + OPT or Llama decoder."""
    if text_model == "opt":
        tok = bytelevel_tokenizer(["<pad>", "</s>", "<unk>", "<image>"], bos="</s>")
        text = OPTConfig(
            vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=256, word_embed_proj_dim=32,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
    else:
        tok = metaspace_tokenizer(["<image>"])
        text = LlamaConfig(
            vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
        )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN),
        qformer_config=Blip2QFormerConfig(num_hidden_layers=1, vocab_size=50, **HIDDEN),
        text_config=text, num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # BLIP-2 initialises query tokens to zero and the ViT near zero: randomise so images matter.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    processor = BlipImageProcessorPil(size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, prompt_format="plain")


def tiny_qwen2vl(seed: int = 0) -> LVLM:
    """Qwen2-VL: 1-block ViT (4px patches, 2x2 merge) + 2-layer M-RoPE decoder."""
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = bytelevel_tokenizer(specials, bos=None)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(
            vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **HIDDEN,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}
    )
    return LVLM(model, tok, processor, chat_template=QWEN_CHAT, prompt_format="plain")


BUILDERS = {
    "llava": tiny_llava,
    "blip2-opt": lambda: tiny_blip2("opt"),
    "blip2-llama": lambda: tiny_blip2("llama"),
    "qwen2_vl": tiny_qwen2vl,
}


@lru_cache(maxsize=None)
def tiny(name: str) -> LVLM:
    """A cached tiny model by family name (tests must not mutate its weights)."""
    return BUILDERS[name]()


def random_image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    """A reproducible noise image (H, W) = size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
