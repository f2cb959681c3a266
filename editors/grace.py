"""`grace`: a codebook of (key, value, deferral radius) at one decoder layer.

After GRACE (Hartvigsen et al., NeurIPS 2023, "Aging with GRACE: Lifelong Model Editing with
Discrete Key-Value Adaptors"; code: github.com/Thartvigsen/GRACE, grace/editors/grace.py, and
EasyEdit's easyeditor/models/grace/GRACE.py). GRACE wraps one linear layer of a frozen model
(GPT2-XL `h[35].mlp.c_fc`, T5 `block[4]...DenseReluDense.wo`; EasyEdit: Llama-2 `layers[27]`,
Qwen2-VL / LLaVA-OneVision `layers[18].mlp.down_proj`). Here that layer is the MLP down projection
of one decoder block (the family's declared `down` role), so keys are its input activations and
values replace its output; the rest of the block (residual, attention) is untouched.

The key is the layer's input at the last prompt token, the token that predicts the first answer
token. Image tokens come before it and reach it through attention, so the same question about
another picture has another key: the codebook is multimodal with no special case, and text-only
queries are keyed the same way. Where GRACE's authors assumed text-only inputs, nothing else is
needed.

An edit (Algorithm 1 of the paper; `place` below): the nearest entry at Euclidean distance d
decides. d > eps_init + eps_i (the balls do not touch): a new entry. Same target: expand
eps_i to d (GRACE's `coverage`). Another target: split, both radii become d/2, and a new entry
holds the edit (the code can grow the old radius to d/2; here it only shrinks, a split never
claims new space). Then the entry's value is trained for `steps` Adam steps on the answer's NLL.

At inference the hook replaces the layer's output where the nearest key is within its radius.
GRACE's code replaces the key token only (EasyEdit `replace_last`) or the prompt before it (the
authors' `replace_prompt`); with teacher-forced scoring, the answer tokens after the key also need
the value for multi-token answers, so `from_key` (default) replaces from the key token to the end.
Training and inference replace the same positions.

The keys live in `memory.VectorMemory` with the L2 metric (exact below `exact_below` entries, IVF
above), so a lookup stays fast at 10^6 entries where GRACE's own code scans every key with
`torch.cdist`; values and radii are tensors here.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from editors.adapter import LVLM, SpanScore
from editors.editor import EditOutcome, Editor, EditRequest, HasMemory, Retrieval, bypassing, weak_hook
from editors.inputs import Query, image_index_groups, row_ids
from editors.losses import answer_nll, fit_answer
from editors.state import EditorState
from memory import MemoryConfig, RetrievalStats, VectorMemory

log = logging.getLogger(__name__)

Replacement = Literal["last", "from_key", "all"]
SAME_KEY = 1e-5  # relative distance below which two keys are one (float32 rounding of the same forward)
Action = Literal["add", "expand", "split", "hold", "replace"]


class GraceConfig(BaseModel):
    """GRACE settings; defaults from the authors' grace.yaml and EasyEdit's hparams/GRACE/*.yaml."""

    model_config = ConfigDict(extra="forbid")

    layer: int | None = Field(
        None,
        description="decoder block whose MLP down projection holds the codebook (negative counts from the end); "
        "None: the block at 2/3 of the depth, floor(2n/3), as EasyEdit's Qwen2-VL / LLaVA-OV (18 of 28) and the "
        "paper's T5 (encoder block 4 of 6); on the 3-layer default model, the last block",
    )
    # Radii are in the units of the layer's activations. On the default model (block 2) keys are ~34 long, a
    # text rephrase ~13 away (max 23), other questions and other creatures' images >= 34: the paper's 1.0 answers
    # only the edit's own question; 20 also answered 95% of text rephrases with T-Loc and I-Loc at 1.0 (60 edits).
    epsilon_init: float = Field(1.0, gt=0, description="deferral radius of a new entry (grace.yaml `eps`: 1.0)")
    dist_fn: Literal["euclidean"] = Field("euclidean", description="key distance (grace.yaml `dist_fn: euc`)")
    replacement: Replacement = Field(
        "from_key", description="positions a hit replaces: the key token (last), key token to the end (from_key), all"
    )
    value_init: Literal["warm", "cold"] = Field(
        "warm", description="a new value starts as the layer's output at the key token (warm) or U[0,1) (cold, "
        "the authors' default)",
    )
    lr: float = Field(1.0, gt=0, description="Adam learning rate of the value (grace.yaml `edit_lr`: 1.0)")
    steps: int = Field(
        20, ge=1, description="Adam steps per edit (EasyEdit's LLaVA-OV / Qwen2-VL GRACE: n_iter 20; grace.yaml: 100)"
    )
    stop_loss: float = Field(
        0.0, ge=0, description="stop early once the answer NLL (nats per token) is below this; 0: all steps, as GRACE"
    )
    memory: MemoryConfig = Field(
        # Finer IVF lists, fewer probed than the store's default (2 per sqrt(N), 16 probed): one lookup of a
        # 16-row batch at 10^5 entries then scans ~2,400 keys per row instead of ~3,700, so its p50 stays within
        # 5x of an exact search at 10^3 (benchmarks/grace_lookup.py; recall@1 1.0 on clustered keys).
        default_factory=lambda: MemoryConfig(normalize=False, metric="l2", lists_per_sqrt=8.0, nprobe=8),
        description="key store settings (Euclidean: metric l2, normalize false)",
    )

    @field_validator("memory")
    @classmethod
    def _euclidean(cls, memory: MemoryConfig) -> MemoryConfig:
        if memory.metric != "l2" or memory.normalize:
            raise ValueError("GRACE's radii are Euclidean: memory needs metric='l2' and normalize=false")
        return memory


def _covering(distance: float) -> float:
    """The least float32 radius at or above `distance`: radii are float32, distances float64, and an entry must
    hold the key that set its radius."""
    radius = np.float32(distance)
    return float(radius) if float(radius) >= distance else float(np.nextafter(radius, np.float32(np.inf)))


@dataclass
class Codebook:
    """Keys (in a `VectorMemory`, id = entry index), values (N, H) and radii (N,), with each entry's target and edit."""

    key_dim: int
    value_dim: int
    config: MemoryConfig
    stats: RetrievalStats = field(default_factory=RetrievalStats)

    def __post_init__(self) -> None:
        self.keys = VectorMemory(self.key_dim, self.config, self.stats)
        self._values = torch.zeros(0, self.value_dim)
        self._radii = torch.zeros(0)
        self.targets: list[str] = []
        self.edit_keys: list[str] = []  # the stream key of the edit that created each entry

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def values(self) -> torch.Tensor:
        """(N, H) float32."""
        return self._values[: len(self)]

    @property
    def radii(self) -> torch.Tensor:
        """(N,) float32 deferral radii."""
        return self._radii[: len(self)]

    def nearest(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry (B,) int64 and its Euclidean distance (B,) float64 for each key (B, D); -1 / inf when empty."""
        if not len(self):
            return np.full(len(keys), -1, np.int64), np.full(len(keys), np.inf)
        found = self.keys.search(keys, 1)
        return found.ids[:, 0], np.sqrt(np.maximum(-found.scores[:, 0].astype(np.float64), 0.0))

    def hits(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest entry, distance and whether it is within that entry's radius, per key (B, D)."""
        ids, dist = self.nearest(keys)
        if not len(self):
            return ids, dist, np.zeros(len(ids), bool)
        radii = self.radii.double().numpy()[np.maximum(ids, 0)]
        return ids, dist, (ids >= 0) & (dist <= radii)

    def place(
        self, key: np.ndarray, target: str, edit_key: str, value: torch.Tensor, epsilon_init: float
    ) -> tuple[int, Action]:
        """Where an edit's key (D,) goes (GRACE Algorithm 1): a new entry, or grow / split / keep / take the nearest."""
        ids, dist = self.nearest(key[None])
        i, d = int(ids[0]), float(dist[0])
        if i < 0 or d > epsilon_init + float(self._radii[i]):
            return self._add(key, target, edit_key, value, epsilon_init), "add"
        if d <= SAME_KEY * max(1.0, float(np.linalg.norm(key))) and self.targets[i] != target:
            # The same question (and image) edited again: splitting at d = 0 would leave two radius-0
            # entries and the older answer winning the tie; the newer edit takes the entry instead.
            self.targets[i], self.edit_keys[i] = target, edit_key
            return i, "replace"
        if self.targets[i] == target:
            if d <= float(self._radii[i]):
                return i, "hold"
            self._radii[i] = _covering(d)  # eps_expand: coverage
            return i, "expand"
        self._radii[i] = min(float(self._radii[i]), d / 2)
        return self._add(key, target, edit_key, value, min(epsilon_init, d / 2)), "split"

    def mark(self) -> tuple[int, torch.Tensor, list[str], list[str]]:
        """What `place` may change (entries added, radii, targets, edits), for `restore` when the edit fails."""
        return len(self), self._radii.clone(), list(self.targets), list(self.edit_keys)

    def restore(self, mark: tuple[int, torch.Tensor, list[str], list[str]]) -> None:
        """Undo every `place` since `mark` (the values of older entries are the caller's to keep)."""
        size, radii, targets, edit_keys = mark
        self.keys.remove(range(size, len(self)))
        self._radii[: len(radii)] = radii
        self.targets[:], self.edit_keys[:] = targets, edit_keys

    def _add(self, key: np.ndarray, target: str, edit_key: str, value: torch.Tensor, radius: float) -> int:
        self.extend(key[None], value[None], torch.tensor([radius]), [target], [edit_key])
        return len(self) - 1

    def extend(
        self, keys: np.ndarray, values: torch.Tensor, radii: torch.Tensor, targets: list[str], edit_keys: list[str]
    ) -> None:
        """Append entries as they are (keys (N, D), values (N, H), radii (N,)), without GRACE's placement."""
        n, m = len(self), len(keys)
        if n + m > len(self._radii):  # grow by doubling: appends stay O(1) amortised over long streams
            capacity = max(2 * len(self._radii), n + m, 16)
            self._values = torch.cat([self._values, torch.zeros(capacity - len(self._values), self.value_dim)])
            self._radii = torch.cat([self._radii, torch.zeros(capacity - len(self._radii))])
        self.keys.add(keys, ids=range(n, n + m))
        self._values[n : n + m] = values.detach().float()
        self._radii[n : n + m] = radii.float()
        self.targets.extend(targets)
        self.edit_keys.extend(edit_keys)

    def set_value(self, entry: int, value: torch.Tensor) -> None:
        """Store an entry's trained value."""
        self._values[entry] = value.detach().float()

    def save_into(self, state: EditorState) -> None:
        """Keys (FAISS-serialised), values, radii and the entries' targets and edits into a state."""
        blob, manifest = self.keys.to_bytes()
        state.tensors |= {"codebook.keys": torch.from_numpy(blob), "codebook.values": self.values.clone(),
                          "codebook.radii": self.radii.clone()}
        state.meta["codebook"] = {"manifest": manifest, "targets": self.targets, "edit_keys": self.edit_keys,
                                  "counters": self.stats.counters()}  # routing hits and misses continue on resume

    def load_from(self, state: EditorState) -> None:
        """Restore what `save_into` wrote."""
        saved = state.meta["codebook"]
        self.keys = VectorMemory.from_bytes(state.tensors["codebook.keys"].numpy(), saved["manifest"], self.stats)
        if "counters" in saved:  # states written before the counters were kept start them anew
            self.stats.restore(saved["counters"])
        self._values = state.tensors["codebook.values"].float().clone()
        self._radii = state.tensors["codebook.radii"].float().clone()
        self.targets, self.edit_keys = list(saved["targets"]), list(saved["edit_keys"])
        sizes = {len(self.keys), len(self._values), len(self._radii), len(self.targets), len(self.edit_keys)}
        if sizes != {len(self.targets)} or set(self.keys.ids().tolist()) != set(range(len(self))):
            raise ValueError("editor state is inconsistent: codebook keys, values, radii and targets differ in size")


@dataclass
class _Training:
    """While an edit's value is trained: the entry, its value (1, H) with grad."""

    entry: int
    value: torch.Tensor


class Grace(Editor, HasMemory):
    """GRACE: replace one layer's output with a trained value when a query's key falls in an entry's radius."""

    name = "grace"
    Config = GraceConfig
    # An entry's radius is grown or split by later edits and its value serves every edit inside it: deleting the
    # entry of one edit could take others' answers with it, and keeping it would not undo the edit.
    cannot_retract = "a codebook entry is shared by the edits that grew or split it"

    def __init__(self, lvlm: LVLM, config: GraceConfig | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        self._bypass = False
        self._count = False  # count hits/misses: only the routing `score` does, as MemoryEditor
        self._training: _Training | None = None
        self._captured: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None  # (ids, dist, inside) per forward
        self._positions: list[torch.Tensor | None] = []  # key token per row of the running forward(s)
        self._id_positions: dict[tuple[int, ...], int] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        weakref.finalize(self, _remove, self._handles)
        self._install()

    # -- the layer and its hooks -------------------------------------------------------------

    def _install(self) -> None:
        """Hook the chosen down projection and the modules `LVLM` calls (to learn each row's key token).

        The hooks hold the editor weakly, and its finalizer removes them: an editor that is dropped
        leaves the model as it found it, so several editors can be made on one model one after another.
        """
        _remove(self._handles)
        n = self.lvlm.decoder_depth
        self.layer_index = self.lvlm.decoder_layer((2 * n) // 3 if self.config.layer is None else self.config.layer)
        # The family declares where the down projection is, not a guess from names.
        (down,) = self.lvlm.parameter_group("llm", layers=[self.layer_index], modules=("down",))
        self.module_path = down.removesuffix(".weight")
        module = self.lvlm.model.get_submodule(self.module_path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{self.module_path} is a {type(module).__name__}, not the linear layer GRACE wraps")
        handles = [module.register_forward_hook(weak_hook(self, "_replace"))]
        for top in self.lvlm.entry_modules():
            handles.append(top.register_forward_pre_hook(weak_hook(self, "_enter"), with_kwargs=True))
            handles.append(top.register_forward_hook(weak_hook(self, "_leave")))
        self._handles[:] = handles
        if not hasattr(self, "codebook"):
            self.codebook = Codebook(module.in_features, module.out_features, self.config.memory)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Note each row's key token: `LVLM` passes the answer positions as `logits_to_keep` (B, T), the first
        of which is the last prompt token; full-sequence scoring finds it by token ids; else the last token."""
        keep = kwargs.get("logits_to_keep")
        positions = None
        if isinstance(keep, torch.Tensor) and keep.ndim == 2:
            positions = keep[:, 0]
        elif self._id_positions is not None and kwargs.get("input_ids") is not None:
            rows = row_ids(kwargs["input_ids"], kwargs.get("attention_mask"))
            positions = torch.tensor([self._id_positions.get(ids, len(ids) - 1) for ids in rows])
        self._positions.append(positions)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._positions:
            self._positions.pop()

    def _known(self) -> torch.Tensor | None:
        return next((p for p in self._positions if p is not None), None)

    def _key_positions(self, rows: int, length: int, device: torch.device) -> torch.Tensor:
        """(B,) key token of each row: the outermost known positions, else the last token (generation)."""
        known = self._known()
        if known is None or len(known) != rows:
            return torch.full((rows,), length - 1, device=device)
        return known.to(device).clamp(0, length - 1)

    def _batched(self, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input (B, L, I) and output (B, L, H) of the layer; OPT's decoder feeds it (B*L, ·), reshaped here."""
        if x.ndim == 3:
            return x, output
        known = self._known()
        rows = 1 if known is None else len(known)
        return x.view(rows, -1, x.shape[-1]), output.view(rows, -1, output.shape[-1])

    def _replace(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The forward hook: output (B, L, H) with the value from the key token on where a key is within radius."""
        if self._bypass or (self._training is None and not len(self.codebook)):
            return None
        x, batched = self._batched(args[0], output)  # (B, L, I), (B, L, H)
        rows, length = x.shape[:2]
        positions = self._key_positions(rows, length, x.device)
        if self._training is not None:  # the entry being trained answers every row (one edit per batch)
            values = self._training.value.to(output.dtype).expand(rows, -1)
            return self._written(batched, positions, torch.ones(rows, dtype=torch.bool), values).view_as(output)
        keys = x[torch.arange(rows, device=x.device), positions].detach().float().cpu().numpy()
        ids, dist, inside = self.codebook.hits(keys)
        if self._captured is not None:
            self._captured.append((ids, dist, inside))
        if self._count:
            hits = int(inside.sum())
            self.codebook.stats.record_routing(hits=hits, misses=rows - hits)
        if not inside.any():
            return None  # nothing within a radius: the layer's output object is returned untouched
        values = self.codebook.values[torch.from_numpy(np.maximum(ids, 0))].to(output.device, output.dtype)
        return self._written(batched, positions, torch.from_numpy(inside), values).view_as(output)

    def _written(
        self, output: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """`output` with `values` (B, H) written at the replaced positions of the chosen rows."""
        span = torch.arange(output.shape[1], device=output.device)[None]  # (1, L)
        starts = positions[:, None]
        where = {"last": span == starts, "from_key": span >= starts, "all": torch.ones_like(span >= starts)}
        mask = where[self.config.replacement] & rows.to(output.device)[:, None]  # (B, L)
        return torch.where(mask[..., None], values[:, None, :], output)

    # -- editing -----------------------------------------------------------------------------

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Place the edit's key in the codebook (add / expand / split) and train its entry's value."""
        self._positions = []
        key, output = self._key_and_output(edit.query)
        if self.config.value_init == "warm":
            value = output
        else:
            value = torch.rand(self.codebook.value_dim, generator=torch.Generator().manual_seed(len(self.codebook)))
        mark = self.codebook.mark()
        entry, action = self.codebook.place(key, edit.target, edit.key, value, self.config.epsilon_init)
        before = self.codebook.values[entry].clone()
        try:
            loss = self._train_value(entry, edit)  # sets the value only when the loss is finite
        except BaseException:  # out of memory, a stop: the codebook is as before the edit
            self.codebook.restore(mark)
            raise
        if not torch.isfinite(loss):
            self.codebook.restore(mark)
            return EditOutcome(applied=False, message=f"GRACE value of entry {entry} diverged (loss {loss}); "
                                                      "the codebook is as before the edit")
        change = float((self.codebook.values[entry] - before).norm())
        return EditOutcome(
            applied=True, changed={f"{self.module_path}.codebook[{entry}]": change},
            message=f"{action} entry {entry} of {len(self.codebook)}; answer NLL {loss:.4f}",
        )

    @torch.no_grad()
    def _key_and_output(self, query: Query) -> tuple[np.ndarray, torch.Tensor]:
        """The layer's input (key, (I,)) and unedited output ((H,)) at the query's key token."""
        seen: dict[str, torch.Tensor] = {}
        module = self.lvlm.model.get_submodule(self.module_path)

        def grab(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x, batched = self._batched(args[0], output)
            position = self._key_positions(x.shape[0], x.shape[1], x.device)[0]
            seen["key"], seen["out"] = x[0, position].float().cpu(), batched[0, position].float().cpu()

        handle = module.register_forward_hook(grab)
        try:
            with bypassing(self):
                self.lvlm.span_logits([query])
        finally:
            handle.remove()
        return seen["key"].numpy(), seen["out"]

    def _train_value(self, entry: int, edit: EditRequest) -> torch.Tensor:
        """Adam on the entry's value for `steps` steps of answer NLL (GRACE: edit_lr, n_iter); returns the last loss."""
        value = self.codebook.values[entry].clone().to(self.lvlm.device)[None].requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=self.config.lr)
        self._training = _Training(entry, value)
        loss = torch.tensor(float("nan"))
        try:
            fit_answer(self.lvlm, edit.query, [], optimizer, self.config.steps, self.config.stop_loss)
            with torch.no_grad():
                loss = answer_nll(self.lvlm, [edit.query])
        finally:
            self._training = None
        if torch.isfinite(loss):
            self.codebook.set_value(entry, value.detach().cpu()[0])
        return loss.detach()

    # -- scoring and retrieval ---------------------------------------------------------------

    def score(self, queries: Sequence[Query], **kwargs: Any) -> list[SpanScore]:
        """Scores with the codebook hook active; its hits and misses are counted."""
        self._positions = []
        self._id_positions = self._encoded_positions(queries) if kwargs.get("sequence_top_k") else None
        self._count = True
        try:
            return self.lvlm.score(queries, **kwargs)
        finally:
            self._count, self._id_positions = False, None

    def _encoded_positions(self, queries: Sequence[Query]) -> dict[tuple[int, ...], int]:
        """Token ids of each query -> its key token, for full-sequence scoring (no `logits_to_keep` positions)."""
        encoded = self.lvlm.inputs.encode_many(queries)
        return {tuple(e.input_ids): e.answer_start - 1 for e in encoded}

    @torch.no_grad()
    def retrieve(self, queries: Sequence[Query]) -> list[Retrieval]:
        """The edit whose entry answers each query (None outside every radius); score = -distance to the nearest key."""
        out = [Retrieval(None, float("-inf"))] * len(queries)
        if not len(self.codebook):
            return out
        for group in image_index_groups(queries):
            for start in range(0, len(group), 16):
                chunk = group[start : start + 16]
                self._positions, self._captured = [], []
                try:
                    self.lvlm.span_logits([queries[i] for i in chunk])  # one forward: the hook looks up the keys
                    ids, dist, inside = self._captured[0]
                finally:
                    self._captured = None
                for row, i in enumerate(chunk):
                    key = self.codebook.edit_keys[int(ids[row])] if inside[row] else None
                    out[i] = Retrieval(key, -float(dist[row]))
        return out

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Disable the hook inside the block: the layer's output is the unedited model's."""
        with bypassing(self):
            yield

    def memory_size(self) -> int:
        """Number of codebook entries."""
        return len(self.codebook)

    def retrieval_stats(self) -> dict[str, float]:
        """The key store's search latency (p50/p99 s, histogram bucket bounds), `score`'s hits and misses, rebuilds."""
        return self.codebook.keys.snapshot().summary()

    # -- state -------------------------------------------------------------------------------

    def state(self) -> EditorState:
        """Config, the layer it wraps and the codebook (keys in FAISS bytes, values, radii, targets, edits)."""
        state = self._new_state({"module": self.module_path})
        self.codebook.save_into(state)
        return state

    def load_state(self, state: EditorState) -> None:
        """Adopt the state's config and codebook."""
        self._check_state(state)
        self.config = self.Config.model_validate(state.meta["config"])
        del self.codebook
        self._install()
        if state.meta.get("module") != self.module_path:
            raise ValueError(f"state's codebook sits at {state.meta.get('module')}, this model's at {self.module_path}")
        self.codebook.load_from(state)

    def reset(self) -> None:
        """Empty the codebook (its statistics run on)."""
        book = self.codebook
        self.codebook = Codebook(book.key_dim, book.value_dim, self.config.memory, book.stats)


def _remove(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
