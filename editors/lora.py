"""LoRA editing (Hu et al., ICLR 2022) as in EasyEdit's multimodal LoRA editor, through `peft`.

Each edit trains low-rank adapters W + s·B·A (s = alpha / rank, B starts at 0) on the edit's
answer NLL for a few SGD steps; the base weights never change. EasyEdit
(easyeditor/models/lora/lora_main.py, `execute_multimodal_lora`) keeps one adapter across a
sequence of edits when `keep_original_weight` is false: the next edit keeps training the same
A and B. Sequential editing here is the same: one adapter accumulates every edit, and `reset`
returns it to its initial values (B = 0: exactly the base model).

Multimodal choices. LoRA needs no subject token: the loss is the NLL of the answer span given
image + prompt (`editors.losses.answer_nll`, the metrics' teacher forcing), so the image shapes
every step and text-only edits train the same adapter on the prompt alone. EasyEdit's LVLM
hparams (hparams/LoRA/qwen2vl-7b.yaml, llavaov-7b.yaml, qwen3vl-4b.yaml) adapt the attention
q/v projections of every decoder layer; editwatch's family table declares decoder blocks by MLP
role only, so the default adapts the MLP `up` / `down` roles of every layer (the alternative
EasyEdit lists in hparams/LoRA/llama-7b.yaml: `#["up_proj", "down_proj"]`), resolved per family
through `LVLM.parameter_group` — never by module-name substrings. The vision tower is not adapted.

peft replaces each adapted `nn.Linear` by a LoRA layer that wraps it, so in `named_parameters`
an adapted weight appears as `<module>.base_layer.weight`; `get_parameter("<module>.weight")`
still resolves to the same tensor (peft's `weight` property), so `LVLM.parameter_group` works.
A state holds A and B of every adapted module; each edit's dropout masks are seeded by the edit's
key, so a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import BaseModel, ConfigDict, Field

from editors.adapter import LVLM
from editors.editor import EditOutcome, EditRequest, Editor, HasWeightDelta, StateMismatchError
from editors.losses import fit_answer
from editors.state import EditorState
from editors.weights import WeightTracker

log = logging.getLogger(__name__)

_ADAPTER = "default"  # peft's adapter name; one adapter holds every edit


class LoRAConfig(BaseModel):
    """LoRA editing settings; defaults from EasyEdit's multimodal LoRA hparams (hparams/LoRA/qwen2vl-7b.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, description="rank r of each adapter (EasyEdit `rank: 8`)")
    alpha: float = Field(
        32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (EasyEdit `lora_alpha: 32`)"
    )
    dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout on the adapter input while an edit trains (EasyEdit `lora_dropout: 0.1`)"
    )
    target_modules: tuple[str, ...] = Field(
        ("up", "down"), min_length=1, description="decoder MLP roles to adapt (gate, up, down; OPT: up, down); "
        "EasyEdit's LVLM yamls adapt q_proj/v_proj, which the family table does not declare"
    )
    layers: tuple[int, ...] | None = Field(
        None, min_length=1, description="decoder layers to adapt (negative counts from the end); None: all of them "
        "(EasyEdit `layers: []`)"
    )
    lr: float = Field(0.1, gt=0, description="SGD learning rate at each edit's first step (EasyEdit `lr: 1e-1`)")
    lr_decay: float = Field(
        0.9, gt=0, le=1, description="the learning rate is multiplied by this after every step (EasyEdit `sh_lr: 0.9`, "
        "an ExponentialLR)"
    )
    steps: int = Field(5, ge=1, description="SGD steps per edit (EasyEdit `num_steps: 5`)")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay on the adapter (EasyEdit `weight_decay: 0.0`)")
    stop_loss: float = Field(
        0.0, ge=0, description="stop an edit early once its answer NLL (nats per token) is below this; "
        "0: run every step, as EasyEdit does"
    )
    seed: int = Field(
        0, description="seed of the adapters' initial A (B starts at zero) and of each edit's dropout masks"
    )


class LoRA(Editor, HasWeightDelta):
    """One LoRA adapter on decoder MLP weights, trained edit after edit; base weights untouched."""

    name = "lora"
    Config = LoRAConfig
    cannot_retract = "every edit trains the same adapter weights"

    def __init__(self, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        if any(isinstance(m, BaseTunerLayer) for m in lvlm.model.modules()):
            raise ValueError("the model already carries peft adapters (another LoRA editor on it?); load a fresh model")
        self._inject()

    def _inject(self) -> None:
        """Wrap the target modules with peft LoRA layers (in place) and snapshot the initial adapter."""
        self.targets = self._target_modules()
        base_flags = [(p, p.requires_grad) for p in self.lvlm.model.parameters()]
        peft_config = LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.targets),  # full module paths: peft matches them exactly
            bias="none",
        )
        with _seeded(self.config.seed, self.lvlm.model):
            # LoraModel edits `lvlm.model` in place, so `lvlm.score` and `span_logits` see the adapters.
            self._tuner = LoraModel(self.lvlm.model, peft_config, _ADAPTER)
        for p, flag in base_flags:  # peft freezes the base; leave its flags as they were
            p.requires_grad_(flag)
        self.layers: dict[str, LoraLayer] = {path: self.lvlm.model.get_submodule(path) for path in self.targets}
        for layer in self.layers.values():
            # Adapters train in float32 on a half-precision model, as peft's `autocast_adapter_dtype` and
            # EasyEdit (which casts the model to float32) do: small SGD steps vanish in bfloat16.
            layer.lora_A[_ADAPTER].float()
            layer.lora_B[_ADAPTER].float()
        self.tracker = WeightTracker(self._adapter_parameters())
        self._set_dropout(training=False)

    def _target_modules(self) -> tuple[str, ...]:
        """Paths of the adapted linear modules: the configured MLP roles of the configured layers."""
        layers = self.config.layers if self.config.layers is not None else range(self.lvlm.decoder_depth)
        params = self.lvlm.parameter_group("llm", layers=layers, modules=self.config.target_modules)
        paths = []
        for name in params:
            path, _, attribute = name.rpartition(".")
            if attribute != "weight" or not isinstance(self.lvlm.model.get_submodule(path), torch.nn.Linear):
                raise ValueError(f"{name} is not the weight of a linear layer; LoRA adapts linear layers only")
            paths.append(path)
        return tuple(paths)

    def _adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable adapter tensors under their model parameter names (`<module>.lora_A.default.weight`)."""
        params = {}
        for path, layer in self.layers.items():
            params[f"{path}.lora_A.{_ADAPTER}.weight"] = layer.lora_A[_ADAPTER].weight
            params[f"{path}.lora_B.{_ADAPTER}.weight"] = layer.lora_B[_ADAPTER].weight
        return params

    def _set_dropout(self, training: bool) -> None:
        """The model stays in eval mode; only the adapter dropout follows EasyEdit's training mode during an edit."""
        for layer in self.layers.values():
            layer.lora_dropout[_ADAPTER].train(training)

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Train the adapter on the edit for `steps` SGD steps (a guarded edit: NaN/Inf rolls it back)."""
        return self.tracker.edit(lambda: self._train(edit))

    def _train(self, edit: EditRequest) -> None:
        params = list(self.tracker.params.values())
        # EasyEdit's multimodal LoRA: plain SGD with an exponentially decaying rate, a fresh optimiser per edit.
        optimizer = torch.optim.SGD(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.config.lr_decay)
        self._set_dropout(training=True)
        try:
            # Dropout masks drawn from the edit itself: a resumed run trains every edit as the uninterrupted one did.
            seed = _edit_seed(self.config.seed, edit)
            with _seeded(seed, self.lvlm.model):
                step, loss = fit_answer(self.lvlm, edit.query, params, optimizer, self.config.steps,
                                        self.config.stop_loss, schedule)
        finally:
            self._set_dropout(training=False)
        log.debug("lora: edit %r stopped at step %d, loss %.4f", edit.key, step, loss)

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Disable the adapter layers for the block (peft's switch: the base layers alone answer)."""
        for layer in self.layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enable_adapters(True)

    def weight_change(self) -> float:
        """Frobenius norm of the effective change s·B·A over all adapted weights (global, like `WeightTracker`)."""
        total = 0.0
        for layer in self.layers.values():
            a = layer.lora_A[_ADAPTER].weight.detach().double()  # (r, d_in)
            b = layer.lora_B[_ADAPTER].weight.detach().double()  # (d_out, r)
            s = layer.scaling[_ADAPTER]
            # ||s·B·A||_F^2 = s^2 tr((BᵀB)(AAᵀ)): r×r products, never the d_out×d_in delta.
            total += s * s * float(((b.T @ b) * (a @ a.T)).sum())
        return math.sqrt(max(total, 0.0))

    def reset(self) -> None:
        """Back to the adapter's initial values (B = 0): the model is exactly the base model again."""
        self.tracker.reset()

    def state(self) -> EditorState:
        """Config and every adapter tensor (A and B of each adapted module)."""
        tensors = {name: p.detach().clone() for name, p in self.tracker.params.items()}
        return self._new_state({"targets": list(self.targets)}, tensors)

    def load_state(self, state: EditorState) -> None:
        """Adopt the state's config (re-injecting if it differs) and load its adapter tensors."""
        self._check_state(state)
        config = self.Config.model_validate(state.meta["config"])
        if config != self.config:
            self._tuner.unload()  # peft puts the base linear layers back
            self.config = config
            self._inject()
        saved = tuple(state.meta.get("targets", ()))
        if saved != self.targets:
            other = sorted(set(saved) ^ set(self.targets))
            raise StateMismatchError(
                f"the state adapts {len(saved)} modules, this model {len(self.targets)} under the same config; "
                f"they differ at {', '.join(other[:3]) or 'their order'}"
            )
        self.tracker.load(dict(state.tensors))


def _edit_seed(seed: int, edit: EditRequest) -> int:
    """A seed for one edit's dropout masks: its stream key (or prompt and target) with the configured seed."""
    identity = edit.key or f"{edit.prompt}\x00{edit.target}"
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{identity}".encode()).digest()[:8], "little")


@contextmanager
def _seeded(seed: int, model: torch.nn.Module) -> Iterator[None]:
    """Draw random numbers from `seed` inside the block without disturbing the caller's generators."""
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
