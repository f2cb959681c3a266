"""`ke`: KnowledgeEditor (De Cao et al., "Editing Factual Knowledge in Language Models", EMNLP 2021).

A hypernetwork conditioned on the edit: a bidirectional LSTM reads the edit's text (question,
old answer when known, new answer) into a condition c. For each edited weight W (m, n), c
predicts vectors that shape the fine-tuning gradient G = dL/dW of the edit (the authors'
`ConditionedParameter` gives max_scale * sigmoid(eta) * (G * a + b)); here

    a = softmax(alpha_row)^T alpha_col,   b = softmax(beta_row)^T beta_col     (m, n) rank-1 each
    dW = -max_scale * sigmoid(eta) * (G * a + b) / ||G * a + b||_F

Deviations: the update is divided by its Frobenius norm, so its size is max_scale * sigmoid(eta)
whatever the gradient's (at most `max_scale`), and only its direction follows G; G is scaled to
unit RMS first and the network starts as a normalised gradient step (a uniform, b = 0), so
training does not first have to find the gradient's scale; the LSTM reads the model's own
(frozen) input embeddings instead of a trainable copy, which keeps the state small on real
vocabularies. Training is the shared loop of `editors.hypernet`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from editors.editor import EditRequest
from editors.hypernet import HyperConfig, HyperEditor, token_factors


class KEConfig(HyperConfig):
    """KE's network sizes and update scale, plus the shared training settings."""

    hidden: int = Field(128, ge=1, description="LSTM width per direction and conditioner hidden width")
    condition: int = Field(256, ge=1, description="size of the edit's condition vector c")
    max_scale: float = Field(4.0, gt=0, description="largest Frobenius norm of one weight's update")


class ConditionedParameter(nn.Module):
    """Maps (c, G) to the update of one weight of shape (m, n)."""

    def __init__(self, shape: torch.Size, condition: int, hidden: int, max_scale: float) -> None:
        super().__init__()
        self.m, self.n = shape
        self.max_scale = max_scale
        last = nn.Linear(hidden, 2 * (self.m + self.n) + 1)
        # Start as a plain normalised gradient step: a uniform and positive, b = 0 (cf. MEND's identity init).
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[: self.n] = 1.0
        self.conditioner = nn.Sequential(nn.Linear(condition, hidden), nn.Tanh(), last)

    def forward(self, c: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The update (m, n) for condition c (condition,) and edit gradient grad (m, n)."""
        col_a, row_a, col_b, row_b, eta = self.conditioner(c).split([self.n, self.m, self.n, self.m, 1])
        a = torch.outer(row_a.softmax(-1), col_a)
        b = torch.outer(row_b.softmax(-1), col_b)
        # G at unit RMS, so the gradient term and b start on one scale whatever the loss's size.
        grad = grad / grad.pow(2).mean().sqrt().clamp(min=1e-12)
        direction = grad * a + b
        return -self.max_scale * eta.sigmoid() * direction / direction.norm().clamp(min=1e-12)


class EditEncoder(nn.Module):
    """Bidirectional LSTM over token embeddings -> condition vector (KE's LSTMConditioner)."""

    def __init__(self, embedding_dim: int, hidden: int, condition: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Sequential(nn.Linear(2 * hidden, condition), nn.Tanh())

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        """c (condition,) from embeddings (L, embedding_dim): both directions' final states."""
        _, (h, _) = self.lstm(embedded[None])
        return self.out(torch.cat([h[0, 0], h[1, 0]]))


class KnowledgeEditor(HyperEditor):
    """KE over the MLP weights of the last decoder layers."""

    name = "ke"
    Config = KEConfig
    cannot_retract = "its update is written into the weights"

    def _build(self) -> nn.Module:
        embedding_dim = self.lvlm.model.get_input_embeddings().embedding_dim
        cfg = self.config
        return nn.ModuleDict({
            "encoder": EditEncoder(embedding_dim, cfg.hidden, cfg.condition),
            "weights": nn.ModuleList(
                ConditionedParameter(p.shape, cfg.condition, cfg.hidden, cfg.max_scale)
                for p in self.tracker.params.values()
            ),
        })

    def _condition(self, edit: EditRequest) -> torch.Tensor:
        """c from the edit's text: question, old answer (when known), new answer — KE's (x, y, a)."""
        text = " ".join(t for t in (edit.prompt, edit.ground_truth, edit.target) if t)
        ids = self.lvlm.inputs.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        with torch.no_grad():
            embedded = self.lvlm.model.get_input_embeddings()(ids.to(self.lvlm.device)).float()
        return self.net["encoder"](embedded)

    def _updates(self, edit: EditRequest) -> dict[str, torch.Tensor]:
        c = self._condition(edit)
        factors = token_factors(self.lvlm, self.tracker.params, edit.query)
        return {
            name: conditioned(c, delta.T @ u)  # G = sum_t delta_t u_t^T
            for (name, (u, delta)), conditioned in zip(factors.items(), self.net["weights"])
        }
