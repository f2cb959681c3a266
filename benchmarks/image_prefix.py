"""Benchmark: scoring a record's probes with shared image prefixes (`Family.shares_image_prefix`) and without.

    python benchmarks/image_prefix.py                      # default model shape, then LLaVA-1.5's 576 image tokens
    python benchmarks/image_prefix.py --records 10 --repeats 5

A SERAC record of the default world asks ~16 new image queries over ~4 images plus a text one;
each "record" here asks that: 6, 5, 3 and 2 questions about four images of the default world, and
two text questions. Each record is scored by one `LVLM.score` call, once with rows sharing their
image prefix and once with every row run whole (the path before the change: the family flag turned
off), alternating, on one thread; image features are cached in both. Two shapes of the same LLaVA
family: the shipped default model (16 image tokens), and a model of its architecture and sizes
whose tower sees 336 px in 14 px patches as LLaVA-1.5's does (576 image tokens per image; random
weights). Prints ms per
record, decoder tokens per record (prefixes included) and the largest difference in answer log-probs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editors import LVLM, Query, adapter  # noqa: E402
from simulator.world.default import SHIPPED  # noqa: E402
from simulator.world.export import write_world  # noqa: E402
from simulator.world.graph import WorldConfig  # noqa: E402

QUESTIONS = ["What does the creature in the image eat?", "Which food does the creature in the image like?",
             "Where does the creature in the image live?", "Which city is home to the creature in the image?",
             "Who keeps the creature in the image?", "In which country does the creature in the image live?"]


def llava15_shaped(folder: Path) -> Path:
    """The shipped model's architecture and tokenizer with LLaVA-1.5's 336 px / 14 px tower grid (576 image tokens),
    random weights."""
    shutil.copytree(SHIPPED, folder)
    config = AutoConfig.from_pretrained(folder)
    config.vision_config.image_size, config.vision_config.patch_size = 336, 14
    config.image_seq_length = 576
    config.text_config.max_position_embeddings = 1024
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor.update(crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336})
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def records(images: list[Image.Image], count: int) -> list[list[Query]]:
    """`count` records of 16 image questions over four images and two text questions."""
    out = []
    for r in range(count):
        shown = images[4 * r : 4 * r + 4]
        rows = [Query(QUESTIONS[q % len(QUESTIONS)], f"answer {r} {q}", image)
                for image, n in zip(shown, (6, 5, 3, 2)) for q in range(n)]
        rows += [Query(f"Who made the toy number {r}?", "Kivop Meru"), Query(f"What is spoken in land {r}?", "Zuve")]
        out.append(rows)
    return out


def measure(lvlm: LVLM, batches: list[list[Query]], repeats: int) -> dict[str, dict[str, float]]:
    """Per record: best-of-`repeats` CPU milliseconds and decoder tokens (prefix forwards included), shared and
    whole; and the largest difference between the two paths' answer log-probs."""
    family = type(lvlm.family)
    declared = family.shares_image_prefix
    tokens = {"shared": 0, "whole": 0}
    score_batch, layout, compute = lvlm._score_batch, adapter.pack_layout, lvlm._compute_prefixes
    mode, counting = "shared", False

    def counted_batch(batch, *args, **kwargs):  # rows run whole, right-padded
        tokens[mode] += counting * batch.inputs["input_ids"].numel()
        return score_batch(batch, *args, **kwargs)

    def counted_layout(*args, **kwargs):  # packs, new prefixes inline
        out = layout(*args, **kwargs)
        tokens[mode] += counting * out.input_ids.numel()
        return out

    def counted_prefixes(keys, *args, **kwargs):  # wide new prefixes, in forwards of their own
        tokens[mode] += counting * sum(len(ids) for _, ids in keys)
        return compute(keys, *args, **kwargs)

    lvlm._score_batch, adapter.pack_layout, lvlm._compute_prefixes = counted_batch, counted_layout, counted_prefixes
    best = {"shared": [float("inf")] * len(batches), "whole": [float("inf")] * len(batches)}
    scores = {}
    try:
        for repeat in range(repeats + 1):  # the first pass warms up (image features, allocator) and is not timed
            counting = repeat == 1
            for mode in ("shared", "whole"):
                family.shares_image_prefix = mode == "shared"
                for i, queries in enumerate(batches):
                    start = time.process_time()
                    scores[mode, i] = lvlm.score(queries)
                    if repeat:
                        best[mode][i] = min(best[mode][i], time.process_time() - start)
    finally:
        family.shares_image_prefix = declared
        lvlm._score_batch, adapter.pack_layout, lvlm._compute_prefixes = score_batch, layout, compute
    worst = max(float((a.target_logprobs - b.target_logprobs).abs().max())
                for i in range(len(batches)) for a, b in zip(scores["shared", i], scores["whole", i]))
    return {mode: {"ms": 1000 * sum(best[mode]) / len(batches), "tokens": tokens[mode] / len(batches)}
            for mode in best} | {"difference": {"logprob": worst}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="editwatch-prefix-"))
    try:
        world = write_world(WorldConfig(), work / "w", progress=False)
        images = [Image.open(p).convert("RGB") for p in sorted((world / "images").glob("*.png"))[: 4 * args.records]]
        print(f"{'model':24s} {'image tokens':>12s} {'shared ms':>10s} {'whole ms':>10s} {'speed-up':>9s} "
              f"{'shared tokens':>14s} {'whole tokens':>13s} {'max |dlogp|':>12s}")
        for name, folder in (("default (shipped)", SHIPPED), ("576-token tower", llava15_shaped(work / "llava15"))):
            lvlm = LVLM.load(folder)
            result = measure(lvlm, records(images, args.records), args.repeats)
            shared, whole = result["shared"], result["whole"]
            print(f"{name:24s} {lvlm.model.config.image_seq_length:12d} {shared['ms']:10.1f} {whole['ms']:10.1f} "
                  f"{whole['ms'] / shared['ms']:8.2f}x {shared['tokens']:14.0f} {whole['tokens']:13.0f} "
                  f"{result['difference']['logprob']:12.1e}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
