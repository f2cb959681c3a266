"""Every declared family at its published size, built on the meta device (no weights, no memory).

For each checkpoint in `tests/published/`, every parameter-editing method is built on the model
under editwatch's defaults and under VLKEB's protocol (`editors/protocols.py`), and the number of
model parameters it trains must equal the count computed by hand from the published dimensions.
Memory editors (SERAC, IKE) change no model parameter; their keys are tested on tiny models.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from editors import LVLM, create_editor, family_for
from editors.protocols import PROTOCOLS
from editors.weights import ParameterEditor
from tests.published import published

PUBLISHED = published()
CASES = sorted((name, key) for name, entry in PUBLISHED.items() for key in entry.trains)


def _stub_tokenizer(config, family) -> PreTrainedTokenizerFast:
    """A tokenizer that knows only the image placeholder, at the id the config expects."""
    vocab = {"<unk>": 0, family.image_token: config.image_token_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


@lru_cache(maxsize=2)
def meta_lvlm(name: str) -> LVLM:
    """The published checkpoint `name` as an LVLM on the meta device."""
    config = PUBLISHED[name].config()
    family = family_for(config)
    with torch.device("meta"):
        model = family.model_class(config)
    return LVLM(model, _stub_tokenizer(config, family), image_processor=None, prompt_format="plain", name=name)


def trained(lvlm: LVLM, key: str) -> dict[str, torch.nn.Parameter]:
    """The model parameters the method `key` ("method" or "method/protocol") changes."""
    method, _, protocol = key.partition("/")
    settings = PROTOCOLS[protocol or "editwatch"].method_config(method, lvlm.family)
    with torch.device("meta"):  # hypernetworks of MEND / KE are built at the model's size: keep them off the host
        editor = create_editor(method, lvlm, settings)
    assert isinstance(editor, ParameterEditor), f"{method} changes no model parameter"
    return editor.tracker.params


@pytest.mark.parametrize(("name", "key"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_trained_parameter_count(name, key):
    lvlm = meta_lvlm(name)
    params = trained(lvlm, key)
    assert sum(p.numel() for p in params.values()) == PUBLISHED[name].trains[key]
    if key in PUBLISHED[name].modules:
        assert sorted(params) == sorted(PUBLISHED[name].modules[key])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_vlkeb_ft_llm_tunes_the_last_layers_mlp_only(name):
    """VLKEB's FT (LLM): the last decoder layer's up and down projections (all of the MLP on Qwen-VL)."""
    lvlm = meta_lvlm(name)
    decoder = lvlm.family.decoder(lvlm.model.config)
    last = lvlm.model.config.get_text_config().num_hidden_layers - 1
    params = trained(lvlm, "ft-llm/vlkeb")
    roles = ["gate", "up", "down"] if lvlm.family.vlkeb_model == "qwenvl" else ["up", "down"]
    expected = [f".{decoder.layers}.{last}.{decoder.mlp[r]}" for r in roles if r in decoder.mlp]
    assert sorted(params) == sorted(n for n in params if any(n.endswith(e) for e in expected))
    assert len(params) == len(expected)
    assert all(re.search(rf"\.{last}\.", n) for n in params)
