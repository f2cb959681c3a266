"""A seeded synthetic multimodal world: text entities, the facts linking them, and creatures.

Everything is a pure function of `WorldConfig` (entity count and seed): the same config gives
the same world, byte for byte, on every machine.
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

GENERATOR_VERSION = 2  # bump when a change alters the generated world
ERAS = ("Ancient", "Classic", "Modern")
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
    seed: int = Field(0, description="generator seed")

    @property
    def eval_creatures(self) -> int:
        """Creatures whose facts form the eval split (5/8); the rest form the train split."""
        return round(self.entities * 5 / 8)

    def pool_sizes(self) -> dict[str, int]:
        """How many text entities of each kind the world has, scaled with the creature count."""
        n = self.entities
        countries = _clamp(n // 20, 4, 24)
        languages = _clamp(countries // 2, 3, 10)
        return {
            "city": _clamp(n // 7, 6, 64),
            "country": countries,
            "language": languages,
            "script": _clamp(languages // 2, 2, 5),
            "era": len(ERAS),
            "food": _clamp(n // 12, 5, 36),
            "person": _clamp(n // 10, 5, 40),
            "toy": _clamp(n // 12, 5, 36),
        }

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
            self.renders[key] = _render(self.glyphs[creature], np.random.default_rng([self.config.seed, creature, variant]))
        return self.renders[key]


def build_world(config: WorldConfig) -> World:
    """Generate the world of `config`."""
    rng = np.random.default_rng([config.seed, GENERATOR_VERSION])
    sizes = config.pool_sizes()
    words = _unique_words(rng, sum(v for k, v in sizes.items() if k != "era") + sizes["person"])
    names: dict[str, list[str]] = {"era": list(ERAS)}
    for kind in ("city", "country", "language", "script", "food", "person", "toy"):
        taken, words = words[: sizes[kind]], words[sizes[kind] :]
        if kind == "person":  # two-word names: multi-token answers
            taken = [f"{first} {last}" for first, last in zip(taken, words)]
            words = words[sizes[kind] :]
        elif kind in ("food", "toy"):
            taken = [w.lower() for w in taken]
        names[kind] = taken
    text_facts = {
        name: _assign(rng, names[rel.subject], names[rel.object]) for name, rel in TEXT_RELATIONS.items()
    }
    creatures = [
        {name: names[rel.object][rng.integers(len(names[rel.object]))] for name, rel in IMAGE_RELATIONS.items()}
        for _ in range(config.entities)
    ]
    return World(config, names, text_facts, creatures, _glyphs(rng, config.entities))


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


def _assign(rng: np.random.Generator, subjects: list[str], objects: list[str]) -> dict[str, str]:
    """Map every subject to an object, using every object at least once when possible."""
    order = list(rng.permutation(len(objects)))
    picks = order + list(rng.integers(len(objects), size=max(0, len(subjects) - len(objects))))
    shuffled = rng.permutation(len(subjects))
    return {subjects[s]: objects[picks[i]] for i, s in enumerate(shuffled)}


def _glyphs(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random 4x4 colour codes, any two differing in at least 6 of 16 cells."""
    codes: list[np.ndarray] = []
    while len(codes) < count:
        code = rng.integers(len(PALETTE), size=(GRID, GRID))
        if all((code != other).sum() >= 6 for other in codes):
            codes.append(code)
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
