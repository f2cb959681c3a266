"""Tiny BLIP-2-style models: ViT + Q-Former + a 2-layer OPT or Llama decoder; InstructBLIP; BLIP-2 over T5."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from editors import LVLM
from editors.families.blip import QFORMER_TOKENIZER
from tests.tiny.tokenizers import CORPUS, HIDDEN, bytelevel_tokenizer, metaspace_tokenizer


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


def _randomise(model: torch.nn.Module) -> None:
    # BLIP initialises query tokens to zero and the ViT near zero: randomise so images matter.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)


def qformer_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style uncased WordPiece with [CLS] ... [SEP], like InstructBLIP's Q-Former tokenizer."""
    # A fixed vocabulary (the corpus's words, then single characters as word starts and "##" pieces):
    # WordPiece training numbers ties differently from run to run, and every build must be the same model.
    pre, norm = pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True)
    words = sorted({w for line in CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *words, *chars, *(f"##{c}" for c in chars)]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_instructblip(seed: int = 0) -> LVLM:
    """InstructBLIP (Vicuna = Llama decoder): ViT + 1-layer Q-Former reading the prompt, 4 query tokens."""
    tok, qtok = metaspace_tokenizer(["<image>"]), qformer_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
    )
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN),
        qformer_config=InstructBlipQFormerConfig(
            num_hidden_layers=1, vocab_size=len(qtok), pad_token_id=qtok.pad_token_id, **HIDDEN
        ),
        text_config=text, num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    _randomise(model)
    processor = BlipImageProcessorPil(size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, prompt_format="plain", extras={QFORMER_TOKENIZER: qtok})


def tiny_blip2_t5(seed: int = 0) -> Blip2ForConditionalGeneration:
    """A BLIP-2 over a 2-layer T5 (Flan-T5's architecture): the encoder-decoder case editwatch refuses."""
    config = Blip2Config(
        vision_config=Blip2VisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN),
        qformer_config=Blip2QFormerConfig(num_hidden_layers=1, vocab_size=50, **HIDDEN),
        text_config=T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             decoder_start_token_id=0),
        num_query_tokens=4, image_token_index=3,
    )
    torch.manual_seed(seed)
    return Blip2ForConditionalGeneration(config)


BUILDERS = {
    "blip2-opt": lambda: tiny_blip2("opt"),
    "blip2-llama": lambda: tiny_blip2("llama"),
    "instructblip": tiny_instructblip,
}
