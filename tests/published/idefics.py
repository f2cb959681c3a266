"""Idefics3 and SmolVLM at published sizes (SigLIP so400m/14 towers: 27 layers, 1152 wide, MLP 4304).

SmolVLM (v1) checkpoints ship as `Idefics3Config`; SmolVLM2 ships as `SmolVLMConfig`.
"""

from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig

from tests.published import Published

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)


def idefics3_8b_llama3() -> Idefics3Config:
    """HuggingFaceM4/Idefics3-8B-Llama3: 364px tiles, 2x2 pixel shuffle (169 tokens a tile), Llama 3.1 8B."""
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**SO400M, image_size=364),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128259,
                                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        scale_factor=2, image_token_id=128257,
    )


def smolvlm_instruct() -> Idefics3Config:
    """HuggingFaceTB/SmolVLM-Instruct: 384px tiles, 3x3 pixel shuffle (81 tokens a tile), SmolLM2-1.7B."""
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**SO400M, image_size=384),
        text_config=LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=49155),
        scale_factor=3, image_token_id=49153,
    )


def smolvlm2_2_2b_instruct() -> SmolVLMConfig:
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct: the same tower and decoder sizes as SmolVLM-Instruct."""
    return SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**SO400M, image_size=384),
        text_config=LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=49280),
        scale_factor=3, image_token_id=49190,
    )


# Llama 3.1 8B layer 31: gate + up + down = 3 x 4096 x 14336; up + down = 2 x 4096 x 14336.
LLAMA3_ALL, LLAMA3_UP_DOWN = 176_160_768, 117_440_512
# Idefics3's connector: pixel shuffle then one linear layer (1152 x 2^2) -> 4096, no bias.
IDEFICS3_CONNECTOR = 18_874_368
# SmolLM2-1.7B layer 23: gate + up + down = 3 x 2048 x 8192; up + down = 2 x 2048 x 8192.
SMOLLM2_ALL, SMOLLM2_UP_DOWN = 50_331_648, 33_554_432
# SmolVLM's connector: (1152 x 3^2) -> 2048, no bias.
SMOLVLM_CONNECTOR = 21_233_664

_SMOLVLM_TRAINS = {
    "ft-llm": SMOLLM2_ALL, "ft-llm/vlkeb": SMOLLM2_UP_DOWN, "mend": SMOLLM2_ALL, "ke": SMOLLM2_ALL,
    "mend/vlkeb": 3 * SMOLLM2_UP_DOWN, "ke/vlkeb": 3 * SMOLLM2_UP_DOWN,  # layers 21-23: 100,663,296
    "ft-vis": SMOLVLM_CONNECTOR, "ft-vis/vlkeb": SMOLVLM_CONNECTOR,
}

PUBLISHED = {
    "HuggingFaceM4/Idefics3-8B-Llama3": Published(
        config=idefics3_8b_llama3,
        trains={
            "ft-llm": LLAMA3_ALL, "ft-llm/vlkeb": LLAMA3_UP_DOWN, "mend": LLAMA3_ALL, "ke": LLAMA3_ALL,
            "mend/vlkeb": 3 * LLAMA3_UP_DOWN, "ke/vlkeb": 3 * LLAMA3_UP_DOWN,  # layers 29-31: 352,321,536
            "ft-vis": IDEFICS3_CONNECTOR, "ft-vis/vlkeb": IDEFICS3_CONNECTOR,
        },
    ),
    "HuggingFaceTB/SmolVLM-Instruct": Published(config=smolvlm_instruct, trains=_SMOLVLM_TRAINS),
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": Published(config=smolvlm2_2_2b_instruct, trains=_SMOLVLM_TRAINS),
}
