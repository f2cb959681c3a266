"""The embedded default model: a tiny LLaVA (CLIP tower + Llama decoder) with a word-level tokenizer.

Built from configs in code and saved with `save_pretrained`, so it loads through the LVLM
adapter exactly as `llava-hf/llava-1.5-7b-hf` would.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from editors import LVLM
from editors.prompts import IN_CONTEXT_FACT, IN_CONTEXT_PROMPT, PLAIN_TEMPLATE
from simulator.world.graph import IMAGE_SIZE, World
from simulator.world.schema import IMAGE_RELATIONS, TEXT_RELATIONS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


class ModelConfig(BaseModel):
    """Sizes of the tiny LLaVA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vision_hidden: int = Field(64, description="CLIP tower width")
    vision_layers: int = Field(2, description="CLIP tower depth")
    patch_size: int = Field(8, description="pixels per patch side (32x32 images -> 16 patches)")
    hidden: int = Field(128, description="decoder width")
    layers: int = Field(3, description="decoder depth")
    heads: int = Field(4, description="attention heads (tower and decoder)")
    mlp_ratio: int = Field(2, description="MLP width / model width")
    # 0.02 (the transformers default) plateaus on this task; 0.1 learns fast.
    initializer_range: float = Field(0.1, description="std of the initial decoder weights")
    # CLIP's own init (std ~0.02 scaled by depth) left the image pathway at chance for
    # thousands of steps; the same std as the decoder lets image facts learn with the text.
    vision_initializer_range: float = Field(0.1, description="std of the initial tower and projector weights")


def _world_strings(world: World) -> list[str]:
    """Every text the model can be shown for this world (templates filled with every name)."""
    texts = [PLAIN_TEMPLATE, IN_CONTEXT_FACT, IN_CONTEXT_PROMPT]
    for relation in IMAGE_RELATIONS.values():
        texts += [*relation.templates, *relation.hop_questions]
    for relation in TEXT_RELATIONS.values():
        texts += [t.format(x="") for t in relation.templates]
    for names in world.names.values():
        texts += names
    return texts


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary; BOS prepended as Llama does."""
    split = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for text in _world_strings(world):
        for word, _ in split.pre_tokenize_str(text.replace("{image}", " ").replace("{prompt}", " ").replace("{answer}", " ")):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(world: World, config: ModelConfig, seed: int) -> LVLM:
    """A freshly initialised tiny LLaVA for `world`, wrapped in the LVLM adapter."""
    tokenizer = build_tokenizer(world)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden, intermediate_size=config.vision_hidden * config.mlp_ratio,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.heads,
        image_size=IMAGE_SIZE, patch_size=config.patch_size, projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.hidden * config.mlp_ratio,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, initializer_range=config.initializer_range, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    llava = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // config.patch_size) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    _init_linear(model.model.vision_tower, config.vision_initializer_range)
    _init_linear(model.model.multi_modal_projector, config.vision_initializer_range)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LVLM(model, tokenizer, processor, prompt_format="plain", name="editwatch-default")


@torch.no_grad()
def _init_linear(module: torch.nn.Module, std: float) -> None:
    """Normal(0, std) weights and zero biases for every linear layer of `module`."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.weight.normal_(0.0, std)
            if layer.bias is not None:
                layer.bias.zero_()
