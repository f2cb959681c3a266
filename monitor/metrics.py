"""Metric definitions — the only ones (DESIGN.md, Metrics). Exporters and dashboards read these.

All edit metrics are teacher-forced over the answer span (input = prompt + " " + answer,
answer tokens scored), after VLKEB (Huang et al., NeurIPS 2024) and MMEdit (Cheng et al., 2023):
- reliability / t_gen / i_gen / port_khop: token accuracy of the expected answer;
- t_loc / i_loc: top-1 agreement of the edited model with the unedited one on the answer
  span, plus `*_kl`: KL(pre || post) averaged over that span, computed on the pre-edit top-10
  ids plus one bucket for the rest of the vocabulary — a lower bound on the full-vocabulary KL,
  since references are cached as top-k only (DESIGN.md); see `topk_kl`;
- `*_vlkeb` (with `vlkeb_compat`): VLKEB's own locality — top-k ids compared rank by rank at
  every position of the sequence, k = 1 for text and 10 for images.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from editors import Editor, ScoresUnedited, SpanScore
from monitor.plan import HOP_RANGE, LOCALITY, Probe
from monitor.reference import Reference, ReferenceStore

VLKEB_TOP_K = {"t_loc": 1, "i_loc": 10}  # VLKEB: text locality top-1, image locality top-10
Unit = Literal["ratio", "factor", "nats", "seconds", "count", "norm"]


@dataclass(frozen=True)
class Metric:
    """One metric: its key everywhere (JSON, MLflow, Prometheus), meaning, direction, unit and aggregation.

    Readers act on these: `simulate compare` reduces a run's values with `aggregation` and marks
    the best method by `higher_is_better`; the exporters describe and group series by `unit`.
    """

    key: str
    description: str
    higher_is_better: bool | None = True  # None: neither (a size, an entropy)
    # How a run's values reduce to one number: the mean over edits (per-edit metrics, rounds of a
    # health metric whose level matters throughout), the value after the last round, or the worst seen.
    aggregation: Literal["mean", "last", "max"] = "mean"
    unit: Unit = "ratio"  # ratio: a fraction in [0, 1]; factor: a ratio of two quantities, unbounded
    scope: Literal["edit", "round"] = "edit"  # measured per edit (per setting), or per probe round


KL_BOUND = "a lower bound on the full-vocabulary KL: pre-edit top-10 ids plus one bucket for the rest (topk_kl)"


def _round(key: str, description: str, **kwargs: object) -> Metric:
    """A probe-round metric: by default its value after the last round is the run's."""
    return Metric(key, description, scope="round", **{"aggregation": "last", **kwargs})  # type: ignore[arg-type]


_DEFINED = [
    Metric("reliability", "token accuracy of `alt` given `image` + `src`"),
    Metric("t_gen", "token accuracy of `alt` given `image` + `rephrase`"),
    Metric("i_gen", "token accuracy of `alt` given `image_rephrase` + `src`"),
    Metric("t_loc", "top-1 agreement with the unedited model on the `loc_ans` span of `loc` (no image)"),
    Metric("i_loc", "top-1 agreement with the unedited model on the `m_loc_a` span of `m_loc` + `m_loc_q`"),
    Metric("t_loc_kl", f"KL(pre || post) over the `loc_ans` span, nats; {KL_BOUND}", higher_is_better=False,
           unit="nats"),
    Metric("i_loc_kl", f"KL(pre || post) over the `m_loc_a` span, nats; {KL_BOUND}", higher_is_better=False,
           unit="nats"),
    Metric("t_loc_vlkeb", "VLKEB's text locality: top-1 agreement at every sequence position"),
    Metric("i_loc_vlkeb", "VLKEB's image locality: top-10 ids agreeing rank by rank at every position"),
    *[Metric(f"port_{k}hop", f"token accuracy of the {k}-hop answer given `image` + the hop question") for k in HOP_RANGE],
    Metric("port_onehop", "token accuracy of `port_a` given `image` + `port_q` after also editing the one-hop fact"),
    Metric("stale_rate", "fraction of re-edited facts still answered in full with an older value of the fact",
           higher_is_better=False),
    Metric("retracted_recall", "token accuracy of a retracted edit's value right after the retraction (0: undone)",
           higher_is_better=False),
    Metric("retraction_restore", "token accuracy of the answer the fact had before the retracted edit (`pred`), "
           "right after the retraction"),
    # Probe rounds (monitor/round.py): health of the long-lived model.
    _round("retention", "reliability of earlier edits re-measured later in the stream (random sample)"),
    _round("retention_ci_low", "lower end of the 95% confidence interval of `retention`"),
    _round("retention_ci_high", "upper end of the 95% confidence interval of `retention`"),
    _round("retention_sample", "number of earlier edits re-measured for `retention`", higher_is_better=None,
           unit="count"),
    _round("forgetting", "reliability right after each sampled edit minus its reliability now", higher_is_better=False),
    _round("forgetting_significant", "1 when the retention interval lies below reliability at edit time "
           "(monitor.alarms.forgetting_significant), else 0", higher_is_better=False, aggregation="max"),
    _round("ref_ppl_ratio", "perplexity of the fixed reference set, edited / unedited", higher_is_better=False,
           unit="factor"),
    _round("ref_agreement", "top-1 agreement with the unedited model on the fixed reference set's answer spans"),
    _round("ref_kl", f"KL(pre || post) on the fixed reference set's answer spans, nats; {KL_BOUND}",
           higher_is_better=False, unit="nats"),
    _round("ref_accuracy", "token accuracy of the reference set's original answers"),
    _round("generation_entropy", "mean entropy of the next-token distribution on the reference set, nats",
           higher_is_better=None, unit="nats"),
    _round("weight_change_norm", "Frobenius norm of the accumulated weight change", higher_is_better=False,
           unit="norm"),
    _round("collapse_alarm", "1 when a collapse threshold is crossed in the round, else 0", higher_is_better=False,
           aggregation="max"),
    _round("retrieval_recall_at_1", "fraction of in-scope queries whose top memory hit is their own edit"),
    _round("retrieval_false_hit_rate", "fraction of out-of-scope queries that hit any memory", higher_is_better=False),
    _round("retrieval_latency_seconds", "mean time to route one query: embedding it plus the memory search, seconds",
           higher_is_better=False, aggregation="mean", unit="seconds"),
    _round("memory_search_seconds_p50", "upper bound of the latency-histogram bucket holding the median memory "
           "search time (the index alone), seconds",
           higher_is_better=False, unit="seconds"),
    _round("memory_search_seconds_p99", "upper bound of the latency-histogram bucket holding the 99th percentile "
           "memory search time (the index alone), seconds",
           higher_is_better=False, unit="seconds"),
    _round("memory_hits", "queries routed to a memory entry so far", higher_is_better=None, unit="count"),
    _round("memory_misses", "queries routed to the base model so far", higher_is_better=None, unit="count"),
    _round("memory_rebuilds", "index rebuilds so far (flat to approximate, growth)", higher_is_better=None,
           unit="count"),
    _round("memory_size", "edits held in the editor's memory", higher_is_better=None, unit="count"),
]
METRICS: dict[str, Metric] = {m.key: m for m in _DEFINED}


def get_metric(key: str) -> Metric:
    """The metric `key`, or an error naming the closest keys and all available ones."""
    if key not in METRICS:
        close = difflib.get_close_matches(key, METRICS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"Unknown metric {key!r}.{hint} Available: {', '.join(METRICS)}")
    return METRICS[key]


def reduce(key: str, values: Sequence[float]) -> float:
    """A run's values of metric `key` (in time order) as one number, by the metric's aggregation."""
    if not values:
        raise ValueError(f"no values of {key} to reduce")
    aggregation = get_metric(key).aggregation
    if aggregation == "last":
        return values[-1]
    if aggregation == "max":
        return math.nan if any(math.isnan(v) for v in values) else max(values)
    return math.fsum(values) / len(values)


def reduce_rounds(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The run-level value of every probe-round metric over a run's rounds (rounds.jsonl rows), by its aggregation."""
    series: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in METRICS and METRICS[key].scope == "round" and (value is None or isinstance(value, (int, float))):
                # null is how the rounds file holds NaN/Inf: it stays NaN, never hidden behind an older value
                series.setdefault(key, []).append(math.nan if value is None else float(value))
    return {key: reduce(key, values) for key, values in series.items()}


def best(key: str, values: Sequence[float]) -> float | None:
    """The best of several values of metric `key` by its direction, NaN never; None for a metric without one."""
    direction = get_metric(key).higher_is_better
    values = [value for value in values if not math.isnan(value)]  # max/min with NaN depend on the order
    if direction is None or not values:
        return None
    return max(values) if direction else min(values)


def token_accuracy(score: SpanScore) -> float:
    """Fraction of answer tokens predicted top-1 (reliability, generality, portability)."""
    return _agreement(score.argmax_ids, score.target_ids)


def _agreement(ids: torch.Tensor, others: torch.Tensor) -> float:
    """Fraction of positions where two (T,) id tensors agree, as a float32 mean gives it: counted on the host, since
    a span is a few ids and each torch op costs more than the count (a run asks this some 30 times an edit)."""
    same = sum(a == b for a, b in zip(ids.tolist(), others.tolist(), strict=True))
    return float(np.float32(same) / np.float32(len(ids))) if len(ids) else math.nan


def topk_kl(pre_logprobs: torch.Tensor, post_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) per position from the pre-edit top-k and the post log-probs at those ids.

    The vocabulary is coarsened to the k ids plus one bucket for the rest, so this is exact
    when k covers the vocabulary and a lower bound otherwise (coarsening never raises KL).
    Shapes: (T, k) -> (T,).
    """
    p = pre_logprobs.exp()
    q = post_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - q.sum(-1)).clamp(min=1e-12)
    head = (p * (pre_logprobs - post_logprobs)).sum(-1)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (head + tail).clamp(min=0)


def locality(post: SpanScore, reference: Reference) -> tuple[float, float]:
    """Top-1 agreement with the unedited model, and mean KL(pre || post), over the answer span."""
    return localities([(post, reference)])[0]


def localities(pairs: Sequence[tuple[SpanScore, Reference]]) -> list[tuple[float, float]]:
    """`locality` of each (post, reference) pair. The KL of the pairs of one top-k width is taken in one pass (a
    probe round asks it of every reference probe) and each pair's mean from its own rows, so a pair gets the very
    numbers it would alone."""
    kls = [0.0] * len(pairs)
    by_width: dict[int, list[int]] = {}
    for i, (post, reference) in enumerate(pairs):
        if post.gathered_logprobs is None:
            raise ValueError("locality needs the post-edit log-probs at the reference's top-k ids (score with gather=)")
        if post.gathered_logprobs.shape != reference.topk_logprobs.shape:  # rows joined below must pair up
            raise ValueError(f"post-edit log-probs {tuple(post.gathered_logprobs.shape)} against the reference's "
                             f"{tuple(reference.topk_logprobs.shape)}")
        by_width.setdefault(reference.topk_logprobs.shape[1], []).append(i)
    for members in by_width.values():
        kl = topk_kl(torch.cat([pairs[i][1].topk_logprobs for i in members]),
                     torch.cat([pairs[i][0].gathered_logprobs for i in members]))
        rows = [len(pairs[i][1].topk_logprobs) for i in members]
        for i, mean in zip(members, torch.stack([part.mean() for part in kl.split(rows)]).tolist()):
            kls[i] = mean
    return [(_agreement(post.argmax_ids, reference.topk_ids[:, 0]), kl) for (post, reference), kl in zip(pairs, kls)]


def vlkeb_locality(post: SpanScore, reference: Reference, k: int) -> float:
    """VLKEB's locality: top-k ids agreeing rank by rank at every position of the sequence.

    When a method changes the sequence length (an in-context prefix), the sequences are
    compared on their common tail, which ends at the answer in both.
    """
    if post.sequence_topk_ids is None or reference.sequence_topk_ids is None:
        raise ValueError("VLKEB-compatible locality needs sequence top-k ids before and after the edit")
    n = min(len(post.sequence_topk_ids), len(reference.sequence_topk_ids))
    after = post.sequence_topk_ids[-n:, :k].long()
    before = reference.sequence_topk_ids[-n:, :k].long()
    return (after == before).float().mean().item()


def score_probes(
    editor: Editor,
    probes: Iterable[Probe],
    references: ReferenceStore | None = None,
    top_k: int = 1,
    vlkeb_compat: bool = False,
    unedited: Iterable[Probe] = (),
) -> dict[str, SpanScore]:
    """Scores of `probes` by probe key, from one `editor.score` call: each distinct probe is run once.

    Locality probes whose key is in `references` also gather the log-probs at the pre-edit top-k
    ids (what `locality` compares); with `vlkeb_compat` every score carries sequence top-k ids.
    `unedited` probes are asked of the unedited model in the same call (`ScoresUnedited` editors
    only); their scores come back under `unedited_key(key)`.
    """
    asked = [(p.key, p, False) for p in probes] + [(unedited_key(p.key), p, True) for p in unedited]
    unique = list({key: (p, flag) for key, p, flag in asked}.items())
    if not unique:
        return {}
    gather = [references[p.key].topk_ids.long() if references is not None and p.metric in LOCALITY
              and p.key in references and not flag else None for _, (p, flag) in unique]
    sequence_k = max(VLKEB_TOP_K.values()) if vlkeb_compat else 0
    queries = [p.query for _, (p, _) in unique]
    if any(flag for _, (_, flag) in unique):
        if not isinstance(editor, ScoresUnedited):
            raise TypeError(f"{editor.name} cannot score unedited queries in the same call as edited ones")
        flags = [flag for _, (_, flag) in unique]
        scores = editor.score_mixed(queries, flags, top_k=top_k, gather=gather, sequence_top_k=sequence_k)
    else:
        scores = editor.score(queries, top_k=top_k, gather=gather, sequence_top_k=sequence_k)
    return {key: score for (key, _), score in zip(unique, scores)}


def unedited_key(key: str) -> str:
    """Where `score_probes` returns the unedited model's score of the probe `key`."""
    return f"unedited:{key}"


def keep_references(probes: Iterable[Probe], scores: dict[str, SpanScore], store: ReferenceStore) -> None:
    """Cache the unedited model's scores of the locality probes not yet in `store` as references."""
    for probe in probes:
        if probe.metric in LOCALITY and probe.key not in store:
            store[probe.key] = Reference.from_score(scores[probe.key])


def edit_values(
    probes: Iterable[Probe], scores: dict[str, SpanScore], references: ReferenceStore, vlkeb_compat: bool = False
) -> dict[str, float]:
    """Every metric of one edit's probes from their post-edit scores, keyed as in METRICS."""
    values: dict[str, float] = {}
    probes = list(probes)
    local = {probe.key: (scores[probe.key], references[probe.key]) for probe in probes if probe.metric in LOCALITY}
    found = dict(zip(local, localities(list(local.values()))))
    for probe in probes:
        score = scores[probe.key]
        if probe.metric in LOCALITY:
            values[probe.metric], values[f"{probe.metric}_kl"] = found[probe.key]
            if vlkeb_compat:
                values[f"{probe.metric}_vlkeb"] = vlkeb_locality(score, local[probe.key][1], VLKEB_TOP_K[probe.metric])
        else:
            values[probe.metric] = token_accuracy(score)
    return values


def base_values(probes: Iterable[Probe], scores: dict[str, SpanScore]) -> dict[str, float]:
    """Token accuracy of the (unedited) model on the original answers, keyed by probe metric."""
    return {p.metric: token_accuracy(scores[p.key]) for p in probes}


def fill_references(
    editor: Editor, probes: Iterable[Probe], store: ReferenceStore, vlkeb_compat: bool = False, top_k: int = 10
) -> None:
    """Score the locality probes not yet in `store` with `editor` (meant unedited) and cache them."""
    todo = [p for p in probes if p.metric in LOCALITY and p.key not in store]
    keep_references(todo, score_probes(editor, todo, top_k=top_k, vlkeb_compat=vlkeb_compat), store)


def measure(
    editor: Editor, probes: list[Probe], references: ReferenceStore, vlkeb_compat: bool = False
) -> dict[str, float]:
    """Every metric of one edit's probes on the edited model, keyed as in METRICS."""
    scores = score_probes(editor, probes, references, vlkeb_compat=vlkeb_compat)
    return edit_values(probes, scores, references, vlkeb_compat)


def measure_base(editor: Editor, probes: list[Probe]) -> dict[str, float]:
    """Token accuracy of the (unedited) model on the original answers, keyed by probe metric."""
    return base_values(probes, score_probes(editor, probes))


class RunningMeans:
    """Mean of each key over the rows that have it (rows may lack e.g. 4-hop portability).

    Kept as sums and counts, a JSON-able mapping that a checkpoint stores and restores exactly.
    """

    def __init__(self, data: dict[str, list[float]] | None = None) -> None:
        self.data: dict[str, list[float]] = data or {}

    def add(self, values: dict[str, float]) -> None:
        """Count one row of values."""
        for key, value in values.items():
            total = self.data.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1

    def count(self, key: str) -> int:
        """How many rows had `key`."""
        return int(self.data.get(key, [0.0, 0])[1])

    def means(self) -> dict[str, float]:
        """Mean of every key."""
        return {key: total / count for key, (total, count) in self.data.items()}


def aggregate(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the rows that have it."""
    means = RunningMeans()
    for row in rows:
        means.add(row)
    return means.means()
