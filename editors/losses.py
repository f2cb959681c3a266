"""Editing losses over answer spans (teacher-forced, as the metrics): NLL of a target, KL to the unedited model.

Queries with and without images cannot share a batch (`LVLM.span_logits`), so each loss
splits its queries into those two groups.
"""

from __future__ import annotations

from typing import Sequence

import torch

from editors.adapter import LVLM, SpanLogits
from editors.inputs import Query, image_index_groups
from editors.weights import span_logits_with, trainable_only


def image_groups(queries: Sequence[Query]) -> list[list[Query]]:
    """The queries split into (with image, without image), empty groups dropped."""
    return [[queries[i] for i in group] for group in image_index_groups(queries)]


def span_logits(lvlm: LVLM, queries: Sequence[Query], weights: dict[str, torch.Tensor] | None = None) -> SpanLogits:
    """`LVLM.span_logits` of one image group, with parameters optionally replaced by `weights`."""
    return span_logits_with(lvlm, queries, weights) if weights else lvlm.span_logits(queries)


def masked_nll(span: SpanLogits) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens, () — the fine-tuning objective."""
    logprobs = torch.log_softmax(span.logits.float(), dim=-1)  # (B, T, V)
    nll = -logprobs.gather(-1, span.targets[..., None]).squeeze(-1)  # (B, T)
    return nll[span.mask].mean()


def masked_kl(pre_logits: torch.Tensor, post: SpanLogits) -> torch.Tensor:
    """Mean KL(pre || post) per answer token, () — MEND's locality loss (Mitchell et al., 2022)."""
    pre = torch.log_softmax(pre_logits.float(), dim=-1)  # (B, T, V)
    postlog = torch.log_softmax(post.logits.float(), dim=-1)
    kl = (pre.exp() * (pre - postlog)).sum(-1)  # (B, T)
    return kl[post.mask].mean()


def answer_nll(lvlm: LVLM, queries: Sequence[Query], weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean answer NLL over queries of any image mix (each group weighted by its query count)."""
    total = torch.zeros(())
    for group in image_groups(queries):
        total = total + masked_nll(span_logits(lvlm, group, weights)) * len(group)
    return total / len(queries)


def fit_answer(
    lvlm: LVLM,
    query: Query,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    stop_loss: float = 0.0,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[int, float]:
    """Up to `steps` optimiser steps on the answer NLL of `query`, gradients reaching `params` only.

    Stops early once the loss is below `stop_loss` or not finite (the step is not taken). Returns
    the index of the last step and its loss, for the caller's log.
    """
    step, loss = 0, torch.tensor(float("nan"))
    with trainable_only(lvlm.model, params):
        for step in range(steps):
            loss = answer_nll(lvlm, [query])
            if loss.item() < stop_loss or not torch.isfinite(loss):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return step, loss.item()
