"""The synthetic world: determinism, valid records, answers that follow from edits."""

import json

import numpy as np
import pytest

from simulator import ImageRoot, load_records
from simulator.cli import main
from simulator.world.export import edit_records, read_manifest, write_world
from simulator.world.graph import WorldConfig, build_world
from simulator.world.schema import IMAGE_RELATIONS, TEXT_RELATIONS

SMALL = WorldConfig(entities=16, seed=5)


def test_the_generator_is_deterministic_for_a_seed():
    a, b, other = build_world(SMALL), build_world(SMALL), build_world(WorldConfig(entities=16, seed=6))
    assert a.names == b.names and a.text_facts == b.text_facts and a.creatures == b.creatures
    assert np.array_equal(a.glyphs, b.glyphs)
    assert np.array_equal(np.asarray(a.image(3, 1)), np.asarray(b.image(3, 1)))
    assert a.creatures != other.creatures
    assert edit_records(a, "eval") == edit_records(b, "eval")
    assert SMALL.digest() == WorldConfig(entities=16, seed=5).digest() != other.config.digest()


def test_renders_of_a_creature_differ_but_share_its_glyph():
    world = build_world(SMALL)
    r0, r1 = (np.asarray(world.image(2, v), dtype=np.int16) for v in (0, 1))
    assert r0.shape == (32, 32, 3) and np.abs(r0 - r1).mean() > 10
    codes = {tuple(world.glyphs[c].ravel()) for c in range(SMALL.entities)}
    assert len(codes) == SMALL.entities


def test_text_facts_chain_every_image_value_four_hops():
    world = build_world(SMALL)
    for creature in world.creatures:
        for relation in IMAGE_RELATIONS.values():
            assert len(world.chain(relation, creature[relation.name])) == 4
    for name, relation in TEXT_RELATIONS.items():
        assert set(world.text_facts[name]) == set(world.names[relation.subject])
        assert set(world.text_facts[name].values()) <= set(world.names[relation.object])


def test_written_world_loads_and_answers_follow_from_the_edit(tmp_path):
    write_world(SMALL, tmp_path / "w", progress=False)
    world = build_world(SMALL)
    images = ImageRoot(tmp_path / "w" / "images")
    records = load_records(tmp_path / "w" / "eval.jsonl", images=images)  # every record validates
    train = load_records(tmp_path / "w" / "train.jsonl", images=images)
    assert len(records) == 4 * SMALL.eval_creatures and len(train) == 4 * (16 - SMALL.eval_creatures)
    assert len({r.id for r in records + train}) == len(records) + len(train)
    for record in records:
        creature = int(record.id.split("-")[1])
        relation = next(r for r in IMAGE_RELATIONS.values() if r.templates[0] == record.src)
        assert record.pred == world.creatures[creature][relation.name] != record.alt
        assert [record.hop(k).answer for k in range(1, 5)] == world.chain(relation, record.alt)
        assert [record.base_hop(k).answer for k in range(1, 5)] == world.chain(relation, record.pred)
        assert record.image != record.image_rephrase
        assert int(record.m_loc[1:6]) in world.train_ids  # never edited in the eval stream
        assert record.port_edit_a == record.port_a
    assert read_manifest(tmp_path / "w") == SMALL
    assert json.loads((tmp_path / "w" / "world.json").read_text())["eval_edits"] == len(records)


def test_the_default_world_has_a_thousand_eval_edits():
    config = WorldConfig()
    assert 4 * config.eval_creatures >= 1000 and config.entities - config.eval_creatures > 0


def test_simulate_world_command(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--entities", "12", "--seed", "1"]) == 0
    assert read_manifest(tmp_path / "w") == WorldConfig(entities=12, seed=1)
    assert (tmp_path / "w" / "images" / "c00011_r2.png").is_file()
    assert main(["world", "--out", str(tmp_path / "x"), "--entities", "3"]) == 2
    assert "--entities: Input should be greater than or equal to 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entities", "expected"),
    [
        # 8 creatures: every pool at its floor (unclamped, n // 20 = 0 countries and n // 7 = 1 city).
        (8, {"city": 6, "country": 4, "language": 3, "script": 2, "era": 3, "food": 5, "person": 5, "toy": 5}),
        # 100: city, country, food, person, toy scale (n // 7, n // 20, ...); language and script at their floor.
        (100, {"city": 14, "country": 5, "language": 3, "script": 2, "era": 3, "food": 8, "person": 10, "toy": 8}),
        # 400 (the default world): everything scales; person and script sit exactly at their ceilings.
        (400, {"city": 57, "country": 20, "language": 10, "script": 5, "era": 3, "food": 33, "person": 40, "toy": 33}),
        # 3000: every pool at its ceiling (unclamped: 428 cities, 150 countries, 300 persons ...).
        (3000, {"city": 64, "country": 24, "language": 10, "script": 5, "era": 3, "food": 36, "person": 40, "toy": 36}),
    ],
)
def test_pool_sizes_scale_between_a_floor_and_a_ceiling(entities, expected):
    """Exact pool sizes at both clamps and between them; names stay unique across pools."""
    assert WorldConfig(entities=entities).pool_sizes() == expected
    if entities <= 400:
        world_names = build_world(WorldConfig(entities=entities)).names
        assert {kind: len(names) for kind, names in world_names.items()} == expected
        all_names = [n for names in world_names.values() for n in names]
        assert len(all_names) == len(set(all_names))
