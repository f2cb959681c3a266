"""What a model family declares: image placement and tokens, model inputs, image features, parameter layout.

Families are declared by config class, never guessed from a model name (STYLE.md, point 4).
A family is one `Family` subclass in one module of this package; text decoders are declared
once in `DECODERS` by their config class, so every family over that decoder shares its layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig


class UnsupportedModelError(ValueError):
    """The model's config class is not one of the declared families, or a part of it is not supported."""


@dataclass(frozen=True)
class Decoder:
    """Where a text decoder keeps its blocks and the MLP weights of one block, by role."""

    layers: str  # path of the ModuleList of blocks, relative to the decoder base model
    mlp: dict[str, str]  # role ("gate", "up", "down") -> parameter path inside one block

    def modules(self, roles: Sequence[str] | None) -> list[str]:
        """Parameter paths of the chosen MLP roles (all when None), in the declared order."""
        if roles is None:
            return list(self.mlp.values())
        unknown = [r for r in roles if r not in self.mlp]
        if unknown:
            raise ValueError(f"MLP role(s) {', '.join(unknown)} not in this decoder. Available: {', '.join(self.mlp)}")
        return [path for role, path in self.mlp.items() if role in roles]


# Llama-style gated MLP: down(act(gate(x)) * up(x)). VLKEB's FT (LLM) tunes up and down only.
GATED = Decoder("layers", {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"})

DECODERS: dict[type[PreTrainedConfig], Decoder] = {
    LlamaConfig: GATED,
    MistralConfig: GATED,
    Qwen2Config: GATED,
    Qwen3Config: GATED,
    GemmaConfig: GATED,
    Gemma2Config: GATED,
    Gemma3TextConfig: GATED,
    Qwen2VLTextConfig: GATED,
    Qwen2_5_VLTextConfig: GATED,
    Qwen3VLTextConfig: GATED,
    # OPT's MLP is fc2(relu(fc1(x))): fc1 plays "up", fc2 "down".
    OPTConfig: Decoder("decoder.layers", {"up": "fc1.weight", "down": "fc2.weight"}),
}


def stack_features(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image features [(N, D), ...] as one (B, N, D) tensor; every image of a batch must give the same N."""
    sizes = sorted({part.shape[0] for part in parts})
    if len(sizes) != 1:
        raise ValueError(f"images of one batch have different token counts {sizes}; embed them apart")
    return torch.stack(list(parts))


class Family:
    """One LVLM family: its model class, image placeholders, inputs and parameter layout.

    Hooks with a default cover the common case (a fixed run of one placeholder token per image,
    pixels concatenated along the batch); a family overrides only what differs.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PreTrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    # "inline": the prompt text holds one placeholder that is replaced by the image's tokens;
    # "prefix": the image tokens go before everything, BOS included (BLIP-2, PaliGemma).
    placement: ClassVar[Literal["inline", "prefix"]]
    image_token: ClassVar[str]  # the placeholder token whose positions receive image features
    image_text: ClassVar[str]  # what a plain-format prompt writes where the image goes
    # What the checkpoints' own chat templates write for an image when it is not `image_token`
    # (Gemma 3 writes "<start_of_image>"): replaced by `image_text` in a chat-format prompt.
    chat_image_marker: ClassVar[str | None] = None
    # What a VLKEB-format prompt writes before the question; None: the bare placeholder for inline
    # families (the image right after BOS, as VLKEB feeds LLaVA), nothing for prefix ones (BLIP-2's
    # image goes before BOS there too).
    vlkeb_image_text: ClassVar[str | None] = None
    # What the family's processor writes after every prompt, so the model was trained to read the answer right after
    # it (PaliGemma's "\n"); a prompt ending in whitespace takes the answer without the usual space. It ends the
    # prompt in every format, VLKEB's bare one too (VLKEB ran no PaliGemma) and a chat template's.
    prompt_end: ClassVar[str] = ""
    decoder_path: ClassVar[str]  # module path of the text decoder's base model
    text_module: ClassVar[str] = ""  # module that runs text-only input ("" = the whole model)
    # part name -> module/parameter paths; integer segments may count from the end ("blocks.-1.mlp").
    vision_parts: ClassVar[dict[str, tuple[str, ...]]]
    # What editwatch's FT (Vis) tunes by default: the part that maps vision features into the language model.
    default_vision_parts: ClassVar[tuple[str, ...]]
    # What VLKEB's FT (Vis) tunes on the nearest model of its paper (hparams/FT/*.yaml): LLaVA's
    # mm_projector, BLIP-2's Q-Former (without query tokens), Qwen-VL's last ViT block MLP.
    vlkeb_vision_parts: ClassVar[tuple[str, ...]]
    # The model of VLKEB's paper whose hyperparameters a VLKEB-protocol run borrows (editors/protocols.py).
    vlkeb_model: ClassVar[Literal["llava", "blip2", "qwenvl"]] = "llava"
    # Keyword arguments every call of the image processor gets (e.g. Idefics3's tile grid, which
    # checkpoints do not save in their processor config).
    processor_kwargs: ClassVar[dict[str, Any]] = {}
    # True where `image_features(model, pixels)[i]` is exactly what the model's forward puts in image i's placeholder
    # slots, so scoring may hand it precomputed features (`mm_encoder_outputs`) instead of pixels: an image that
    # several queries of a batch or of a run show then goes through the vision path once.
    shares_image_features: ClassVar[bool] = False
    # True where, besides `shares_image_features`, the decoder sees an image only through its placeholder slots and
    # counts positions one by one (no image-dependent position ids or extra inputs): rows that show the same image
    # after the same tokens may then share the decoder's keys and values up to the image's last slot, and run only
    # their own tokens after it (`LVLM.score`). On LLaVA-1.5 that prefix is ~580 of a query's ~600 tokens.
    shares_image_prefix: ClassVar[bool] = False

    def vision_part_paths(self, config: PreTrainedConfig, part: str) -> tuple[str, ...]:
        """The module or parameter paths of vision part `part` (a key of `vision_parts`) on a model of `config`."""
        return self.vision_parts[part]

    def vlkeb_image(self) -> str:
        """The image marker of a VLKEB-format prompt (see `vlkeb_image_text`)."""
        if self.vlkeb_image_text is not None:
            return self.vlkeb_image_text
        return self.image_token if self.placement == "inline" else ""

    def check(self, config: PreTrainedConfig) -> None:
        """Raise UnsupportedModelError if this config uses a part the family cannot run (checked at load)."""
        self.decoder(config)

    def load_extras(self, source: str) -> dict[str, Any]:
        """Extra processing parts a checkpoint ships beside tokenizer and image processor (e.g. a Q-Former tokenizer)."""
        return {}

    def image_token_count(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor]) -> int:
        """Number of image-token slots one processed image fills in `input_ids`."""
        raise NotImplementedError

    def image_tokens(self, config: PreTrainedConfig, pixels: dict[str, torch.Tensor], tokenizer: Any) -> list[int]:
        """The token ids that stand for one processed image in `input_ids` (replacing the placeholder)."""
        return [config.image_token_id] * self.image_token_count(config, pixels)

    def query_pixels(self, prompt: str, pixels: dict[str, torch.Tensor], extras: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-query vision inputs: the processed image plus anything the vision path reads from the prompt."""
        return pixels

    def stack_pixels(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch's vision inputs from each query's (concatenated along dim 0)."""
        return {key: torch.cat([item[key] for item in items]) for key in items[0]}

    def extra_inputs(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Family-specific model inputs derived from the token ids of an image batch."""
        return {}

    def prefix_inputs(
        self, config: PreTrainedConfig, input_ids: torch.Tensor, prompt_lengths: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Model inputs of any batch that depend on where each row's prompt ends (a prefix-LM's attention)."""
        return {}

    def image_features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token image features (B, N, D) as the decoder receives them, before any pooling."""
        raise NotImplementedError

    def key_image_size(self, config: PreTrainedConfig, image_processor: Any) -> tuple[int, int] | None:
        """(height, width) images are resized to before a memory key is embedded; None: the processor fixes it."""
        # Dynamic-resolution families (token count follows the image size) override this, so that
        # keys of any image keep one token layout (editors/edit_memory.py).
        return None

    def decoder(self, config: PreTrainedConfig) -> Decoder:
        """The decoder layout of this model's text config."""
        text_config = config.get_text_config()
        decoder = DECODERS.get(type(text_config))
        if decoder is None:
            known = ", ".join(sorted(c.__name__ for c in DECODERS))
            raise UnsupportedModelError(
                f"{self.name}: text decoder {type(text_config).__name__} is not supported; supported decoders: {known}"
            )
        return decoder
