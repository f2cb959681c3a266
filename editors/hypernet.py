"""What MEND and KE share: the edit gradient's token factors and the hypernetwork training loop.

Both learn a network that turns the fine-tuning gradient of one edit into a weight update of
decoder MLP layers. Training follows MEND's procedure (Mitchell et al., ICLR 2022), used for KE
as well (as in MEND's and EasyEdit's KE baselines): for each train edit, the update is applied
functionally, then

    L = c_edit * NLL(new answer | edit + generality queries, edited weights)
      + c_loc  * KL(unedited || edited) on its locality queries,

both over answer spans, and the loss is back-propagated into the hypernetwork only.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from editors.adapter import LVLM
from editors.editor import EditExample, EditOutcome, EditRequest
from editors.inputs import Query
from editors.losses import answer_nll, image_groups, masked_kl, span_logits
from editors.weights import ParameterEditor, trainable_only

log = logging.getLogger(__name__)


class NotTrainedError(RuntimeError):
    """A hypernetwork editor was asked to edit before it was trained or loaded."""


class HyperConfig(BaseModel):
    """Settings shared by hypernetwork editors: which layers, and how the network is trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] = Field((-1,), min_length=1, description="decoder layers whose MLP weights are edited")
    modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="MLP roles edited (gate, up, down; OPT: up, down); default: all of them"
    )
    seed: int = Field(0, description="seed of the network's initialisation and the training order")
    epochs: int = Field(3, ge=1, description="passes over the train split")
    batch_size: int = Field(4, ge=1, description="train edits whose losses are averaged per optimiser step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the hypernetwork")
    edit_weight: float = Field(1.0, ge=0, description="c_edit: weight of the edit / generality NLL")
    loc_weight: float = Field(1.0, ge=0, description="c_loc: weight of the locality KL")


def token_factors(
    lvlm: LVLM, params: dict[str, nn.Parameter], query: Query
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token factors of the gradient of the answer NLL for each linear weight W (d_out, d_in).

    dL/dW = sum_t delta_t u_t^T, with u_t (N, d_in) the layer's inputs and delta_t (N, d_out) the
    gradient at its outputs (MEND's rank-1 decomposition). Tokens whose factors are zero (they do not reach the
    loss) are dropped, as MEND does. Computed at the model's current weights, detached.
    """
    modules = {name: _linear_of(lvlm, name) for name in params}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, module in modules.items()
    ]
    try:
        with torch.enable_grad(), trainable_only(lvlm.model, list(params.values())):
            loss = answer_nll(lvlm, [query])
            deltas = torch.autograd.grad(loss, [seen[name][1] for name in params])
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for name, delta in zip(params, deltas):
        u = seen[name][0].detach().reshape(-1, seen[name][0].shape[-1]).float()
        delta = delta.reshape(-1, delta.shape[-1]).float()
        keep = (u != 0).any(-1) & (delta != 0).any(-1)
        factors[name] = (u[keep], delta[keep])
    return factors


def _linear_of(lvlm: LVLM, name: str) -> nn.Linear:
    owner, _, leaf = name.rpartition(".")
    module = lvlm.model.get_submodule(owner)
    if leaf != "weight" or not isinstance(module, nn.Linear):
        raise ValueError(f"hypernetwork editors edit nn.Linear weights; {name} is not one")
    return module


class HyperEditor(ParameterEditor):
    """An editor whose weight update comes from a trained network (MEND, KE)."""

    trainable = True
    Config: type[HyperConfig]

    def _configure(self) -> None:
        super()._configure()
        # Built on the CPU from its generator alone: `torch.manual_seed` would also reset every CUDA generator.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.config.seed)
            self.net = self._build().to(self.lvlm.device)
        self.report: dict[str, float] = {}

    def _parameters(self) -> dict[str, nn.Parameter]:
        return self.lvlm.parameter_group("llm", layers=self.config.layers, modules=self.config.modules)

    @abstractmethod
    def _build(self) -> nn.Module:
        """The untrained hypernetwork for the tracked parameters."""

    @abstractmethod
    def _updates(self, edit: EditRequest) -> dict[str, torch.Tensor]:
        """The weight change of each tracked parameter for one edit (differentiable in `net`)."""

    def _prepare(self, examples: Sequence[EditExample]) -> None:
        """Fit what must be known before training starts (e.g. MEND's input statistics)."""

    def _trained_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if not self.report:
            return {}, {}
        return {"report": self.report}, {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _load_trained(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if "report" not in meta:  # the state of an untrained editor
            self._configure()
            return
        self.net.load_state_dict(tensors)
        self.report = meta["report"]

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Add the network's update for this edit to the weights (a guarded, revertible edit)."""
        if not self.report:
            raise NotTrainedError(
                f"{self.name} has no trained hypernetwork: run `simulate train-editor --method {self.name} "
                f"--out DIR` and load that state, or call train() on a train split first"
            )
        with torch.no_grad():
            self.net.eval()
            updates = self._updates(edit)
        return self.tracker.edit(lambda: self._add(updates))

    @torch.no_grad()
    def _add(self, updates: dict[str, torch.Tensor]) -> None:
        for name, update in updates.items():
            self.tracker.params[name].add_(update.to(self.tracker.params[name].dtype))

    def train(self, examples: Sequence[EditExample], progress: bool = True) -> dict[str, float]:
        """Train the hypernetwork on train-split examples; returns losses and edit success.

        Edits in place are undone first, and the network restarts from its seeded initialisation,
        so the same examples and config give the same network.
        """
        if not examples:
            raise ValueError(f"{self.name}: no training examples")
        self.tracker.reset()
        start = time.perf_counter()
        self._configure()
        self._prepare(examples)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.lr)
        order_rng = np.random.default_rng(self.config.seed)
        steps_per_epoch = -(-len(examples) // self.config.batch_size)
        history = []
        with tqdm(total=self.config.epochs * steps_per_epoch, desc=f"train {self.name}", disable=not progress) as bar:
            for epoch in range(self.config.epochs):
                order = order_rng.permutation(len(examples))
                totals = np.zeros(3)
                for at in range(0, len(order), self.config.batch_size):
                    batch = [examples[i] for i in order[at : at + self.config.batch_size]]
                    totals += self._step(batch, optimizer) * len(batch)
                    bar.update()
                    bar.set_postfix(edit=f"{totals[1] / (at + len(batch)):.3f}", loc=f"{totals[2] / (at + len(batch)):.4f}")
                history.append(totals / len(examples))
                log.info("%s epoch %d: loss %.4f edit %.4f loc %.4f", self.name, epoch + 1, *history[-1])
        self.report = {
            "examples": float(len(examples)),
            "epochs": float(self.config.epochs),
            "loss_first_epoch": float(history[0][0]),
            "loss": float(history[-1][0]),
            "edit_loss": float(history[-1][1]),
            "loc_loss": float(history[-1][2]),
        }
        self.report["seconds"] = time.perf_counter() - start
        return dict(self.report)

    def _step(self, batch: Sequence[EditExample], optimizer: torch.optim.Optimizer) -> np.ndarray:
        """One optimiser step over a batch of edits; returns the batch's mean (total, edit, loc) losses."""
        self.net.train()
        optimizer.zero_grad(set_to_none=True)
        sums = np.zeros(3)
        for example in batch:
            edit_loss, loc_loss = self._meta_losses(example)
            loss = self.config.edit_weight * edit_loss + self.config.loc_weight * loc_loss
            (loss / len(batch)).backward()
            sums += [loss.item(), edit_loss.item(), loc_loss.item()]
        optimizer.step()
        return sums / len(batch)

    def _edited(self, updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Edited weights as tensors for a functional forward (the model's own stay untouched)."""
        return {n: p.detach() + updates[n].to(p.dtype) for n, p in self.tracker.params.items()}

    def _meta_losses(self, example: EditExample) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit NLL (edit + generality queries) and locality KL under the functionally edited weights."""
        with trainable_only(self.lvlm.model, []):
            edited = self._edited(self._updates(example.edit))
            edit_loss = answer_nll(self.lvlm, [example.edit.query, *example.generality], edited)
            loc_loss = torch.zeros(())
            for group in image_groups(example.locality):
                with torch.no_grad():
                    pre = self.lvlm.span_logits(group).logits
                loc_loss = loc_loss + masked_kl(pre, span_logits(self.lvlm, group, edited)) * len(group)
        return edit_loss, loc_loss / max(len(example.locality), 1)
