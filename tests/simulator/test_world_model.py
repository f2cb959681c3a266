"""The embedded default model: shipped weights meet the bars, the recipe learns, the cache is safe."""

import json
import multiprocessing
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from editors import LVLM
from simulator.world.default import SHIPPED, TRAINING_RECORD, load_world_model, model_key, world_model_path
from simulator.world.export import StreamConfig, eval_stream
from simulator.world.graph import WorldConfig, build_world
from simulator.world.model import ModelConfig, build_model
from simulator.world.training import TrainConfig, eval_sets, evaluate, train

BARS = ("pred_src", "pred_rephrase", "pred_image_rephrase", "loc", "m_loc")
SMALL = WorldConfig(entities=16, seed=3)
TEXT_FIELDS = ("src", "alt", "pred", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
# A recipe cut down for tests: few steps, no bars to miss (the cache, not accuracy, is under test).
QUICK_MODEL = ModelConfig(vision_hidden=16, vision_layers=1, hidden=32, layers=1, heads=2)
QUICK_TRAIN = TrainConfig(max_steps=20, eval_every=20, warmup=5, icl_phase=5, batch_size=8,
                          bars={"pred_src": 0.0}, margin=0.0)


def test_the_shipped_weights_are_the_default_worlds_and_recipes():
    # Any change to the world generator or a ModelConfig / TrainConfig default changes this key;
    # the shipped folder must then be retrained (`simulate world train --out simulator/world/default_model`),
    # or every first run would train a model of its own.
    record = json.loads((SHIPPED / TRAINING_RECORD).read_text())
    assert record["key"] == model_key(WorldConfig(), ModelConfig(), TrainConfig()) and record["bars_met"]
    assert world_model_path(WorldConfig(), progress=False) == SHIPPED


def test_the_shipped_tokenizer_reads_every_word_of_a_long_stream():
    """Unseen creatures, re-edits and retractions bring no word the default model's vocabulary lacks."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(SHIPPED / "tokenizer.json"), unk_token="<unk>")
    stream = StreamConfig(edits=1400, re_edits=0.5, retractions=0.1)
    lines = eval_stream(build_world(WorldConfig(), unseen=stream.unseen_creatures(WorldConfig())), stream)
    texts = {line[key] for line in lines if "op" not in line for key in (*TEXT_FIELDS, "port_edit_q", "port_a")}
    texts |= {hop["Q&A"][part] for line in lines if "op" not in line for hop in line["port_new"] + line["port_base"]
              for part in ("Question", "Answer")}
    assert len(texts) > 500  # every name of every pool, every template
    unknown = {text for text in texts if tokenizer.unk_token_id in tokenizer(text)["input_ids"]}
    assert unknown == set()


@pytest.mark.slow
def test_the_shipped_default_model_meets_every_bar_on_the_full_evaluation():
    record = json.loads((SHIPPED / TRAINING_RECORD).read_text())
    world = WorldConfig(**{k: record["world"][k] for k in ("entities", "seed")})
    lvlm = load_world_model(world, progress=False)  # through the adapter, as a hub model would load
    assert isinstance(lvlm, LVLM) and lvlm.family.name == "llava"
    assert sum(p.numel() for p in lvlm.model.parameters()) < 1_000_000
    sets = eval_sets(build_world(world))
    metrics = evaluate(lvlm, {k: sets[k] for k in (*BARS, "icl_heldout")})
    assert len(sets["pred_src"]) == 4 * world.eval_creatures >= 1000
    for key in BARS:
        assert metrics[key] >= 0.95, (key, metrics[key])
    assert metrics["icl_heldout"] >= 0.9
    for key, value in metrics.items():  # the recorded evaluation is what the weights give
        assert record["evaluation"][key] == pytest.approx(value, abs=1e-4)


@pytest.mark.slow
def test_the_recipe_learns_a_small_world_in_a_few_hundred_steps():
    world = build_world(SMALL)
    config = TrainConfig(max_steps=300, eval_every=300, icl_phase=100, warmup=50, batch_size=32)
    lvlm = build_model(world, ModelConfig(), seed=config.seed)
    before = evaluate(lvlm, eval_sets(world))
    result = train(lvlm, world, config, eval_sample=None, progress=False)
    after = evaluate(lvlm, eval_sets(world))
    assert result.steps == 300
    for key in ("pred_src", "pred_rephrase", "pred_image_rephrase", "m_loc"):
        assert before[key] < 0.5 and after[key] >= 0.9, (key, before[key], after[key])
    assert after["loc"] > before["loc"] + 0.2 and after["icl_heldout"] > before["icl_heldout"] + 0.2


def test_a_new_world_trains_once_into_the_cache_and_is_reused(caplog):
    caplog.set_level("INFO", logger="simulator.world.default")
    first = world_model_path(SMALL, QUICK_MODEL, QUICK_TRAIN, progress=False)
    assert first.parent.name == "models" and first.name == model_key(SMALL, QUICK_MODEL, QUICK_TRAIN)
    assert sum("training one" in m for m in caplog.messages) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert world_model_path(SMALL, QUICK_MODEL, QUICK_TRAIN, progress=False) == first
    assert sum("training one" in m for m in caplog.messages) == 1 and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    LVLM.load(first)


def _train_in_process(seed: int) -> str:
    return str(world_model_path(WorldConfig(entities=16, seed=seed), QUICK_MODEL, QUICK_TRAIN, progress=False))


def test_concurrent_first_runs_publish_one_complete_model():
    world_seed = 4
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_train_in_process, [world_seed, world_seed])
    assert paths[0] == paths[1]
    folder = Path(paths[0])
    record = json.loads((folder / TRAINING_RECORD).read_text())
    assert record["key"] == folder.name
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []
    LVLM.load(folder)
