"""`mend`: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

The gradient of a linear weight for one edit is a sum of rank-1 terms, dL/dW = sum_t delta_t u_t^T.
MEND maps each token's (u_t, delta_t) through a small network g — standardised inputs,
an identity plus a low-rank residual MLP — to (u~_t, delta~_t) and edits W <- W - alpha *
sum_t delta~_t u~_t^T, with a learned step size alpha per weight. Here one network
per edited weight (MEND without cross-layer sharing) over the MLP weights of the last decoder
layers; training is the shared loop of `editors.hypernet`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import Field
from torch import nn

from editors.editor import EditExample, EditRequest
from editors.hypernet import HyperConfig, HyperEditor, token_factors


# The shipped model's MEND, trained on the default world, has no feature below 0.028 of its factor's scale.
STD_FLOOR = 1e-2


class MENDConfig(HyperConfig):
    """MEND's network size and initial step size, plus the shared training settings."""

    rank: int = Field(128, ge=1, description="width of the low-rank residual MLP of each weight's network")
    # 1e-2 suits the embedded model (weights of std ~0.1); MEND used 1e-4 on GPT-scale models.
    edit_lr: float = Field(1e-2, gt=0, description="initial step size alpha of each weight's update (learned)")


class GradientTransform(nn.Module):
    """g for one weight (d_out, d_in): (u_t, delta_t) -> (u~_t, delta~_t), starting as the identity."""

    def __init__(self, d_in: int, d_out: int, rank: int, edit_lr: float) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        # Per-feature statistics of [u; delta] over the train split (MEND standardises its inputs).
        self.register_buffer("mean", torch.zeros(d_in + d_out))
        self.register_buffer("std", torch.ones(d_in + d_out))
        self.down = nn.Linear(d_in + d_out, rank)
        self.up = nn.Linear(rank, d_in + d_out)
        nn.init.zeros_(self.up.weight)  # zero residual: g starts as the identity (MEND's "id" init)
        nn.init.zeros_(self.up.bias)
        self.log_lr = nn.Parameter(torch.tensor(math.log(edit_lr)))

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The weight update (d_out, d_in) from token factors u (N, d_in) and delta (N, d_out)."""
        x = (torch.cat([u, delta], -1) - self.mean) / self.std
        x = x + self.up(torch.relu(self.down(x)))
        u_, delta_ = x.split([self.d_in, self.d_out], -1)
        return -self.log_lr.exp() * delta_.T @ u_


class MEND(HyperEditor):
    """MEND over the MLP weights of the last decoder layers."""

    name = "mend"
    Config = MENDConfig
    cannot_retract = "its update is written into the weights"

    def _build(self) -> nn.Module:
        return nn.ModuleList(
            GradientTransform(p.shape[1], p.shape[0], self.config.rank, self.config.edit_lr)
            for p in self.tracker.params.values()
        )

    def _updates(self, edit: EditRequest) -> dict[str, torch.Tensor]:
        factors = token_factors(self.lvlm, self.tracker.params, edit.query)
        return {name: g(*factors[name]) for name, g in zip(self.tracker.params, self.net)}

    @torch.no_grad()
    def _prepare(self, examples: Sequence[EditExample]) -> None:
        """Mean and std of [u; delta] per weight over the train edits' tokens (running sums, float64)."""
        # Sums of each row less the weight's first row (the shifted-data algorithm): a feature that never varies sums
        # to exactly 0, where plain sums of squares minus the squared mean leave rounding noise.
        first: dict[str, torch.Tensor] = {}
        count = dict.fromkeys(self.tracker.params, 0)
        total = {name: torch.zeros(g.mean.shape, dtype=torch.float64) for name, g in zip(self.tracker.params, self.net)}
        squares = {name: torch.zeros_like(t) for name, t in total.items()}
        for example in examples:
            for name, (u, delta) in token_factors(self.lvlm, self.tracker.params, example.edit.query).items():
                rows = torch.cat([u, delta], -1).cpu().double()
                rows = rows - first.setdefault(name, rows[0].clone())
                count[name] += len(rows)
                total[name] += rows.sum(0)
                squares[name] += rows.pow(2).sum(0)
        for g, name in zip(self.net, self.tracker.params):
            if count[name] < 2:
                continue  # too few tokens to estimate: keep the identity standardisation
            mean = total[name] / count[name]
            std = ((squares[name] - count[name] * mean.pow(2)) / (count[name] - 1)).clamp(min=0).sqrt()
            g.mean.copy_(first[name] + mean)
            g.std.copy_(torch.cat([_floored(part) for part in std.split([g.d_in, g.d_out])]))


def _floored(std: torch.Tensor) -> torch.Tensor:
    """One factor's per-feature std, each at least `STD_FLOOR` times the factor's root-mean-square std: a feature
    that barely varied over the train tokens (few tokens, or a feature nearly constant on them) would otherwise be
    divided by almost nothing at edit time and make the update huge. The root-mean-square, not the median, sets the
    scale so that a factor with many dead features still gets a floor. A factor that did not vary at all is not
    scaled (std 1), only centred on its constant value."""
    scale = std.pow(2).mean().sqrt()
    return std.clamp(min=max(STD_FLOOR * float(scale), 1e-8)) if scale > 0 else torch.ones_like(std)
