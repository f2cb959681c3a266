"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL at published sizes (the checkpoints' config.json).

VLKEB's Qwen-VL rows (editors/protocols.py, `vlkeb_model = "qwenvl"`) tune the whole gated MLP
(w1, w2, c_proj = gate, up, down): FT (LLM) the last layer, MEND / KE the last three; FT (Vis) the
last ViT block's MLP. editwatch's defaults: FT (LLM), MEND and KE the last layer's gate+up+down;
FT (Vis) the projector (the patch merger; on Qwen3-VL also the three DeepStack mergers).

Decoder MLP of one layer, bias-free: 3 x hidden x intermediate.
- Qwen2-VL-7B / Qwen2.5-VL-7B (Qwen2-7B decoder): 3 x 3,584 x 18,944 = 3 x 67,895,296 = 203,685,888;
  three layers 611,057,664.
- Qwen3-VL-8B (Qwen3-8B decoder): 3 x 4,096 x 12,288 = 3 x 50,331,648 = 150,994,944; three layers 452,984,832.
"""

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

from tests.published import Published

# Token ids shared by the three checkpoints (Qwen2 tokenizer): <|vision_start|> 151652, <|vision_end|> 151653,
# <|image_pad|> 151655, <|video_pad|> 151656.
TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, sliding_window=32768,
                max_window_layers=28, bos_token_id=151643, eos_token_id=151645)


def qwen2_vl_7b() -> Qwen2VLConfig:
    """Qwen/Qwen2-VL-7B-Instruct: 32-block ViT (width 1,280, MLP 5,120, 14-px patches) + Qwen2-7B."""
    return Qwen2VLConfig(
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                           num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(**QWEN2_7B, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        tie_word_embeddings=False, **TOKENS,
    )


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct: 32-block windowed ViT (width 1,280, gated MLP 3,420) + Qwen2-7B."""
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        text_config=dict(**QWEN2_7B, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        tie_word_embeddings=False, **TOKENS,
    )


def qwen3_vl_8b() -> Qwen3VLConfig:
    """Qwen/Qwen3-VL-8B-Instruct: 27-block SigLIP-2 ViT (width 1,152, 16-px patches, DeepStack 8/16/24) + Qwen3-8B."""
    return Qwen3VLConfig(
        vision_config=dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
                           num_heads=16, out_hidden_size=4096, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         max_position_embeddings=262144, bos_token_id=151643, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True, "rope_theta": 5000000.0}),
        tie_word_embeddings=False, **TOKENS,
    )


PUBLISHED = {
    "Qwen/Qwen2-VL-7B-Instruct": Published(
        config=qwen2_vl_7b,
        trains={
            "ft-llm": 203_685_888, "ft-llm/vlkeb": 203_685_888,
            # Merger: LayerNorm(1,280) 2,560 + Linear(5,120 -> 5,120) 26,219,520 + Linear(5,120 -> 3,584) 18,353,664.
            "ft-vis": 44_575_744,
            # Block 31 MLP: fc1 1,280 x 5,120 + 5,120 and fc2 5,120 x 1,280 + 1,280.
            "ft-vis/vlkeb": 13_113_600,
            "mend": 203_685_888, "ke": 203_685_888, "mend/vlkeb": 611_057_664, "ke/vlkeb": 611_057_664,
        },
        modules={"ft-vis/vlkeb": [f"model.visual.blocks.31.mlp.{p}" for p in
                                  ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]},
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": Published(
        config=qwen2_5_vl_7b,
        trains={
            "ft-llm": 203_685_888, "ft-llm/vlkeb": 203_685_888,
            # Merger: RMSNorm(1,280) 1,280 (no bias) + 26,219,520 + 18,353,664.
            "ft-vis": 44_574_464,
            # Block 31 gated MLP, biased: 2 x (1,280 x 3,420 + 3,420) + (3,420 x 1,280 + 1,280).
            "ft-vis/vlkeb": 13_140_920,
            "mend": 203_685_888, "ke": 203_685_888, "mend/vlkeb": 611_057_664, "ke/vlkeb": 611_057_664,
        },
    ),
    "Qwen/Qwen3-VL-8B-Instruct": Published(
        config=qwen3_vl_8b,
        trains={
            "ft-llm": 150_994_944, "ft-llm/vlkeb": 150_994_944,
            # Merger over 2x2 patches (4 x 1,152 = 4,608): LayerNorm(1,152) 2,304 + Linear(4,608 -> 4,608)
            # 21,238,272 + Linear(4,608 -> 4,096) 18,878,464 = 40,119,040; each of 3 DeepStack mergers
            # normalises after the shuffle, LayerNorm(4,608) 9,216: 40,125,952. 40,119,040 + 3 x 40,125,952.
            "ft-vis": 160_496_896,
            # Block 26 MLP: linear_fc1 1,152 x 4,304 + 4,304 and linear_fc2 4,304 x 1,152 + 1,152.
            "ft-vis/vlkeb": 9_921_872,
            "mend": 150_994_944, "ke": 150_994_944, "mend/vlkeb": 452_984_832, "ke/vlkeb": 452_984_832,
        },
    ),
}
