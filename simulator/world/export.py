"""Writing a world as VLKEB-format edit records and image files (`simulate world`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from memory.files import write_text_atomically
from simulator.world.graph import World, WorldConfig, build_world
from simulator.world.schema import IMAGE_RELATIONS, TEXT_RELATIONS

MANIFEST = "world.json"


def image_name(creature: int, variant: int) -> str:
    """File name of a creature's render, relative to the image root."""
    return f"c{creature:05d}_r{variant}.png"


def text_fact_question(world: World, rng: np.random.Generator) -> tuple[str, str]:
    """A random text-only fact as (question, answer), in its first template."""
    relation = list(TEXT_RELATIONS.values())[rng.integers(len(TEXT_RELATIONS))]
    subjects = list(world.text_facts[relation.name])
    subject = subjects[rng.integers(len(subjects))]
    return relation.templates[0].format(x=subject), world.text_facts[relation.name][subject]


def edit_records(world: World, split: Literal["train", "eval"]) -> list[dict]:
    """One counterfactual edit per (creature, image relation) of a split, shuffled into a stream order."""
    rng = np.random.default_rng([world.config.seed, 1 if split == "eval" else 2])
    # m_loc shows a creature of the other split: one the stream never edits, so that memory
    # editors holding every edit of this split still have a truly out-of-scope image question.
    outsiders = world.train_ids if split == "eval" else world.eval_ids
    records = []
    for creature in world.train_ids if split == "train" else world.eval_ids:
        for relation in IMAGE_RELATIONS.values():
            true = world.creatures[creature][relation.name]
            pool = [v for v in world.names[relation.object] if v != true]
            alt = pool[rng.integers(len(pool))]
            loc, loc_ans = text_fact_question(world, rng)
            other = int(rng.choice(outsiders))
            other_relation = list(IMAGE_RELATIONS.values())[rng.integers(len(IMAGE_RELATIONS))]
            first_hop = TEXT_RELATIONS[relation.chain[0]]
            hop_pool = [v for v in world.names[first_hop.object] if v != world.text_facts[first_hop.name][alt]]
            records.append({
                "id": f"{split}-{creature:05d}-{relation.name}",
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
                "port_a": (onehop := hop_pool[rng.integers(len(hop_pool))]),
                "port_edit_q": first_hop.templates[0].format(x=alt),
                "port_edit_a": onehop,
            })
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def _hops(questions: tuple[str, ...], answers: list[str]) -> list[dict]:
    return [
        {"port_type": f"{k}-hop", "Q&A": {"Question": q, "Answer": a}}
        for k, (q, a) in enumerate(zip(questions, answers), start=1)
    ]


def write_world(config: WorldConfig, out: str | Path, progress: bool = True) -> Path:
    """Write `train.jsonl`, `eval.jsonl`, `images/` and `world.json` into `out`; returns `out`."""
    out = Path(out)
    world = build_world(config)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    variants = [(c, v) for c in range(config.entities) for v in range(3)]
    for creature, variant in tqdm(variants, desc="rendering", unit="img", disable=not progress):
        world.image(creature, variant).save(images / image_name(creature, variant))
    for split in ("train", "eval"):
        lines = "".join(json.dumps(r) + "\n" for r in edit_records(world, split))
        write_text_atomically(out / f"{split}.jsonl", lines)
    manifest = {**config.model_dump(), "digest": config.digest(), "eval_edits": 4 * len(world.eval_ids),
                "train_edits": 4 * len(world.train_ids)}
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(folder: str | Path) -> WorldConfig | None:
    """The config of the world written into `folder`, if it holds a `world.json`."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return WorldConfig(entities=data["entities"], seed=data["seed"])
