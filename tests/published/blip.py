"""BLIP-2 (OPT-2.7b, VLKEB's model) and InstructBLIP (Vicuna-7b) at published sizes.

Both Q-Formers are BERT-base: 12 layers 768 wide, cross-attention to the 1408-wide ViT in every
2nd layer (6 layers). Per layer: self-attention 4 x (768^2 + 768) + LayerNorm 1,536 = 2,363,904;
query FFN (768 x 3072 + 3072) + (3072 x 768 + 768) + 1,536 = 4,723,968; cross-attention
2 x (768^2 + 768) + 2 x (1408 x 768 + 768) + 1,536 = 3,346,944. The query tokens are 32 x 768 = 24,576.
"""

from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
)

from tests.published import Published

# EVA ViT-g/14 at 224px, as both checkpoints ship it.
EVA = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
           patch_size=14)
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               cross_attention_frequency=2, encoder_hidden_size=1408)


def blip2_opt_2_7b() -> Blip2Config:
    """Salesforce/blip2-opt-2.7b."""
    return Blip2Config(
        vision_config=Blip2VisionConfig(**EVA),
        qformer_config=Blip2QFormerConfig(**QFORMER, vocab_size=30522),
        text_config=OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                              vocab_size=50304, word_embed_proj_dim=2560, max_position_embeddings=2048),
        num_query_tokens=32, image_token_index=50265,
    )


def instructblip_vicuna_7b() -> InstructBlipConfig:
    """Salesforce/instructblip-vicuna-7b."""
    return InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**EVA),
        qformer_config=InstructBlipQFormerConfig(**QFORMER, vocab_size=30523),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, vocab_size=32002),
        num_query_tokens=32, image_token_index=32001,
    )


# OPT-2.7b layer 31: fc1 + fc2 = 2 x 2560 x 10240 (OPT has no gate: editwatch's default is VLKEB's).
OPT_LAST = 52_428_800
# BLIP-2 Q-Former body: LayerNorm 1,536 + 12 x (2,363,904 + 4,723,968) + 6 x 3,346,944.
BLIP2_QFORMER = 105_137_664
# Vicuna-7b layer 31: gate + up + down = 3 x 4096 x 11008; up + down = 2 x 4096 x 11008.
VICUNA_ALL, VICUNA_UP_DOWN = 135_266_304, 90_177_536
# InstructBLIP's Q-Former also embeds the prompt: words 30523 x 768 + positions 512 x 768 + LayerNorm
# 1,536 = 23,836,416, and every layer keeps a text FFN of 4,723,968 beside the query FFN:
# 23,836,416 + 12 x (2,363,904 + 2 x 4,723,968) + 6 x 3,346,944.
INSTRUCTBLIP_QFORMER = 185_660_160

PUBLISHED = {
    "Salesforce/blip2-opt-2.7b": Published(
        config=blip2_opt_2_7b,
        trains={
            "ft-llm": OPT_LAST, "ft-llm/vlkeb": OPT_LAST, "mend": OPT_LAST, "ke": OPT_LAST,
            "mend/vlkeb": 3 * OPT_LAST, "ke/vlkeb": 3 * OPT_LAST,  # layers 29-31: 157,286,400
            "ft-vis": BLIP2_QFORMER + 24_576,  # Q-Former and query tokens: 105,162,240
            "ft-vis/vlkeb": BLIP2_QFORMER,  # VLKEB's "Qformer" substring misses query_tokens
        },
    ),
    "Salesforce/instructblip-vicuna-7b": Published(
        config=instructblip_vicuna_7b,
        trains={
            "ft-llm": VICUNA_ALL, "ft-llm/vlkeb": VICUNA_UP_DOWN, "mend": VICUNA_ALL, "ke": VICUNA_ALL,
            "mend/vlkeb": 3 * VICUNA_UP_DOWN, "ke/vlkeb": 3 * VICUNA_UP_DOWN,  # 270,532,608
            "ft-vis": INSTRUCTBLIP_QFORMER + 24_576,  # 185,684,736
            "ft-vis/vlkeb": INSTRUCTBLIP_QFORMER,
        },
    ),
}
