"""The synthetic world: determinism, valid records, answers that follow from edits."""

import json

import numpy as np
import pytest

from simulator import ImageRoot, VLKEBRecord, load_records
from simulator.cli import main
from simulator.world.export import StreamConfig, edit_records, eval_stream, port_chance, read_manifest, write_world
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
        (8, 6),  # the floor (unclamped n // 10 = 0)
        (100, 10),  # n // 10
        (400, 40),  # the default world: exactly at the ceiling
        (3000, 40),  # the ceiling (unclamped: 300)
    ],
)
def test_every_kind_has_a_pool_of_the_same_size(entities, expected):
    """Exact pool sizes at both clamps and between them; names stay unique across pools."""
    kinds = ("city", "country", "language", "script", "era", "food", "person", "toy")
    assert WorldConfig(entities=entities).pool_sizes() == dict.fromkeys(kinds, expected)
    if entities <= 400:
        world_names = build_world(WorldConfig(entities=entities)).names
        assert {kind: len(names) for kind, names in world_names.items()} == dict.fromkeys(kinds, expected)
        all_names = [n for names in world_names.values() for n in names]
        assert len(all_names) == len(set(all_names))


def test_text_relations_are_one_to_one_so_hops_keep_their_answer_count():
    world = build_world(WorldConfig())
    for name in TEXT_RELATIONS:
        assert sorted(world.text_facts[name].values()) == sorted(world.names[TEXT_RELATIONS[name].object])
    for relation in IMAGE_RELATIONS.values():  # 40 values -> 40 distinct answers at every hop
        answers = [world.chain(relation, value) for value in world.names[relation.object]]
        assert [len({a[k] for a in answers}) for k in range(4)] == [40, 40, 40, 40]


def test_every_hop_of_the_default_stream_has_the_same_chance_level(tmp_path):
    """1 / distinct k-hop answers: 3 kinds of answer per hop (e.g. country, city, person at hop 1), 40 names each."""
    write_world(WorldConfig(), tmp_path / "w", progress=False)
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    assert manifest["port_chance"] == {f"port_{k}hop": 1 / 120 for k in range(1, 5)}
    assert manifest["hop_pool"] == 40
    lines = [json.loads(line) for line in (tmp_path / "w" / "eval.jsonl").read_text().splitlines()]
    base = [{"port_new": line["port_base"]} for line in lines]  # the original facts' hops: the same levels
    assert port_chance(lines) == port_chance(base) == manifest["port_chance"]
    # per relation: each hop answer set as large as the set of values the stream gives that relation
    for relation in IMAGE_RELATIONS.values():
        mine = [line for line in lines if line["src"] == relation.templates[0]]
        counts = [len({line["port_new"][k]["Q&A"]["Answer"] for line in mine}) for k in range(4)]
        assert counts == [len({line["alt"] for line in mine})] * 4 and counts[0] >= 39  # of 40 names


def test_every_answer_of_the_default_world_is_one_token_of_the_shipped_tokenizer():
    """Token accuracy is teacher-forced: the second word of a two-word answer would follow from its first, so a
    question answered by such a name would score 0.5 knowing nothing, and hops would differ in chance level."""
    from transformers import AutoTokenizer

    from simulator.world.default import SHIPPED

    world = build_world(WorldConfig())
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    names = [name for kind in world.names.values() for name in kind]
    assert all(len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1 for name in names)
    assert tokenizer.unk_token_id not in tokenizer(" ".join(names), add_special_tokens=False)["input_ids"]


def test_one_hop_edits_never_set_a_fact_to_two_answers_and_locality_asks_none_of_them(tmp_path):
    """VLKEB's edit_onehop also sets the new value's first-hop fact: every record that sets one fact agrees on its
    answer, and no text-locality question asks a fact that any one-hop edit of the stream sets."""
    write_world(WorldConfig(), tmp_path / "w", progress=False)
    lines = _lines(tmp_path / "w")
    answers: dict[str, set[str]] = {}
    for line in lines:
        answers.setdefault(line["port_edit_q"], set()).add(line["port_edit_a"])
    assert len(answers) > 100 and all(len(given) == 1 for given in answers.values())
    assert not {line["loc"] for line in lines} & set(answers)
    world = build_world(WorldConfig())
    for line in lines[:50]:  # a counterfactual: never the fact's true answer
        relation = next(r for r in IMAGE_RELATIONS.values() if r.templates[0] == line["src"])
        assert line["port_edit_a"] != world.chain(relation, line["alt"])[0]


def test_a_world_folder_from_another_generator_version_is_refused(tmp_path):
    write_world(SMALL, tmp_path / "w", StreamConfig(re_edits=0.5), progress=False)
    manifest = tmp_path / "w" / "world.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "digest": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="another version of the generator") as refused:
        read_manifest(tmp_path / "w")
    # The command it gives writes the same world again: its options, not the default world's.
    assert str(refused.value).endswith(f"`simulate world --out {tmp_path / 'w'} --entities 16 --seed 5 --re-edits 0.5`")
    from simulator.config import RunConfig
    from simulator.run import RunError, load_model

    config = RunConfig(stream=str(tmp_path / "w" / "eval.jsonl"), out=tmp_path / "out")  # --model default
    with pytest.raises(RunError, match="another version of the generator"):  # not the current world's model
        load_model(config)


def test_a_negative_seed_is_a_usage_error(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--entities", "8", "--seed", "-1"]) == 2
    assert "--seed: Input should be greater than or equal to 0" in capsys.readouterr().err


def _lines(folder):
    return [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]


LONG = StreamConfig(edits=200, re_edits=0.25, retractions=0.1)


@pytest.fixture(scope="module")
def long_world(tmp_path_factory):
    """SMALL with 200 distinct edits (40 of its own, 160 about 40 unseen creatures), 50 re-edits, 20 retractions."""
    return write_world(SMALL, tmp_path_factory.mktemp("long") / "w", LONG, progress=False)


def test_a_long_stream_holds_its_distinct_edits_about_unseen_creatures(long_world):
    lines = _lines(long_world)
    edits = [line for line in lines if "op" not in line]
    firsts = [line for line in edits if "#" not in line["id"]]
    assert len(lines) == 200 + 50 + 20 and len(firsts) == 200
    assert len({(line["image"], line["src"]) for line in firsts}) == 200  # distinct facts
    assert len({line["id"] for line in edits}) == 250
    creatures = {int(line["image"][1:6]) for line in firsts}
    assert creatures == set(range(10)) | set(range(16, 56))  # 10 eval creatures, then unseen ones after the 16
    world = build_world(SMALL, unseen=40)
    for line in edits:
        VLKEBRecord.model_validate(line)
        for field in ("image", "image_rephrase", "m_loc"):
            assert (long_world / "images" / line[field]).is_file()
        assert int(line["m_loc"][1:6]) in world.train_ids  # never edited in the stream
        creature = int(line["image"][1:6])
        relation = next(r for r in IMAGE_RELATIONS.values() if r.templates[0] == line["src"])
        assert line["pred"] == world.creatures[creature][relation.name] != line["alt"]
        assert [h["Q&A"]["Answer"] for h in line["port_new"]] == world.chain(relation, line["alt"])
    assert (long_world / "images" / "c00055_r1.png").is_file() and not (long_world / "images" / "c00055_r2.png").exists()
    manifest = json.loads((long_world / "world.json").read_text())
    assert {k: manifest[k] for k in ("eval_edits", "distinct_edits", "re_edits", "retractions", "unseen_creatures")} == {
        "eval_edits": 250, "distinct_edits": 200, "re_edits": 50, "retractions": 20, "unseen_creatures": 40}
    assert read_manifest(long_world) == SMALL  # runs on the world's own model
    chance = manifest["port_chance"]
    assert len(set(chance.values())) == 1 and chance == port_chance(edits)


def test_re_edits_give_an_edited_fact_a_new_value_and_retractions_name_an_earlier_edit(long_world):
    lines = _lines(long_world)
    values: dict[tuple[str, str], list[str]] = {}
    position, retracted = {}, set()
    world = build_world(SMALL, unseen=40)
    for index, line in enumerate(lines):
        if "op" in line:
            assert line == {"op": "retract", "id": line["id"]} and line["op"] == "retract"
            assert "#" not in line["id"] and position[line["id"]] < index and line["id"] not in retracted
            retracted.add(line["id"])
            continue
        position[line["id"]] = index
        fact = (line["image"], line["src"])
        base, _, count = line["id"].partition("#")
        if not count:
            assert fact not in values
            values[fact] = [line["alt"]]
            continue
        assert base not in retracted and position[base] < index
        assert lines[position[base]]["image"] == line["image"] and lines[position[base]]["src"] == line["src"]
        assert line["alt"] not in values[fact] and line["alt"] != line["pred"]  # a value the fact never had
        values[fact].append(line["alt"])
        assert int(count) == len(values[fact]) - 1  # <id>#1 is the first re-edit
        relation = next(r for r in IMAGE_RELATIONS.values() if r.templates[0] == line["src"])
        assert [h["Q&A"]["Answer"] for h in line["port_new"]] == world.chain(relation, line["alt"])
    assert len(retracted) == 20 and sum(len(v) - 1 for v in values.values()) == 50
    assert not any(line["id"].partition("#")[0] in retracted for line in lines if "#" in line.get("id", ""))
    assert max(len(v) for v in values.values()) <= 4


def test_the_same_stream_config_writes_the_same_bytes(long_world, tmp_path):
    again = write_world(SMALL, tmp_path / "again", LONG, progress=False)
    for name in ("eval.jsonl", "train.jsonl", "world.json", "images/c00055_r0.png", "images/c00003_r2.png"):
        assert (again / name).read_bytes() == (long_world / name).read_bytes(), name
    other = write_world(SMALL, tmp_path / "other", StreamConfig(edits=200, re_edits=0.25, retractions=0.2),
                        progress=False)
    assert (other / "eval.jsonl").read_bytes() != (long_world / "eval.jsonl").read_bytes()


def test_without_re_edits_a_long_stream_starts_with_the_default_one(tmp_path):
    default = _lines(write_world(SMALL, tmp_path / "d", progress=False))
    assert _lines(write_world(SMALL, tmp_path / "l", StreamConfig(edits=100), progress=False))[:40] == default
    assert _lines(write_world(SMALL, tmp_path / "s", StreamConfig(edits=7), progress=False)) == default[:7]


def test_unseen_creatures_leave_the_world_of_the_model_unchanged_and_get_glyphs_of_their_own():
    own, more = build_world(WorldConfig()), build_world(WorldConfig(), unseen=3000)
    assert more.creatures[:400] == own.creatures and np.array_equal(more.glyphs[:400], own.glyphs)
    assert more.unseen_ids == list(range(400, 3400)) and own.unseen_ids == []
    codes = more.glyphs.reshape(3400, 16)
    shared = np.zeros((3400, 3400), dtype=np.int64)
    for cell in range(16):  # cells any two glyphs share
        shared += codes[:, cell, None] == codes[None, :, cell]
    np.fill_diagonal(shared, 0)
    assert shared.max() <= 10  # every two differ in at least 6 of 16 cells


def test_a_stream_of_ten_to_the_five_distinct_edits_needs_24750_unseen_creatures():
    stream = StreamConfig(edits=100_000)
    assert stream.unseen_creatures(WorldConfig()) == 24_750 and 4 * (250 + 24_750) == 100_000
    assert StreamConfig().distinct(WorldConfig()) == 1000 and StreamConfig().unseen_creatures(WorldConfig()) == 0
    assert StreamConfig(edits=1001).unseen_creatures(WorldConfig()) == 1


@pytest.mark.slow
def test_a_stream_of_ten_to_the_five_distinct_edits():
    """The long path at full size, images left out (about 40 s)."""
    stream = StreamConfig(edits=100_000, re_edits=0.1, retractions=0.02)
    world = build_world(WorldConfig(), unseen=stream.unseen_creatures(WorldConfig()))
    lines = eval_stream(world, stream)
    firsts = {(line["image"], line["src"]) for line in lines if "op" not in line and "#" not in line["id"]}
    assert len(firsts) == 100_000 and len(lines) == 100_000 + 10_000 + 2_000
    assert port_chance(lines) == {f"port_{k}hop": 1 / 120 for k in range(1, 5)}
    # 25,150 glyphs: ~150 pairs would lie within 5 cells of each other by chance, so the check shows here
    codes = world.glyphs.reshape(len(world.glyphs), 16)
    one_hot = np.zeros((len(codes), 16 * 8), dtype=np.float32)
    np.put_along_axis(one_hot, codes + np.arange(16) * 8, 1.0, axis=1)
    for start in range(0, len(codes), 4096):
        shared = one_hot[start : start + 4096] @ one_hot.T  # cells shared, (4096, 25150)
        shared[np.arange(len(shared)), np.arange(start, start + len(shared))] = 0
        assert shared.max() <= 10


def test_simulate_world_writes_a_long_stream_and_refuses_stream_options_for_training(tmp_path, capsys):
    flags = ["--entities", "12", "--edits", "60", "--re-edits", "0.5", "--retractions", "0.1"]
    assert main(["world", "--out", str(tmp_path / "w"), *flags]) == 0
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    assert manifest["stream"] == {"edits": 60, "re_edits": 0.5, "retractions": 0.1}
    assert (manifest["distinct_edits"], manifest["re_edits"], manifest["retractions"]) == (60, 30, 6)
    assert len(_lines(tmp_path / "w")) == 96
    assert main(["world", "train", "--out", str(tmp_path / "m"), "--edits", "60"]) == 2
    assert "--edits, --re-edits and --retractions shape the written eval.jsonl" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "x"), "--retractions", "0.9", "--edits", "0"]) == 2
    err = capsys.readouterr().err
    assert "--retractions: Input should be less than or equal to 0.5" in err and "--edits: Input should be greater" in err
