"""transformers' model contract, as its own test mixins (ModelTesterMixin) exercise it on native InternVL: outputs
on request (`output_hidden_states`, `output_attentions`), tuples on `return_dict=False`, the `TransformersKwargs`
signature the mixins read, and `save_pretrained(save_original_format=True)` writing back the layout a checkpoint
was loaded from. Expected values come from transformers' native `InternVLForConditionalGeneration` holding the
same weights, or from the checkpoint files themselves.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration, InternVL3Model

OFFICIAL_CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny" / "checkpoint"


def native_kwargs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != "image_num_patches"}


def assert_tensors_equal(ours, theirs, atol: float = 1e-5) -> None:
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, atol=atol, rtol=0)


@pytest.fixture
def eager_pair(model_factory, native_factory):
    model = model_factory(attn_implementation="eager")
    return model, native_factory(model)


# ------------------------------------------------------------------------------------------- outputs on request
def test_get_image_features_returns_hidden_states_on_request(eager_pair, pixel_values_factory):
    model, native = eager_pair
    pixel_values = pixel_values_factory(3)
    with torch.no_grad():
        ours = model.get_image_features(pixel_values, output_hidden_states=True)
        theirs = native.get_image_features(pixel_values, output_hidden_states=True)
    assert len(ours.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert_tensors_equal(ours.hidden_states, theirs.hidden_states)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=0)


def test_get_image_features_returns_attentions_on_request(eager_pair, pixel_values_factory):
    model, native = eager_pair
    pixel_values = pixel_values_factory(2)
    with torch.no_grad():
        ours = model.model.get_image_features(pixel_values, output_attentions=True)
        theirs = native.model.get_image_features(pixel_values, output_attentions=True)
    assert len(ours.attentions) == model.config.vision_config.num_hidden_layers
    assert_tensors_equal(ours.attentions, theirs.attentions)


def test_a_deeper_vision_feature_layer_equals_native(model_factory, native_factory, config, pixel_values_factory):
    config.vision_feature_layer = -2
    model = model_factory(config)
    native = native_factory(model)
    pixel_values = pixel_values_factory(2)
    with torch.no_grad():
        ours = model.get_image_features(pixel_values).pooler_output
        theirs = native.get_image_features(pixel_values).pooler_output
        ours_with_states = model.get_image_features(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_with_states.pooler_output, ours, atol=0, rtol=0)


def test_forward_returns_language_model_attentions_like_native(eager_pair, make_batch):
    model, native = eager_pair
    inputs = make_batch([[2], [1, 3]])
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True, output_hidden_states=True)
        theirs = native(**native_kwargs(inputs), output_attentions=True, output_hidden_states=True)
    assert len(ours.attentions) == model.config.text_config.num_hidden_layers
    assert_tensors_equal(ours.attentions, theirs.attentions)
    assert_tensors_equal(ours.hidden_states, theirs.hidden_states)


@pytest.mark.parametrize("model_class", [InternVL3Model, InternVL3ForConditionalGeneration])
def test_forward_advertises_transformers_kwargs(model_class):
    """How transformers' mixins decide a model can return attentions (and so compare eager with SDPA on them)."""
    kwargs = inspect.signature(model_class.forward).parameters["kwargs"]
    typed_kwargs = kwargs.annotation.__args__[0].__annotations__
    assert {"output_attentions", "output_hidden_states"} <= set(typed_kwargs)


# ------------------------------------------------------------------------------------------- return_dict=False
def test_get_image_features_returns_a_tuple_without_return_dict(model, pixel_values_factory):
    pixel_values = pixel_values_factory(2)
    with torch.no_grad():
        as_dict = model.get_image_features(pixel_values)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_tensors_equal(as_tuple, as_dict.to_tuple(), atol=0)


def test_forward_returns_a_tuple_without_return_dict(model, make_batch):
    inputs = make_batch([[2], [1, 3]])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        base_as_dict = model.model(**inputs)
        base_as_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, atol=0, rtol=0)
    torch.testing.assert_close(base_as_tuple[0], base_as_dict.last_hidden_state, atol=0, rtol=0)
    assert len(as_tuple) == len(as_dict.to_tuple())


def test_config_return_dict_false_gives_tuples(model, make_batch):
    model.config.return_dict = False
    with torch.no_grad():
        out = model(**make_batch([[1]]))
    assert isinstance(out, tuple)


# ------------------------------------------------------------------------------------------- key layout on save
def test_save_original_format_writes_back_the_official_layout(tmp_path):
    """Loaded from an official checkpoint (fused qkv, `mlp1.*`, `vision_model.*`), saved in its original format:
    the official file again, key for key and bit for bit."""
    official = load_file(str(next(OFFICIAL_CHECKPOINT.glob("*.safetensors"))))
    model = InternVL3ForConditionalGeneration.from_pretrained(OFFICIAL_CHECKPOINT, dtype=torch.float32)
    model.save_pretrained(tmp_path, save_original_format=True)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(saved) == sorted(official)
    assert all(torch.equal(saved[key], official[key]) for key in official)


def test_save_original_format_writes_back_the_native_hf_layout(model, native_factory, tmp_path):
    """Loaded from transformers' native `-hf` layout (`language_model.model.*`, `vision_tower.*`), saved in its
    original format: native's own file again."""
    native = native_factory(model)
    native.save_pretrained(tmp_path / "native")
    native_file = load_file(str(tmp_path / "native" / "model.safetensors"))
    loaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path / "native", dtype=torch.float32)
    loaded.save_pretrained(tmp_path / "again", save_original_format=True)
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(saved) == sorted(native_file)
    assert all(torch.equal(saved[key], native_file[key]) for key in native_file)


def test_plugin_format_keeps_in_memory_names_and_round_trips(model, tmp_path):
    """The plugin's own format (the default) stores the in-memory names; `save_original_format=True` on a model
    built in memory writes the official layout, and both load back to the same weights."""
    model.save_pretrained(tmp_path / "plugin")
    assert sorted(load_file(str(tmp_path / "plugin" / "model.safetensors"))) == sorted(model.state_dict())
    model.save_pretrained(tmp_path / "official", save_original_format=True)
    official_keys = load_file(str(tmp_path / "official" / "model.safetensors")).keys()
    assert any(key.endswith("attn.qkv.weight") for key in official_keys)
    assert all(key.startswith(("vision_model.", "mlp1.", "language_model.")) for key in official_keys)
    for folder in ("plugin", "official"):
        reloaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path / folder, dtype=torch.float32)
        for name, tensor in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), (folder, name)
