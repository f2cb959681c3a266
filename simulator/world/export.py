"""Writing a world as VLKEB-format edit records and image files (`simulate world`).

`eval.jsonl` holds one edit per (creature, image relation) of the eval split by default. A long
stream (`StreamConfig`) goes on with edits about unseen creatures (glyphs of their own, the
world's vocabulary, so the world's model reads every record), and mixes in re-edits of facts
already edited and retraction lines (`{"op": "retract", "id": ...}`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from memory.files import write_atomically, write_text_atomically
from simulator.world.graph import SEED_EDITS, SEED_EVENTS, SEED_ONE_HOP, World, WorldConfig, build_world
from simulator.world.schema import IMAGE_RELATIONS, RENDERS, TEXT_RELATIONS, ImageRelation, TextRelation

MANIFEST = "world.json"
# Glyphs of unseen creatures are checked against every other glyph (quadratic time): 50,000 take 6 s, 250,000 6.5 min.
MAX_EDITS = 200_000

Fact = tuple[int, ImageRelation]  # (creature, image relation)
RELATIONS = tuple(IMAGE_RELATIONS.values())
# Text relations no image relation's chain starts with. `--one-hop-edit` rewrites facts of the others, so a
# locality question about one of those could ask a fact the run itself changed.
LOCALITY_RELATIONS = tuple(r for name, r in TEXT_RELATIONS.items() if all(i.chain[0] != name for i in RELATIONS))


class StreamConfig(BaseModel):
    """What `eval.jsonl` holds: how many distinct edits, and the re-edits and retractions among them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edits: int | None = Field(
        None, ge=1, le=MAX_EDITS,
        description="distinct edits (facts) in eval.jsonl; past the world's own (4 per eval creature) they are "
        "about unseen creatures, whose original facts the model does not know (default: the world's own)",
    )
    re_edits: float = Field(
        0.0, ge=0.0, le=1.0,
        description="re-edits per distinct edit: later records with the same image and src, a new alt and a fresh "
        "id (`<id>#<n>`); the newest value must win",
    )
    retractions: float = Field(
        0.0, ge=0.0, le=0.5,
        description='retraction lines per distinct edit: {"op": "retract", "id": ID} after the edit ID, of a fact '
        "edited once and never again",
    )

    def distinct(self, world: WorldConfig) -> int:
        """Distinct edits of the stream in `world`."""
        return self.edits or 4 * world.eval_creatures

    def unseen_creatures(self, world: WorldConfig) -> int:
        """Creatures beyond the world's own that the stream's distinct edits need (four facts each)."""
        return max(0, -(-(self.distinct(world) - 4 * world.eval_creatures) // 4))


def image_name(creature: int, variant: int) -> str:
    """File name of a creature's render, relative to the image root."""
    return f"c{creature:05d}_r{variant}.png"


def text_fact_question(world: World, rng: np.random.Generator) -> tuple[str, str]:
    """A random text-only fact that no edit (one-hop edits included) changes, as (question, answer), in its first
    template."""
    relation = LOCALITY_RELATIONS[rng.integers(len(LOCALITY_RELATIONS))]
    subjects = list(world.text_facts[relation.name])
    subject = subjects[rng.integers(len(subjects))]
    return relation.templates[0].format(x=subject), world.text_facts[relation.name][subject]


def edit_records(world: World, split: Literal["train", "eval"]) -> list[dict]:
    """One counterfactual edit per (creature, image relation) of a split, shuffled into a stream order."""
    creatures = world.train_ids if split == "train" else world.eval_ids
    return [record for _, record in _edits(world, creatures, split, 1 if split == "eval" else 2)]


def eval_stream(world: World, stream: StreamConfig) -> list[dict]:
    """The lines of `eval.jsonl`: distinct edits, with re-edits and retractions placed after the edit they name.

    The distinct edits are the world's own eval edits in their usual order, then those of unseen
    creatures, so a stream without re-edits or retractions starts with the default `eval.jsonl`.
    Retractions name facts edited once, which are never edited again; re-edits go round the
    other facts (a fact is re-edited at most three times) and never repeat a value the fact had.
    """
    edits = _edits(world, world.eval_ids, "eval", 1) + _edits(world, world.unseen_ids, "eval", 3)
    edits = edits[: stream.distinct(world.config)]
    n, rng = len(edits), np.random.default_rng([world.config.seed, SEED_EVENTS])
    retracted = rng.choice(n, size=round(stream.retractions * n), replace=False)
    live = np.setdiff1d(np.arange(n), retracted)
    re_count = round(stream.re_edits * n)
    rounds = -(-re_count // len(live)) if re_count else 0
    targets = np.array([t for _ in range(rounds) for t in rng.permutation(live)][:re_count] + list(retracted),
                       dtype=np.int64)
    # Each comes after its target's edit, at a uniform place among the distinct edits from there on.
    after = targets + (rng.random(len(targets)) * (n - targets)).astype(np.int64)
    order = np.argsort(after, kind="stable")
    values: dict[int, list[str]] = defaultdict(list)  # distinct edit -> values its re-edits gave, oldest first
    lines, next_event = [], 0
    for position, (_, record) in enumerate(edits):
        lines.append(record)
        while next_event < len(order) and after[order[next_event]] == position:
            event, next_event = int(order[next_event]), next_event + 1
            target = int(targets[event])
            fact, first = edits[target]
            if event >= re_count:
                lines.append({"op": "retract", "id": first["id"]})
                continue
            old = {first["pred"], first["alt"], *values[target]}
            pool = [v for v in world.names[fact[1].object] if v not in old]  # >= 1 left: pools hold >= 6 names
            values[target].append(pool[rng.integers(len(pool))])
            lines.append(_record(world, fact, values[target][-1], rng, world.train_ids,
                                 f"{first['id']}#{len(values[target])}"))
    return lines


def port_chance(lines: Iterable[dict]) -> dict[str, float]:
    """Chance level of each hop in a stream: 1 / the number of distinct k-hop answers of its edits."""
    answers: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        for hop in line.get("port_new", ()):
            answers[hop["port_type"]].add(hop["Q&A"]["Answer"])
    return {f"port_{hop.split('-')[0]}hop": 1 / len(found) for hop, found in sorted(answers.items())}


def _edits(world: World, creatures: list[int], split: str, stream: int) -> list[tuple[Fact, dict]]:
    """A counterfactual edit of every image relation of `creatures`, in a shuffled order."""
    rng = np.random.default_rng([world.config.seed, SEED_EDITS, stream])
    # m_loc shows a creature of the other split: one the stream never edits, so that memory
    # editors holding every edit of this split still have a truly out-of-scope image question.
    outsiders = world.train_ids if split == "eval" else world.eval_ids
    rows = []
    for creature in creatures:
        for relation in RELATIONS:
            true = world.creatures[creature][relation.name]
            pool = [v for v in world.names[relation.object] if v != true]
            alt = pool[rng.integers(len(pool))]
            record = _record(world, (creature, relation), alt, rng, outsiders, f"{split}-{creature:05d}-{relation.name}")
            rows.append(((creature, relation), record))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _record(world: World, fact: Fact, alt: str, rng: np.random.Generator, outsiders: list[int], key: str) -> dict:
    """The VLKEB record that sets `fact` to `alt`, with fresh locality questions."""
    creature, relation = fact
    true = world.creatures[creature][relation.name]
    loc, loc_ans = text_fact_question(world, rng)
    other = outsiders[rng.integers(len(outsiders))]
    other_relation = RELATIONS[rng.integers(len(RELATIONS))]
    first_hop = TEXT_RELATIONS[relation.chain[0]]
    onehop = _one_hop_value(world, first_hop, alt)
    return {
        "id": key,
        "src": relation.templates[0],
        "pred": true,
        "alt": alt,
        "rephrase": relation.templates[1],
        "image": image_name(creature, 0),
        "image_rephrase": image_name(creature, 1),
        "loc": loc,
        "loc_ans": loc_ans,
        "m_loc": image_name(other, int(rng.integers(2))),
        "m_loc_q": other_relation.templates[0],
        "m_loc_a": world.creatures[other][other_relation.name],
        "port_new": _hops(relation.hop_questions, world.chain(relation, alt)),
        "port_base": _hops(relation.hop_questions, world.chain(relation, true)),
        # VLKEB Table 3 (edit_onehop): also move the new value's first-hop fact.
        "port_q": relation.hop_questions[0],
        "port_a": onehop,
        "port_edit_q": first_hop.templates[0].format(x=alt),
        "port_edit_a": onehop,
    }


def _one_hop_value(world: World, relation: TextRelation, subject: str) -> str:
    """The counterfactual answer of `relation`'s fact about `subject` that one-hop edits (VLKEB's edit_onehop) set: one
    per fact, whichever record sets it, so that records of one stream never set a fact to two answers."""
    true = world.text_facts[relation.name][subject]
    pool = [v for v in world.names[relation.object] if v != true]
    at = (list(TEXT_RELATIONS).index(relation.name), world.names[relation.subject].index(subject))
    return pool[np.random.default_rng([world.config.seed, SEED_ONE_HOP, *at]).integers(len(pool))]


def _hops(questions: tuple[str, ...], answers: list[str]) -> list[dict]:
    return [
        {"port_type": f"{k}-hop", "Q&A": {"Question": q, "Answer": a}}
        for k, (q, a) in enumerate(zip(questions, answers), start=1)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as file:  # line by line: a 10^5-edit stream is ~180 MB of text
            file.writelines(json.dumps(row) + "\n" for row in rows)

    write_atomically(path, write)


def write_world(config: WorldConfig, out: str | Path, stream: StreamConfig | None = None,
                progress: bool = True) -> Path:
    """Write `train.jsonl`, `eval.jsonl`, `images/` and `world.json` into `out`; returns `out`."""
    out, stream = Path(out), stream or StreamConfig()
    world = build_world(config, unseen=stream.unseen_creatures(config))
    lines = eval_stream(world, stream)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    # Every render of the world's own creatures (the third is held out in training); records of
    # unseen creatures show only the first two.
    variants = [(c, v) for c in range(config.entities) for v in range(RENDERS)]
    variants += [(c, v) for c in world.unseen_ids for v in range(2)]
    for creature, variant in tqdm(variants, desc="rendering", unit="img", disable=not progress):
        world.render(creature, variant).save(images / image_name(creature, variant))
    train = edit_records(world, "train")
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", lines)
    retractions = sum(1 for line in lines if "op" in line)
    manifest = {
        **config.model_dump(),
        "digest": config.digest(),
        "stream": stream.model_dump(),
        "eval_edits": len(lines) - retractions,
        "distinct_edits": stream.distinct(config),
        "re_edits": len(lines) - retractions - stream.distinct(config),
        "retractions": retractions,
        "unseen_creatures": len(world.unseen_ids),
        "train_edits": len(train),
        "hop_pool": config.pool_size,
        "port_chance": port_chance(lines),
    }
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(folder: str | Path) -> WorldConfig | None:
    """The config of the world written into `folder`, if it holds a `world.json`; ValueError if this generator would
    write another world from it (the folder is from an older version: its facts and names are not the model's)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    config = WorldConfig(entities=data["entities"], seed=data["seed"])
    if data.get("digest") != config.digest():
        stream = StreamConfig.model_validate(data.get("stream", {}))
        options = f"--entities {config.entities} --seed {config.seed}" + "".join(
            f" --{name.replace('_', '-')} {value}" for name, value in stream.model_dump(exclude_defaults=True).items())
        raise ValueError(f"{folder} holds a world from another version of the generator (digest {data.get('digest')}, "
                         f"now {config.digest()}): write it again with `simulate world --out {folder} {options}`")
    return config
