"""PaliGemma and Gemma 3 at published sizes (SigLIP so400m/14 towers: 27 layers, 1152 wide, MLP 4304)."""

from transformers import Gemma3Config, Gemma3TextConfig, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

from tests.published import Published

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
              vision_use_head=False)


def paligemma_3b_pt_224() -> PaliGemmaConfig:
    """google/paligemma-3b-pt-224: SigLIP at 224px (256 image tokens) + Gemma-2B."""
    return PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**SO400M, image_size=224, projection_dim=2048),
        text_config=GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216),
        image_token_index=257152, projection_dim=2048, hidden_size=2048, vocab_size=257216,
    )


def gemma_3_4b_it() -> Gemma3Config:
    """google/gemma-3-4b-it: SigLIP at 896px pooled to 256 soft tokens + Gemma 3 4B (34 layers)."""
    return Gemma3Config(
        vision_config=SiglipVisionConfig(**SO400M, image_size=896),
        text_config=Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                                     sliding_window=1024, query_pre_attn_scalar=256),
        mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
    )


# Gemma-2B layer 17: gate + up + down = 3 x 2048 x 16384; up + down = 2 x 2048 x 16384.
GEMMA_2B_ALL, GEMMA_2B_UP_DOWN = 100_663_296, 67_108_864
# PaliGemma's projector: one linear layer 1152 -> 2048 with bias = 1152 x 2048 + 2048.
PALIGEMMA_PROJECTOR = 2_361_344
# Gemma 3 4B layer 33: gate + up + down = 3 x 2560 x 10240; up + down = 2 x 2560 x 10240.
GEMMA3_4B_ALL, GEMMA3_4B_UP_DOWN = 78_643_200, 52_428_800
# Gemma 3's projector: soft-embedding RMSNorm 1152 + projection matrix 1152 x 2560 (no bias).
GEMMA3_PROJECTOR = 2_950_272

PUBLISHED = {
    "google/paligemma-3b-pt-224": Published(
        config=paligemma_3b_pt_224,
        trains={
            "ft-llm": GEMMA_2B_ALL, "ft-llm/vlkeb": GEMMA_2B_UP_DOWN, "mend": GEMMA_2B_ALL, "ke": GEMMA_2B_ALL,
            "mend/vlkeb": 3 * GEMMA_2B_UP_DOWN, "ke/vlkeb": 3 * GEMMA_2B_UP_DOWN,  # layers 15-17: 201,326,592
            "ft-vis": PALIGEMMA_PROJECTOR, "ft-vis/vlkeb": PALIGEMMA_PROJECTOR,
        },
    ),
    "google/gemma-3-4b-it": Published(
        config=gemma_3_4b_it,
        trains={
            "ft-llm": GEMMA3_4B_ALL, "ft-llm/vlkeb": GEMMA3_4B_UP_DOWN, "mend": GEMMA3_4B_ALL, "ke": GEMMA3_4B_ALL,
            "mend/vlkeb": 3 * GEMMA3_4B_UP_DOWN, "ke/vlkeb": 3 * GEMMA3_4B_UP_DOWN,  # layers 31-33: 157,286,400
            "ft-vis": GEMMA3_PROJECTOR, "ft-vis/vlkeb": GEMMA3_PROJECTOR,
        },
    ),
}
