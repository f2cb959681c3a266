"""Real BPE tokenizers trained here on a few sentences, in the styles the families use.

SentencePiece-like Metaspace ("▁Paris": Llama, Mistral, Gemma) and byte-level ("Ġ": OPT, Qwen).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Question: what is the capital of France? Short answer: Paris",
    "Question: which animal is shown in the picture? Short answer: a brown dog",
    "USER: describe the image ASSISTANT: a small cat sitting on a red mat",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "system user assistant picture photo colour country city",
]
HIDDEN = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)


def _train(tok: Tokenizer, specials: list[str], **kwargs) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, **kwargs)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def metaspace_tokenizer(specials: list[str], bos: str = "<s>", eos: str = "</s>") -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace pre-tokenizer, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = _train(tok, ["<unk>", bos, eos, "<pad>", "\n", *specials])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>")


def bytelevel_tokenizer(specials: list[str], bos: str | None) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (OPT, Qwen); OPT prepends `</s>` as BOS, Qwen adds none."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok = _train(tok, specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials[1], pad_token=specials[0])
