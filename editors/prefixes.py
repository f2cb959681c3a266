"""Shared image prefixes: rows that show the same image after the same tokens share the decoder's keys and values
up to the image's last slot and run only their own tokens after it (`Family.shares_image_prefix`, `LVLM.score`).

On LLaVA-1.5 the prefix is ~580 of a query's ~600 tokens, and a record asks ~16 questions about ~4 images.

Such rows are scored packed: a forward holds a few packs, each one sequence of several *units* side by side, a
unit being a prefix and the rows that continue it (or one row run whole). A prefix another call computed is
handed to the decoder as cached keys and values; a new one is a segment of the pack, ahead of its rows, and its
keys and values are kept for later calls (one wider than `PACK_TOKENS` is computed first in a forward of its own:
the dense mask over it would cost more). Inside a unit, rows that go on alike share those tokens too (a `Trie`: the
questions of a record begin alike, and an in-context fact is shown to several of them), and a row stops before its
last answer token, whose logit nothing reads. A mask lets each token see only the tokens before it on its rows and
their prefix, and position ids count on from the prefix, so a row's logits are those of the row run whole (to float
rounding), with no padding between rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import PreTrainedConfig

from editors.inputs import Encoded
from memory.cache import LRUCache

# Prefixes kept between the batches (and, in a `ScoreMemo`, the calls) of scoring: ~50 KB per image on the default
# model, ~300 MB on a 7B LLaVA-1.5 in float16 (576 image tokens in 32 layers).
PREFIX_CACHE_BYTES = 2 * 2**30

PrefixKey = tuple[str, tuple[int, ...]]  # (image digest, the prefix's token ids)
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys and values (rows, heads, P, head_dim)


def prefix_cache(max_bytes: int = PREFIX_CACHE_BYTES) -> LRUCache[KeysValues]:
    """An LRU cache of one prefix's keys and values per key, bounded in bytes."""
    return LRUCache(max_bytes, lambda layers: sum(t.numel() * t.element_size() for pair in layers for t in pair))


def suffix(item: Encoded, start: int) -> Encoded:
    """`item` from token `start` on, without its image (which sits in the prefix before `start`)."""
    return replace(item, input_ids=item.input_ids[start:], answer_start=item.answer_start - start, pixels=None,
                   image=None)


def shared_prefixes(encoded: dict[int, Encoded], image_token: int, cache: LRUCache[KeysValues]
                    ) -> dict[int, PrefixKey]:
    """Rows whose prefix (up to their image's last slot) another row shows too or `cache` holds: row -> its key."""
    found: dict[int, PrefixKey] = {}
    for i, item in encoded.items():
        if item.image is None:
            continue
        ids = item.input_ids
        end = len(ids) - ids[::-1].index(image_token)
        if end < item.answer_start:  # the logit that predicts the first answer token must come after the prefix
            found[i] = (item.image, tuple(ids[:end]))
    count = Counter(found.values())
    return {i: key for i, key in found.items() if count[key] > 1 or key in cache}


def bytes_per_token(config: PreTrainedConfig, dtype: torch.dtype) -> int:
    """Bytes the decoder's keys and values take per token, over all its layers."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * dtype.itemsize


def within_window(config: PreTrainedConfig, longest: int) -> bool:
    """Whether rows of `longest` tokens fit the decoder's sliding window, if it has one: past the window a layer's
    cache would keep only the last keys, and a row's prefix could not be handed on whole."""
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    return window is None or longest < window


# Width a pack may reach beyond its longest unit: several short units share one sequence rather than each padded to
# the longest. Wider packs pad less but attend over more masked columns (the mask is dense).
PACK_TOKENS = 128


@dataclass
class Trie:
    """Token sequences merged where they begin alike, one node per distinct beginning, in depth-first order: a node's
    descendants are the nodes after it up to its `end`, so a token sees exactly the nodes whose span holds it."""

    ids: list[int]  # each node's token
    depth: list[int]  # each node's index in its sequences
    end: list[int]  # one past a node's last descendant
    paths: list[list[int]]  # per sequence, in the order given, its nodes


def merge(sequences: list[list[int]]) -> Trie:
    """`sequences` as a `Trie`: sorted, each adds the tokens after the beginning it shares with the one before."""
    ids: list[int] = []
    depth: list[int] = []
    paths: list[list[int]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=sequences.__getitem__)
    previous: list[int] = []
    path: list[int] = []
    for j in order:
        sequence, shared = sequences[j], 0
        while shared < min(len(sequence), len(previous)) and sequence[shared] == previous[shared]:
            shared += 1
        path = paths[j] = [*path[:shared], *range(len(ids), len(ids) + len(sequence) - shared)]
        ids += sequence[shared:]
        depth += range(shared, len(sequence))
        previous = sequence
    end = [0] * len(ids)
    for j in order:  # in depth-first order the last path through a node ends its span
        for node in paths[j]:
            end[node] = paths[j][-1] + 1
    return Trie(ids, depth, end, paths)


def _run_tokens(item: Encoded) -> list[int]:
    """The tokens of `item` a pack runs: up to the one that predicts its last answer token."""
    return item.input_ids[: item.answer_start + max(item.answer_len - 1, 0)]


@dataclass
class Unit:
    """A prefix and the rows that continue it (`key` None: one row run whole); `held` when the cache has the prefix."""

    key: PrefixKey | None
    rows: list[int]
    held: bool
    # Built on first use and kept: `plan_packs` and `pack_layout` of one call pass the same `items`.
    merged: Trie | None = field(default=None, repr=False, compare=False)

    def inline(self) -> int:
        """Tokens of the unit's prefix that run in its pack (a new one), ahead of its rows."""
        return 0 if self.key is None or self.held else len(self.key[1])

    def trie(self, items: dict[int, Encoded]) -> Trie:
        """The unit's tokens in a pack: its new prefix, then its rows merged where they begin alike."""
        if self.merged is None:
            lead = list(self.key[1]) if self.inline() else []
            self.merged = merge([lead + _run_tokens(items[i]) for i in self.rows])
        return self.merged

    def tokens(self, items: dict[int, Encoded]) -> int:
        """Sequence tokens the unit takes in a pack."""
        return len(self.trie(items).ids)

    def columns(self) -> int:
        """Cached key columns the unit needs: its held prefix."""
        return len(self.key[1]) if self.key is not None and self.held else 0


def plan_packs(rows: list[int], items: dict[int, Encoded], shared: dict[int, PrefixKey], held: set[PrefixKey],
               batch_size: int, column_budget: int) -> list[list[list[Unit]]]:
    """`rows` as forwards of packs of units: first fit by decreasing size, packs as wide as the larger of the
    biggest unit and `PACK_TOKENS`. A forward holds at most as many tokens as `batch_size` rows of the longest one
    padded would, and at most `column_budget` cached prefix columns over its packs (packs are padded to the most)."""
    by_key: dict[PrefixKey, list[int]] = {}
    units = []
    for i in rows:
        if i in shared:
            by_key.setdefault(shared[i], []).append(i)
        else:
            units.append(Unit(None, [i], False))
    units += [Unit(key, members, key in held) for key, members in by_key.items()]
    units.sort(key=lambda u: (-u.tokens(items), -u.columns()))
    width = max(PACK_TOKENS, units[0].tokens(items))
    packs: list[tuple[list[int], list[Unit]]] = []  # ([tokens, columns], units)
    for unit in units:
        size, columns = unit.tokens(items), unit.columns()
        for used, members in packs:
            if used[0] + size <= width and used[1] + columns <= column_budget:
                used[0] += size
                used[1] += columns
                members.append(unit)
                break
        else:
            packs.append(([size, columns], [unit]))
    longest = max(len(items[i].input_ids) for i in rows)
    per_forward = max(1, batch_size * longest // width)
    forwards: list[list[list[Unit]]] = []
    widest = 0
    for (_, columns), members in packs:
        if forwards and len(forwards[-1]) < per_forward and \
                (len(forwards[-1]) + 1) * max(widest, columns) <= column_budget:
            forwards[-1].append(members)
            widest = max(widest, columns)
        else:
            forwards.append([members])
            widest = columns
    return forwards


@dataclass
class Layout:
    """One forward of packs as the decoder's inputs, and where each row's answer logits come out."""

    input_ids: torch.Tensor  # (P, W)
    position_ids: torch.Tensor  # (P, W) each row counting on from its prefix
    allowed: torch.Tensor  # (P, 1, W, C + W) True where a token may attend: cached columns, then the packs' tokens
    layers: KeysValues | None  # per layer: cached prefix keys and values (P, heads, C, head_dim); None when C = 0
    keep: torch.Tensor  # (P, K) positions whose logits are computed
    rows: list[int]  # the forward's rows, in the order of the tensors below
    pack: torch.Tensor  # (B,) each row's pack
    slots: torch.Tensor  # (B, T) each row's answer-span logits among its pack's `keep`
    targets: torch.Tensor  # (B, T) answer token ids (padding past a row's span)
    mask: torch.Tensor  # (B, T) True on a row's answer tokens
    images: list[str] = field(default_factory=list)  # digests of the images in the packs, in token order
    computed: list[tuple[PrefixKey, int, int]] = field(default_factory=list)  # new prefixes: (key, pack, offset)


def pack_layout(packs: list[list[Unit]], items: dict[int, Encoded], held: dict[PrefixKey, KeysValues],
                pad_id: int, device: torch.device) -> Layout:
    """The tensors of one forward of `packs` (from `plan_packs`); `held` has the keys and values of held prefixes."""
    span = max(1, max(items[i].answer_len for units in packs for unit in units for i in unit.rows))
    # Per pack, token by token (Python lists: one tensor each at the end costs far less than a write per row).
    ids: list[list[int]] = []
    positions: list[list[int]] = []
    ends: list[list[int]] = []  # one past the last pack token that sees the token (`Trie.end`)
    sees_column: list[list[int]] = []  # the unit whose held prefix the token sees (-1: none)
    column_unit: list[list[int]] = []  # per cached column, the unit whose prefix it holds
    held_keys: list[list[PrefixKey]] = []  # per pack, its held prefixes in column order
    rows, pack_of, slots, targets, mask, keep, images, computed = [], [], [], [], [], [], [], []
    for p, units in enumerate(packs):
        pack_ids, pack_positions, pack_ends, pack_column, pack_units = [], [], [], [], []
        held_keys.append([])
        kept: dict[int, int] = {}  # pack position -> its index among the logits kept (rows may share one)
        for u, unit in enumerate(units):
            start, column = 0, -1
            if unit.held:
                start, column = len(unit.key[1]), u  # type: ignore[index]
                pack_units += [u] * start
                held_keys[p].append(unit.key)  # type: ignore[arg-type]
            elif unit.key is not None:
                computed.append((unit.key, p, len(pack_ids)))
                images.append(unit.key[0])
            trie, offset, lead = unit.trie(items), len(pack_ids), unit.inline()
            pack_ids += trie.ids
            pack_positions += [start + d for d in trie.depth]
            pack_ends += [offset + e for e in trie.end]
            pack_column += [column] * len(trie.ids)
            for i, path in zip(unit.rows, trie.paths):
                item = items[i]
                if item.image is not None and item.pixels is not None:
                    images.append(item.image)
                # The logit at a row's node predicts the row's next token; unused slots repeat the span's last one.
                at = [offset + path[lead + item.answer_start - 1 + min(t, max(item.answer_len - 1, 0))]
                      for t in range(span)]
                answer = [item.input_ids[min(item.answer_start + t, len(item.input_ids) - 1)] for t in range(span)]
                rows.append(i)
                pack_of.append(p)
                slots.append([kept.setdefault(q, len(kept)) for q in at])
                targets.append([token if t < item.answer_len else pad_id for t, token in enumerate(answer)])
                mask.append([t < item.answer_len for t in range(span)])
        ids.append(pack_ids)
        positions.append(pack_positions)
        ends.append(pack_ends)
        sees_column.append(pack_column)
        column_unit.append(pack_units)
        keep.append(list(kept))
    width = max(map(len, ids))
    columns = max(map(len, column_unit))
    for p in range(len(packs)):
        pad = width - len(ids[p])
        ends[p] += range(len(ids[p]) + 1, width + 1)  # padding: each token sees only itself
        ids[p] += [pad_id] * pad
        positions[p] += [0] * pad
        sees_column[p] += [-1] * pad
        column_unit[p] += [-2] * (columns - len(column_unit[p]))
    index = torch.arange(width)
    own = (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] < _ints(ends)[:, None, :])
    cached = _ints(sees_column)[:, :, None] == _ints(column_unit)[:, None, :]
    allowed = torch.cat([cached, own], dim=2)[:, None]
    longest = max(map(len, keep))
    keep_ids = _ints([k + [0] * (longest - len(k)) for k in keep])
    layers = _held_columns(held_keys, held, columns) if columns else None
    return Layout(_ints(ids).to(device), _ints(positions).to(device), allowed.to(device), layers, keep_ids.to(device),
                  rows, _ints(pack_of).to(device), _ints(slots).to(device), _ints(targets).to(device),
                  torch.from_numpy(np.array(mask, dtype=bool)).to(device), images, computed)


def _ints(rows: list) -> torch.Tensor:
    """A long tensor of nested lists of ints: numpy reads Python lists several times faster than torch.tensor."""
    return torch.from_numpy(np.array(rows, dtype=np.int64))


def _held_columns(held_keys: list[list[PrefixKey]], held: dict[PrefixKey, KeysValues], columns: int) -> KeysValues:
    """Per layer, the keys and values of each pack's held prefixes side by side (P, heads, `columns`, head_dim),
    zero past a pack's own: every pack's prefixes and a zero column in one sequence, picked out by one index."""
    order = [key for keys in held_keys for key in keys]
    at, picks = 0, []
    for keys in held_keys:
        width = sum(len(key[1]) for key in keys)
        picks += [*range(at, at + width), *[-1] * (columns - width)]  # -1: the zero column at the end
        at += width
    first = held[order[0]]
    pick = torch.tensor(picks, device=first[0][0].device)
    out = []
    for layer in range(len(first)):
        pair = []
        for part in (0, 1):
            parts = [held[key][layer][part] for key in order]
            flat = torch.cat([*parts, parts[0].new_zeros(*parts[0].shape[:2], 1, parts[0].shape[3])], dim=2)[0]
            pair.append(flat[:, pick].unflatten(1, (len(held_keys), columns)).transpose(0, 1))
        out.append((pair[0], pair[1]))
    return out
