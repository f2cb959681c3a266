"""InstructBLIP, PaliGemma, Gemma 3, Idefics3 and SmolVLM: image placement, batching, and the Flan-T5 refusal."""

import pytest
import torch
from transformers import Idefics3Processor, InstructBlipProcessor, PaliGemmaProcessor, PreTrainedTokenizerFast
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from editors import LVLM, Query
from editors.families import UnsupportedModelError
from editors.families.blip import QFORMER_TOKENIZER
from tests.tiny.blip import tiny_blip2_t5
from tests.tiny_models import BUILDERS, random_image, tiny

FAMILIES = ["instructblip", "paligemma", "gemma3", "idefics3", "smolvlm"]
# (H, W): the split Idefics3 processor gives these 2x2, 1x2 and 2x1 tiles (+ the global view).
SIZES = {"square": (20, 24), "wide": (10, 40), "tall": (40, 10)}


def ids_of(lvlm: LVLM, query: Query, with_answer: bool = True) -> list[int]:
    return lvlm.inputs.encode(query, with_answer=with_answer).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_scores_equal_one_at_a_time(family):
    lvlm = tiny(family)
    queries = [
        Query("what is the capital of France?", "Paris", random_image(3, SIZES["square"])),
        Query("describe the image", "a small cat sitting on a red mat", random_image(4, SIZES["wide"])),
        Query("which animal is shown in the picture? the photo is small", "dog", random_image(5, SIZES["tall"])),
        Query("the quick brown fox", "jumps over the lazy dog"),
        Query("city?", "Paris"),
    ]
    lengths = {len(ids_of(lvlm, q)) for q in queries[:3]}
    assert len(lengths) == 3  # rows of the image batch really are padded
    batched = lvlm.score(queries, top_k=4, sequence_top_k=3, batch_size=8)
    for query, together in zip(queries, batched):
        alone = lvlm.score([query], top_k=4, sequence_top_k=3)[0]
        assert together.target_ids.tolist() == alone.target_ids.tolist()
        torch.testing.assert_close(together.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(together.topk_logprobs, alone.topk_logprobs, atol=1e-5, rtol=0)
        assert together.sequence_topk_ids.tolist() == alone.sequence_topk_ids.tolist()
    # Different images score differently: the image reaches the decoder.
    a, b = (Query("which animal is shown in the picture?", "a brown dog", random_image(s)) for s in (7, 8))
    sa, sb = lvlm.score([a, b])
    assert (sa.target_logprobs - sb.target_logprobs).abs().max() > 1e-4


# -- InstructBLIP and BLIP-2 over Flan-T5 --------------------------------------------------------


def test_instructblip_input_ids_are_the_processors_and_the_qformer_reads_only_the_question():
    lvlm = BUILDERS["instructblip"]()
    qtok = lvlm.inputs.extras[QFORMER_TOKENIZER]
    query = Query("which animal is shown in the picture?", "a brown dog", random_image(1))
    text = lvlm.inputs.prompt_text(query) + " " + query.answer
    processor = InstructBlipProcessor(lvlm.inputs.image_processor, lvlm.inputs.tokenizer, qtok, num_query_tokens=4)
    reference = processor(images=query.image, text=text, return_tensors="pt")
    encoded = lvlm.inputs.encode(query)
    # Image tokens before BOS, then the prompt and answer, exactly as InstructBlipProcessor writes them.
    assert encoded.input_ids == reference["input_ids"][0].tolist()
    assert encoded.input_ids[:5] == [lvlm.inputs.image_token_id] * 4 + [lvlm.inputs.tokenizer.bos_token_id]
    torch.testing.assert_close(encoded.pixels["pixel_values"], reference["pixel_values"])
    # The processor hands the Q-Former whatever text it gets; scoring must not show it the answer.
    assert encoded.pixels["qformer_input_ids"][0].tolist() == qtok(query.prompt)["input_ids"]
    qformer_tokens = qtok.convert_ids_to_tokens(encoded.pixels["qformer_input_ids"][0].tolist())
    assert qformer_tokens[:3] == ["[CLS]", "which", "animal"]


def test_instructblip_image_features_follow_the_question():
    lvlm = tiny("instructblip")
    image = random_image(2)
    features = [
        lvlm.family.image_features(lvlm.model, lvlm.inputs.pixels([image], prompt))
        for prompt in ("what is the capital of France?", "which animal is shown in the picture?")
    ]
    assert features[0].shape == (1, 4, 32)
    assert not torch.allclose(features[0], features[1])


def test_instructblip_saves_and_loads_its_qformer_tokenizer(tmp_path):
    lvlm = tiny("instructblip")
    lvlm.save(tmp_path / "m")
    assert (tmp_path / "m" / QFORMER_TOKENIZER / "tokenizer.json").is_file()
    loaded = LVLM.load(tmp_path / "m", prompt_format="plain")
    assert loaded.family.name == "instructblip"
    query = Query("what is the capital?", "Paris", random_image(1))
    torch.testing.assert_close(lvlm.score([query])[0].target_logprobs, loaded.score([query])[0].target_logprobs)


def test_blip2_over_flan_t5_is_refused_with_the_reason(tmp_path):
    model = tiny_blip2_t5()
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny("blip2-llama").inputs.tokenizer.backend_tokenizer)
    message = r"encoder-decoder language model such as Flan-T5.*assume a decoder-only language model"
    with pytest.raises(UnsupportedModelError, match=r"blip2 over T5Config \(an " + message):
        LVLM(model, tok, BlipImageProcessorPil(size={"height": 16, "width": 16}))
    model.save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match=message):
        LVLM.load(tmp_path / "t5")  # refused from the config, before tokenizer or weights are read


# -- PaliGemma -----------------------------------------------------------------------------------


def test_paligemma_reads_prompt_and_answer_as_its_processor_writes_them():
    """The image before BOS, "\n" after the prompt, the answer right after it: token for token what PaliGemmaProcessor
    gives for a prompt and its suffix, with the same prefix (0) and answer (1) token types."""
    lvlm = BUILDERS["paligemma"]()
    image_processor = lvlm.inputs.image_processor
    image_processor.image_seq_length = 16
    query = Query("what is the capital of France?", "Paris", random_image(1))
    # Encoded first: building the processor adds its <loc>/<seg> tokens to the tokenizer and turns its
    # `add_bos_token` off (the processor writes BOS into its text itself).
    encoded, prompt_ids = lvlm.inputs.encode(query), ids_of(lvlm, query, with_answer=False)
    types = lvlm._batch([query]).inputs["token_type_ids"][0].tolist()
    prompt = lvlm.inputs.prompt_text(query)
    assert prompt.endswith("answer:\n")
    processor = PaliGemmaProcessor(image_processor, lvlm.inputs.tokenizer)
    reference = processor(images=query.image, text=prompt.removesuffix("\n"), suffix=query.answer, return_tensors="pt")
    # The processor ends the answer with EOS, which no answer span here holds.
    assert encoded.input_ids == reference["input_ids"][0, :-1].tolist()
    assert encoded.input_ids[:17] == [lvlm.inputs.image_token_id] * 16 + [lvlm.inputs.tokenizer.bos_token_id]
    assert lvlm.inputs.tokenizer.decode(encoded.input_ids[encoded.answer_start :]) == "Paris"
    assert types == reference["token_type_ids"][0, :-1].tolist()
    # Without the answer, the prompt is what the processor writes for generation.
    prompt_only = processor(images=query.image, text=prompt.removesuffix("\n"), return_tensors="pt")
    assert prompt_ids == prompt_only["input_ids"][0].tolist()


def test_paligemma_prefix_is_bidirectional_and_the_answer_causal():
    lvlm = tiny("paligemma")
    query = Query("what is the capital of France?", "a brown dog", random_image(1))
    batch = lvlm._batch([query])
    encoded = lvlm.inputs.encode(query)
    types = batch.inputs["token_type_ids"][0].tolist()
    assert types == [0] * encoded.answer_start + [1] * encoded.answer_len
    # The answer never leaks into its own prediction: a changed later answer word leaves the first token's score.
    other = lvlm.score([Query(query.prompt, "a brown cat", query.image)])[0]
    score = lvlm.score([query])[0]
    assert other.target_ids[:2].tolist() == score.target_ids[:2].tolist()
    torch.testing.assert_close(other.target_logprobs[:2], score.target_logprobs[:2], atol=1e-6, rtol=0)
    # ... while the prefix attends both ways: a plain causal forward scores differently.
    with torch.no_grad():
        inputs = {k: v for k, v in batch.inputs.items() if k != "token_type_ids"}
        causal = lvlm.model(**inputs).logits[0, batch.positions[0]].log_softmax(-1)
    causal_target = causal.gather(-1, batch.targets[0][:, None]).squeeze(-1)
    assert (causal_target - score.target_logprobs).abs().max() > 1e-4


# -- Gemma 3 -------------------------------------------------------------------------------------


def test_gemma3_soft_tokens_sit_between_boi_and_eoi_with_bidirectional_type_ids():
    lvlm = tiny("gemma3")
    config, tok = lvlm.model.config, lvlm.inputs.tokenizer
    query = Query("what is the capital of France?", "Paris", random_image(1))
    ids = ids_of(lvlm, query)
    boi = ids.index(config.boi_token_id)
    # Gemma3Processor's full image sequence: "\n\n<start_of_image>" + 4 soft tokens + "<end_of_image>\n\n".
    assert tok.convert_ids_to_tokens(ids[: boi + 1]) == ["<bos>", "\n", "\n", "<start_of_image>"]
    assert ids[boi + 1 : boi + 5] == [config.image_token_id] * 4
    assert tok.convert_ids_to_tokens(ids[boi + 5 : boi + 8]) == ["<end_of_image>", "\n", "\n"]
    assert ids.count(config.image_token_id) == 4 and ids.count(config.boi_token_id) == 1
    batch = lvlm._batch([query])
    assert batch.inputs["token_type_ids"][0].tolist() == [int(i == config.image_token_id) for i in ids]


def test_gemma3_chat_template_image_marker_becomes_the_soft_token_sequence():
    lvlm = tiny("gemma3")
    config, tok = lvlm.model.config, lvlm.inputs.tokenizer
    # Gemma 3's chat template writes <start_of_image> for an image (as its checkpoints ship it).
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    chat = type(lvlm.inputs)(lvlm.family, config, tok, lvlm.inputs.image_processor, template, "chat")
    ids = chat.encode(Query("what is the capital of France?", "Paris", random_image(1))).input_ids
    boi = ids.index(config.boi_token_id)
    assert ids[boi + 1 : boi + 5] == [config.image_token_id] * 4 and ids[boi + 5] == config.eoi_token_id
    assert ids.count(config.boi_token_id) == 1
    assert "<start_of_image>" not in chat.prompt_text(Query("what is it?"))  # text-only: no image marker


# -- Idefics3 / SmolVLM --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_idefics_image_string_and_pixels_are_the_processors(family, size):
    lvlm = BUILDERS[family]()
    query = Query("what is the capital of France?", "Paris", random_image(1, SIZES[size]))
    text = lvlm.inputs.prompt_text(query) + " " + query.answer
    processor = Idefics3Processor(lvlm.inputs.image_processor, lvlm.inputs.tokenizer, image_seq_len=4)
    reference = processor(images=[query.image], text=text, return_tensors="pt")
    encoded = lvlm.inputs.encode(query)
    assert encoded.input_ids == reference["input_ids"][0].tolist()
    torch.testing.assert_close(encoded.pixels["pixel_values"], reference["pixel_values"])
    tiles = {"idefics3": {"square": 5, "wide": 3, "tall": 3}, "smolvlm": dict.fromkeys(SIZES, 1)}[family][size]
    assert encoded.pixels["pixel_values"].shape[1] == tiles
    assert encoded.input_ids.count(lvlm.inputs.image_token_id) == 4 * tiles
    tokens = lvlm.inputs.tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens.count("<global-img>") == 1
    assert ("<row_1_col_2>" in tokens) == (family == "idefics3" and size != "tall")
    assert ("<row_2_col_1>" in tokens) == (family == "idefics3" and size != "wide")


def test_idefics3_batches_of_different_tile_counts_pad_with_empty_tiles():
    lvlm = tiny("idefics3")
    queries = [Query("what?", "Paris", random_image(i, SIZES[size])) for i, size in ((1, "square"), (2, "wide"))]
    batch = lvlm._batch(queries)
    assert batch.inputs["pixel_values"].shape[:2] == (2, 5)
    assert batch.inputs["pixel_values"][1, 3:].abs().sum() == 0  # the wide image has 3 tiles: 2 padding ones
    assert batch.inputs["pixel_attention_mask"][1, 3:].sum() == 0
    # embed_images keeps one row per image; a batch of different tile counts is refused, not mixed.
    assert lvlm.embed_images([random_image(1, SIZES["wide"]), random_image(2, SIZES["tall"])]).shape == (2, 32)
    with pytest.raises(ValueError, match="different token counts"):
        lvlm.embed_images([random_image(1, SIZES["square"]), random_image(2, SIZES["wide"])])
