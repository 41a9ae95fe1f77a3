"""The loading keywords evaluation clients pass, and which class `AutoModel` gives with and without remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from internvl3_hf import InternVL3ForConditionalGeneration, InternVL3Model
from internvl3_hf.modeling.modeling_internvl3 import official_attention


def test_auto_model_maps_to_the_chat_model_and_the_package_keeps_the_base_model(compat):
    """The checkpoint's `auto_map` makes `AutoModel` the chat model under trust_remote_code (the replays load it in
    a process without the package); where `internvl3_hf` is imported, transformers prefers its registered classes
    to remote code, and `AutoModel` stays the base model, transformers' convention."""
    directory = compat["dirs"]["chat"]
    auto_map = json.loads((Path(directory) / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_internvl3.InternVL3ForConditionalGeneration"
    assert type(AutoModel.from_pretrained(directory)) is InternVL3Model
    assert type(AutoModel.from_pretrained(directory, trust_remote_code=True)) is InternVL3Model


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_use_flash_attn_picks_the_attention_as_the_official_constructor(compat, use_flash_attn):
    model = InternVL3ForConditionalGeneration.from_pretrained(compat["dirs"]["chat"], use_flash_attn=use_flash_attn)
    assert model.config._attn_implementation == official_attention(use_flash_attn)
    assert official_attention(False) == "eager"
    if not torch.cuda.is_available():  # no FlashAttention here: the official fallback
        assert official_attention(True) == "eager"


def test_load_in_8bit_false_is_a_no_op_and_true_points_to_quantization_config(compat):
    directory = compat["dirs"]["chat"]
    model = InternVL3ForConditionalGeneration.from_pretrained(directory, load_in_8bit=False)
    reference = InternVL3ForConditionalGeneration.from_pretrained(directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"quantization_config=BitsAndBytesConfig\(load_in_8bit=True\)"):
        InternVL3ForConditionalGeneration.from_pretrained(directory, load_in_8bit=True)
