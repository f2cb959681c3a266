"""Probe rounds on a long-lived edited model (DESIGN.md, Timeline and probes).

Each probe has bounded cost: retention re-scores a fixed-size random sample of earlier edits,
the reference set is fixed, retrieval health looks at a bounded set of queries. So a round
costs the same at edit 100 and at edit 100,000, and the total probe cost grows linearly with
the stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from editors import Editor, EditRequest, HasMemory, Query, SpanScore
from monitor.metrics import keep_references, localities, token_accuracy
from monitor.plan import LOCALITY, Probe
from monitor.reference import ReferenceStore

Z_95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Estimate:
    """A mean over a random sample of a finite population, with a 95% confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    population: int


def estimate_mean(values: Sequence[float], population: int) -> Estimate:
    """Sample mean with a normal 95% interval and the finite-population correction.

    Sampling without replacement from `population` items: the standard error shrinks by
    sqrt((N - n) / (N - 1)) and is 0 when every item is measured. Values are fractions in
    [0, 1], so the interval is clipped to [0, 1].
    """
    n = len(values)
    if n == 0:
        raise ValueError("cannot estimate a mean from an empty sample")
    if population < n:
        raise ValueError(f"sample of {n} is larger than its population of {population}")
    mean = sum(values) / n
    if n == 1 or population == n:
        half = 0.0 if population == n else 1.0  # one draw from many: no information on spread
    else:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        fpc = (population - n) / (population - 1)
        half = Z_95 * math.sqrt(variance / n * fpc)
    return Estimate(mean, max(0.0, mean - half), min(1.0, mean + half), n, population)


def retention(scores: Sequence[SpanScore], at_edit: Sequence[float], population: int) -> dict[str, float]:
    """Reliability of earlier edits now (`retention`, with its 95% CI) and how much it fell (`forgetting`).

    `scores` are the sampled edits' reliability queries scored now, `at_edit` their reliability
    right after each was applied, `population` how many edits the sample was drawn from.
    """
    if not scores:
        return {}
    now = [token_accuracy(s) for s in scores]
    estimate = estimate_mean(now, population)
    drop = [before - value for before, value in zip(at_edit, now)]
    return {
        "retention": estimate.mean,
        "retention_ci_low": estimate.low,
        "retention_ci_high": estimate.high,
        "retention_sample": float(estimate.n),
        "forgetting": sum(drop) / len(drop),
    }


@dataclass
class ReferenceSet:
    """Locality queries of the stream's first records, with the unedited model's answers and likelihood.

    It grows while those records are read (each scored on the unedited model) and is fixed after;
    the perplexity ratio compares the same queries before and after editing at every size.
    """

    probes: list[Probe] = field(default_factory=list)
    references: ReferenceStore = field(default_factory=ReferenceStore)
    base_nll: float = 0.0  # summed negative log-likelihood (nats) of the reference answers, unedited
    tokens: int = 0  # answer tokens those nats are summed over

    def add(self, probes: Sequence[Probe], scores: dict[str, SpanScore]) -> list[Probe]:
        """Add the new locality probes with their unedited scores (by probe key); returns those added."""
        new = list({p.key: p for p in probes if p.metric in LOCALITY and p.key not in self.references}.values())
        if new:
            keep_references(new, scores, self.references)
            self.probes += new
            self.base_nll += _nll(scores[p.key] for p in new)
            self.tokens += sum(len(scores[p.key].target_ids) for p in new)
        return new


def edit_success(editor: Editor, edits: Sequence[EditRequest]) -> float:
    """Mean reliability of each edit applied alone to the unedited model (a trained editor's report).

    Each edit is applied, its own query scored, and the editor reset, so `editor` must be unedited.
    """
    if not edits:
        raise ValueError("edit success needs at least one edit")
    hits = []
    for edit in edits:
        editor.apply(edit)
        hits.append(token_accuracy(editor.score([edit.query], top_k=1)[0]))
        editor.reset()
    return sum(hits) / len(hits)


def _nll(scores: Iterable[SpanScore]) -> float:
    """Summed negative log-likelihood of the answer tokens of all scores, nats."""
    return sum(float(-s.target_logprobs.sum()) for s in scores)


def reference_health(refset: ReferenceSet, scores: dict[str, SpanScore]) -> dict[str, float]:
    """Unedited knowledge on the reference set from its probes' scores now (by key, with the references'
    top-k gathered: `score_probes`): agreement, KL, accuracy, perplexity ratio, entropy."""
    if not refset.probes:
        return {}
    now = [scores[p.key] for p in refset.probes]
    agreement, kl = zip(*localities([(s, refset.references[p.key]) for p, s in zip(refset.probes, now)]))
    entropy = torch.cat([s.entropy for s in now])
    return {
        "ref_agreement": sum(agreement) / len(agreement),
        "ref_kl": sum(kl) / len(kl),
        "ref_accuracy": sum(token_accuracy(s) for s in now) / len(now),
        # exp(nll_post) / exp(nll_pre): the perplexity ratio, computed in log space
        "ref_ppl_ratio": math.exp(min((_nll(now) - refset.base_nll) / refset.tokens, 700.0)),
        "generation_entropy": float(entropy.mean()),
    }


def retrieval_health(
    editor: HasMemory, in_scope: Sequence[tuple[Query, str]], out_of_scope: Sequence[Query]
) -> dict[str, float]:
    """Recall@1 of the right memory on in-scope queries, false-hit rate out of scope, and latency."""
    queries = [q for q, _ in in_scope] + list(out_of_scope)
    if not queries:
        return {}
    start = time.perf_counter()
    routes = editor.retrieve(queries)
    seconds = time.perf_counter() - start
    values = {"retrieval_latency_seconds": seconds / len(queries)}
    if in_scope:
        hits = [route.key == key for route, (_, key) in zip(routes, in_scope)]
        values["retrieval_recall_at_1"] = sum(hits) / len(hits)
    if out_of_scope:
        false = [route.key is not None for route in routes[len(in_scope) :]]
        values["retrieval_false_hit_rate"] = sum(false) / len(false)
    return values
