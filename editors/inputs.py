"""Model inputs for teacher-forced answer scoring: prompt formats, answer-span alignment, batches.

A query is scored as `prompt + sep + answer` (DESIGN.md, Metrics): the answer span is the set
of tokens whose characters overlap the answer, found from the tokenizer's offsets, so a space
before the answer, multi-token answers and tokenizers that merge the space into the first
answer token (Llama's "▁Paris") all align the same way.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from PIL import Image
from transformers import PreTrainedConfig

from editors.families import Family
from memory.cache import LRUCache
from editors.prompts import PLAIN_TEMPLATE, VLKEB_TEMPLATE, PromptFormat


PROCESSED_CACHE_BYTES = 256 * 2**20
# Tokens kept by text: a run asks the same question of many images (a relation's question is one text for every
# creature, and an image rephrase repeats its question), so most texts were tokenized before. Bounded in bytes,
# counted as a text's characters and ~128 bytes a token (its id and its offsets' tuple in Python objects).
TOKENS_CACHE_BYTES = 64 * 2**20


class InputError(ValueError):
    """A query that cannot be turned into model inputs; the message says why."""


@dataclass(frozen=True)
class Query:
    """One question to the model: an optional image, the prompt text and the expected answer."""

    prompt: str
    answer: str = ""
    image: Image.Image | None = None


@dataclass
class Encoded:
    """Token ids of one query, with where its answer span sits and its processed image."""

    input_ids: list[int]
    answer_start: int  # index of the first answer token in input_ids
    answer_len: int  # 0 when encoded without the answer (generation)
    pixels: dict[str, torch.Tensor] | None
    image: str | None = None  # `image_digest` of the query's image


@dataclass
class Batch:
    """A right-padded batch of queries that all have images, or all have none."""

    inputs: dict[str, torch.Tensor]  # keyword arguments for the model's forward
    positions: torch.Tensor  # (B, T) index of the logit that predicts each answer token
    targets: torch.Tensor  # (B, T) answer token ids
    mask: torch.Tensor  # (B, T) True where a row has an answer token
    lengths: list[int]  # unpadded sequence length of each row
    images: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)  # (digest, pixels) per image row


class InputBuilder:
    """Turns queries into one family's model inputs: prompt format, image tokens, padding."""

    def __init__(
        self,
        family: Family,
        config: PreTrainedConfig,
        tokenizer,
        image_processor,
        chat_template: str | None = None,
        prompt_format: PromptFormat = "auto",
        plain_template: str = PLAIN_TEMPLATE,
        extras: dict[str, Any] | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", True):
            raise InputError("answer-span alignment needs a fast (tokenizers-backed) tokenizer")
        if prompt_format == "chat" and not chat_template:
            raise InputError("prompt_format='chat' but neither the tokenizer nor the processor has a chat template")
        self.family = family
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.extras = extras or {}
        self.chat_template = chat_template
        self.prompt_format: Literal["chat", "plain", "vlkeb"] = (
            ("chat" if chat_template else "plain") if prompt_format == "auto" else prompt_format
        )
        self.plain_template = plain_template
        self.image_token_id = self._image_token_id()
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        # Text a record may not carry: the tokenizer's special and added tokens (the image placeholder among them).
        self.reserved = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab(), family.image_token} - {""})
        # Longest input the model takes (its text context); a run may lower it (--max-tokens).
        text_config = getattr(config, "text_config", None) or config
        self.max_tokens: int | None = getattr(text_config, "max_position_embeddings", None)
        # A run asks about the same few images again and again: each is processed once (by content).
        self._processed: LRUCache[dict[str, Any]] = LRUCache(PROCESSED_CACHE_BYTES, _nbytes)
        self._encoded: LRUCache[Encoded] = LRUCache(PROCESSED_CACHE_BYTES, lambda e: _nbytes(e.pixels or {}) + 256)
        self._tokens: LRUCache[tuple[list[int], list]] = LRUCache(  # by (text, with_answer)
            TOKENS_CACHE_BYTES, lambda tokens: 128 * len(tokens[0]) + 64)

    def _image_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(self.family.image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise InputError(f"the tokenizer has no {self.family.image_token!r} token for {self.family.name} images")
        model_id = getattr(self.config, "image_token_id", None)
        if model_id != token_id:
            # BLIP-2 scatters image features into positions holding config.image_token_id; with
            # no such id (old checkpoints) or another one it silently answers without the image.
            raise InputError(
                f"{self.family.name}: config.image_token_id={model_id} but the tokenizer's "
                f"{self.family.image_token!r} is {token_id}; the model would ignore the image"
            )
        return token_id

    def prompt_text(self, query: Query) -> str:
        """The prompt as the model sees it before the answer: the configured format, then the family's `prompt_end`."""
        return self._prompt_text(query) + self.family.prompt_end

    def _prompt_text(self, query: Query) -> str:
        """The prompt in the configured format."""
        if self.prompt_format == "chat":
            content = ([{"type": "image"}] if query.image is not None else []) + [{"type": "text", "text": query.prompt}]
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
            marker = self.family.chat_image_marker
            return text.replace(marker, self.family.image_text) if marker and query.image is not None else text
        if self.prompt_format == "vlkeb":
            image = self.family.vlkeb_image() if query.image is not None else ""
            return VLKEB_TEMPLATE.format(image=image, prompt=query.prompt)
        image = self.family.image_text if query.image is not None else ""
        return self.plain_template.format(image=image, prompt=query.prompt)

    def check(self, query: Query, with_answer: bool = True) -> None:
        """Refuse what a record must not bring: a blank question, or the tokenizer's special tokens in its text."""
        texts = {"question": query.prompt, **({"answer": query.answer} if with_answer else {})}
        for what, text in texts.items():
            if not text.strip():
                raise InputError(f"blank {what}")
            if found := [token for token in self.reserved if token in text]:
                raise InputError(f"the {what} holds the tokenizer's special token(s) {', '.join(map(repr, found))}")

    def encode(self, query: Query, with_answer: bool = True) -> Encoded:
        """Token ids of prompt (+ answer), image placeholders expanded to the image's slots.

        InputError for a query `check` refuses, or one longer than `max_tokens` with its image tokens.
        Encodings are cached by content: a run asks the same questions of the same images often.
        """
        return self.encode_many([query], with_answer)[0]

    def encode_many(self, queries: Sequence[Query], with_answer: bool = True) -> list[Encoded]:
        """`encode` of each query, with one call of the tokenizer for those not cached (a call costs far more than a
        text); InputError for the first query `encode` would refuse."""
        keys = [self._key(query, with_answer) for query in queries]
        found: list[Encoded | None] = [self._encoded.get(key) for key in keys]
        missing: dict[tuple, int] = {}  # each uncached key, at the first query asking for it
        for i, (key, encoded) in enumerate(zip(keys, found)):
            if encoded is None:
                missing.setdefault(key, i)
        texts: dict[int, tuple[str, int] | InputError] = {}
        for i in missing.values():  # a cached encoding passed `check`, which reads only the key's texts
            try:
                self.check(queries[i], with_answer)
                texts[i] = self._text(queries[i], with_answer)
            except InputError as error:
                texts[i] = error  # raised in its turn below, so the first refused query is the one named
        tokens = self._tokenize({i: text for i, text in texts.items() if not isinstance(text, InputError)}, with_answer)
        for i, (query, key) in enumerate(zip(queries, keys)):
            if found[i] is None:
                if (j := missing[key]) == i:
                    if isinstance(texts[i], InputError):
                        raise texts[i]
                    found[i] = self._finish(query, texts[i], tokens[i], with_answer, key[5])
                    self._encoded.put(key, found[i])
                else:
                    found[i] = found[j]
            length = len(found[i].input_ids)
            if self.max_tokens is not None and length > self.max_tokens:
                raise InputError(f"the query is {length} tokens long with its image; the model takes at most "
                                 f"{self.max_tokens}")
        return found  # type: ignore[return-value]

    def form(self) -> tuple[str, str, str | None]:
        """How a query becomes text: the prompt format and templates, which tests and protocols switch on a live
        builder, so every cache of encodings or scores depends on them."""
        return self.prompt_format, self.plain_template, self.chat_template

    def _key(self, query: Query, with_answer: bool) -> tuple:
        """What an encoding depends on: the `form`, the query and its image."""
        image = None if query.image is None else image_digest(query.image)
        return (*self.form(), query.prompt, query.answer, image, with_answer)

    def _text(self, query: Query, with_answer: bool) -> tuple[str, int]:
        """The text to tokenize (prompt, and the answer after a separator) and where the answer starts in it."""
        text = self.prompt_text(query)
        if not with_answer:
            return text, len(text)
        if not query.answer.strip():
            raise InputError(f"empty answer for prompt {query.prompt!r}")
        sep = "" if text[-1:].isspace() else " "
        return text + sep + query.answer, len(text) + len(sep)

    def _tokenize(self, texts: dict[int, tuple[str, int]], with_answer: bool) -> dict[int, tuple[list[int], list]]:
        """Token ids (and offsets, with the answer) of each text, cached by text; those not cached in one tokenizer
        call per kind of text: a text that already starts with the BOS token gets no second one."""
        bos = self.tokenizer.bos_token
        found = {text: tokens for text, _ in texts.values() if (tokens := self._tokens.get((text, with_answer)))}
        todo = list(dict.fromkeys(text for text, _ in texts.values() if text not in found))
        for special in (True, False):
            rows = [text for text in todo if special != bool(bos and text.startswith(bos))]
            if not rows:
                continue
            enc = self.tokenizer(rows, add_special_tokens=special, return_offsets_mapping=with_answer)
            for n, text in enumerate(rows):
                found[text] = (list(enc["input_ids"][n]), enc["offset_mapping"][n] if with_answer else [])
                self._tokens.put((text, with_answer), found[text])
        return {i: (list(found[text][0]), found[text][1]) for i, (text, _) in texts.items()}  # ids a caller may own

    def _finish(self, query: Query, text: tuple[str, int], tokens: tuple[list[int], list], with_answer: bool,
                digest: str | None) -> Encoded:
        """The `Encoded` of a query from its `_text` and tokens: the answer span found, the image's slots expanded."""
        (text, answer_char), (ids, offsets) = text, tokens
        start, length = len(ids), 0
        if with_answer:
            start, length = _answer_span(offsets, answer_char, query)
        pixels = None
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if query.image is None:
            if slots:
                raise InputError(f"prompt {query.prompt!r} holds the image placeholder but the query has no image")
        else:
            pixels = self._query_pixels(query.image, digest, query.prompt)
            image_ids = self.family.image_tokens(self.config, pixels, self.tokenizer)
            n = len(image_ids)
            if self.family.placement == "prefix":
                if slots:
                    raise InputError(f"{self.family.name} puts image tokens before the prompt; remove them from it")
                ids, at = image_ids + ids, 0
            else:
                if len(slots) != 1:
                    raise InputError(f"expected one image placeholder in the prompt text, found {len(slots)}: {text!r}")
                at = slots[0]
                ids = ids[:at] + image_ids + ids[at + 1 :]
            if at < start:
                start += n - (0 if self.family.placement == "prefix" else 1)
        return Encoded(ids, start, length, pixels, digest)

    def pixels(self, images: Sequence[Image.Image], prompt: str = "") -> dict[str, torch.Tensor]:
        """The family's vision inputs for `images` (RGB), with whatever its vision path reads from `prompt`.

        Each image is processed once per run (cached by content), as for scoring, and the batch is
        stacked as `collate` stacks it.
        """
        return self.family.stack_pixels([self._query_pixels(image, image_digest(image), prompt) for image in images])

    def _process(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """The image processor's output for `images`, converted to RGB."""
        return dict(self.image_processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt", **self.family.processor_kwargs
        ))

    def _query_pixels(self, image: Image.Image, digest: str, prompt: str) -> dict[str, torch.Tensor]:
        """`pixels([image], prompt)`, with the processed image cached by its content's `digest`."""
        processed = self._processed.get(digest)
        if processed is None:
            processed = self._process([image])
            self._processed.put(digest, processed)
        return self.family.query_pixels(prompt, processed, self.extras)

    def collate(self, items: Sequence[Encoded], dtype: torch.dtype, device: torch.device | str) -> Batch:
        """Right-pad encoded queries into one batch; all must have images or none, unless the family
        `shares_image_features` (the rows without an image then simply hold no image tokens)."""
        has_image = {item.pixels is not None for item in items}
        if len(has_image) != 1 and not self.family.shares_image_features:
            raise InputError("a batch mixes queries with and without images")
        lengths = [len(item.input_ids) for item in items]
        width, span = max(lengths), max(max(item.answer_len for item in items), 1)
        input_ids = torch.tensor([item.input_ids + [self.pad_id] * (width - len(item.input_ids)) for item in items],
                                 dtype=torch.long)
        attention = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        starts = torch.tensor([item.answer_start for item in items])[:, None]
        spans = torch.tensor([item.answer_len for item in items])[:, None]
        slots = torch.arange(span)[None, :]
        # The logit at position p predicts token p + 1; unused slots repeat the last position.
        positions = starts - 1 + torch.minimum(slots, (spans - 1).clamp(min=0))
        mask = slots < spans
        answer = input_ids.gather(1, (starts + slots).clamp(max=width - 1))
        targets = torch.where(mask, answer, torch.tensor(self.pad_id))
        inputs = {"input_ids": input_ids, "attention_mask": attention}
        if True in has_image:
            stacked = self.family.stack_pixels([item.pixels for item in items if item.pixels is not None])
            for key, value in stacked.items():
                inputs[key] = value.to(dtype) if value.is_floating_point() else value
            inputs.update(self.family.extra_inputs(self.config, input_ids))
        inputs.update(self.family.prefix_inputs(self.config, input_ids, [item.answer_start for item in items]))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        images = [(item.image, item.pixels) for item in items if item.pixels is not None and item.image is not None]
        return Batch(inputs, positions.to(device), targets.to(device), mask.to(device), lengths, images)


def _nbytes(values: dict[str, Any]) -> int:
    """Bytes held by the tensors among `values` (plus a little for the rest)."""
    return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 64 for v in values.values())


# Digests by image object: a run hashes each query's image for several caches, and an image store hands out the
# same (unmodified, see `simulator.stream.ImageRoot.open`) object for every record that names the file.
_DIGESTS: LRUCache[tuple[weakref.ref, str]] = LRUCache(4096)


def image_digest(image: Image.Image) -> str:
    """Content hash of an image (mode, size, pixels): the same picture gives the same digest whatever object holds it.

    Remembered per object (images are not modified once handed to the model), so hashing the
    pixels happens once per image object, not once per cache that keys by it.
    """
    held = _DIGESTS.get(id(image))
    if held is not None and held[0]() is image:
        return held[1]
    digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    _DIGESTS.put(id(image), (weakref.ref(image), digest.hexdigest()))
    return digest.hexdigest()


def row_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, ...]]:
    """Each row's token ids without its right padding: how a hook finds a query in a batch `collate` built."""
    lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(input_ids)
    return [tuple(row[:n].tolist()) for row, n in zip(input_ids, lengths)]


def image_index_groups(queries: Sequence[Query]) -> list[list[int]]:
    """Indices of the queries with an image, then of those without (a batch cannot mix them); empty groups dropped."""
    groups = [[i for i, q in enumerate(queries) if q.image is not None], [i for i, q in enumerate(queries) if q.image is None]]
    return [g for g in groups if g]


def _answer_span(offsets: Sequence[tuple[int, int]], answer_char: int, query: Query) -> tuple[int, int]:
    """First index and length of the tokens whose characters overlap the answer."""
    hits = [i for i, (s, e) in enumerate(offsets) if e > answer_char and e > s]
    if not hits:
        raise InputError(f"answer {query.answer!r} produced no tokens after prompt {query.prompt!r}")
    first, last = hits[0], hits[-1]
    if last - first + 1 != len(hits):
        raise InputError(f"answer {query.answer!r} is not one contiguous token span")
    return first, len(hits)
