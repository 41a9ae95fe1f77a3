"""transformers-native `-hf` format: exported for `InternVLForConditionalGeneration`, read back bit-exactly."""

import json
import logging

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, InternVLForConditionalGeneration

from internvl3_hf import InternVL3ForConditionalGeneration
from internvl3_hf.formats.convert import convert, detect_format, load_checkpoint
from internvl3_hf.formats.hf import load_hf_config, save_hf, to_native_model
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import tiny_config


def _tiny_model(tokenizer, **overrides) -> InternVL3ForConditionalGeneration:
    torch.manual_seed(0)
    return InternVL3ForConditionalGeneration(tiny_config(tokenizer, **overrides)).eval()


def _inputs(config) -> dict:
    image = [config.image_start_token_id] + [config.image_token_id] * 8 + [config.image_end_token_id]
    return {"input_ids": torch.tensor([[5, 6, *image, 7, 8]]), "pixel_values": torch.randn(2, 3, 28, 28)}


def test_hf_export_loads_in_transformers_native_class_with_equal_logits(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    save_hf(model, tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    native, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = _inputs(model.config)
    torch.testing.assert_close(native(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
    # The on-disk layout is transformers' own (what OpenGVLab/InternVL3-*-hf repositories hold).
    keys = load_file(tmp_path / "hf" / "model.safetensors")
    assert "language_model.lm_head.weight" in keys
    assert any(key.startswith("vision_tower.encoder.layer.0.attention.q_proj") for key in keys)


def test_to_native_model_shares_every_tensor_and_gives_equal_logits(tokenizer):
    model = _tiny_model(tokenizer)
    native = to_native_model(model)
    assert not any(tensor.is_meta for tensor in [*native.parameters(), *native.buffers()])
    plugin_buffers = dict(model.named_buffers())
    assert all(buffer is plugin_buffers[name] for name, buffer in native.named_buffers())
    inputs = _inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(native(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


def test_plugin_to_hf_to_plugin_is_bit_exact(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    save_hf(model, tmp_path / "hf")
    loaded, info = load_checkpoint(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.save_pretrained(tmp_path / "plugin")
    again = InternVL3ForConditionalGeneration.from_pretrained(tmp_path / "plugin")
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    for field in ("image_token_id", "image_seq_length", "downsample_ratio", "tie_word_embeddings", "eos_token_id"):
        assert getattr(again.config, field) == getattr(model.config, field), field


def test_hf_round_trip_keeps_tied_heads_tied(tokenizer, tmp_path):
    model = _tiny_model(tokenizer, tie_word_embeddings=True)
    save_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_hf_checkpoint_takes_image_span_ids_from_its_tokenizer(tokenizer, tmp_path):
    """The native config stores only `<IMG_CONTEXT>`'s id; `<img>` / `</img>` come from the tokenizer beside it."""
    model = _tiny_model(tokenizer)
    save_hf(model, tmp_path / "hf", processor_for_config(tokenizer, model.config))
    config = load_hf_config(tmp_path / "hf")
    fields = ("image_token_id", "image_start_token_id", "image_end_token_id", "eos_token_id")
    assert [getattr(config, field) for field in fields] == [getattr(model.config, field) for field in fields]
    convert(tmp_path / "hf", tmp_path / "plugin", "plugin")
    processor = AutoProcessor.from_pretrained(tmp_path / "plugin")  # refuses ids that disagree with the config
    reloaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path / "plugin")
    inputs = processor(text="<image>\nHi", images=[Image.new("RGB", (28, 28), "red")], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_hf_checkpoint_without_tokenizer_warns_about_the_image_span_ids(tokenizer, tmp_path, caplog):
    model = _tiny_model(tokenizer)
    save_hf(model, tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="internvl3_hf.formats.official"):
        config = load_hf_config(tmp_path / "hf")
    assert config.image_token_id == model.config.image_token_id  # stored in the native config
    assert (config.image_start_token_id, config.image_end_token_id) == (151665, 151666)
    assert str(tmp_path / "hf") in caplog.text and "no tokenizer" in caplog.text
