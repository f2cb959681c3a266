"""An out-of-tree model family, installed as a package, registered through `editwatch.families`.

The plugin (tests/plugin/editwatch_tiny_owl) is pip-installed into a temporary folder put on
sys.path: entry points are found the way they are for any installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editors import LVLM, METHODS, Query, UnsupportedModelError, family_for
from editors.families import ENTRY_POINT_GROUP, FAMILIES, all_families, plugin_families
from tests.editors.test_contract import run_contract
from tests.tiny.llava import LLAVA_CHAT
from tests.tiny.tokenizers import HIDDEN, metaspace_tokenizer
from tests.tiny_models import random_image

PLUGIN = Path(__file__).parent.parent / "plugin" / "editwatch_tiny_owl"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin package installed into a fresh folder on sys.path; its module."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(PLUGIN)],
        check=True, capture_output=True,
    )
    sys.path.insert(0, str(target))
    plugin_families.cache_clear()
    try:
        import editwatch_tiny_owl

        yield editwatch_tiny_owl
    finally:
        sys.path.remove(str(target))
        plugin_families.cache_clear()


def tiny_owl(plugin, seed: int = 0) -> LVLM:
    """The plugin's model class at tiny size (CLIP tower + 2-layer Llama, image before BOS)."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = metaspace_tokenizer(["<image>"])
    config = plugin.TinyOwlConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=2, image_size=16, patch_size=4, projection_dim=32, **HIDDEN),
        text_config=LlamaConfig(
            vocab_size=len(tok), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **HIDDEN,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = plugin.TinyOwlForConditionalGeneration(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LVLM(model, tok, processor, chat_template=LLAVA_CHAT, prompt_format="plain")


def test_the_plugin_family_is_found_through_its_entry_point(plugin):
    families = all_families()
    assert plugin.TinyOwlConfig in families and plugin.TinyOwlConfig not in FAMILIES
    assert families[plugin.TinyOwlConfig].name == "tiny-owl"
    lvlm = tiny_owl(plugin)
    assert lvlm.family.name == "tiny-owl"
    # The plugin's layout is used: image tokens before BOS.
    encoded = lvlm.inputs.encode(Query("what is shown?", "a dog", random_image(1)))
    image_id = lvlm.inputs.image_token_id
    assert encoded.input_ids[:16] == [image_id] * 16
    assert encoded.input_ids[16] == lvlm.inputs.tokenizer.bos_token_id


def test_without_the_plugin_the_config_is_refused_naming_the_group(plugin):
    plugin_families.cache_clear()
    sys.path.remove(next(p for p in sys.path if Path(p, "editwatch_tiny_owl").is_dir()))
    try:
        with pytest.raises(UnsupportedModelError, match=rf"unsupported model config TinyOwlConfig.*{ENTRY_POINT_GROUP}"):
            family_for(plugin.TinyOwlConfig())
    finally:
        sys.path.insert(0, str(Path(plugin.__file__).parent.parent))
        plugin_families.cache_clear()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_the_plugin_family(plugin, method, tmp_path):
    run_contract(method, lambda: tiny_owl(plugin, seed=1), tmp_path)


def test_a_saved_plugin_model_loads_by_path(plugin, tmp_path):
    lvlm = tiny_owl(plugin)
    lvlm.save(tmp_path / "owl")
    loaded = LVLM.load(tmp_path / "owl", prompt_format="plain")
    assert loaded.family.name == "tiny-owl"
    query = [Query("what is shown?", "a dog", random_image(2))]
    torch.testing.assert_close(loaded.score(query)[0].target_logprobs, lvlm.score(query)[0].target_logprobs)


def test_a_saved_plugin_model_loads_by_path_in_a_fresh_process(plugin, tmp_path):
    """Loading must find the plugin (and its AutoConfig registration) before reading the config."""
    tiny_owl(plugin).save(tmp_path / "owl")
    code = f"from editors import LVLM; print(LVLM.load({str(tmp_path / 'owl')!r}, prompt_format='plain').family.name)"
    site = str(Path(plugin.__file__).parent.parent)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": site},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "tiny-owl"
