"""The LVLM adapter on tiny random models of every family, checked against raw logits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Blip2Processor

from editors import LVLM, InputError, Query
from editors.families.blip import Blip2
from tests.tiny.llava import reference_inputs as llava_reference_inputs
from tests.tiny_models import BUILDERS, QWEN_CHAT, random_image, tiny, tiny_llava

FAMILIES = list(BUILDERS)
# Their token ids are checked against their transformers processors in test_more_families.py; here the
# adapter's inputs are the reference, and scores are checked against the model's raw logits on them.
TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
PROCESSOR_CHECKED_ELSEWHERE = {"instructblip", "paligemma", "gemma3", "idefics3", "smolvlm"}


def reference_inputs(lvlm: LVLM, query: Query) -> dict[str, torch.Tensor]:
    """Model inputs built the way each family's own processor builds them, not by the adapter."""
    text = lvlm.inputs.prompt_text(query) + " " + query.answer
    tok, ip = lvlm.inputs.tokenizer, lvlm.inputs.image_processor
    family = lvlm.family.name
    if family in PROCESSOR_CHECKED_ELSEWHERE:
        return dict(lvlm._batch([query]).inputs)
    if query.image is None:
        return dict(tok(text, return_tensors="pt"))
    if family.startswith("llava"):  # llava, llava_next, llava_onevision
        return llava_reference_inputs(lvlm, text, query.image)
    if family == "blip2":
        proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=lvlm.model.config.num_query_tokens)
        return dict(proc(images=query.image, text=text, return_tensors="pt"))
    # Qwen2VLProcessor needs torchvision; do what it does: expand the pad token in the text.
    pixels = ip(images=[query.image], return_tensors="pt")
    n = int(pixels["image_grid_thw"].prod()) // 4
    enc = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    mm = (enc["input_ids"] == lvlm.model.config.image_token_id).int()
    return {**enc, **pixels, "mm_token_type_ids": mm}


def raw_logprobs(lvlm: LVLM, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(L, V) log-probs of one sequence straight from the model's forward."""
    with torch.no_grad():
        if "pixel_values" in inputs or lvlm.family.text_module == "":
            logits = lvlm.model(**inputs).logits
        else:
            logits = lvlm.model.get_submodule(lvlm.family.text_module)(**inputs).logits
    return torch.log_softmax(logits[0].float(), -1)


def answer_length(tokenizer, ids: list[int], answer: str) -> int:
    """Fewest trailing tokens that decode to the answer: the span, found without offsets."""
    for n in range(1, len(ids)):
        if tokenizer.decode(ids[-n:]).strip() == answer:
            return n
    raise AssertionError(f"{answer!r} is not at the end of {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "query",
    [
        Query("what is the capital of France?", "Paris", random_image(1)),
        Query("which animal is shown in the picture?", "a brown dog", random_image(2, (28, 20))),
        Query("which country?", "Parisian capital city", None),
    ],
    ids=["image-one-word", "image-multi-token", "text-only"],
)
def test_score_matches_raw_logits(family, query):
    lvlm = tiny(family)
    inputs = reference_inputs(lvlm, query)
    ids = inputs["input_ids"][0].tolist()
    assert lvlm.inputs.encode(query).input_ids == ids  # same tokens as the family's processor
    logprobs = raw_logprobs(lvlm, inputs)
    n = answer_length(lvlm.inputs.tokenizer, ids, query.answer)
    positions = torch.arange(len(ids) - n - 1, len(ids) - 1)
    targets = torch.tensor(ids[-n:])
    expected = logprobs[positions]

    score = lvlm.score([query], top_k=5)[0]
    assert score.target_ids.tolist() == targets.tolist()
    torch.testing.assert_close(score.target_logprobs, expected.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert score.argmax_ids.tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(score.topk_logprobs, expected.topk(5).values, atol=1e-5, rtol=0)
    assert score.topk_ids.tolist() == expected.topk(5).indices.tolist()
    torch.testing.assert_close(score.entropy, -(expected.exp() * expected).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_alone(family):
    lvlm = tiny(family)
    queries = [
        Query("what is the capital of France?", "Paris", random_image(3)),
        Query("describe the image", "a small cat sitting on a red mat", random_image(4, (32, 16))),
        Query("the quick brown fox", "jumps over the lazy dog"),
        Query("city?", "Paris"),
        Query("which animal is shown in the picture?", "dog", random_image(5)),
    ]
    batched = lvlm.score(queries, top_k=4, sequence_top_k=3, batch_size=8)
    for query, together in zip(queries, batched):
        alone = lvlm.score([query], top_k=4, sequence_top_k=3)[0]
        assert together.target_ids.tolist() == alone.target_ids.tolist()
        assert together.argmax_ids.tolist() == alone.argmax_ids.tolist()
        torch.testing.assert_close(together.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(together.topk_logprobs, alone.topk_logprobs, atol=1e-5, rtol=0)
        assert together.sequence_topk_ids.tolist() == alone.sequence_topk_ids.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_gathered_logprobs_are_at_the_given_ids(family):
    lvlm = tiny(family)
    query = Query("which animal is shown in the picture?", "a small cat", random_image(6))
    first = lvlm.score([query], top_k=3)[0]
    ids = first.topk_ids.flip(-1)  # ask in another order
    again = lvlm.score([query], gather=[ids])[0]
    torch.testing.assert_close(again.gathered_logprobs, first.topk_logprobs.flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_reaches_the_model(family):
    """BLIP-2 silently drops images whose tokens are missing: different images must score differently."""
    lvlm = tiny(family)
    a, b = (Query("which animal is shown in the picture?", "a brown dog", random_image(s)) for s in (7, 8))
    sa, sb = lvlm.score([a, b])
    assert (sa.target_logprobs - sb.target_logprobs).abs().max() > 1e-4
    image_tokens = lvlm.inputs.encode(a).input_ids.count(lvlm.inputs.image_token_id)
    assert image_tokens == {"llava": 16, "llava_next": 70, "llava_onevision": 44, "blip2": 4, "qwen2_vl": 6, "qwen2_5_vl": 6, "qwen3_vl": 2,
                            "instructblip": 4, "paligemma": 16, "gemma3": 4, "idefics3": 20, "smolvlm": 4}[lvlm.family.name]


def test_answer_span_alignment_metaspace_and_bytelevel():
    llava, blip = tiny("llava"), tiny("blip2-opt")
    for lvlm in (llava, blip):
        tok = lvlm.inputs.tokenizer
        for answer in ("Paris", "a brown dog", "Parisianism"):
            enc = lvlm.inputs.encode(Query("what?", answer))
            span = enc.input_ids[enc.answer_start : enc.answer_start + enc.answer_len]
            assert enc.answer_start + enc.answer_len == len(enc.input_ids)
            assert tok.decode(span).strip() == answer
            # The separator space is never a scored token on its own.
            assert tok.decode(span[:1]).strip() != ""
    assert llava.inputs.encode(Query("what?", "Parisianism")).answer_len > 1


def test_chat_format_uses_the_template_and_separates_the_answer():
    llava = tiny_llava()
    llava.inputs.prompt_format = "chat"
    query = Query("what is it?", "Paris", random_image(1))
    assert llava.inputs.prompt_text(query) == "USER: <image>\nwhat is it? ASSISTANT:"
    enc = llava.inputs.encode(query)
    assert llava.inputs.tokenizer.decode(enc.input_ids[enc.answer_start:]).strip() == "Paris"
    qwen = tiny("qwen2_vl")
    qwen_chat = type(qwen.inputs)(qwen.family, qwen.model.config, qwen.inputs.tokenizer, qwen.inputs.image_processor,
                                  QWEN_CHAT, "chat")
    text = qwen_chat.prompt_text(query)
    assert text.endswith("<|im_start|>assistant\n")
    enc = qwen_chat.encode(query)
    # The template ends in a newline, so no extra space goes before the answer.
    assert qwen.inputs.tokenizer.decode(enc.input_ids[enc.answer_start:]) == "Paris"


def test_input_errors_are_specific():
    llava = tiny("llava")
    with pytest.raises(InputError, match="the question holds the tokenizer's special token\\(s\\) '<image>'"):
        llava.inputs.encode(Query("<image> what?", "Paris"))
    eos = llava.inputs.tokenizer.eos_token
    with pytest.raises(InputError, match=f"the answer holds the tokenizer's special token\\(s\\) '{eos}'"):
        llava.inputs.encode(Query("what?", f"Paris{eos}"))
    with pytest.raises(InputError, match="^blank answer$"):
        llava.inputs.encode(Query("what?", "  "))
    with pytest.raises(InputError, match="^blank question$"):
        llava.inputs.encode(Query(" \n", "Paris"))
    with pytest.raises(InputError, match="chat template"):
        type(llava.inputs)(llava.family, llava.model.config, llava.inputs.tokenizer, llava.inputs.image_processor,
                           None, "chat")


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_many_equals_encode_one_at_a_time_with_one_tokenizer_call(family):
    lvlm = tiny(family)
    image = random_image(3)
    queries = [Query("what is shown?", "a cat", image), Query("what is the capital of France?", "Paris"),
               Query("what is shown?", "a cat", image), Query("what colour is it?", "deep blue", random_image(4)),
               Query("who wrote it?", "Shakespeare")]
    alone = [type(lvlm.inputs).encode(lvlm.inputs, q) for q in queries]  # each in a call of its own
    lvlm.inputs._encoded.clear()
    lvlm.inputs._tokens.clear()
    calls = []
    tokenizer = lvlm.inputs.tokenizer
    original = type(tokenizer).__call__
    type(tokenizer).__call__ = lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k)
    try:
        many = lvlm.inputs.encode_many(queries)
    finally:
        type(tokenizer).__call__ = original
    # Prompts with their answers go to the tokenizer in one call, the repeated query once (a family may tokenize
    # other text on its own: InstructBLIP's Q-Former question, Idefics3's image tokens).
    texts = [c if isinstance(c, list) else [c] for c in calls]
    answered = [c for c, some in zip(calls, texts) if any(q.answer in text for q in queries for text in some)]
    assert answered == [calls[0]] and len(calls[0]) == 4
    for one, batched in zip(alone, many):
        assert (one.input_ids, one.answer_start, one.answer_len, one.image) == (
            batched.input_ids, batched.answer_start, batched.answer_len, batched.image)
        assert (one.pixels is None) == (batched.pixels is None)
        assert one.pixels is None or all(torch.equal(one.pixels[k], batched.pixels[k]) for k in one.pixels)
    assert many[0] is many[2]


def _answered_calls(lvlm: LVLM, answer: str, queries: list[Query]) -> list:
    """The tokenizer calls `encode_many(queries)` makes with `answer` in their text."""
    calls = []
    tokenizer = lvlm.inputs.tokenizer
    original = type(tokenizer).__call__
    type(tokenizer).__call__ = lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k)
    try:
        lvlm.inputs.encode_many(queries)
    finally:
        type(tokenizer).__call__ = original
    return [c for c in calls if any(answer in text for text in (c if isinstance(c, list) else [c]))]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_question_asked_of_another_image_is_not_tokenized_again(family):
    """Tokens are cached by text: the same question of a new image (an image rephrase, one relation's question of
    every creature) expands that image's tokens into the tokens held, and encodes as a fresh builder would."""
    lvlm = tiny(family)
    lvlm.inputs._encoded.clear()
    lvlm.inputs._tokens.clear()
    first, again, third = (Query("what is shown?", "a tabby cat", random_image(seed)) for seed in (3, 5, 6))
    calls = _answered_calls(lvlm, "tabby", [first, third])  # one question of two images in one call: once
    assert len(calls) == 1 and len(calls[0] if isinstance(calls[0], list) else [calls[0]]) == 1
    assert _answered_calls(lvlm, "tabby", [again]) == []
    cached = lvlm.inputs.encode(again)
    lvlm.inputs._encoded.clear()
    lvlm.inputs._tokens.clear()
    fresh = lvlm.inputs.encode(again)
    assert (cached.input_ids, cached.answer_start, cached.answer_len, cached.image) == (
        fresh.input_ids, fresh.answer_start, fresh.answer_len, fresh.image)
    assert cached.image != lvlm.inputs.encode(first).image


@pytest.mark.parametrize("with_answer", [True, False])
def test_batched_tokenization_equals_a_call_per_text_with_and_without_a_leading_bos(with_answer):
    llava = tiny("llava")
    tokenizer = llava.inputs.tokenizer
    bos = tokenizer.bos_token
    assert bos
    texts = {0: ("what is it? Paris", 12), 1: (f"{bos}what is it? Paris", 15), 2: ("who? a very long answer", 5),
             3: (f"{bos} who? Rome", 10)}
    batched = llava.inputs._tokenize(texts, with_answer)
    for i, (text, _) in texts.items():
        alone = tokenizer(text, add_special_tokens=not text.startswith(bos), return_offsets_mapping=with_answer)
        assert batched[i][0] == list(alone["input_ids"])
        assert batched[i][1] == (list(alone["offset_mapping"]) if with_answer else [])
    assert batched[1][0].count(tokenizer.bos_token_id) == 1 == batched[0][0].count(tokenizer.bos_token_id)
    queries = [Query("what is shown?", "a cat", random_image(3)), Query("who wrote it?", "Shakespeare")]
    many = llava.inputs.encode_many(queries, with_answer=with_answer)
    for query, encoded in zip(queries, many):
        text = llava.inputs.prompt_text(query) + (" " + query.answer if with_answer else "")
        ids = tokenizer(text)["input_ids"]
        if query.image is not None:
            at = ids.index(llava.inputs.image_token_id)
            ids = ids[:at] + [llava.inputs.image_token_id] * (len(encoded.input_ids) - len(ids) + 1) + ids[at + 1 :]
        assert encoded.input_ids == ids and encoded.answer_len == (answer_length(tokenizer, ids, query.answer)
                                                                   if with_answer else 0)


def test_encode_many_refuses_with_the_error_of_the_first_query_encode_would_refuse():
    llava = tiny("llava")
    good, eos = Query("what?", "Paris"), llava.inputs.tokenizer.eos_token
    special, long = Query("what?", f"Paris{eos}"), Query("what is the capital of France, then?", "Paris")
    limit, llava.inputs.max_tokens = llava.inputs.max_tokens, len(llava.inputs.encode(good).input_ids)
    try:
        # The first refused query names the error, whether refused before the tokenizer (special tokens) or after.
        with pytest.raises(InputError, match="tokens long"):
            llava.inputs.encode_many([good, long, special])
        with pytest.raises(InputError, match="special token"):
            llava.inputs.encode_many([good, special, long])
        assert llava.inputs.encode_many([good])[0].input_ids == llava.inputs.encode(good).input_ids
    finally:
        llava.inputs.max_tokens = limit


def test_a_query_longer_than_the_models_context_is_refused_before_any_forward():
    llava = tiny("llava")
    limit = llava.inputs.max_tokens
    assert limit == llava.model.config.text_config.max_position_embeddings
    fits = llava.inputs.encode(Query("what?", "Paris"))
    llava.inputs.max_tokens = len(fits.input_ids)  # exactly full: accepted
    llava.inputs.encode(Query("what?", "Paris"))
    with pytest.raises(InputError, match=f"is {len(fits.input_ids) + 1} tokens long .* at most {len(fits.input_ids)}"):
        llava.inputs.encode(Query("what?", "Paris Paris"))
    llava.inputs.max_tokens = limit


def test_blip2_without_image_token_id_is_refused():
    blip = tiny("blip2-opt")
    config = blip.model.config.__class__.from_dict(blip.model.config.to_dict())
    config.image_token_index = None
    with pytest.raises(InputError, match="ignore the image"):
        type(blip.inputs)(blip.family, config, blip.inputs.tokenizer, blip.inputs.image_processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_groups(family):
    lvlm = tiny(family)
    params = dict(lvlm.model.named_parameters())
    llm = lvlm.parameter_group("llm", layers=[0, -1])
    gated = ["model.language_model.layers.{i}.mlp.gate_proj.weight", "model.language_model.layers.{i}.mlp.up_proj.weight",
             "model.language_model.layers.{i}.mlp.down_proj.weight"]
    expected_mlp = {
        **dict.fromkeys(["llava", "llava-qwen2", "llava-mistral", "llava-gemma", "llava-next", "llava-onevision"], gated),
        "blip2-opt": ["language_model.model.decoder.layers.{i}.fc1.weight", "language_model.model.decoder.layers.{i}.fc2.weight"],
        "blip2-llama": ["language_model.model.layers.{i}.mlp.gate_proj.weight", "language_model.model.layers.{i}.mlp.up_proj.weight",
                        "language_model.model.layers.{i}.mlp.down_proj.weight"],
        "qwen2_vl": ["model.language_model.layers.{i}.mlp.gate_proj.weight", "model.language_model.layers.{i}.mlp.up_proj.weight",
                     "model.language_model.layers.{i}.mlp.down_proj.weight"],
        **dict.fromkeys(["qwen2_5_vl", "qwen3_vl", "paligemma", "gemma3"], gated),
        "instructblip": [n.replace("model.language_model.", "language_model.model.") for n in gated],
        **dict.fromkeys(["idefics3", "smolvlm"], [n.replace("language_model", "text_model") for n in gated]),
    }[family]
    assert list(llm) == [n.format(i=i) for i in (0, 1) for n in expected_mlp]
    assert all(llm[name] is params[name] for name in llm)
    vision = lvlm.parameter_group("vision")
    assert vision and all(vision[name] is params[name] for name in vision)
    assert not set(vision) & set(llm)
    for part in lvlm.family.vision_parts:
        assert set(lvlm.parameter_group("vision", parts=[part])) <= set(vision)
    with pytest.raises(ValueError, match="out of range"):
        lvlm.parameter_group("llm", layers=[5])
    with pytest.raises(ValueError, match="Unknown vision part"):
        lvlm.parameter_group("vision", parts=["retina"])
    with pytest.raises(ValueError, match="Available: llm, vision"):
        lvlm.parameter_group("decoder")


@pytest.mark.parametrize("family", FAMILIES)
def test_span_logits_carry_gradients_to_the_llm_group(family):
    lvlm = tiny(family)
    queries = [Query("what is the capital?", "Paris", random_image(1)), Query("which animal?", "a brown dog", random_image(2))]
    span = lvlm.span_logits(queries)
    assert span.logits.shape[:2] == span.targets.shape == span.mask.shape
    loss = torch.nn.functional.cross_entropy(span.logits[span.mask], span.targets[span.mask])
    group = lvlm.parameter_group("llm")
    grads = torch.autograd.grad(loss, list(group.values()))
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_starts_with_the_argmax_token(family):
    lvlm = tiny(family)
    for query in (Query("what is the capital?", "", random_image(1)), Query("the quick brown", "")):
        enc = lvlm.inputs.encode(query, with_answer=False)
        batch = lvlm.inputs.collate([enc], lvlm.dtype, lvlm.device)
        module = lvlm.model if enc.pixels is not None else lvlm._text_module()
        with torch.no_grad():
            first = module(**batch.inputs).logits[0, -1].argmax().item()
        text = lvlm.generate([query], max_new_tokens=1)[0]
        assert text == lvlm.inputs.tokenizer.decode([first], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path):
    lvlm = tiny(family)
    lvlm.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = LVLM.load(tmp_path / "m", prompt_format="plain")
    assert loaded.family.name == lvlm.family.name
    queries = [Query("what is the capital?", "Paris", random_image(1)), Query("the quick", "brown fox")]
    for a, b in zip(lvlm.score(queries), loaded.score(queries)):
        torch.testing.assert_close(a.target_logprobs, b.target_logprobs, atol=1e-6, rtol=0)
    if lvlm.inputs.chat_template:
        assert loaded.inputs.chat_template == lvlm.inputs.chat_template


def test_load_in_bfloat16_scores_in_float32(tmp_path):
    lvlm = tiny("llava")
    lvlm.save(tmp_path / "m")
    half = LVLM.load(tmp_path / "m", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    score = half.score([Query("what is the capital?", "Paris", random_image(1))])[0]
    assert score.target_logprobs.dtype == torch.float32
    with pytest.raises(ValueError, match="Unknown dtype"):
        LVLM.load(tmp_path / "m", dtype="float8")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_features_are_what_the_decoder_receives(family):
    lvlm = tiny(family)
    query = Query("which animal is shown in the picture?", "a brown dog", random_image(5))
    batch = lvlm._batch([query])
    seen = {}
    # The module the image tokens are handed to as embeddings (BLIP-2: its whole causal LM).
    decoder = lvlm.model.get_submodule(lvlm.family.text_module or lvlm.family.decoder_path)
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            lvlm.model(**batch.inputs)
    finally:
        handle.remove()
    slots = batch.inputs["input_ids"][0] == lvlm.inputs.image_token_id
    received = seen["inputs_embeds"][0, slots]  # (N, D_decoder)
    pixels = {k: v for k, v in batch.inputs.items() if k not in TEXT_INPUTS}
    with torch.no_grad():
        tokens = lvlm.family.image_features(lvlm.model, pixels)[0]
        if isinstance(lvlm.family, Blip2):  # the Q-Former output goes through the language projection
            tokens = lvlm.model.language_projection(tokens)
    torch.testing.assert_close(tokens, received, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_images_pools_tokens_and_batches_exactly(family):
    lvlm = tiny(family)
    images = [random_image(5), random_image(6), random_image(5)]
    pixels = lvlm.inputs.pixels([images[1]])
    with torch.no_grad():
        tokens = lvlm.family.image_features(lvlm.model, pixels)[0]
    mean = lvlm.embed_images(images, batch_size=2)
    flat = lvlm.embed_images(images[1:2], pooling="flat")
    assert mean.shape == (3, tokens.shape[-1]) and flat.shape == (1, tokens.numel())
    torch.testing.assert_close(mean[1], tokens.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat[0], tokens.flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean[0], mean[2], atol=1e-6, rtol=0)  # same image, other batch
    assert not torch.allclose(mean[0], mean[1])
    with pytest.raises(ValueError, match="Unknown pooling"):
        lvlm.embed_images(images, pooling="max")


def test_a_score_memo_answers_a_repeated_query_without_a_forward_until_a_weight_changes():
    from editors.adapter import ScoreMemo

    lvlm = tiny_llava()
    memo, forwards = ScoreMemo(), []
    forward = lvlm._forward
    lvlm._forward = lambda *a, **kw: forwards.append(1) or forward(*a, **kw)
    queries = [Query("what is shown?", "a dog", random_image(7)), Query("city?", "Paris")]
    first = lvlm.score(queries, top_k=2, memo=memo)
    again = lvlm.score(list(reversed(queries)), top_k=2, memo=memo)
    # One forward: LLaVA takes image features, so the text-only query shares the image query's batch.
    assert len(forwards) == 1 and again == list(reversed(first))  # the same score objects, no forward
    # Another top-k, or other gathered ids, is another question.
    lvlm.score(queries[:1], top_k=3, memo=memo)
    assert len(forwards) == 2
    # A weight changed in place: the memo is emptied and the new weights answer.
    with torch.no_grad():
        next(lvlm.model.parameters()).mul_(2.0)
    changed = lvlm.score(queries, top_k=2, memo=memo)
    assert len(forwards) == 3
    fresh = lvlm.score(queries, top_k=2)
    assert [s.target_logprobs.tolist() for s in changed] == [s.target_logprobs.tolist() for s in fresh]
    assert changed[0].target_logprobs.tolist() != first[0].target_logprobs.tolist()


def test_a_score_memo_answers_fewer_top_k_and_ids_inside_its_top_k_with_the_numbers_a_forward_gives():
    from editors.adapter import ScoreMemo

    lvlm = tiny_llava()
    memo, forwards = ScoreMemo(), []
    forward = lvlm._forward
    lvlm._forward = lambda *a, **kw: forwards.append(1) or forward(*a, **kw)
    query = Query("what is shown?", "a dog", random_image(7))
    stored = lvlm.score([query], top_k=5, memo=memo)[0]
    inside = stored.topk_ids[:, [3, 0, 1]]  # ids the stored top-5 holds, in another order
    derived = lvlm.score([query], top_k=1, gather=[inside], memo=memo)[0]
    assert len(forwards) == 1  # answered from the top-5 entry
    fresh = lvlm.score([query], top_k=1, gather=[inside])[0]
    assert derived.topk_ids.tolist() == fresh.topk_ids.tolist() and derived.topk_ids.shape[-1] == 1
    torch.testing.assert_close(derived.gathered_logprobs, fresh.gathered_logprobs, rtol=0, atol=1e-6)
    assert derived.gathered_logprobs[:, 1].tolist() == stored.topk_logprobs[:, 0].tolist()
    # Its own first three ids, in their order (a locality probe at its pre-edit top-k): read whole, no forward.
    own = lvlm.score([query], top_k=1, gather=[stored.topk_ids[:, :3]], memo=memo)[0]
    assert len(forwards) == 2
    assert own.gathered_logprobs.tolist() == stored.topk_logprobs[:, :3].tolist()
    again = lvlm.score([query], top_k=1, gather=[stored.topk_ids[:, :3]])[0]
    torch.testing.assert_close(own.gathered_logprobs, again.gathered_logprobs, rtol=0, atol=1e-6)
    # An id outside the stored top-5 (the least likely token) needs a forward.
    outside = torch.cat([stored.topk_ids[:, :2], fresh.topk_ids[:, :1] * 0 + _least_likely(lvlm, query)], dim=1)
    lvlm.score([query], top_k=1, gather=[outside], memo=memo)
    assert len(forwards) == 4  # `fresh` and `again` above were two, this the other


def test_a_score_memo_is_emptied_when_the_prompt_format_or_a_template_changes():
    from editors.adapter import ScoreMemo

    lvlm = tiny_llava()
    memo = ScoreMemo()
    queries = [Query("what is shown?", "a dog", random_image(7)), Query("city?", "Paris")]

    def logprobs(scores):
        return [s.target_logprobs.tolist() for s in scores]

    template = lvlm.inputs.plain_template
    assert lvlm.inputs.prompt_format == "plain"
    plain = logprobs(lvlm.score(queries, memo=memo))
    for name, value in (("prompt_format", "vlkeb"), ("plain_template", "Q: {image}{prompt} A:")):
        setattr(lvlm.inputs, name, value)
        remembered, fresh = logprobs(lvlm.score(queries, memo=memo)), logprobs(lvlm.score(queries))
        assert remembered == fresh and fresh != plain, name
        lvlm.inputs.prompt_format, lvlm.inputs.plain_template = "plain", template
        assert logprobs(lvlm.score(queries, memo=memo)) == plain  # back to the form the memo was first filled under


def test_a_gather_longer_than_its_answer_is_refused_alone_and_in_a_batch():
    lvlm = tiny_llava()
    short, long = Query("city?", "Paris"), Query("what is shown?", "a very small brown dog", random_image(7))
    span = len(lvlm.score([short])[0].target_ids)
    ids = torch.zeros(span + 2, 2, dtype=torch.long)
    for queries, gather in (([short], [ids]), ([long, short], [None, ids])):
        with pytest.raises(ValueError, match=f"gather for query {len(queries) - 1} has {span + 2} rows"):
            lvlm.score(queries, gather=gather)
    assert lvlm.score([short], gather=[ids[:span]])[0].gathered_logprobs.shape == (span, 2)


def test_score_refuses_a_batch_size_below_one_and_ranks_the_whole_vocabulary_at_most():
    lvlm = tiny_llava()
    query = Query("city?", "Paris")
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        lvlm.score([query], batch_size=0)
    vocabulary = lvlm.model.get_output_embeddings().weight.shape[0]
    ranked = lvlm.score([query], sequence_top_k=vocabulary + 5)[0].sequence_topk_ids
    assert ranked.shape[-1] == vocabulary and sorted(ranked[0].tolist()) == list(range(vocabulary))


def _least_likely(lvlm, query: Query) -> torch.Tensor:
    """The id of each answer position's least likely token, (T, 1)."""
    batch = lvlm._batch([query])
    with torch.no_grad():
        logits = lvlm.model(**batch.inputs).logits[0, batch.positions[0, : batch.mask[0].sum()]]
    return logits.argmin(-1, keepdim=True)


def _batches_cost(batches, length_of):
    from editors.adapter import BATCH_COST_TOKENS

    return sum(len(b) * max(length_of[i] for i in b) + BATCH_COST_TOKENS for b in batches)


def _cheapest(rows, length_of, batch_size):
    """The least cost over every cut of `rows` into contiguous batches (brute force)."""
    if not rows:
        return 0
    return min(_batches_cost([rows[:n]], length_of) + _cheapest(rows[n:], length_of, batch_size)
               for n in range(1, min(batch_size, len(rows)) + 1))


@given(st.lists(st.integers(1, 400), max_size=9), st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_padded_batches_cut_sorted_rows_at_the_least_padding_plus_forward_cost(lengths, batch_size):
    from editors.adapter import padded_batches

    lengths = sorted(lengths)
    rows = [10 + i for i in range(len(lengths))]  # row ids are not positions
    length_of = dict(zip(rows, lengths))
    batches = padded_batches(rows, lengths, batch_size)
    assert [row for batch in batches for row in batch] == rows
    assert all(0 < len(batch) <= batch_size for batch in batches)
    assert _batches_cost(batches, length_of) == _cheapest(rows, length_of, batch_size)


# Every parameter in one chunk per dtype; small ones in several chunks and those over 1,000 bytes alone; each alone.
@pytest.mark.parametrize("budget", [2**30, 1000, 1])
def test_nonfinite_parameters_names_each_tensor_holding_nan_or_inf_in_order(budget, monkeypatch):
    from editors import adapter

    monkeypatch.setattr(adapter, "FINITE_CHECK_BYTES", budget)
    lvlm = tiny("llava")
    named = dict(lvlm.model.named_parameters())
    assert lvlm.nonfinite_parameters() == []
    names = list(named)
    broken = {names[3]: float("nan"), names[10]: float("inf"), names[20]: float("-inf"), names[40]: float("nan"),
              names[41]: float("inf")}
    saved = {name: named[name].data for name in [*broken, names[30]]}
    try:
        with torch.no_grad():
            named[names[30]].data = saved[names[30]] * 1e30  # huge but finite: not named
            named[names[10]].data = saved[names[10]].half()  # another dtype, named in its place all the same
            for name, value in broken.items():
                named[name].data = named[name].data.clone()
                named[name].data.view(-1)[-1] = value  # one element, the last
        assert named[names[41]].nbytes > 1000 > named[names[3]].nbytes
        assert lvlm.nonfinite_parameters() == [names[3], names[10], names[20], names[40], names[41]]
        assert lvlm.nonfinite_parameters(limit=2) == [names[3], names[10]]
    finally:
        for name, value in saved.items():
            named[name].data = value
    assert lvlm.nonfinite_parameters() == []
