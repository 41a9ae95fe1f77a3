"""Official OpenGVLab format: read through the Auto classes with no conversion step, and exported back bit-exactly."""

import json
import logging
import math
import re
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen2Tokenizer

import internvl3_hf  # noqa: F401  (registers internvl3 / internvl_chat)
from internvl3_hf import InternVL3Config, InternVL3ForConditionalGeneration, InternVL3Processor
from internvl3_hf.formats.convert import convert
from internvl3_hf.formats.official import (
    official_config_to_plugin,
    plugin_config_to_official,
    save_official,
    tokenizer_token_ids,
)
from internvl3_hf.tiny import tiny_config

# The documented official → in-memory key map (OpenGVLab `InternVLChatModel` vs transformers' native InternVL),
# written out independently of the package's table: (official regex, plugin replacement).
DOCUMENTED_KEY_MAP = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def official_tensors_from_documented_map(plugin_state: dict) -> dict:
    """Build an official-layout state dict from plugin tensors, using only the documented map above."""
    official = {}
    for official_key in _official_keys(plugin_state):
        match = QKV.match(official_key)
        if match:
            layer, kind = match.groups()
            prefix = f"model.vision_tower.encoder.layer.{layer}.attention"
            official[official_key] = torch.cat([plugin_state[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"]).contiguous()
            continue
        plugin_key = official_key
        for pattern, replacement in DOCUMENTED_KEY_MAP:
            plugin_key, hits = re.subn(pattern, replacement, plugin_key)
            if hits:
                break
        official[official_key] = plugin_state[plugin_key].clone()
    return official


def _official_keys(plugin_state: dict) -> list[str]:
    """The official key names a checkpoint of this architecture has (q/k/v fused into one qkv)."""
    reverse = {
        "model.vision_tower.encoder.layer.": "vision_model.encoder.layers.",
        "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
        "model.vision_tower.embeddings.patch_embeddings.projection.": "vision_model.embeddings.patch_embedding.",
        ".lambda_1": ".ls1",
        ".lambda_2": ".ls2",
        ".attention.projection_layer.": ".attn.proj.",
        ".layernorm_before.": ".norm1.",
        ".layernorm_after.": ".norm2.",
        "model.multi_modal_projector.layer_norm.": "mlp1.0.",
        "model.multi_modal_projector.linear_1.": "mlp1.1.",
        "model.multi_modal_projector.linear_2.": "mlp1.3.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    keys = set()
    for key in plugin_state:
        key = re.sub(r"attention\.[qkv]_proj\.", "attn.qkv.", key)
        for source, target in reverse.items():
            key = key.replace(source, target)
        keys.add(key.replace("language_model.language_model.lm_head.", "language_model.lm_head."))
    return sorted(keys)


def official_config_dict(config: InternVL3Config) -> dict:
    """A hand-written official config.json for the tiny model (field names as OpenGVLab ships them)."""
    text = config.text_config
    vision = config.vision_config
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 28,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "system_message": None,
        "use_thumbnail": True,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "image_fold": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_size": text.hidden_size,
        # No token ids: the official format keeps them only in the tokenizer.
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_theta": 10000.0,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "image_size": 28,
            "patch_size": 7,
            "num_channels": 3,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.1,
            "use_flash_attn": False,
        },
    }


INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
TOKEN_ID_KEYS = {"image_token_id", "image_start_token_id", "image_end_token_id", "eos_token_id"}
_CORPUS = (
    "Describe the image. What colour is the square? The square is red. How many shapes are there? Three.\n"
    "user assistant system Image-1: Image-2: Frame1: 0 1 2 3 4 5 6 7 8 9\n"
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。\n"
)


def build_specials_first_tokenizer(special_tokens: tuple[str, ...] = INTERNVL_SPECIAL_TOKENS) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE whose special tokens take ids 0-11, far from Qwen2.5's 151643+ and from the ids of
    the project's tiny tokenizer (`<img>` is 3, `</img>` 4, `<IMG_CONTEXT>` 5, `<|im_end|>` 2)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    state = json.loads(bpe.model.__getstate__())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": list(special_tokens[1:])})
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


@pytest.fixture(scope="module")
def specials_first_tokenizer():
    return build_specials_first_tokenizer()


def write_official_checkpoint(directory, reference, tokenizer=None, **config_changes):
    """Write `reference` in the official layout, independently of the package's exporter (and its tokenizer)."""
    directory.mkdir()
    save_file(official_tensors_from_documented_map(reference.state_dict()), directory / "model.safetensors")
    config = official_config_dict(reference.config)
    config.update(config_changes)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def official_dir(tmp_path, specials_first_tokenizer, model_factory):
    """A tiny official checkpoint whose tokenizer puts the special tokens at ids 0-11, and the plugin model holding
    its weights (built from the tokenizer's ids directly, not from the reader)."""
    reference = model_factory(tiny_config(specials_first_tokenizer))
    return write_official_checkpoint(tmp_path / "official", reference, specials_first_tokenizer), reference


def test_official_checkpoint_loads_through_auto_class_with_no_missing_keys(official_dir):
    directory, reference = official_dir
    model, info = AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True)
    assert isinstance(model, InternVL3ForConditionalGeneration)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_official_config_is_read_into_internvl3_config(official_dir):
    directory, _ = official_dir
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is InternVL3Config
    assert config.vision_feature_layer == -1 and config.ps_version == "v2" and config.force_image_size == 28
    assert config.image_seq_length == 4 and config.max_dynamic_patch == 12 and not config.tie_word_embeddings
    assert config.vision_config.attention_bias is True and config.vision_config.layer_scale_init_value == 0.1
    assert config.vision_config.drop_path_rate == 0.1


@pytest.mark.parametrize("read", [AutoConfig.from_pretrained, InternVL3Config.from_pretrained])
def test_token_ids_are_read_from_the_tokenizer_beside_config_json(official_dir, read):
    directory, _ = official_dir
    assert not TOKEN_ID_KEYS & json.loads((directory / "config.json").read_text()).keys()
    config = read(directory)
    ids = (config.image_start_token_id, config.image_end_token_id, config.image_token_id, config.eos_token_id)
    assert ids == (3, 4, 5, 2)  # <img>, </img>, <IMG_CONTEXT>, <|im_end|> of the specials-first tokenizer


# Keys of `Qwen2Config().to_dict()` in transformers 4.37.2, the official stack: an exported llm_config may hold no other
# key but `rope_scaling`, which released llm_configs carry verbatim.
OFFICIAL_QWEN2_KEYS = {
    "_name_or_path", "add_cross_attention", "architectures", "attention_dropout", "bad_words_ids",
    "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "eos_token_id", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "hidden_act", "hidden_size", "id2label", "initializer_range", "intermediate_size",
    "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length", "max_position_embeddings",
    "max_window_layers", "min_length", "model_type", "no_repeat_ngram_size", "num_attention_heads", "num_beam_groups",
    "num_beams", "num_hidden_layers", "num_key_value_heads", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "rms_norm_eps",
    "rope_theta", "sep_token_id", "sliding_window", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
    "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16", "use_cache",
    "use_sliding_window", "vocab_size",
}


def assert_official_config_round_trips(written: dict, expected: dict) -> None:
    """Every field of `expected` comes back unchanged, and no field the official code would not write appears.

    Released configs carry `system_message: null` and `image_fold: null`, which `InternVLChatConfig.to_dict` does not
    write (and a null `system_message` would replace the official template's default): those come back absent.
    """
    assert written.keys() <= expected.keys() | {"torch_dtype"}, written.keys() - expected.keys()
    assert written["vision_config"].keys() <= expected["vision_config"].keys()
    assert written["llm_config"].keys() <= OFFICIAL_QWEN2_KEYS | {"rope_scaling"}
    for key in expected.keys() - {"llm_config", "vision_config"}:
        if key in ("system_message", "image_fold") and expected[key] is None:
            assert key not in written, key
        else:
            assert written[key] == expected[key], key
    for part in ("vision_config", "llm_config"):
        for key in expected[part]:
            assert written[part][key] == expected[part][key], (part, key)


def test_official_to_plugin_to_official_is_bit_exact(official_dir, tmp_path):
    directory, _ = official_dir
    model = AutoModelForImageTextToText.from_pretrained(directory)
    model.save_pretrained(tmp_path / "plugin")
    plugin = AutoModelForImageTextToText.from_pretrained(tmp_path / "plugin")
    save_official(plugin, tmp_path / "back", AutoProcessor.from_pretrained(directory))

    original = load_file(directory / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    for key in original:
        assert original[key].dtype == back[key].dtype and torch.equal(original[key], back[key]), key
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert_official_config_round_trips(written, json.loads((directory / "config.json").read_text()))
    assert not TOKEN_ID_KEYS & written.keys()


def test_convert_official_to_plugin_to_official_keeps_weights_config_and_token_ids(official_dir, tmp_path):
    directory, _ = official_dir
    convert(directory, tmp_path / "plugin", "plugin")
    plugin_config = json.loads((tmp_path / "plugin" / "config.json").read_text())
    assert [plugin_config[key] for key in ("image_start_token_id", "image_end_token_id", "image_token_id")] == [3, 4, 5]
    convert(tmp_path / "plugin", tmp_path / "back", "official")
    original = load_file(directory / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back) and all(torch.equal(original[key], back[key]) for key in original)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert_official_config_round_trips(written, json.loads((directory / "config.json").read_text()))
    assert AutoConfig.from_pretrained(tmp_path / "back").image_token_id == 5


def test_save_official_writes_the_tokenizer_files_the_official_stack_reads(official_dir, specials_first_tokenizer,
                                                                           tmp_path):
    """transformers 4.37 with use_fast=False reads vocab.json + merges.txt and the additional special tokens of
    special_tokens_map.json (its chat() skips only those when decoding)."""
    directory, _ = official_dir
    model = AutoModelForImageTextToText.from_pretrained(directory)
    save_official(model, tmp_path, AutoProcessor.from_pretrained(directory))
    assert json.loads((tmp_path / "vocab.json").read_text()) == specials_first_tokenizer.get_vocab()
    merges = [line for line in (tmp_path / "merges.txt").read_text().splitlines() if not line.startswith("#")]
    trained = json.loads(specials_first_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert merges == [" ".join(pair) if isinstance(pair, list) else pair for pair in trained]
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == list(INTERNVL_SPECIAL_TOKENS[1:])
    assert special["eos_token"] == "<|im_end|>" and special["pad_token"] == "<|endoftext|>"
    # tokenizers 0.15 cannot read a tokenizer.json written by 0.23; without one both stacks build it from the above
    assert not (tmp_path / "tokenizer.json").exists()
    reloaded = AutoProcessor.from_pretrained(tmp_path).tokenizer
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat colour?<|im_end|>"
    assert reloaded(text).input_ids == specials_first_tokenizer(text).input_ids


def test_plugin_config_exports_back_to_an_equivalent_official_config(official_dir):
    directory, _ = official_dir
    config = AutoConfig.from_pretrained(directory)
    again = InternVL3Config.from_dict(official_config_to_plugin(plugin_config_to_official(config), directory))
    assert again.to_diff_dict() == config.to_diff_dict()


def test_official_checkpoint_without_tokenizer_warns_and_uses_the_qwen25_ids(official_dir, caplog):
    directory, _ = official_dir
    for path in directory.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    with caplog.at_level(logging.WARNING, logger="internvl3_hf.formats.official"):
        config = AutoConfig.from_pretrained(directory)
    assert (config.image_start_token_id, config.image_end_token_id, config.image_token_id) == (151665, 151666, 151667)
    assert config.eos_token_id == 151645
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert str(directory) in warning and "151667" in warning and "no tokenizer" in warning


def test_official_checkpoint_whose_tokenizer_lacks_an_internvl_token_is_refused(tmp_path, model_factory,
                                                                               specials_first_tokenizer):
    reference = model_factory(tiny_config(specials_first_tokenizer))
    plain = build_specials_first_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>"))
    directory = write_official_checkpoint(tmp_path / "official", reference, plain)
    with pytest.raises(ValueError, match=r"has no <IMG_CONTEXT> token"):
        AutoConfig.from_pretrained(directory)


def test_token_ids_stored_in_config_json_must_match_the_tokenizer(official_dir):
    directory, _ = official_dir
    config = json.loads((directory / "config.json").read_text())
    config["image_token_id"] = 151667  # as older exports of this package wrote it
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"image_token_id=151667 but <IMG_CONTEXT> is 5"):
        AutoConfig.from_pretrained(directory)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"llm_config": {"architectures": ["InternLM2ForCausalLM"]}}, "InternLM2ForCausalLM language model"),
        ({"use_llm_lora": 16}, "use_llm_lora=16"),
        ({"pad2square": True}, "pad2square=True"),
    ],
)
def test_unsupported_official_configs_are_refused_clearly(official_dir, change, message):
    directory, _ = official_dir
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoConfig.from_pretrained(directory)


def test_plugin_class_reads_official_checkpoint_directly(official_dir):
    directory, reference = official_dir
    model = InternVL3ForConditionalGeneration.from_pretrained(directory)
    assert model.config.vision_feature_layer == -1 and model.config.image_seq_length == 4
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_auto_processor_reads_official_directory_without_processor_files(official_dir):
    directory, reference = official_dir
    processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(processor, InternVL3Processor)
    assert processor.image_seq_length == 4 and processor.image_processor.max_patches == 12
    assert processor.image_processor.size.height == 28
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    inputs = processor(text=prompt, images=[Image.new("RGB", (56, 28), "red")], return_tensors="pt")
    assert inputs["image_num_patches"].tolist() == [3]  # 2x1 grid + thumbnail
    assert int((inputs["input_ids"] == reference.config.image_token_id).sum()) == 12
    model = AutoModelForImageTextToText.from_pretrained(directory)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_missing_official_fields_take_the_official_class_defaults():
    """A config.json that leaves fields out means the official constructor defaults, not InternVL3's values."""
    config = InternVL3Config.from_dict(
        {"model_type": "internvl_chat", "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1,
         "vocab_size": 300}, "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
         "intermediate_size": 64}}
    )
    assert config.ps_version == "v1" and config.max_dynamic_patch == 6
    assert not config.use_thumbnail and not config.dynamic_image_size and config.template is None
    assert config.vision_config.use_qk_norm and config.vision_config.norm_type == "rms_norm"
    assert config.force_image_size == 224 and config.image_seq_length == 64  # (224 / 14)² / 4


def test_official_training_use_cache_flag_does_not_disable_the_kv_cache(official_dir):
    directory, _ = official_dir
    config = json.loads((directory / "config.json").read_text())
    config["llm_config"]["use_cache"] = False  # as released InternVL3 configs ship it
    (directory / "config.json").write_text(json.dumps(config))
    model = AutoModelForImageTextToText.from_pretrained(directory)
    assert model.config.text_config.use_cache and model.generation_config.use_cache in (None, True)  # None: on


# ------------------------------------------------------------------------------ token ids from the tokenizer
def _image_inputs(processor, question: str = "Describe the image."):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    return processor(text=prompt, images=[Image.new("RGB", (56, 28), (200, 40, 90))], return_tensors="pt")


def test_official_checkpoint_with_other_token_ids_forwards_images_like_its_weights_model(official_dir):
    directory, reference = official_dir
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    inputs = _image_inputs(processor)
    assert int((inputs["input_ids"] == 5).sum()) == 12  # 3 tiles x 4 <IMG_CONTEXT> (id 5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


def test_chat_on_official_checkpoint_uses_the_tokenizer_ids(official_dir, specials_first_tokenizer):
    directory, reference = official_dir
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    pixel_values = _image_inputs(processor)["pixel_values"]
    settings = dict(max_new_tokens=6, do_sample=False)
    answer, history = model.chat(specials_first_tokenizer, pixel_values, "What colour is it?", settings,
                                 return_history=True)
    # The same turn through the processor and `generate` of the model built from the tokenizer's ids directly.
    inputs = _image_inputs(processor, "What colour is it?")
    output = reference.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=2)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == expected and history == [("<image>\nWhat colour is it?", expected)]
    batch = model.batch_chat(specials_first_tokenizer, torch.cat([pixel_values, pixel_values]),
                             ["What colour is it?"] * 2, settings, num_patches_list=[3, 3])
    assert batch == [expected, expected]


def test_v2pe_on_official_checkpoint_with_other_token_ids(official_dir):
    directory, reference = official_dir
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory, v2pe_mode="fixed", v2pe_delta=0.25).eval()
    inputs = _image_inputs(processor)
    positions, _ = model.model.v2pe_positions(inputs["input_ids"] == model.config.image_token_id,
                                              inputs["attention_mask"])
    ids = inputs["input_ids"][0].tolist()
    # Written out from V2PE's rule: text +1, each <IMG_CONTEXT> of the image +δ, </img> at ceil(last) + 1.
    expected, position = [], 0.0
    for index, token in enumerate(ids):
        if token == 5:
            position += 0.25
        elif index and ids[index - 1] == 5:
            position = float(math.ceil(position) + 1)
        elif index:
            position += 1
        expected.append(position)
    assert positions[0].tolist() == expected
    v2pe_reference = InternVL3ForConditionalGeneration(reference.config.__class__.from_dict(
        {**reference.config.to_dict(), "v2pe_mode": "fixed", "v2pe_delta": 0.25})).eval()
    v2pe_reference.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, v2pe_reference(**inputs).logits, rtol=0, atol=0)


def test_processor_refuses_a_tokenizer_that_disagrees_with_the_model_config(model, specials_first_tokenizer, tmp_path):
    model.save_pretrained(tmp_path)  # the tiny model: <IMG_CONTEXT> etc. at the project tiny tokenizer's ids
    specials_first_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"<IMG_CONTEXT> is id 5 in the tokenizer of .* but image_token_id="
                                         rf"{model.config.image_token_id} in .*config.json"):
        AutoProcessor.from_pretrained(tmp_path)


def test_chat_refuses_a_tokenizer_that_disagrees_with_the_model(model, specials_first_tokenizer):
    with pytest.raises(ValueError, match=r"<img> is id 3 in the tokenizer given to chat\(\) but image_start_token_id="):
        model.chat(specials_first_tokenizer, torch.zeros(1, 3, 28, 28), "Hi", dict(max_new_tokens=1))
    with pytest.raises(ValueError, match=r"<IMG_CONTEXT> is id 5 in the tokenizer given to chat\(\)"):
        model.batch_chat(specials_first_tokenizer, None, ["Hi"], dict(max_new_tokens=1))


def test_chat_refuses_tile_counts_that_do_not_add_up(model, tokenizer):
    pixel_values = torch.zeros(3, 3, 28, 28)
    with pytest.raises(ValueError, match=r"num_patches_list \[2\] sums to 2 tiles but pixel_values holds 3"):
        model.chat(tokenizer, pixel_values, "Hi", dict(max_new_tokens=1), num_patches_list=[2])
    with pytest.raises(ValueError, match=r"num_patches_list \[1, 1\] sums to 2 tiles but pixel_values holds 3"):
        model.batch_chat(tokenizer, pixel_values, ["Hi", "Ho"], dict(max_new_tokens=1), num_patches_list=[1, 1])
    with pytest.raises(ValueError, match="one tile count per question"):
        model.batch_chat(tokenizer, pixel_values, ["Hi", "Ho"], dict(max_new_tokens=1), num_patches_list=[3])


def test_save_official_writes_only_official_fields(official_dir, tmp_path):
    directory, _ = official_dir
    model = AutoModelForImageTextToText.from_pretrained(directory)
    save_official(model, tmp_path / "export", AutoProcessor.from_pretrained(directory))
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    released = official_config_dict(model.config)  # the released InternVL3 layout, written out by hand above
    assert written.keys() <= released.keys() and written["vision_config"].keys() <= released["vision_config"].keys()
    assert written["llm_config"].keys() <= OFFICIAL_QWEN2_KEYS | {"rope_scaling"}
    assert not TOKEN_ID_KEYS & written.keys()


def test_save_official_refuses_a_processor_whose_tokenizer_disagrees(model, specials_first_tokenizer, tmp_path):
    # Built without a model config (processor_for_config would refuse this tokenizer already).
    processor = InternVL3Processor(tokenizer=specials_first_tokenizer)
    with pytest.raises(ValueError, match="disagree on token ids.*the processor's tokenizer"):
        save_official(model, tmp_path, processor)


# ------------------------------------------------------------------------------ rope_scaling as the official stack
def test_official_rope_scaling_is_not_applied_and_round_trips(specials_first_tokenizer, model_factory, tmp_path):
    """transformers 4.37's Qwen2 (the official stack) builds plain RoPE whatever `rope_scaling` says; transformers 5
    would apply the dynamic x2 past max_position_embeddings. Read here, the official checkpoint keeps plain RoPE."""
    reference = model_factory(tiny_config(specials_first_tokenizer))
    rope_scaling = {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}
    directory = write_official_checkpoint(tmp_path / "official", reference, specials_first_tokenizer)
    config = json.loads((directory / "config.json").read_text())
    config["llm_config"].update(max_position_embeddings=8, rope_scaling=rope_scaling)
    (directory / "config.json").write_text(json.dumps(config))

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    assert model.config.text_config.rope_parameters["rope_type"] == "default"
    assert model.config.official_rope_scaling == rope_scaling
    input_ids = torch.tensor([specials_first_tokenizer.encode("Describe the image. The square is red. " * 3)])
    assert input_ids.shape[1] > 2 * 8  # well past max_position_embeddings: dynamic NTK would rescale
    dynamic_config = tiny_config(specials_first_tokenizer)  # what transformers 5 would build from rope_scaling
    dynamic_config.text_config.max_position_embeddings = 8
    dynamic_config.text_config.rope_parameters.update(rope_type="dynamic", factor=2.0)
    dynamic = model_factory(dynamic_config)
    dynamic.load_state_dict(reference.state_dict())
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(logits, reference(input_ids=input_ids).logits, rtol=0, atol=0)
        assert not torch.allclose(logits, dynamic(input_ids=input_ids).logits, atol=1e-3)  # the scaling would show

    save_official(model, tmp_path / "back", AutoProcessor.from_pretrained(directory))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["llm_config"]["rope_scaling"] == rope_scaling


REMOTE_RELOAD_SCRIPT = """
import json, sys
class BlockPackage:  # a fresh process where internvl3_hf cannot be imported: only the checkpoint's own code runs
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "internvl3_hf":
            raise ImportError("blocked")
sys.meta_path.insert(0, BlockPackage())
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
    add_generation_prompt=True,
)
inputs = processor(text=prompt, images=[Image.new("RGB", (56, 28), (200, 40, 90))], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"module": type(model).__module__, "image_token_id": model.config.image_token_id,
                  "logits": logits[0, -1].tolist()}))
"""


def test_remote_code_reload_of_a_converted_official_checkpoint(official_dir, tmp_path):
    directory, reference = official_dir
    convert(directory, tmp_path / "plugin", "plugin")
    run = subprocess.run([sys.executable, "-c", REMOTE_RELOAD_SCRIPT, str(tmp_path / "plugin")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["image_token_id"] == 5
    with torch.no_grad():
        expected = reference(**_image_inputs(AutoProcessor.from_pretrained(directory))).logits[0, -1]
    # another process may use another thread count, so the float32 sums may round differently
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=0, atol=1e-5)


def test_official_img_context_token_id_attribute_is_the_config_field(official_dir, specials_first_tokenizer):
    """Official training code sets `model.img_context_token_id` from the tokenizer; here it is
    `config.image_token_id`, so setting it moves the placeholder the forward replaces."""
    directory, _ = official_dir
    model = AutoModelForImageTextToText.from_pretrained(directory)
    assert model.img_context_token_id == 5
    model.img_context_token_id = specials_first_tokenizer.convert_tokens_to_ids("<box>")
    assert model.config.image_token_id == 10
    inputs = _image_inputs(AutoProcessor.from_pretrained(directory))
    with pytest.raises(ValueError, match="input_ids hold 0 <IMG_CONTEXT> tokens"):
        model(**inputs)


def test_hub_checkpoint_token_ids_come_from_its_cached_tokenizer(specials_first_tokenizer, tmp_path, monkeypatch):
    """For a Hub id the tokenizer is read from the local cache (reading a config never downloads)."""
    snapshot = tmp_path / "models--someone--tiny-internvl" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tiny-internvl" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-internvl" / "refs" / "main").write_text("0" * 40)
    specials_first_tokenizer.save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert tokenizer_token_ids("someone/tiny-internvl") == {
        "image_token_id": 5, "image_start_token_id": 3, "image_end_token_id": 4, "eos_token_id": 2,
    }
    assert tokenizer_token_ids("someone/not-in-the-cache") is None
