"""A model family that transformers does not ship, registered from outside editwatch.

It stands in for mPLUG-Owl2 / MiniGPT-4 / the original Qwen-VL: its own config and model classes
(registered with transformers' Auto classes so a saved folder loads), and its own layout: the
image goes before BOS, as mPLUG-Owl2 feeds it (VLKEB: coco_caption.py with tokenizer_image_token).
"""

from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from editors.families.llava import Llava


class TinyOwlConfig(LlavaConfig):
    """Config of the out-of-tree model (a LLaVA layout under its own model type)."""

    model_type = "tiny_owl"


class TinyOwlForConditionalGeneration(LlavaForConditionalGeneration):
    """The out-of-tree model class."""

    config_class = TinyOwlConfig


class TinyOwlFamily(Llava):
    """How editwatch runs it: LLaVA's parts, image tokens before BOS."""

    name = "tiny-owl"
    config_class = TinyOwlConfig
    model_class = TinyOwlForConditionalGeneration
    placement = "prefix"
    image_text = ""


AutoConfig.register("tiny_owl", TinyOwlConfig)
