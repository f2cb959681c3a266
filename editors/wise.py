"""`wise`: a side memory beside one decoder MLP, an activation router, knowledge shards merged with TIES.

After WISE (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model
Editing of Large Language Models"), read in EasyEdit's easyeditor/models/wise/ (WISE.py,
utils.py, merge/gta.py) and hparams/WISE/*.yaml:
- Main memory: the output projection (`down_proj`; OPT: `fc2`) of one decoder layer, never changed.
- Side memory: copies of that matrix. Edits train the current *shard* (a copy of the main matrix,
  WISE.py `new_weight`), with gradients masked by a random mask of `mask_ratio` drawn per shard
  (`generate_activation_mask`). Every `shard_every` edits the shard is put aside (`save_weight`)
  and a fresh one starts from the main matrix; every `merge_every` edits the put-aside shards are
  TIES-merged into the side memory (`merge_weight`; the second and later merges keep the side
  memory as one more input at weight 0.6 against 0.4 shared by the shards).
- Router (WISE.py `euc`, `WISEAdapter.forward`): the activation score of a memory on a query pools
  over tokens || act(x W_mem^T) - act(x W_main^T) ||_2, with x the MLP's hidden input
  and act the decoder's activation function. A query goes to the memory with the highest score
  when that score reaches the threshold `act_ratio` x (the *lowest* in-scope score of any edit at
  the end of its training: `EditingMeanAct.min_act`, despite its name), else to the main memory.
- Editing loss (paper Eq. 4-5, WISE.py `_cal_activation_loss`): the answer NLL plus hinge margins
  on activation scores: irrelevant queries below `alpha`, the edit above `beta`, and the edit at
  least `gamma` above every irrelevant query. SGD with lr `lr`, each weight kept within
  `norm_constraint` of the main memory's (`_norm_constraint`).

Multimodal and streaming decisions (where WISE assumed other inputs):
- Tokens scored: the prompt's, image tokens included, answer excluded, pooled by their maximum
  (`pooling`) in training and routing alike. EasyEdit averages over every position of the padded
  edit rows while training, but at inference takes the maximum token of any sequence over 100
  tokens, which every LLaVA / Qwen2-VL input with an image is; its multimodal yamls lower
  `act_ratio` to 0.4 to set a max-token score against mean-token training scores. One statistic
  for both keeps the threshold on one scale, so the ratio is the text yaml's 0.88, where the two
  statistics coincide. Routing that ignores the answer is the same for any answer and in
  generation. Measured on the default world (20 edits): max pooling edits reliably (0.97 vs
  0.42 with mean), mean pooling keeps text locality out of the side memory better (0 vs 0.3).
- Irrelevant queries: EasyEdit takes each request's own locality question; an `EditRequest` has
  none. WISE therefore learns (`trainable`): `train` keeps a fixed, seeded sample of the train
  split's locality queries, half text-only facts, half other images asked the edit-style
  questions, so the margin teaches the router both "not this fact" and "not this image". Every
  edit uses the whole sample, plus its own question asked about each of the sample's images
  (the image-locality probe's exact form: same question, another image).
- Pending shards: EasyEdit's merge mode routes only between the merged memory and the current
  shard, so shards put aside but not yet merged are unreachable until the next merge (its
  evaluation merges them first). Probes run every few edits here, so every live memory (merged,
  pending, current) is a candidate and the highest score wins, as in WISE-Retrieve.
- Layer: EasyEdit edits LLaMA-2-7B's layer 27 of 32 and Qwen2-VL-7B's / LLaVA-OV-7B's 23 of 28;
  both are floor(0.85 x depth), which the default follows (the last layer of a 2-3 layer model).
- Retrieval: WISE routes to a memory, not to an edit. `retrieve` names, for a query routed to the
  side, the stored edit whose unedited layer output (mean over prompt tokens, main memory, so it
  never goes stale) is nearest by cosine; None for the main memory.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers.activations import ACT2FN

from editors.adapter import LVLM
from editors.editor import (
    EditExample,
    EditOutcome,
    Editor,
    EditRequest,
    HasMemory,
    HasWeightDelta,
    Retrieval,
    bypassing,
    weak_hook,
)
from editors.inputs import Query, image_index_groups, row_ids
from editors.losses import answer_nll, image_groups
from editors.state import EditorState
from editors.weights import trainable_only

log = logging.getLogger(__name__)


class WiseConfig(BaseModel):
    """WISE settings; defaults from EasyEdit's hparams/WISE/qwen2vl-7b.yaml and llavaov-7b.yaml unless a field says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int | None = Field(
        None, description="decoder layer of the side memory (negative counts from the end); default floor(0.85 x depth): "
        "yaml inner_params layers[27] of LLaMA-2-7B's 32, layers[23] of Qwen2-VL-7B's 28"
    )
    mask_ratio: float = Field(0.2, gt=0, le=1, description="fraction of the shard's weights a gradient may reach (yaml mask_ratio)")
    lr: float = Field(1.0, gt=0, description="SGD learning rate (yaml edit_lr)")
    steps: int = Field(10, ge=1, description="maximum SGD steps per edit (yaml n_iter: 10 multimodal, 70 text)")
    weight_decay: float = Field(1e-5, ge=0, description="SGD weight decay (WISE.py: SGD(..., weight_decay=1e-5))")
    norm_constraint: float = Field(1.0, gt=0, description="largest change of any shard weight from the main memory's (yaml norm_constraint)")
    alpha: float = Field(5.0, ge=0, description="irrelevant queries' activation score is pushed below this (yaml act_margin[0])")
    beta: float = Field(20.0, ge=0, description="the edit's activation score is pushed above this (yaml act_margin[1])")
    gamma: float = Field(10.0, ge=0, description="margin of the edit's score over each irrelevant query's (yaml act_margin[2])")
    act_ratio: float = Field(
        0.88, gt=0, description="threshold = act_ratio x the lowest in-scope score of any edit (llama-7b.yaml act_ratio 0.88; "
        "the multimodal yamls' 0.4 offsets their max-token inference against mean-token training, see the module docstring)"
    )
    shard_every: int = Field(500, ge=1, description="edits per knowledge shard (one random mask each; yaml save_freq)")
    merge_every: int = Field(1000, ge=1, description="edits between TIES merges of the shards into the side memory (yaml merge_freq)")
    merge_alg: Literal["ties"] = Field("ties", description="how shards merge (yaml merge_alg: TIES = GTA magnitude/sum/normalize)")
    density: float = Field(0.53, gt=0, le=1, description="fraction of each task vector TIES keeps, by magnitude (yaml densities)")
    irrelevant: int = Field(
        8, ge=1, description="irrelevant (locality) queries kept from the train split for the margin loss, half text-only, half with images"
    )
    pooling: Literal["mean", "max"] = Field(
        "max", description="how a query's per-token scores over its prompt pool, in training and routing alike (WISE.py "
        "`euc`: max at inference over 100 tokens, i.e. any LVLM image input; mean in training and for short text)"
    )
    stop_loss: float = Field(0.02, ge=0, description="stop early below this loss once it changes by <= 1e-4 (utils.EarlyStopMeter)")
    seed: int = Field(0, description="seed of the shard masks and the irrelevant sample")

    @model_validator(mode="after")
    def _shards_divide_merges(self) -> WiseConfig:
        if self.merge_every % self.shard_every:
            raise ValueError(f"merge_every ({self.merge_every}) must be a multiple of shard_every ({self.shard_every})")
        return self


class _Stop(Exception):
    """Raised by the hook once the side-memory layer has run: the layers above are not needed."""


@dataclass
class _Pass:
    """What the side-memory hook does in one forward over a batch of queries (rows)."""

    prompt_lengths: list[int]  # per row: positions before the answer, the tokens scored (set per forward: `_enter`)
    by_ids: dict[tuple[int, ...], int] | None = None  # full-sequence scoring: token ids -> prompt length
    side: int = 0  # rows routed to a side memory, over every forward of the pass
    train: torch.Tensor | None = None  # editing: the shard being trained answers every row
    stop: bool = False  # raise _Stop after the layer
    scores: torch.Tensor | None = None  # (B,) activation score of the trained shard / of the best memory
    chosen: torch.Tensor | None = None  # (B,) index of the memory each row went to, -1 = main
    main_mean: torch.Tensor | None = None  # (B, H) main memory's output, mean over prompt tokens


class Wise(Editor, HasMemory, HasWeightDelta):
    """Side memory with activation routing, random-mask shards and TIES merges; the main weights never change."""

    name = "wise"
    Config = WiseConfig
    cannot_retract = "its edits are trained into shared side-memory weights and merged"
    trainable = True  # keeps a sample of the train split's locality queries (the irrelevant set)

    def __init__(self, lvlm: LVLM, config: WiseConfig | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        self.irrelevant: list[Query] = []
        self._hook_handles: list[Any] = []
        self._configure()

    # -- set-up ------------------------------------------------------------------------------

    def _configure(self) -> None:
        depth = self.lvlm.decoder_depth
        index = math.floor(0.85 * depth) if self.config.layer is None else self.config.layer
        (self.parameter_name,) = self.lvlm.parameter_group("llm", layers=[index], modules=("down",))
        self.module = self.lvlm.model.get_submodule(self.parameter_name.removesuffix(".weight"))
        self.main = self.module.weight  # the main memory: read, never written
        text_config = self.lvlm.model.config.get_text_config()
        act = next(getattr(text_config, k) for k in ("hidden_act", "hidden_activation", "activation_function")
                   if getattr(text_config, k, None))
        self._act = ACT2FN[act]
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = [self.module.register_forward_hook(weak_hook(self, "_hook"))] + [
            top.register_forward_pre_hook(weak_hook(self, "_enter"), with_kwargs=True)
            for top in self.lvlm.entry_modules()]
        self._pass: _Pass | None = None
        self._bypass = False
        self._clear()

    def _clear(self) -> None:
        """Forget every edit: no merged memory, no shards, threshold unset."""
        self.side: torch.Tensor | None = None  # the merged side memory, None until the first merge
        self.pending: list[torch.Tensor] = []  # shards put aside, waiting for the next merge
        self.current: torch.Tensor | None = None  # the shard edits train now, None until its first edit
        self.mask: torch.Tensor | None = None  # (out, in) bool gradient mask of the current shard
        self.edits = 0
        self.merges = 0
        self.min_activation = math.inf
        self.keys: list[str] = []
        self.key_vectors = torch.zeros(0, self.main.shape[0])  # (N, H) per edit, for `retrieve`
        self.routed = {"side": 0, "main": 0}

    @property
    def threshold(self) -> float:
        """Activation score at or above which a query goes to the side memory (inf before any edit)."""
        return self.config.act_ratio * self.min_activation

    def _memories(self) -> list[torch.Tensor]:
        return [w for w in (self.side, *self.pending, self.current) if w is not None]

    def train(self, examples: Sequence[EditExample], progress: bool = True) -> dict[str, float]:
        """Keep a seeded sample of the examples' locality queries as the irrelevant set of the margin loss."""
        text = [q for e in examples for q in e.locality if q.image is None]
        image = [q for e in examples for q in e.locality if q.image is not None]
        if not text and not image:
            raise ValueError("WISE needs locality queries in the train split (its irrelevant inputs)")
        rng = random.Random(self.config.seed)
        half = self.config.irrelevant // 2
        take_image = min(len(image), max(self.config.irrelevant - min(len(text), half), 0))
        take_text = min(len(text), self.config.irrelevant - take_image)
        self.irrelevant = rng.sample(text, take_text) + rng.sample(image, take_image)
        return {"irrelevant_text": float(take_text), "irrelevant_image": float(take_image)}

    # -- the hook ----------------------------------------------------------------------------

    def _activation(self, side: torch.Tensor, main: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) mean over the masked tokens of || act(side) - act(main) ||_2 (WISE.py `euc`)."""
        distance = (self._act(side.float()) - self._act(main.float())).norm(dim=-1)  # (B, L)
        if self.config.pooling == "max":
            return distance.masked_fill(mask == 0, float("-inf")).amax(1)
        return (distance * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Read each row's prompt length from the batch the model gets: `LVLM.score` sorts and batches rows its own
        way. Its answer positions (`logits_to_keep`, B x T) start at the last prompt token; full-sequence scoring
        finds a row by its token ids."""
        run = self._pass
        keep = kwargs.get("logits_to_keep")
        if run is None:
            return
        if isinstance(keep, torch.Tensor) and keep.ndim == 2:
            run.prompt_lengths = (keep[:, 0] + 1).tolist()
        elif run.by_ids is not None and kwargs.get("input_ids") is not None:
            run.prompt_lengths = [run.by_ids[ids] for ids in row_ids(kwargs["input_ids"], kwargs.get("attention_mask"))]

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        run = self._pass
        if run is None:
            return None
        rows, shape = len(run.prompt_lengths), output.shape
        x = args[0]  # (B, L, I) the MLP's hidden input; OPT flattens it to (B * L, I)
        if x.dim() not in (2, 3) or (x.shape[0] != rows if x.dim() == 3 else x.shape[0] % rows):
            raise RuntimeError(f"wise: the layer saw inputs of shape {tuple(x.shape)} for {rows} queries")
        x, output = x.view(rows, -1, x.shape[-1]), output.view(rows, -1, output.shape[-1])
        positions = torch.arange(x.shape[1], device=x.device)
        mask = (positions[None, :] < torch.tensor(run.prompt_lengths, device=x.device)[:, None]).float()  # (B, L)
        run.main_mean = ((output.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).detach()
        if run.train is not None:
            result = F.linear(x, run.train.to(x.dtype), module.bias)
            run.scores = self._activation(result, output, mask)
        else:
            outs = torch.stack([F.linear(x, w, module.bias) for w in self._memories()])  # (C, B, L, H)
            scores = torch.stack([self._activation(o, output, mask) for o in outs])  # (C, B)
            best, index = scores.max(0)
            routed = best >= self.threshold  # WISE.py: the main memory only when the score is below it
            run.scores, run.chosen = best, torch.where(routed, index, -1)
            run.side += int(routed.sum())
            picked = outs[index, torch.arange(x.shape[0], device=x.device)]  # (B, L, H)
            result = torch.where(routed[:, None, None], picked, output)
        if run.stop:
            raise _Stop
        return result.view(shape)

    @contextmanager
    def _running(self, run: _Pass) -> Iterator[_Pass]:
        self._pass = run
        try:
            yield run
        except _Stop:
            pass
        finally:
            self._pass = None

    def _prompt_lengths(self, queries: Sequence[Query]) -> list[int]:
        return [self.lvlm.inputs.encode(q, with_answer=bool(q.answer.strip())).answer_start for q in queries]

    def _layer_pass(self, queries: Sequence[Query], train: torch.Tensor | None = None) -> _Pass:
        """Run queries (one image group) up to the side-memory layer: scores, choices, main outputs."""
        with self._running(_Pass(self._prompt_lengths(queries), train=train, stop=True)) as run:
            self.lvlm.span_logits(queries)
        return run

    # -- scoring and routing -----------------------------------------------------------------

    def score(self, queries: Sequence[Query], **kwargs: Any) -> list:
        """Teacher-forced scores, each query answered by the memory the router picks for it."""
        if self._bypass or not self._memories():
            return self.lvlm.score(queries, **kwargs)
        by_ids = None
        if kwargs.get("sequence_top_k"):
            by_ids = {tuple(e.input_ids): e.answer_start for e in self.lvlm.inputs.encode_many(queries)}
        with self._running(_Pass([], by_ids=by_ids)) as run:
            scores = self.lvlm.score(queries, **kwargs)
        self.routed["side"] += run.side
        self.routed["main"] += len(queries) - run.side
        return scores

    def retrieve(self, queries: Sequence[Query]) -> list[Retrieval]:
        """Per query: the nearest stored edit when routed to the side memory, None for the main memory."""
        out: list[Retrieval | None] = [None] * len(queries)
        if self._bypass or not self._memories():
            return [Retrieval(None, 0.0) for _ in queries]
        keys = F.normalize(self.key_vectors, dim=-1)
        with torch.no_grad():
            for group in image_index_groups(queries):
                run = self._layer_pass([queries[i] for i in group])
                nearest = (F.normalize(run.main_mean.cpu(), dim=-1) @ keys.T).argmax(1)
                for row, i in enumerate(group):
                    key = self.keys[int(nearest[row])] if run.chosen[row] >= 0 else None
                    out[i] = Retrieval(key, float(run.scores[row]))
        return out  # type: ignore[return-value]

    def memory_size(self) -> int:
        """Edits held in the side memory."""
        return len(self.keys)

    def retrieval_stats(self) -> dict[str, float]:
        """The router's threshold, its side/main decisions in `score` so far, shards and merges."""
        return {
            "router_threshold": self.threshold if math.isfinite(self.threshold) else -1.0,
            "router_side_total": float(self.routed["side"]),
            "router_main_total": float(self.routed["main"]),
            "side_memory_merges": float(self.merges),
            "side_memory_pending_shards": float(len(self.pending)),
        }

    # -- editing -----------------------------------------------------------------------------

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Train the current shard on the edit (masked SGD on NLL + margins); put shards aside and merge on schedule."""
        if not self.irrelevant:
            raise RuntimeError("wise: call train() on a train split first; it keeps the irrelevant queries of the margin loss")
        if self.edits % self.config.shard_every == 0 or self.mask is None:
            self.mask = self._new_mask(self.edits // self.config.shard_every)
        start = (self.current if self.current is not None else self.main).detach()
        weight = self._tune(edit, start.clone())
        if weight is None or not torch.isfinite(weight).all():
            message = f"edit {'had a non-finite loss' if weight is None else 'left non-finite side-memory weights'}; rolled back"
            log.warning(message)
            return EditOutcome(applied=False, message=message)
        with torch.no_grad():
            run = self._layer_pass([edit.query], train=weight)
        self.current = weight
        self.min_activation = min(self.min_activation, float(run.scores[0]))
        self.keys.append(edit.key)
        self.key_vectors = torch.cat([self.key_vectors, run.main_mean.cpu()])
        self.edits += 1
        if self.edits % self.config.shard_every == 0:
            self.pending.append(self.current)
            self.current = None
        if self.edits % self.config.merge_every == 0:
            self._merge()
        return EditOutcome(applied=True, changed={f"{self.parameter_name}@side": float((weight - start).float().norm())})

    def _new_mask(self, shard: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + shard)
        return (torch.rand(self.main.shape, generator=generator) < self.config.mask_ratio).to(self.main.device)

    def _tune(self, edit: EditRequest, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight` trained on the edit, or None where a loss was not finite (the edit failed, whatever it learnt)."""
        weight.requires_grad_(True)
        optimizer = torch.optim.SGD([weight], lr=self.config.lr, weight_decay=self.config.weight_decay)
        main, bound = self.main.detach(), self.config.norm_constraint
        previous = math.inf
        negatives = self._negatives(edit)
        with trainable_only(self.lvlm.model, []):
            for step in range(self.config.steps):
                with self._running(_Pass(self._prompt_lengths([edit.query]), train=weight)) as run:
                    nll = answer_nll(self.lvlm, [edit.query])
                inside = run.scores  # (1,)
                outside = torch.cat([self._layer_pass(g, train=weight).scores for g in image_groups(negatives)])
                loss = nll + margin_loss(inside, outside, self.config.alpha, self.config.beta, self.config.gamma)
                if not torch.isfinite(loss):
                    log.debug("wise: edit %r had a non-finite loss at step %d", edit.key, step)
                    return None
                if loss.item() <= self.config.stop_loss and abs(previous - loss.item()) <= 1e-4:
                    break
                previous = loss.item()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight.grad *= self.mask  # knowledge sharding: this shard's random subspace only
                optimizer.step()
                with torch.no_grad():
                    weight.copy_(torch.maximum(torch.minimum(weight, main + bound), main - bound))
        log.debug("wise: edit %r stopped at step %d, loss %.4f", edit.key, step, loss.item())
        return weight.detach()

    def _negatives(self, edit: EditRequest) -> list[Query]:
        """The irrelevant set, plus the edit's own question about each of its images (the hardest image locality)."""
        if edit.image is None:
            return list(self.irrelevant)
        return [*self.irrelevant, *(Query(edit.prompt, edit.target, q.image) for q in self.irrelevant if q.image is not None)]

    def _merge(self) -> None:
        """TIES-merge the pending shards (and the side memory after the first merge) into the side memory."""
        n = len(self.pending)
        if self.side is None:
            tensors, weights = self.pending, [1.0 / n] * n
        else:  # WISE.py merge_weight: 0.4 shared by the new shards, 0.6 for what was merged before
            tensors, weights = [*self.pending, self.side], [0.4 / n] * n + [0.6]
        self.side = ties_merge(self.main.detach(), tensors, weights, self.config.density)
        self.pending = []
        self.merges += 1

    # -- contract ----------------------------------------------------------------------------

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Every query goes to the main memory inside the block."""
        with bypassing(self):
            yield

    def weight_change(self) -> float:
        """Frobenius norm of (side memory - main) over the merged memory, pending shards and the current shard."""
        main = self.main.detach().double()
        return math.sqrt(sum(float((w.double() - main).pow(2).sum()) for w in self._memories()))

    def reset(self) -> None:
        """Back to a side memory equal to the main one: shards, merges, threshold and keys forgotten (the irrelevant set kept)."""
        self._clear()

    def state(self) -> EditorState:
        """Side memory, shards, mask, threshold, counters, keys and the irrelevant set; no pickle."""
        tensors: dict[str, torch.Tensor] = {"key_vectors": self.key_vectors}
        if self.side is not None:
            tensors["side"] = self.side
        tensors |= {f"pending.{i}": w for i, w in enumerate(self.pending)}
        if self.current is not None:
            tensors["current"] = self.current
        if self.mask is not None:
            tensors["mask"] = self.mask.to(torch.uint8)
        irrelevant = []
        for i, q in enumerate(self.irrelevant):
            if q.image is not None:
                tensors[f"irrelevant.{i}"] = torch.from_numpy(np.array(q.image.convert("RGB")))
            irrelevant.append({"prompt": q.prompt, "answer": q.answer, "image": q.image is not None})
        meta = {"edits": self.edits, "merges": self.merges, "min_activation": self.min_activation
                if math.isfinite(self.min_activation) else None, "keys": self.keys, "irrelevant": irrelevant,
                "routed": self.routed}
        return self._new_state(meta, tensors)

    def load_state(self, state: EditorState) -> None:
        """Adopt the state's config and restore its memories onto the unedited model."""
        self._check_state(state)
        config = self.Config.model_validate(state.meta["config"])
        if config != self.config:
            self.config = config
            self._configure()
        self._clear()
        t, meta, device = state.tensors, state.meta, self.main.device
        for name in ("side", "current", *(f"pending.{i}" for i in range(len(t)))):
            if name in t and t[name].shape != self.main.shape:
                raise ValueError(f"wise state: {name} has shape {tuple(t[name].shape)}, the layer {tuple(self.main.shape)}")
        self.side = t["side"].to(device, self.main.dtype) if "side" in t else None
        self.pending = [t[f"pending.{i}"].to(device, self.main.dtype) for i in range(len(t)) if f"pending.{i}" in t]
        self.current = t["current"].to(device, self.main.dtype) if "current" in t else None
        self.mask = t["mask"].to(device).bool() if "mask" in t else None
        self.edits, self.merges, self.keys = int(meta["edits"]), int(meta["merges"]), list(meta["keys"])
        self.min_activation = math.inf if meta["min_activation"] is None else float(meta["min_activation"])
        self.key_vectors = t["key_vectors"].float()
        self.routed = dict(meta["routed"])
        self.irrelevant = [
            Query(q["prompt"], q["answer"], Image.fromarray(t[f"irrelevant.{i}"].numpy()) if q["image"] else None)
            for i, q in enumerate(meta["irrelevant"])
        ]


def margin_loss(inside: torch.Tensor, outside: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """WISE's activation margins (paper Eq. 5; WISE.py `_cal_activation_loss`): each hinge is the mean of its positive terms."""
    pairs = outside[:, None] - inside[None, :] + gamma  # (N_out, N_in)
    return _mean_positive(pairs) + _mean_positive(outside - alpha) + _mean_positive(beta - inside)


def _mean_positive(values: torch.Tensor) -> torch.Tensor:
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023; EasyEdit merge/gta.py GTA('magnitude', 'sum', normalize=True)).

    Task vectors (tensor - base) keep their `density` largest-magnitude entries; each entry takes
    the sign of the weighted sum, and the weighted mean of the task vectors agreeing with it.
    """
    deltas = []
    for tensor in tensors:
        delta = (tensor - base).float().flatten()
        keep = int(density * delta.numel())
        pruned = torch.zeros_like(delta)
        if keep:
            top = delta.abs().topk(keep).indices
            pruned[top] = delta[top]
        deltas.append(pruned)
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device)[:, None]  # (n, 1)
    weighted = torch.stack(deltas) * w  # (n, numel)
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == majority).float()
    divisor = (w * agree).sum(0)
    mixed = (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    return (base.float() + mixed.view(base.shape)).to(base.dtype)


