"""Shared image prefixes: rows that show the same image after the same tokens share the decoder's keys and values
up to the image's last slot and run only their own tokens after it (`Family.shares_image_prefix`, `LVLM.score`).

On LLaVA-1.5 the prefix is ~580 of a query's ~600 tokens, and a record asks ~16 questions about ~4 images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

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


@dataclass
class Prefixes:
    """The prefixes of a batch's rows as the decoder's cache: left-padded to the longest, masked where empty."""

    layers: KeysValues  # per layer: keys and values (B, heads, P, head_dim)
    attention: torch.Tensor  # (B, P) 1 on a row's own prefix slots
    lengths: torch.Tensor  # (B,) tokens of each row's prefix (0: the row runs whole)


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


def stack(keys: list[PrefixKey | None], held: dict[PrefixKey, KeysValues], device: torch.device) -> Prefixes:
    """The prefixes of a batch's rows (None: the row has none) side by side, each ending where the row's tokens begin."""
    lengths = [0 if key is None else len(key[1]) for key in keys]
    width = max(lengths)
    layers = []
    for layer, (k, v) in enumerate(next(iter(held.values()))):
        stacked = (k.new_zeros(len(keys), k.shape[1], width, k.shape[3]),
                   v.new_zeros(len(keys), v.shape[1], width, v.shape[3]))
        for row, key in enumerate(keys):
            if key is not None:
                for into, part in zip(stacked, held[key][layer]):
                    into[row, :, width - lengths[row] :] = part[0]
        layers.append(stacked)
    counts = torch.tensor(lengths, device=device)
    attention = (torch.arange(width, device=device)[None, :] >= width - counts[:, None]).long()
    return Prefixes(layers, attention, counts)
