"""The LVLM adapter: one class over the transformers vision-language families.

It loads a model by hub id or path, scores answer spans teacher-forced in batches, generates,
and names the parameter groups editors change (`llm`, `vision`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from editors.families import Family, UnsupportedModelError, family_for, plugin_families, supported
from editors.families.base import stack_features
from editors.inputs import Batch, Encoded, InputBuilder, InputError, Query, image_digest, image_index_groups
from editors.prefixes import (
    PACK_TOKENS,
    PREFIX_CACHE_BYTES,
    KeysValues,
    PrefixKey,
    bytes_per_token,
    pack_layout,
    plan_packs,
    prefix_cache,
    shared_prefixes,
    suffix,
    within_window,
)
from editors.prompts import PromptFormat
from memory.cache import GenerationCache, LRUCache

FEATURE_CACHE_BYTES = 256 * 2**20
# Parameters whose magnitudes `LVLM.nonfinite_parameters` takes at once: a bound on its temporaries.
FINITE_CHECK_BYTES = 64 * 2**20
RECORDING_HOOKS = "transformers.utils.output_capturing"  # the module of the hooks transformers puts on layers
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GROUPS = ("llm", "vision")


@dataclass
class SpanScore:
    """Teacher-forced scores of one answer span; T answer tokens, k top-k entries."""

    target_ids: torch.Tensor  # (T,) the answer's token ids
    argmax_ids: torch.Tensor  # (T,) the model's top-1 prediction at each answer position
    target_logprobs: torch.Tensor  # (T,) log p(answer token | prefix)
    topk_ids: torch.Tensor  # (T, k)
    topk_logprobs: torch.Tensor  # (T, k)
    entropy: torch.Tensor  # (T,) entropy of the predictive distribution, nats
    gathered_logprobs: torch.Tensor | None = None  # (T, j) log-probs at caller-given ids
    sequence_topk_ids: torch.Tensor | None = None  # (L, k') top ids at every sequence position


def _gathered_from_top(score: SpanScore, gather: torch.Tensor) -> torch.Tensor | None:
    """Log-probs at `gather` (T', j) read from `score`'s top-k, or None when an id is not among them."""
    rows, ids = gather.shape
    if rows > len(score.topk_ids):
        return None
    if ids <= score.topk_ids.shape[1] and torch.equal(gather, score.topk_ids[:rows, :ids]):
        return score.topk_logprobs[:rows, :ids]  # the usual ask: a locality probe at its own pre-edit top-k
    match = gather[:, :, None] == score.topk_ids[:rows, None, :]  # (T', j, k)
    if not bool(match.any(-1).all()):
        return None
    return score.topk_logprobs[:rows].gather(-1, match.int().argmax(-1))


Memoised = tuple[SpanScore, int, torch.Tensor | None]  # a score, the top-k it was computed with, the ids gathered at


@dataclass
class SpanLogits:
    """Differentiable answer-span logits of a batch, for editing losses."""

    logits: torch.Tensor  # (B, T, V)
    targets: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool


# What one more forward costs, in padded tokens: on one CPU core a forward of the default model costs ~2.5 ms fixed
# and ~20 us per token; `padded_batches` splits a group only where padding would cost more than another forward.
BATCH_COST_TOKENS = 128


def padded_batches(rows: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """`rows` (sorted by their `lengths`, ascending) cut into batches of at most `batch_size` that minimise the
    padded tokens plus `BATCH_COST_TOKENS` per batch: contiguous cuts, by dynamic programming."""
    best = [0] + [None] * len(rows)  # best[n]: least cost of the first n rows
    cut = [0] * (len(rows) + 1)
    for end in range(1, len(rows) + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + (end - start) * lengths[end - 1] + BATCH_COST_TOKENS
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(rows)
    while end:
        batches.append(rows[cut[end] : end])
        end = cut[end]
    return batches[::-1]


class ScoreMemo:
    """Span scores of queries already run on an unchanged model, so a query asked again costs a lookup.

    Sound only while the model's output for an input cannot change: memory editors (SERAC, IKE)
    never touch the weights and rewrite prompts instead, so the same rewritten query gets the
    same score, and probe rounds ask the same reference and retention queries again and again.
    A query asked for fewer top-k entries, or for the log-probs at ids its stored top-k holds
    (a locality probe gathering at its own pre-edit top-k), is answered from the stored score:
    those are the very numbers a forward would give. As a guard the memo is emptied when a
    parameter is added, replaced or changed in place (its version counter moves), or when the
    prompt format or a template changes (`InputBuilder.form`). Scores are kept
    in generations (`GenerationCache`), the oldest going whole beyond `capacity`, so that a
    checkpoint can save the memo a sealed generation at a time (and a copy of the open one) and a
    resumed run look up the very scores the uninterrupted one holds (`restore`). The decoder's
    keys and values of shared image prefixes (`LVLM.score`) are kept alongside, under the same
    guard, up to `prefix_bytes`, and are not saved.
    """

    def __init__(self, capacity: int = 65536, prefix_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.scores: GenerationCache[Memoised] = GenerationCache(capacity)
        self.prefixes: LRUCache[KeysValues] = prefix_cache(prefix_bytes)  # shared image prefixes (`LVLM.score`)
        self._under: tuple = ()  # the weights' versions and the input form the scores were computed under

    def key(self, query: Query, sequence_top_k: int) -> tuple:
        """What a score depends on besides the weights, the input form and the top-k asked: the query's text and image."""
        image = None if query.image is None else image_digest(query.image)
        return query.prompt, query.answer, image, sequence_top_k

    def get(self, key: tuple, top_k: int, gather: torch.Tensor | None) -> SpanScore | None:
        """The score under `key` with `top_k` entries and log-probs at `gather`, or None if the memo cannot tell."""
        held = self.scores.get(key)
        if held is None:
            return None
        gather = None if gather is None else gather.cpu()  # scores are held on the host
        score, asked, gathered_at = held
        if top_k > asked:
            return None
        if gather is None:
            gathered = None
        elif gathered_at is not None and torch.equal(gather, gathered_at):
            gathered = score.gathered_logprobs
        else:
            gathered = _gathered_from_top(score, gather)
            if gathered is None:
                return None
        if top_k == asked and gathered is score.gathered_logprobs:
            return score
        return replace(score, topk_ids=score.topk_ids[:, :top_k], topk_logprobs=score.topk_logprobs[:, :top_k],
                       gathered_logprobs=gathered)

    def put(self, key: tuple, score: SpanScore, top_k: int, gather: torch.Tensor | None) -> None:
        """Keep `score`, computed with `top_k` entries and log-probs at `gather`."""
        self.scores.put(key, (score, top_k, None if gather is None else gather.cpu()))

    def check(self, versions: tuple, form: tuple) -> None:
        """Empty the memo (scores and prefixes) if the model's parameters (their `Guards.versions`) or the input
        `form` changed since it was filled."""
        under = (versions, form)
        if under != self._under:
            self.clear()
            self._under = under

    def restore(self, sealed: dict[int, dict[tuple, Memoised]], opened: int, values: dict[tuple, Memoised],
                model: nn.Module, form: tuple) -> None:
        """Hold saved scores of `model` as it is now, under the input `form` (see `GenerationCache.restore`)."""
        self.clear()
        self.scores.restore(sealed, opened, values)
        self._under = (guards(model).versions, form)

    def clear(self) -> None:
        """Forget every score and prefix."""
        self.scores.clear()
        self.prefixes.clear()


def _encoder_outputs(features: list[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """Image features (one (N, D) per image row) as the model's `mm_encoder_outputs`, in place of its pixels."""
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


@dataclass(frozen=True)
class Guards:
    """What the caches of `LVLM.score` check, from one walk of the model (reading `_modules` directly:
    `nn.Module.modules()` builds every module's name on the way). A version is which tensor holds a parameter and
    how often it was changed in place."""

    versions: tuple  # every parameter's: what the score memo depends on
    outside: tuple  # those of the parameters outside `inner` (the text decoder): what image features depend on
    hooked: bool  # a module has a forward hook that may change what it computes (see `LVLM.score`)


def guards(root: nn.Module, inner: nn.Module | None = None) -> Guards:
    """The `Guards` of `root`, `outside` being the parameters not under `inner`."""
    versions: list[tuple[int, int]] = []
    outside: list[tuple[int, int]] = []
    hooked = False
    stack = [(root, False)]
    while stack:  # plain loops: this runs for every scoring call, over every module
        module, under = stack.pop()
        under = under or module is inner
        for param in module._parameters.values():
            if param is not None:
                versions.append((id(param), param._version))
                if not under:
                    outside.append(versions[-1])
        if not hooked and (module._forward_hooks or module._forward_pre_hooks):
            hooked = any(hook.__module__ != RECORDING_HOOKS for hook in
                         (*module._forward_hooks.values(), *module._forward_pre_hooks.values()))
        for child in module._modules.values():
            if child is not None:
                stack.append((child, under))
    return Guards(tuple(versions), tuple(outside), hooked)


class LVLM:
    """A vision-language model behind one interface, whatever its family."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        image_processor,
        chat_template: str | None = None,
        prompt_format: PromptFormat = "auto",
        name: str = "",
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.family: Family = family_for(model.config)
        self.family.check(model.config)
        self.inputs = InputBuilder(
            self.family, model.config, tokenizer, image_processor, chat_template, prompt_format, extras=extras
        )
        self.name = name or model.config.name_or_path or self.family.name
        # Image features by image digest, for families that `shares_image_features`; valid while the weights
        # outside the text decoder are unchanged (`_vision_weights`).
        self.features: LRUCache[torch.Tensor] = LRUCache(FEATURE_CACHE_BYTES, lambda t: t.numel() * t.element_size())
        self._vision_weights: tuple = ()

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        prompt_format: PromptFormat = "auto",
        trust_remote_code: bool = False,
    ) -> LVLM:
        """Load a model, its tokenizer and its (PIL) image processor from a hub id or a folder.

        The family is checked on the config before any weight is read; weights are read straight
        onto `device` in `dtype`. `trust_remote_code` runs code shipped with the checkpoint.
        """
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}. Available: {', '.join(DTYPES)}")
        source = str(name_or_path)
        folder = Path(source)
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise OSError(f"model folder {source} has no config.json")
        if not folder.exists() and (folder.is_absolute() or source.startswith(".") or source.count("/") > 1):
            raise OSError(f"model folder {source} does not exist")  # a path, not a hub id "org/name"
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        plugin_families()  # plugins register their config classes with AutoConfig when loaded
        try:
            config = AutoConfig.from_pretrained(source, **remote)
        except ValueError as error:  # a model_type transformers does not know (or no model_type at all)
            raise UnsupportedModelError(f"cannot use {source!r}: {str(error).split('. ')[0]}. {supported()}") from None
        family = family_for(config)
        # Everything that can refuse the model is read before gigabytes of weights are.
        family.check(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **remote)
            # The PIL backend needs no torchvision and gives the same pixels on every machine.
            image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", **remote)
        except OSError as error:  # transformers' message names the missing file
            raise OSError(f"cannot load {source!r}: {' '.join(str(error).split())}") from None
        chat_template = tokenizer.chat_template or _processor_chat_template(source)
        if prompt_format == "chat" and not chat_template:
            raise InputError(f"prompt_format='chat' but {source} has no chat template (in its tokenizer or processor)")
        extras = family.load_extras(source)
        # transformers 5 builds the model on the meta device; a device map then reads each tensor
        # from the safetensors file straight onto the device in the dtype (no full host copy).
        model = family.model_class.from_pretrained(
            source, config=config, dtype=DTYPES[dtype], device_map=device, **remote
        )
        return cls(model, tokenizer, image_processor, chat_template, prompt_format, name=source, extras=extras)

    def save(self, path: str | Path) -> None:
        """Write model (safetensors), tokenizer, image processor and chat template for `load(path)`."""
        self.model.save_pretrained(path)
        self.inputs.tokenizer.save_pretrained(path)
        self.inputs.image_processor.save_pretrained(path)
        for key, part in self.inputs.extras.items():  # a subfolder per extra, where `family.load_extras` reads it
            part.save_pretrained(Path(path) / key)
        if self.inputs.chat_template and not self.inputs.tokenizer.chat_template:
            (Path(path) / "chat_template.jinja").write_text(self.inputs.chat_template)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        return self.model.dtype

    # -- scoring ---------------------------------------------------------------------------

    def span_logits(self, queries: Sequence[Query]) -> SpanLogits:
        """Answer-span logits of queries that all have images or none (keeps the graph)."""
        batch = self._batch(queries)
        logits = self._forward(batch, batch.positions)
        return SpanLogits(logits, batch.targets, batch.mask)

    @torch.no_grad()
    def score(
        self,
        queries: Sequence[Query],
        top_k: int = 10,
        gather: Sequence[torch.Tensor | None] | None = None,
        sequence_top_k: int = 0,
        batch_size: int = 16,
        memo: ScoreMemo | None = None,
    ) -> list[SpanScore]:
        """Teacher-forced answer-span scores, batched; results in the order of `queries`.

        `gather[i]` (T_i, j), when not None, asks for the log-probs of query i at given ids
        (e.g. a cached pre-edit top-k); `sequence_top_k` > 0 also returns top ids at every
        position of the sequence. Queries are encoded once, sorted by length inside each group
        (image / text) so a batch pads little, and scored `batch_size` at a time. With a `memo`,
        queries it already holds are not run again (see `ScoreMemo` for when that is sound).

        On families that `shares_image_prefix`, rows showing the same image after the same tokens
        (or whose prefix the memo holds) share that prefix and run only their own tokens after
        it, packed side by side without padding (`editors.prefixes`); a prefix is computed once,
        in the pack ahead of its rows (one wider than a pack: first, in a forward of its own),
        unless the cache holds it. A call runs every row whole,
        right-padded, on a hooked model, for `sequence_top_k`, when a row reaches the decoder's
        sliding window, or when the cache's bound fits fewer than two prefixes a forward.
        """
        if gather is not None and len(gather) != len(queries):
            raise ValueError(f"gather has {len(gather)} entries for {len(queries)} queries")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: list[SpanScore | None] = [None] * len(queries)
        wanted = [None if gather is None else gather[i] for i in range(len(queries))]
        walked = self._guards()
        keys: list[tuple] = []
        if memo is not None:
            keys = [memo.key(q, sequence_top_k) for q in queries]
            memo.check(walked.versions, self.inputs.form())
            for i, key in enumerate(keys):
                results[i] = memo.get(key, top_k, wanted[i])
        todo = [i for i, r in enumerate(results) if r is None]
        encoded = dict(zip(todo, self.inputs.encode_many([queries[i] for i in todo])))
        for i in todo:
            if wanted[i] is not None and len(wanted[i]) > encoded[i].answer_len:
                # Rows past the span would be read from padding, so the result would depend on the batch.
                raise ValueError(f"gather for query {i} has {len(wanted[i])} rows; its answer "
                                 f"{queries[i].answer!r} has {encoded[i].answer_len} tokens")
        if self.family.shares_image_features:
            self._check_features(walked)
            groups = [list(range(len(todo)))]  # the model gets image features, not pixels: text rows may join
        else:
            groups = image_index_groups([queries[i] for i in todo])
        cache = prefix_cache() if memo is None else memo.prefixes
        shared, column_budget = self._plan_prefixes(encoded, cache, sequence_top_k, walked.hooked)
        scored: Iterable[tuple[list[int], list[SpanScore]]]
        if shared:
            scored = self._score_packed(todo, encoded, shared, cache, batch_size, column_budget, top_k, wanted)
        else:
            scored = self._score_padded(groups, todo, encoded, batch_size, top_k, wanted, sequence_top_k)
        for chunk, scores in scored:
            for i, score in zip(chunk, scores):
                results[i] = score
                if memo is not None:
                    memo.put(keys[i], score, top_k, wanted[i])
        return results  # type: ignore[return-value]

    def _score_padded(self, groups: list[list[int]], todo: list[int], encoded: dict[int, Encoded], batch_size: int,
                      top_k: int, gather: list[torch.Tensor | None], sequence_top_k: int
                      ) -> Iterator[tuple[list[int], list[SpanScore]]]:
        """Each group's rows whole, right-padded in batches cut where padding would cost more than a forward."""
        for group in groups:
            rows = sorted((todo[j] for j in group), key=lambda i: len(encoded[i].input_ids))
            for chunk in padded_batches(rows, [len(encoded[i].input_ids) for i in rows], batch_size):
                batch = self.inputs.collate([encoded[i] for i in chunk], self.dtype, self.device)
                yield chunk, self._score_batch(batch, top_k, [gather[i] for i in chunk], sequence_top_k)

    def _score_packed(self, rows: list[int], encoded: dict[int, Encoded], shared: dict[int, PrefixKey],
                      cache: LRUCache[KeysValues], batch_size: int, column_budget: int, top_k: int,
                      gather: list[torch.Tensor | None]) -> Iterator[tuple[list[int], list[SpanScore]]]:
        """The rows in packs (`editors.prefixes`): a shared prefix the cache holds is handed on as keys and values, a
        new one computed in the pack ahead of its rows and put in the cache."""
        # A row whose prefix is shared runs from where its prefix ends.
        items = {i: suffix(e, len(shared[i][1])) if i in shared else e for i, e in encoded.items()}
        pixels = {e.image: e.pixels for e in encoded.values() if e.image is not None}
        # A new prefix wider than a pack runs first, in plain causal forwards: inline, the dense mask over it would
        # cost more than the forward (LLaVA-1.5's 577 tokens: 214 against 170 ms a record, benchmarks/image_prefix).
        wide = [key for key in dict.fromkeys(shared.values()) if len(key[1]) > PACK_TOKENS and key not in cache]
        if wide:
            self._compute_prefixes(wide, pixels, cache, batch_size, column_budget)
        # Held for the whole call: a forward's new prefixes may push out of the cache those a later forward needs.
        # One the cache could not keep until here is computed inline.
        values = {key: value for key in dict.fromkeys(shared.values()) if (value := cache.get(key)) is not None}
        for packs in plan_packs(rows, items, shared, set(values), batch_size, column_budget):
            layout = pack_layout(packs, items, values, self.inputs.pad_id, self.device)
            with torch.inference_mode():
                inputs: dict[str, Any] = {
                    "input_ids": layout.input_ids, "position_ids": layout.position_ids,
                    "attention_mask": torch.zeros(layout.allowed.shape, dtype=self.dtype, device=self.device)
                    .masked_fill_(~layout.allowed, torch.finfo(self.dtype).min)}
                if layout.images:
                    features = self._image_features([(digest, pixels[digest]) for digest in layout.images])
                    inputs["mm_encoder_outputs"] = _encoder_outputs(features)
                if layout.layers is not None or layout.computed:
                    # Every key kept, also where a layer's sliding window would not: the mask says what is seen.
                    inputs["cache"] = DynamicCache(layout.layers) if layout.layers is not None else DynamicCache()
                out = self.model(**inputs, logits_to_keep=layout.keep, use_cache="cache" in inputs)
                columns = 0 if layout.layers is None else layout.layers[0][0].shape[2]
                for key, pack, offset in layout.computed:
                    at = slice(columns + offset, columns + offset + len(key[1]))
                    cache.put(key, [(layer.keys[pack : pack + 1, :, at].clone(),
                                     layer.values[pack : pack + 1, :, at].clone()) for layer in out.cache.layers])
                span = out.logits[layout.pack[:, None], layout.slots]
            yield layout.rows, self._span_scores(span, layout.targets, layout.mask, top_k,
                                                 [gather[i] for i in layout.rows])

    def _compute_prefixes(self, keys: list[PrefixKey], pixels: dict[str, dict[str, torch.Tensor]],
                          cache: LRUCache[KeysValues], batch_size: int, column_budget: int) -> None:
        """Decoder keys and values of each prefix in `keys` into `cache`, batched among prefixes of one length, at
        most `column_budget` tokens a forward."""
        by_length: dict[int, list[PrefixKey]] = {}
        for key in keys:
            by_length.setdefault(len(key[1]), []).append(key)
        with torch.inference_mode():
            for length, same in by_length.items():
                step = max(1, min(batch_size, column_budget // length))
                for start in range(0, len(same), step):
                    chunk = same[start : start + step]
                    features = self._image_features([(digest, pixels[digest]) for digest, _ in chunk])
                    ids = torch.tensor([ids for _, ids in chunk], device=self.device)
                    # A cache without the config keeps every key, also where a layer's sliding window would not.
                    out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(),
                                     use_cache=True, logits_to_keep=1, mm_encoder_outputs=_encoder_outputs(features))
                    for row, key in enumerate(chunk):
                        cache.put(key, [(layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone())
                                        for layer in out.cache.layers])

    def _plan_prefixes(self, encoded: dict[int, Encoded], cache: LRUCache[KeysValues], sequence_top_k: int,
                       hooked: bool) -> tuple[dict[int, PrefixKey], int]:
        """The rows of a call that continue a shared prefix (row -> its key), and how many cached prefix tokens a
        forward may hold. A `hooked` model (`Guards.hooked`: an editor that rewrites activations where a row's prompt
        ends, GRACE or WISE, must see every row whole) shares none; transformers' own hooks, which only record
        outputs (`output_hidden_states`), do not count."""
        if not (self.family.shares_image_features and self.family.shares_image_prefix and not sequence_top_k
                and encoded and within_window(self.model.config, max(len(e.input_ids) for e in encoded.values()))
                and self._takes_dense_masks() and not hooked):
            return {}, 0
        shared = shared_prefixes(encoded, self.inputs.image_token_id, cache)
        if not shared:
            return {}, 0
        # A forward holds its packs' cached prefixes side by side, every layer at once, and the decoder's cache copies
        # them once more: half the cache's bound for them keeps a forward's prefixes within it. Where that leaves
        # fewer than two prefixes a forward, many small forwards would cost more than running rows whole.
        longest = max(len(ids) for _, ids in shared.values())
        budget = cache.max_cost // 2 // bytes_per_token(self.model.config, self.dtype)
        return (shared, budget) if budget >= 2 * longest else ({}, 0)

    def _takes_dense_masks(self) -> bool:
        """Whether the decoder's attention takes an arbitrary mask, as packs need (flash attention takes none)."""
        text = self.model.config.get_text_config(decoder=True)
        return getattr(text, "_attn_implementation", None) in (None, "sdpa", "eager")

    def _guards(self) -> Guards:
        """The model's `Guards`, the text decoder being the inner part."""
        return guards(self.model, self.model.get_submodule(self.family.decoder_path))

    def _score_batch(
        self, batch: Batch, top_k: int, gather: list[torch.Tensor | None] | None, sequence_top_k: int
    ) -> list[SpanScore]:
        # Inference mode skips autograd's bookkeeping (a sixth of a small model's forward). The scores below are
        # computed from its logits outside it, so they are ordinary tensors that a training loss may use.
        with torch.inference_mode():
            features = self._image_features(batch.images) if self.family.shares_image_features else None
            if sequence_top_k:
                full = self._forward(batch, None, features)  # (B, L, V)
                span = torch.take_along_dim(full, batch.positions[..., None], dim=1)
            else:
                span = self._forward(batch, batch.positions, features)  # (B, T, V)
        scores = self._span_scores(span, batch.targets, batch.mask, top_k, gather)
        if sequence_top_k:
            for row, score in enumerate(scores):
                n, k = batch.lengths[row], min(sequence_top_k, full.shape[-1])
                score.sequence_topk_ids = full[row, :n].topk(k, dim=-1).indices.cpu()
        return scores

    def _span_scores(self, span: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, top_k: int,
                     gather: list[torch.Tensor | None] | None) -> list[SpanScore]:
        """Scores of answer-span logits `span` (B, T, V) against `targets` (B, T), where `mask` holds a row's tokens."""
        logprobs = torch.log_softmax(span.float(), dim=-1)
        top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        target_lp = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        argmax = logprobs.argmax(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
        # One copy to the host per tensor, and each cut into its rows' answer tokens by one split, not a slice per
        # row and tensor (a row's mask is True on its first tokens, so the masked tokens come row by row).
        lengths = mask.sum(1).tolist()
        on_host = mask.cpu()
        fields = [x.cpu()[on_host].split(lengths) for x in (targets, argmax, target_lp, top.indices, top.values, entropy)]
        out = [SpanScore(target_ids=t, argmax_ids=a, target_logprobs=lp, topk_ids=top_ids, topk_logprobs=top_lp,
                         entropy=e) for t, a, lp, top_ids, top_lp, e in zip(*fields)]
        for row, score in enumerate(out):
            if gather is not None and gather[row] is not None:
                ids = gather[row].to(logprobs.device)
                score.gathered_logprobs = logprobs[row, : ids.shape[0]].gather(-1, ids).cpu()
        return out

    def _batch(self, queries: Sequence[Query]) -> Batch:
        return self.inputs.collate(self.inputs.encode_many(queries), self.dtype, self.device)

    def _forward(self, batch: Batch, keep: torch.Tensor | None, features: list[torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """Logits at the `keep` positions (B, T, V), or at all positions when `keep` is None.

        With `features` (one per image row, from `image_features`) the model gets them in place of the pixels.
        """
        module = self._text_module() if "pixel_values" not in batch.inputs else self.model
        logits_to_keep = 0 if keep is None else keep
        inputs = dict(batch.inputs)
        if features:
            pixels = batch.images[0][1].keys()
            inputs = {key: value for key, value in inputs.items() if key not in pixels}
            inputs["mm_encoder_outputs"] = _encoder_outputs(features)
        return module(**inputs, logits_to_keep=logits_to_keep, use_cache=False).logits

    def image_features(self, images: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
        """The family's `image_features` (N, D) of each (digest, pixels), computed one image per forward (so they
        do not depend on what else is in a batch) and cached by digest while the vision weights are unchanged."""
        self._check_features(self._guards())
        return self._image_features(images)

    def _check_features(self, walked: Guards) -> None:
        """Empty the feature cache if a weight outside the text decoder was added, replaced or changed in place."""
        weights = walked.outside
        if weights != self._vision_weights:
            self.features.clear()
            self._vision_weights = weights

    def _image_features(self, images: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
        """`image_features` without the weight check (done once per call of `score`)."""
        out = []
        for digest, pixels in images:
            features = self.features.get(digest)
            if features is None:
                cast = {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device) for k, v in pixels.items()}
                features = self.family.image_features(self.model, cast)[0]
                self.features.put(digest, features)
            out.append(features)
        return out

    def _text_module(self) -> nn.Module:
        path = self.family.text_module
        return self.model.get_submodule(path) if path else self.model

    def entry_modules(self) -> list[nn.Module]:
        """The modules a forward of `score` or `span_logits` enters by: the model, and its text module for text rows;
        a pre-hook on them sees the batch as `LVLM` built it (`logits_to_keep`, `input_ids`)."""
        text = self._text_module()
        return [self.model] if text is self.model else [self.model, text]

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, queries: Sequence[Query], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers to the prompts of `queries` (their `answer` is ignored)."""
        answers = []
        for query in queries:
            encoded = self.inputs.encode(query, with_answer=False)
            batch = self.inputs.collate([encoded], self.dtype, self.device)
            module = self.model if encoded.pixels is not None else self._text_module()
            tokens = module.generate(
                **batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.inputs.pad_id
            )
            new = tokens[0, len(encoded.input_ids) :]
            answers.append(self.inputs.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers

    # -- image features --------------------------------------------------------------------

    @torch.inference_mode()  # the result is made by torch.cat outside any view: an ordinary tensor
    def embed_images(
        self, images: Sequence[Image.Image], pooling: Literal["mean", "flat"] = "mean", batch_size: int = 64
    ) -> torch.Tensor:
        """Pooled image features (B, D) from the family's vision path: mean over tokens, or all tokens flattened."""
        if pooling not in ("mean", "flat"):
            raise ValueError(f"Unknown pooling {pooling!r}. Available: mean, flat")
        if not images:
            raise ValueError("embed_images needs at least one image")
        if self.family.shares_image_features:  # the features scoring uses, cached per image
            keyed = [(image_digest(image), self.inputs.pixels([image])) for image in images]
            features = stack_features(self.image_features(keyed)).float()
            return (features.mean(1) if pooling == "mean" else features.flatten(1)).cpu()
        parts = []
        for start in range(0, len(images), batch_size):
            pixels = self.inputs.pixels(images[start : start + batch_size])
            pixels = {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device) for k, v in pixels.items()}
            features = self.family.image_features(self.model, pixels).float()  # (B, N, D)
            parts.append(features.mean(1) if pooling == "mean" else features.flatten(1))
        return torch.cat(parts).cpu()

    # -- parameter groups ------------------------------------------------------------------

    def parameter_group(
        self,
        group: str,
        layers: Sequence[int] = (-1,),
        parts: Sequence[str] | None = None,
        modules: Sequence[str] | None = None,
    ) -> dict[str, nn.Parameter]:
        """Named parameters of a group: `llm` = MLP weights (`modules` roles, default all) of `layers`; `vision` = `parts`."""
        if group == "llm":
            return dict(self._llm_parameters(layers, modules))
        if group == "vision":
            return dict(self._vision_parameters(parts))
        raise ValueError(f"Unknown parameter group {group!r}. Available: {', '.join(GROUPS)}")

    def check(self, queries: Sequence[Query]) -> None:
        """InputError for the first query the model cannot take (see `InputBuilder.encode`), without a forward pass."""
        self.inputs.encode_many(queries)

    def nonfinite_parameters(self, limit: int = 5) -> list[str]:
        """Names of (up to `limit`) parameters holding NaN or Inf: the first sign of a collapsed model.

        A tensor holds one exactly when its largest magnitude is NaN or Inf. Those are taken by fused ops over a
        chunk of parameters of one device and dtype at a time, with one read back per chunk: a check per parameter
        cost ~4x more on the default model (72 small tensors), and syncs a GPU once per parameter. The fused ops
        copy a chunk's magnitudes, so a parameter over `FINITE_CHECK_BYTES` is checked alone, by `isfinite`.
        """
        # Integer and bool parameters cannot hold NaN or Inf.
        named = [(name, param) for name, param in self.model.named_parameters()
                 if param.numel() and param.is_floating_point()]
        finite = [True] * len(named)
        chunks: dict[tuple, list[list[int]]] = {}  # per (device, dtype), its chunks of parameters
        held: dict[tuple, int] = {}  # bytes in each kind's last chunk
        with torch.no_grad():
            for i, (_, param) in enumerate(named):
                if param.nbytes > FINITE_CHECK_BYTES:
                    finite[i] = bool(torch.isfinite(param).all())
                    continue
                kind = (param.device, param.dtype)
                if kind not in chunks or held[kind] + param.nbytes > FINITE_CHECK_BYTES:
                    chunks.setdefault(kind, []).append([])
                    held[kind] = 0
                chunks[kind][-1].append(i)
                held[kind] += param.nbytes
            for chunk in (c for per_kind in chunks.values() for c in per_kind):
                peaks = torch._foreach_max(torch._foreach_abs([named[i][1] for i in chunk]))
                for i, ok in zip(chunk, torch.stack(peaks).isfinite().tolist()):
                    finite[i] = ok
        return [name for (name, _), ok in zip(named, finite) if not ok][:limit]

    def parameter_count(self) -> int:
        """Number of the model's parameters."""
        return sum(p.numel() for p in self.model.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require gradients (all of them, unless frozen), for training the whole model."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_training(self, on: bool) -> None:
        """Switch the model to training (dropout on) or evaluation mode."""
        self.model.train(on)

    @property
    def decoder_depth(self) -> int:
        """Number of blocks of the text decoder."""
        return len(self._decoder_blocks()[1])

    def decoder_layer(self, index: int) -> int:
        """A decoder block index (negative counts from the end) as 0..depth-1; ValueError when out of range."""
        depth = self.decoder_depth
        if not -depth <= index < depth:
            raise ValueError(f"layer {index} out of range: the decoder has {depth} layers")
        return index % depth

    def _decoder_blocks(self) -> tuple[str, nn.ModuleList]:
        path = f"{self.family.decoder_path}.{self.family.decoder(self.model.config).layers}"
        return path, self.model.get_submodule(path)

    def _llm_parameters(self, layers: Sequence[int], modules: Sequence[str] | None) -> Iterator[tuple[str, nn.Parameter]]:
        decoder = self.family.decoder(self.model.config)
        blocks_path, blocks = self._decoder_blocks()
        for index in map(self.decoder_layer, layers):
            for name in decoder.modules(modules):
                yield f"{blocks_path}.{index}.{name}", blocks[index].get_parameter(name)

    def _vision_parameters(self, parts: Sequence[str] | None) -> Iterator[tuple[str, nn.Parameter]]:
        available = self.family.vision_parts
        for part in parts or available:
            if part not in available:
                raise ValueError(f"Unknown vision part {part!r} for {self.family.name}. Available: {', '.join(available)}")
            for declared in self.family.vision_part_paths(self.model.config, part):
                path, target = _module_or_parameter(self.model, declared)
                if isinstance(target, nn.Parameter):
                    yield path, target
                else:
                    for name, param in target.named_parameters():
                        yield f"{path}.{name}", param


def _module_or_parameter(model: nn.Module, path: str) -> tuple[str, nn.Module | nn.Parameter]:
    """The module or parameter at a declared path and its canonical path; negative indices count from the end."""
    target: nn.Module | nn.Parameter = model
    parts = []
    for segment in path.split("."):
        if isinstance(target, nn.ModuleList) and segment.lstrip("-").isdigit():
            index = int(segment)
            if not -len(target) <= index < len(target):
                raise ValueError(f"{path}: index {index} out of range for {len(target)} blocks")
            segment = str(index % len(target))
        if segment in getattr(target, "_parameters", {}):
            target = target._parameters[segment]
        elif isinstance(target, nn.Module) and segment in target._modules:
            target = target._modules[segment]
        else:
            raise ValueError(f"{path}: this model has no {'.'.join([*parts, segment])}")
        parts.append(segment)
    return ".".join(parts), target


def _processor_chat_template(source: str) -> str | None:
    """A chat template saved beside the processor (chat_template.jinja / .json), if any."""
    import json

    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None
