"""A seeded synthetic multimodal world: text entities, the facts linking them, and creatures.

Everything is a pure function of `WorldConfig` (entity count and seed): the same config gives
the same world, byte for byte, on every machine.

Every kind of text entity has the same number of names and every text relation is one-to-one,
so a set of image values leads to as many distinct k-hop answers at every k: each hop has the
same chance level (with pools of 64 cities and 3 eras, 4-hop questions were answered by chance
far more often than 1-hop ones, and portability rose with hops, the opposite of VLKEB's Fig. 3).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from simulator.world.schema import IMAGE_RELATIONS, TEXT_RELATIONS, ImageRelation

GENERATOR_VERSION = 4  # bump when a change alters the generated world
# What each of the generator's random streams is for (its second seed word), so that no two of them coincide.
SEED_RENDER, SEED_WORLD, SEED_UNSEEN, SEED_EDITS, SEED_EVENTS, SEED_ONE_HOP = range(6)
KINDS = ("city", "country", "language", "script", "era", "food", "person", "toy")
GRID = 4  # glyph cells per side
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [250, 250, 250]],
    dtype=np.float32,
)
IMAGE_SIZE = 32
CELL = IMAGE_SIZE // GRID  # 8 px: one glyph cell per 8x8 ViT patch, so a patch reads one colour


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


class WorldConfig(BaseModel):
    """What a world is generated from; the defaults give the world of the embedded model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entities: int = Field(400, ge=8, le=20000, description="number of creatures")
    seed: int = Field(0, ge=0, description="generator seed")

    @property
    def eval_creatures(self) -> int:
        """Creatures whose facts form the eval split (5/8); the rest form the train split."""
        return round(self.entities * 5 / 8)

    @property
    def pool_size(self) -> int:
        """Names of every kind of text entity (one size for all), scaled with the creature count."""
        return _clamp(self.entities // 10, 6, 40)

    def pool_sizes(self) -> dict[str, int]:
        """How many text entities of each kind the world has: `pool_size` for every kind."""
        return dict.fromkeys(KINDS, self.pool_size)

    def digest(self) -> str:
        """Content hash of the world: config plus generator version."""
        payload = json.dumps({**self.model_dump(), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class World:
    """Text entities by kind, text facts, and each creature's glyph and image facts."""

    config: WorldConfig
    names: dict[str, list[str]]
    text_facts: dict[str, dict[str, str]]  # text relation -> subject -> object
    creatures: list[dict[str, str]]  # creature -> image relation -> value
    glyphs: np.ndarray  # (creatures, GRID, GRID) palette indices
    renders: dict[tuple[int, int], Image.Image] = field(default_factory=dict, repr=False)

    @cached_property
    def eval_ids(self) -> list[int]:
        """Creatures of the eval split."""
        return list(range(self.config.eval_creatures))

    @cached_property
    def train_ids(self) -> list[int]:
        """Creatures of the train split (MEND, KE, SERAC and in-context training use these)."""
        return list(range(self.config.eval_creatures, self.config.entities))

    @cached_property
    def unseen_ids(self) -> list[int]:
        """Creatures beyond the config's, added for long streams: the world's model never saw them."""
        return list(range(self.config.entities, len(self.creatures)))

    def chain(self, relation: ImageRelation, value: str) -> list[str]:
        """Answers of hops 1..4 that follow from `value` of an image relation."""
        answers = []
        for name in relation.chain:
            value = self.text_facts[name][value]
            answers.append(value)
        return answers

    def image(self, creature: int, variant: int) -> Image.Image:
        """Render `variant` of a creature (cached): its glyph under pose, colour and background jitter."""
        key = (creature, variant)
        if key not in self.renders:
            self.renders[key] = self.render(creature, variant)
        return self.renders[key]

    def render(self, creature: int, variant: int) -> Image.Image:
        """Render `variant` of a creature, uncached (writing 50,000 renders should not keep them all)."""
        return _render(self.glyphs[creature], np.random.default_rng([self.config.seed, SEED_RENDER, creature, variant]))


def build_world(config: WorldConfig, unseen: int = 0) -> World:
    """Generate the world of `config`, plus `unseen` creatures its model never saw (for long streams)."""
    rng = np.random.default_rng([config.seed, SEED_WORLD, GENERATOR_VERSION])
    size = config.pool_size
    words = _unique_words(rng, len(KINDS) * size)
    names: dict[str, list[str]] = {}
    for kind in KINDS:
        # One word (one token) per name, persons too: with two-word names a teacher-forced answer's second word
        # would follow from its first, and a question answered by a person would score 0.5 knowing nothing.
        taken, words = words[:size], words[size:]
        names[kind] = [w.lower() for w in taken] if kind in ("food", "toy") else taken
    text_facts = {
        name: _one_to_one(rng, names[rel.subject], names[rel.object]) for name, rel in TEXT_RELATIONS.items()
    }
    creatures = _creatures(rng, names, config.entities)
    glyphs = _glyphs(rng, config.entities)
    if unseen:
        # A generator of their own: adding unseen creatures leaves the config's world (and its model) unchanged.
        more = np.random.default_rng([config.seed, SEED_UNSEEN, GENERATOR_VERSION])
        creatures += _creatures(more, names, unseen)
        glyphs = np.concatenate([glyphs, _glyphs(more, unseen, taken=glyphs)])
    return World(config, names, text_facts, creatures, glyphs)


def _creatures(rng: np.random.Generator, names: dict[str, list[str]], count: int) -> list[dict[str, str]]:
    """Each creature's value of every image relation, drawn uniformly from the relation's pool."""
    return [
        {name: names[rel.object][rng.integers(len(names[rel.object]))] for name, rel in IMAGE_RELATIONS.items()}
        for _ in range(count)
    ]


def _unique_words(rng: np.random.Generator, count: int) -> list[str]:
    """Pronounceable, capitalised pseudo-words, all different."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = "".join(consonants[rng.integers(14)] + vowels[rng.integers(5)] for _ in range(syllables))
        if rng.random() < 0.5:
            word += consonants[rng.integers(14)]
        word = word.capitalize()
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _one_to_one(rng: np.random.Generator, subjects: list[str], objects: list[str]) -> dict[str, str]:
    """A random one-to-one map from subjects to the (equally many) objects.

    One-to-one keeps the number of distinct answers the same along a chain: a many-to-one
    map would shrink the answer set hop by hop and raise the chance level of later hops.
    """
    return {subject: objects[i] for subject, i in zip(subjects, rng.permutation(len(objects)), strict=True)}


def _glyphs(rng: np.random.Generator, count: int, taken: np.ndarray | None = None) -> np.ndarray:
    """`count` random 4x4 colour codes, any two (and any one and a `taken` code) differing in at least 6 of 16 cells.

    Codes are drawn one at a time and kept in draw order, as a one-by-one check would keep them;
    the check runs on batches of candidates as a product of one-hot codes (cells two codes share),
    which keeps 25,000 unseen creatures to 2 s (50,000: 6 s).
    """
    cells, colours = GRID * GRID, len(PALETTE)
    taken = np.zeros((0, GRID, GRID), dtype=np.int64) if taken is None else taken
    kept = np.zeros((len(taken) + count, cells * colours), dtype=np.float32)  # one-hot rows of the codes kept
    offsets = np.arange(cells) * colours

    def one_hot(codes: np.ndarray) -> np.ndarray:
        rows = np.zeros((len(codes), cells * colours), dtype=np.float32)
        np.put_along_axis(rows, codes.reshape(len(codes), cells) + offsets, 1.0, axis=1)
        return rows

    kept[: len(taken)] = one_hot(taken)
    found, codes = len(taken), []
    while len(codes) < count:
        batch = min(count - len(codes) + 8, 2048)
        candidates = np.stack([rng.integers(colours, size=(GRID, GRID)) for _ in range(batch)])
        rows = one_hot(candidates)
        ok = (rows @ kept[:found].T).max(axis=1, initial=0) <= cells - 6  # cells shared with every code kept
        clash = np.tril(rows @ rows.T > cells - 6, k=-1)  # [i, j]: candidate i too close to an earlier one, j
        for i in np.flatnonzero(clash.any(axis=1)):  # rare; settled in draw order, as one by one
            ok[i] = ok[i] and not ok[clash[i]].any()
        chosen = np.flatnonzero(ok)[: count - len(codes)]
        codes += list(candidates[chosen])
        kept[found : found + len(chosen)] = rows[chosen]
        found += len(chosen)
    return np.stack(codes)


def _render(glyph: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 32x32 picture of a glyph: one jittered colour blob per 8-px cell on a noisy tinted background.

    Pose (the blobs' offset and size inside their cells), colours and background change from
    render to render; the cell grid stays put, so every cell keeps to its own patch. (A free
    shift across patch borders left a 2-layer ViT at chance on 400 creatures.)
    """
    background = rng.uniform(60, 200) + rng.uniform(-30, 30, size=3)
    canvas = np.tile(background, (IMAGE_SIZE, IMAGE_SIZE, 1)) + rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    colours = PALETTE[glyph] * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-15, 15)  # (GRID, GRID, 3)
    side = int(rng.integers(5, 7))
    dy, dx = rng.integers(0, CELL - side + 1, size=2)
    for row in range(GRID):
        for col in range(GRID):
            top, left = row * CELL + dy, col * CELL + dx
            canvas[top : top + side, left : left + side] = colours[row, col]
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
