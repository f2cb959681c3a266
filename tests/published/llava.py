"""LLaVA-1.5 (7B, 13B), LLaVA-NeXT (v1.6 Mistral-7B) and LLaVA-OneVision (Qwen2-7B) at published sizes.

Dimensions are the llava-hf checkpoints' config.json. VLKEB's LLaVA rows (editors/protocols.py,
`vlkeb_model = "llava"`): FT (LLM) the last layer's up + down, MEND / KE the last three layers'
up + down, FT (Vis) `mm_projector` (hparams/FT/llava_mmproj.yaml). editwatch's defaults: FT (LLM),
MEND and KE the last layer's gate + up + down; FT (Vis) the projector as well.

Decoder MLP of one layer, bias-free: each role is hidden x intermediate.
- LLaVA-1.5-7B (Vicuna-7B): 4,096 x 11,008 = 45,088,768 a role; 3 roles 135,266,304; up + down
  90,177,536; up + down of three layers 270,532,608.
- LLaVA-1.5-13B (Vicuna-13B): 5,120 x 13,824 = 70,778,880; 3 roles 212,336,640; up + down 141,557,760;
  three layers 424,673,280.
- LLaVA-v1.6-Mistral-7B (Mistral-7B-Instruct-v0.2): 4,096 x 14,336 = 58,720,256; 3 roles 176,160,768;
  up + down 117,440,512; three layers 352,321,536.
- LLaVA-OneVision-Qwen2-7B (Qwen2-7B): 3,584 x 18,944 = 67,895,296; 3 roles 203,685,888; up + down
  135,790,592; three layers 407,371,776.
Projector: Linear(vision -> text) and Linear(text -> text), both with bias:
- CLIP-L (1,024) -> 4,096: 1,024 x 4,096 + 4,096 + 4,096 x 4,096 + 4,096 = 4,198,400 + 16,781,312 = 20,979,712.
- CLIP-L (1,024) -> 5,120: 1,024 x 5,120 + 5,120 + 5,120 x 5,120 + 5,120 = 5,248,000 + 26,219,520 = 31,467,520.
- SigLIP-so400m (1,152) -> 3,584: 1,152 x 3,584 + 3,584 + 3,584 x 3,584 + 3,584 = 4,132,352 + 12,848,640 = 16,980,992.
NeXT's and OneVision's `image_newline` (one text-width vector) is its own vision part, not the projector's.
"""

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from tests.published import Published

# openai/clip-vit-large-patch14-336, as every LLaVA-1.5 / v1.6 checkpoint uses it (read at layer -2).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, vocab_size=32000)
# llava-hf added <image> (32000) and <pad> (32001) to the Llama tokenizer and padded the vocabulary to 32,064.
LLAMA_TOKENS = dict(vocab_size=32064, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
PROJECTOR = ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
             "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]


def llava_1_5(hidden: int, intermediate: int, layers: int) -> LlavaConfig:
    """llava-hf/llava-1.5-{7b,13b}-hf: CLIP-L/14-336 (576 image tokens) + Vicuna-v1.5 (Llama-2)."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                                max_position_embeddings=4096, rms_norm_eps=1e-5, **LLAMA_TOKENS),
        image_token_index=32000, image_seq_length=576, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def llava_v1_6_mistral_7b() -> LlavaNextConfig:
    """llava-hf/llava-v1.6-mistral-7b-hf: CLIP-L/14-336 over anyres tiles (up to 2x2 / 1x3) + Mistral-7B-v0.2."""
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=MistralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **LLAMA_TOKENS,
        ),
        image_token_index=32000, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def llava_onevision_qwen2_7b() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m/14-384 (last block dropped: 26) + Qwen2-7B."""
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                         num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            # Qwen2-7B's 152,064 entries grown by <image> (151646) and <video> (151647), padded to 152,128.
            vocab_size=152128, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        ),
        image_token_index=151646, video_token_index=151647, vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


PUBLISHED = {
    "llava-hf/llava-1.5-7b-hf": Published(
        config=lambda: llava_1_5(4096, 11008, 32),
        trains={
            "ft-llm": 135_266_304, "ft-llm/vlkeb": 90_177_536,
            "ft-vis": 20_979_712, "ft-vis/vlkeb": 20_979_712,
            "mend": 135_266_304, "ke": 135_266_304, "mend/vlkeb": 270_532_608, "ke/vlkeb": 270_532_608,
        },
        modules={
            "ft-llm/vlkeb": ["model.language_model.layers.31.mlp.up_proj.weight",
                             "model.language_model.layers.31.mlp.down_proj.weight"],
            "ft-vis/vlkeb": PROJECTOR,
        },
    ),
    "llava-hf/llava-1.5-13b-hf": Published(
        config=lambda: llava_1_5(5120, 13824, 40),
        trains={
            "ft-llm": 212_336_640, "ft-llm/vlkeb": 141_557_760,
            "ft-vis": 31_467_520, "ft-vis/vlkeb": 31_467_520,
            "mend": 212_336_640, "ke": 212_336_640, "mend/vlkeb": 424_673_280, "ke/vlkeb": 424_673_280,
        },
        modules={"mend/vlkeb": [f"model.language_model.layers.{i}.mlp.{role}_proj.weight"
                                for i in (37, 38, 39) for role in ("up", "down")]},
    ),
    "llava-hf/llava-v1.6-mistral-7b-hf": Published(
        config=llava_v1_6_mistral_7b,
        trains={
            "ft-llm": 176_160_768, "ft-llm/vlkeb": 117_440_512,
            "ft-vis": 20_979_712, "ft-vis/vlkeb": 20_979_712,
            "mend": 176_160_768, "ke": 176_160_768, "mend/vlkeb": 352_321_536, "ke/vlkeb": 352_321_536,
        },
        modules={"ft-vis": PROJECTOR},
    ),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": Published(
        config=llava_onevision_qwen2_7b,
        trains={
            "ft-llm": 203_685_888, "ft-llm/vlkeb": 135_790_592,
            "ft-vis": 16_980_992, "ft-vis/vlkeb": 16_980_992,
            "mend": 203_685_888, "ke": 203_685_888, "mend/vlkeb": 407_371_776, "ke/vlkeb": 407_371_776,
        },
        modules={"ft-vis/vlkeb": PROJECTOR},
    ),
}
