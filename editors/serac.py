"""`serac`: a memory of edits, a scope decision, and a counterfactual model for in-scope queries.

After SERAC (Mitchell et al., ICML 2022, "Memory-Based Model Editing at Scale"): edits are
stored, not trained in; a scope classifier decides whether a query is about a stored edit, and
in-scope queries are answered by a counterfactual model given the edit, out-of-scope ones by
the untouched base model. Here the scope classifier is a threshold on the multimodal key
similarity (text *and* image: `editors.edit_memory`), calibrated on the train split, and the
counterfactual model is the base LVLM with the edit stated in context ("New fact: ..."), which
the embedded default model is trained to use.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from pydantic import ConfigDict, Field

from editors.adapter import LVLM
from editors.edit_memory import KeyConfig, MemoryEditor
from editors.editor import EditExample, Retrieval
from editors.inputs import Query
from editors.prompts import in_context_prompt

log = logging.getLogger(__name__)


class SeracConfig(KeyConfig):
    """SERAC settings; `threshold` is replaced by `train`'s calibration."""

    model_config = ConfigDict(extra="forbid")

    image_components: int = Field(
        8, ge=1, description="discriminant directions kept per image token, fitted by `train` (key: tokens x this)"
    )
    threshold: float = Field(
        0.85, gt=-1.0, le=1.0, description="cosine similarity at or above which a query is in scope of its nearest edit"
    )


class Serac(MemoryEditor):
    """Retrieve the nearest edit; answer with it in context when in scope, else with the base model."""

    name = "serac"
    Config = SeracConfig
    trainable = True

    def __init__(self, lvlm: LVLM, config: SeracConfig | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        self.threshold = self.config.threshold

    def retrieve(self, queries: Sequence[Query]) -> list[Retrieval]:
        """The in-scope edit of each query (None when the best match is below the threshold)."""
        return self.edits.retrievals(queries, self.threshold)

    def _prompted(self, queries: Sequence[Query]) -> list[Query]:
        routed = []
        for query, (edit, _) in zip(queries, self.edits.route(queries, self.threshold, scored=False)):
            if edit is not None:
                query = Query(in_context_prompt([(edit.prompt, edit.target)], query.prompt), query.answer, query.image)
            routed.append(query)
        return routed

    def _trained(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _restore_trained(self, meta: dict[str, Any]) -> None:
        self.threshold = float(meta["threshold"])

    def train(self, examples: Sequence[EditExample], progress: bool = True) -> dict[str, float]:
        """Fit the image keys (`VisionKeys.fit`) and calibrate the scope threshold on train-split examples.

        All example edits go into a scratch memory. In scope: each example's edit question and its
        generality queries (rephrase, image rephrase), counted correct only when their nearest edit
        is their own.
        Out of scope: the locality queries (text-only facts, other creatures' images). The
        threshold is the middle of the widest gap that best separates the two score sets
        (maximum balanced accuracy); ties go to the widest gap, so the result is deterministic.
        """
        if not examples:
            raise ValueError("SERAC calibration needs at least one training example")
        if self.edits.edits:
            raise RuntimeError("train SERAC before applying edits (or after reset): stored keys would miss the new centre")
        images = [e.edit.image for e in examples if e.edit.image is not None]
        pairs = [(e.edit.image, q.image) for e in examples for q in e.generality
                 if e.edit.image is not None and q.image is not None and q.image is not e.edit.image]
        images += [b for _, b in pairs]
        if images:
            vision = self.edits.vision
            vision.fit(images, pairs, min(self.config.image_components, vision.token_dim))
        self.edits.reset()  # the key dimension follows the fitted projection
        scratch = self.edits.empty_copy()
        for example in examples:
            scratch.add(example.edit)
        # A fact given twice (same question and image) is held once, by its newest edit: each example's own then.
        owners = [scratch.holder(e.edit) for e in examples]
        # The edit's own question is in scope too (and the only in-scope query when an example has no generality set).
        positives = [(q, scratch.edits[o]) for e, o in zip(examples, owners) for q in (e.edit.query, *e.generality)]
        negatives = [q for e in examples for q in e.locality]
        pos_scores, pos_found = scratch.nearest([q for q, _ in positives], 1)
        neg_scores, _ = scratch.nearest(negatives, 1)
        right = np.array([bool(found) and found[0] == own for (_, own), found in zip(positives, pos_found)])
        pos, neg = pos_scores[:, 0], neg_scores[:, 0]
        self.threshold = _calibrate(pos[right], neg)
        report = {
            "threshold": self.threshold,
            "train_edits": float(len(examples)),
            "in_scope_queries": float(len(pos)),
            "out_of_scope_queries": float(len(neg)),
            "train_recall_at_1": float(np.mean(right & (pos >= self.threshold))),
            "train_false_hit_rate": float(np.mean(neg >= self.threshold)) if len(neg) else 0.0,
            "in_scope_min_score": float(pos[right].min()) if right.any() else float("nan"),
            "out_of_scope_max_score": float(neg.max()) if len(neg) else float("nan"),
        }
        log.info("SERAC scope calibrated: %s", " ".join(f"{k}={v:.4g}" for k, v in report.items()))
        return report


def _calibrate(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Threshold maximising balanced accuracy between in-scope and out-of-scope scores (midpoint of the widest best gap)."""
    if not len(positives):
        raise ValueError("no in-scope calibration query found its own edit: the keys cannot separate edits")
    if not len(negatives):
        return float(positives.min())
    values = np.unique(np.concatenate([positives, negatives]))
    cuts = np.concatenate([[values[0] - 1e-3], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    gaps = np.concatenate([[1e-3], np.diff(values), [1e-3]])
    tpr = (positives[None, :] >= cuts[:, None]).mean(1)
    tnr = (negatives[None, :] < cuts[:, None]).mean(1)
    balanced = np.round((tpr + tnr) / 2, 9)
    best = np.flatnonzero(balanced == balanced.max())
    return float(cuts[best[np.argmax(gaps[best])]])
