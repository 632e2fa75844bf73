"""Model-family adapters: each supported checkpoint finds its family by model_type, the FSDP units and final norms
are the models' own, and an unknown family fails where it needs something family-specific, naming the known ones."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, MistralConfig, MistralForCausalLM

from relax_pl.families import FAMILIES, family_of, final_norm
from relax_pl.families.qwen2_vl import Qwen2VL
from relax_pl.models import build_tiny_model, checkpoint_family, load_causal_lm
from relax_pl.testing import save_tiny_vl_model


def test_supported_checkpoints_find_their_family(tmp_path, tiny_model):
    assert sorted(FAMILIES) == ["llama", "qwen2", "qwen2_5_vl", "qwen2_vl"]
    assert type(checkpoint_family(str(tiny_model))).__name__ == "Qwen2"
    assert type(family_of(build_tiny_model("llama"))).__name__ == "Llama"
    for kind in ("qwen2_5_vl", "qwen2_vl"):
        folder = save_tiny_vl_model(tmp_path / kind, kind=kind)
        family = checkpoint_family(str(folder))
        assert isinstance(family, Qwen2VL) and family.vision_language and family.model_type == kind
        model = load_causal_lm(str(folder))
        assert final_norm(model) is model.model.language_model.norm
        blocks = family.decoder_blocks(model)  # FSDP's units: every decoder layer and every vision block
        names = {type(block).__name__ for block in blocks}
        assert len(blocks) == len(model.model.language_model.layers) + len(model.model.visual.blocks)
        assert names == set(model._no_split_modules)


def test_a_conventional_text_family_needs_no_adapter():
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, vocab_size=64)
    model = MistralForCausalLM(config)
    family = family_of(model)
    assert family.model_type == "mistral" and not family.vision_language
    assert final_norm(model) is model.model.norm
    assert family.decoder_blocks(model) == list(model.model.layers)
    mask = torch.tensor([[0, 1, 1]])
    assert family.position_ids(mask, {}).tolist() == [[0, 0, 1]]


def test_an_unknown_vision_language_family_fails_naming_the_known_ones():
    family = family_of(AutoConfig.for_model("llava"))
    assert family.vision_language  # loaded with transformers' image-text-to-text class, as before
    with pytest.raises(ValueError, match="image inputs for model_type 'llava'.*known families are llama, qwen2"):
        family.position_ids(torch.ones(1, 3), {"pixel_values": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="which image rows belong.*'llava'"):
        family.image_rows({"pixel_values": torch.zeros(2, 3)}, [1, 1])


def test_qwen_vl_rows_per_prompt_and_positions():
    family = Qwen2VL("qwen2_5_vl")
    grids = torch.tensor([[1, 4, 4], [1, 2, 6], [1, 2, 2]])  # 16, 12 and 4 patches
    assert family.image_rows({"image_grid_thw": grids}, [2, 0, 1]) == {
        "image_grid_thw": [2, 0, 1], "pixel_values": [28, 0, 4]}
    assert family.position_ids(torch.ones(1, 3), {"image_grid_thw": grids}) is None  # the model numbers them
    encoded = {"input_ids": torch.zeros(2, 3), "mm_token_type_ids": torch.tensor([[0, 1, 1], [0, 0, 0]])}
    assert family.count_image_tokens(encoded) == [2, 0]
