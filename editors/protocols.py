"""Benchmark protocols as data: the settings a published benchmark ran each method with.

`editwatch` is this project's own defaults (each method's config). `vlkeb` reproduces VLKEB
(Huang et al., NeurIPS 2024 D&B) as far as editwatch's methods allow; every value cites the file of
VLKEB's repository (github.com/VLKEB/VLKEB, branch main) it comes from. VLKEB ran five models; a
family borrows the values of the one its `vlkeb_model` names (LLaVA-1.5 for LLaVA-like
families, BLIP-2 for Q-Former families, Qwen-VL for the Qwen-VL line).

Where editwatch's method is not VLKEB's (SERAC's scope classifier and counterfactual model, IKE's
demonstration wording, the length of hypernetwork training), the protocol keeps editwatch's and
`DEVIATIONS` says so; the README shows both protocols side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from editors.families.base import Family
from editors.prompts import PromptFormat, ProtocolName


# FT uses torch.optim.AdamW(lr=edit_lr) with its default weight decay and a fixed number of steps
# on the edit's NLL (easyeditor/trainer/algs/FT.py L92-111): no early stop.
_FT = {"weight_decay": 0.01, "stop_loss": 0.0}


@dataclass(frozen=True)
class Protocol:
    """Prompt format, locality definition and per-method settings of one benchmark protocol."""

    name: str
    prompt_format: PromptFormat = "auto"
    vlkeb_compat: bool = False
    # method -> VLKEB model ("*" for every model) -> settings; the model's row overrides "*".
    methods: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def method_config(self, method: str, family: Family) -> dict[str, Any]:
        """The settings this protocol gives `method` on a model of `family` (empty: the method's defaults)."""
        rows = self.methods.get(method, {})
        settings = {**rows.get("*", {}), **rows.get(family.vlkeb_model, {})}
        if settings.get("parts") == "vlkeb":  # the family's own analogue of VLKEB's choice
            settings["parts"] = list(family.vlkeb_vision_parts)
        return settings


VLKEB = Protocol(
    name="vlkeb",
    # CaptionDataset feeds "{question} {answer}" with the image right after BOS (coco_caption.py collate_fn).
    prompt_format="vlkeb",
    # T-Loc top-1 / I-Loc top-10 rank by rank over all positions (MultimodalTrainer.py L168-185).
    vlkeb_compat=True,
    methods={
        "ft-llm": {
            # hparams/FT/llava.yaml: model.layers.31.mlp.{up,down}_proj, edit_lr 1e-4, num_steps 10.
            "*": {**_FT, "layers": [-1], "modules": ["up", "down"], "lr": 1e-4, "steps": 10},
            # hparams/FT/blip2.yaml: opt_model...layers.31.fc1/fc2, edit_lr 2e-4, num_steps 15.
            "blip2": {"lr": 2e-4, "steps": 15},
            # hparams/FT/qwenvl.yaml: transformer.h.31.mlp.w1/w2/c_proj (the whole gated MLP), num_steps 20.
            "qwenvl": {"modules": ["gate", "up", "down"], "steps": 20},
        },
        "ft-vis": {
            # hparams/FT/llava_mmproj.yaml: mm_projector, edit_lr 1e-4, num_steps 10.
            "*": {**_FT, "parts": "vlkeb", "lr": 1e-4, "steps": 10},
            # hparams/FT/blip2_qformer.yaml: "Qformer" parameters, edit_lr 2e-4, num_steps 15.
            "blip2": {"lr": 2e-4, "steps": 15},
            # hparams/FT/qwenvl_vit.yaml: visual resblocks.47.mlp (last ViT block), edit_lr 2e-3, num_steps 25.
            "qwenvl": {"lr": 2e-3, "steps": 25},
        },
        "mend": {
            # hparams/MEND/llava.yaml: layers 29-31 up/down_proj, lr 1e-6, edit_lr 1e-4, rank 1920,
            # cedit 0.1, cloc 1.0, accumulate_bs 2.
            "*": {"layers": [-3, -2, -1], "modules": ["up", "down"], "lr": 1e-6, "edit_lr": 1e-4, "rank": 1920,
                  "edit_weight": 0.1, "loc_weight": 1.0, "batch_size": 2},
            "qwenvl": {"modules": ["gate", "up", "down"]},  # hparams/MEND/qwenvl.yaml: w1, w2, c_proj
        },
        "ke": {
            # KE/src/models/ke_train.py: lr 3e-4, max_scale 1, condition_dim 1024, hidden_dim 128; the
            # inner params are MEND's (hparams/TRAINING/KE/*.yaml): layers 29-31 up/down.
            "*": {"layers": [-3, -2, -1], "modules": ["up", "down"], "lr": 3e-4, "max_scale": 1.0,
                  "condition": 1024, "hidden": 128},
            "qwenvl": {"modules": ["gate", "up", "down"]},
        },
        # hparams/IKE/*.yaml: k 32 demonstrations retrieved with all-MiniLM-L6-v2.
        "ike": {"*": {"k": 32}},
    },
)

PROTOCOLS: dict[ProtocolName, Protocol] = {"editwatch": Protocol(name="editwatch"), "vlkeb": VLKEB}

# What a VLKEB-protocol run still does editwatch's way, by method.
DEVIATIONS = {
    "serac": "VLKEB trains a distilbert scope classifier and a separate small counterfactual LM (hparams/SERAC); "
    "editwatch's SERAC uses a calibrated threshold on multimodal keys and the base model with the edit in context",
    "ike": "VLKEB's demonstrations read 'New Fact: {src} {alt}\\nPrompt: ...' built from the train split; "
    "editwatch states the retrieved edits as 'New fact: ...' (the wording the embedded model knows)",
    "mend": "VLKEB meta-trains for 50,000 iterations; editwatch trains for `epochs` passes over the train split",
    "ke": "VLKEB trains 30,000 steps with a 1,000-step warm-up; editwatch trains for `epochs` passes",
}


def protocol(name: str) -> Protocol:
    """The protocol registered as `name`."""
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}. Available: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
