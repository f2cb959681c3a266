"""Loading as a GPU user does: dtype and device at load, the family checked first, sentencepiece
tokenizers, and editor states that remember the model they were made on."""

import json
import logging

import pytest
import sentencepiece
import torch
from transformers import CLIPVisionConfig, GPTNeoXConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from editors import LVLM, EditorState, Query, UnsupportedModelError, create_editor
from editors.editor import StateMismatchError
from tests.tiny.llava import tiny_llava
from tests.tiny.tokenizers import CORPUS, HIDDEN
from tests.tiny_models import random_image

QUERY = Query("what is the capital of France?", "Paris", random_image(1))


def test_weights_load_in_the_dtype_on_the_device(tmp_path):
    lvlm = tiny_llava()
    lvlm.save(tmp_path / "m")
    loaded = LVLM.load(tmp_path / "m", dtype="bfloat16", device="cpu")
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert {p.device for p in params.values()} == {torch.device("cpu")}
    for name, param in lvlm.model.named_parameters():  # the saved values, rounded once to bfloat16
        assert torch.equal(params[name], param.detach().to(torch.bfloat16)), name


def test_an_unsupported_decoder_is_refused_before_any_weight_is_read(tmp_path):
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN),
        text_config=GPTNeoXConfig(vocab_size=64, num_hidden_layers=1, **HIDDEN), image_token_index=5,
    )
    config.save_pretrained(tmp_path / "m")  # config.json only: reading weights would fail with OSError
    with pytest.raises(UnsupportedModelError, match="text decoder GPTNeoXConfig is not supported"):
        LVLM.load(tmp_path / "m")


def _sentencepiece_llava(folder):
    """A tiny LLaVA whose tokenizer is only a sentencepiece model (tokenizer.model), as Llama-2 era checkpoints ship."""
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_prefix=str(folder / "tokenizer"), vocab_size=120, model_type="bpe",
        user_defined_symbols=["<image>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
    }))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = LlamaConfig(vocab_size=sp.get_piece_size(), num_hidden_layers=2, num_key_value_heads=2, pad_token_id=3,
                       bos_token_id=1, eos_token_id=2, **HIDDEN)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=1, image_size=16, patch_size=4, **HIDDEN),
        text_config=text, image_token_index=sp.piece_to_id("<image>"), image_seq_length=16,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return model, sp


def test_a_sentencepiece_tokenizer_loads(tmp_path):
    model, sp = _sentencepiece_llava(tmp_path / "m")
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    loaded = LVLM.load(tmp_path / "m", prompt_format="plain")
    tokenizer = loaded.inputs.tokenizer
    assert tokenizer.is_fast and len(tokenizer) == sp.get_piece_size()
    question = "the quick brown fox jumps over the lazy dog"
    assert tokenizer(question).input_ids == [1, *sp.encode(question)]  # BOS, then sentencepiece's own ids
    encoded = loaded.inputs.encode(QUERY)
    assert encoded.input_ids.count(model.config.image_token_index) == 16
    # The answer span: sentencepiece's own ids of "Paris" after "Short answer:", found through the offsets.
    answer = encoded.input_ids[encoded.answer_start : encoded.answer_start + encoded.answer_len]
    assert sp.decode(answer) == "Paris" and answer == sp.encode("Short answer: Paris")[-len(answer):]
    in_memory = LVLM(model, tokenizer, loaded.inputs.image_processor, prompt_format="plain")
    torch.testing.assert_close(loaded.score([QUERY])[0].target_logprobs, in_memory.score([QUERY])[0].target_logprobs,
                               atol=0, rtol=0)


# -- editor states remember the model -----------------------------------------------------


def test_a_state_records_the_model_it_was_made_on(tmp_path):
    lvlm = tiny_llava()
    lvlm.save(tmp_path / "m")
    loaded = LVLM.load(tmp_path / "m", dtype="bfloat16", prompt_format="chat")
    create_editor("ft-llm", loaded).state().save(tmp_path / "s")
    model = EditorState.load(tmp_path / "s").meta["model"]
    assert {k: v for k, v in model.items() if k != "config_hash"} == {
        "name": str(tmp_path / "m"), "config_class": "LlavaConfig", "family": "llava", "dtype": "bfloat16",
        "prompt_format": "chat",
    }
    # The fingerprint is the architecture's: the same for the model in memory, in another dtype, from disk.
    assert model["config_hash"] == create_editor("none", lvlm).model_identity["config_hash"]
    assert model["config_hash"] != create_editor("none", tiny_llava(strategy="full")).model_identity["config_hash"]


def test_a_state_of_another_model_or_prompt_format_is_refused(caplog):
    state = create_editor("ft-llm", tiny_llava()).state()
    create_editor("ft-llm", tiny_llava(seed=1)).load_state(state)  # same architecture: accepted
    with pytest.raises(StateMismatchError, match=r"trained on model 'llava' \(LlavaConfig, config \w+\) with prompt "
                                                 r"format 'plain'; this run uses 'llava' \(LlavaConfig, config \w+\)"):
        create_editor("ft-llm", tiny_llava(strategy="full")).load_state(state)
    chat = tiny_llava()
    chat.inputs.prompt_format = "chat"
    with pytest.raises(StateMismatchError, match="with prompt format 'plain'; this run uses .* with 'chat'$"):
        create_editor("ft-llm", chat).load_state(state)
    half = tiny_llava()
    half.model.to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="editors.editor"):
        create_editor("ft-llm", half).load_state(state)
    assert "trained in float32; this run uses bfloat16" in caplog.text


def test_an_old_state_without_the_record_is_accepted_with_a_warning(caplog):
    state = create_editor("ft-llm", tiny_llava()).state()
    del state.meta["model"]
    editor = create_editor("ft-llm", tiny_llava())
    with caplog.at_level(logging.WARNING, logger="editors.editor"):
        editor.load_state(state)
    assert "does not say which model it was trained on; assuming 'llava'" in caplog.text
