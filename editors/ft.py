"""Fine-tuning editors (VLKEB's FT baselines): a few AdamW steps on the edit, on one parameter group.

`ft-llm` tunes decoder MLP weights (default: the last layer, as VLKEB's FT (LLM));
`ft-vis` tunes vision-side parts (VLKEB's FT (Vis): the projector of LLaVA and Qwen2-VL, the
Q-Former of BLIP-2). The two differ only in the group. Each `apply` starts a fresh optimiser
from the current weights, so sequential editing is repeated `apply` and edits accumulate.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from editors.editor import EditOutcome, EditRequest
from editors.losses import fit_answer
from editors.weights import ParameterEditor

log = logging.getLogger(__name__)


class FTConfig(BaseModel):
    """Settings shared by both FT editors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(20, ge=1, description="maximum AdamW steps per edit")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0: keep the unedited weights' scale)")
    stop_loss: float = Field(
        0.05, ge=0, description="stop early once the edit's answer NLL (nats per token) is below this"
    )


class FTLLMConfig(FTConfig):
    """FT (LLM): which decoder layers' MLP weights to tune."""

    layers: tuple[int, ...] = Field((-1,), min_length=1, description="decoder layers (negative counts from the end)")
    modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="MLP roles to tune (gate, up, down; OPT: up, down); default: all of them"
    )


class FTVisConfig(FTConfig):
    """FT (Vis): which vision-side parts to tune (default per family, after VLKEB)."""

    parts: tuple[str, ...] | None = Field(
        None, min_length=1, description="vision parts (llava: tower/projector; blip2: tower/qformer/projector; "
        "qwen2_vl: tower/projector); default: the family's `default_vision_parts` (projector; BLIP-2: Q-Former)"
    )


class FineTune(ParameterEditor):
    """Fine-tuning of one parameter group on the edit's answer NLL."""

    reaches_text: ClassVar[bool] = True  # False: the group only sees images, text-only edits cannot move it
    cannot_retract = "it is written into the weights"

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Tune the group on the edit for up to `steps` AdamW steps (a guarded, revertible edit)."""
        if edit.image is None and not self.reaches_text:
            return EditOutcome(applied=False, message=f"{self.name} tunes vision parts: a text-only edit cannot reach them")
        return self.tracker.edit(lambda: self._tune(edit))

    def _tune(self, edit: EditRequest) -> None:
        params = list(self.tracker.params.values())
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        step, loss = fit_answer(self.lvlm, edit.query, params, optimizer, self.config.steps, self.config.stop_loss)
        log.debug("%s: edit %r stopped at step %d, loss %.4f", self.name, edit.key, step, loss)


class FTLLM(FineTune):
    """FT (LLM): fine-tune decoder MLP weights of chosen layers."""

    name = "ft-llm"
    Config = FTLLMConfig

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.lvlm.parameter_group("llm", layers=self.config.layers, modules=self.config.modules)


class FTVis(FineTune):
    """FT (Vis): fine-tune vision-side parts (projector / Q-Former / tower)."""

    name = "ft-vis"
    Config = FTVisConfig
    reaches_text = False

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        parts = self.config.parts or self.lvlm.family.default_vision_parts
        return self.lvlm.parameter_group("vision", parts=parts)
