"""Official OpenGVLab format: read through the Auto classes with no conversion step, and exported back bit-exactly."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import internvl3_hf  # noqa: F401  (registers internvl3 / internvl_chat)
from internvl3_hf import InternVL3Config, InternVL3ForConditionalGeneration, InternVL3Processor
from internvl3_hf.formats.official import official_config_to_plugin, plugin_config_to_official, save_official
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
        # The tiny tokenizer's ids; a released config omits these (151667/151665/151666, <|im_end|> 151645).
        "image_token_id": config.image_token_id,
        "image_start_token_id": config.image_start_token_id,
        "image_end_token_id": config.image_end_token_id,
        "eos_token_id": config.eos_token_id,
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


@pytest.fixture
def official_dir(tmp_path, tokenizer):
    """A tiny checkpoint written in the official layout, independently of the package's exporter."""
    torch.manual_seed(0)
    reference = InternVL3ForConditionalGeneration(tiny_config(tokenizer)).eval()
    directory = tmp_path / "official"
    directory.mkdir()
    save_file(official_tensors_from_documented_map(reference.state_dict()), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(official_config_dict(reference.config), indent=2))
    tokenizer.save_pretrained(directory)
    return directory, reference


def test_official_checkpoint_loads_through_auto_class_with_no_missing_keys(official_dir):
    directory, reference = official_dir
    model, info = AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True)
    assert isinstance(model, InternVL3ForConditionalGeneration)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_official_config_is_read_into_internvl3_config(official_dir, tokenizer):
    directory, _ = official_dir
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is InternVL3Config
    assert config.vision_feature_layer == -1 and config.ps_version == "v2" and config.force_image_size == 28
    assert config.image_seq_length == 4 and config.max_dynamic_patch == 12 and not config.tie_word_embeddings
    assert config.vision_config.attention_bias is True and config.vision_config.layer_scale_init_value == 0.1
    assert config.vision_config.drop_path_rate == 0.1
    assert config.text_config.rope_parameters["rope_type"] == "dynamic"
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_official_to_plugin_to_official_is_bit_exact(official_dir, tmp_path):
    directory, _ = official_dir
    model = AutoModelForImageTextToText.from_pretrained(directory)
    model.save_pretrained(tmp_path / "plugin")
    plugin = AutoModelForImageTextToText.from_pretrained(tmp_path / "plugin")
    save_official(plugin, tmp_path / "back")

    original = load_file(directory / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    for key in original:
        assert original[key].dtype == back[key].dtype and torch.equal(original[key], back[key]), key

    written = json.loads((tmp_path / "back" / "config.json").read_text())
    expected = json.loads((directory / "config.json").read_text())
    for key in expected.keys() - {"llm_config", "vision_config"}:
        assert written[key] == expected[key], key
    for key in expected["vision_config"]:
        assert written["vision_config"][key] == expected["vision_config"][key], key
    for key in expected["llm_config"].keys() - {"rope_scaling"}:
        assert written["llm_config"][key] == expected["llm_config"][key], key
    assert written["llm_config"]["rope_scaling"]["factor"] == 2.0
    assert written["llm_config"]["rope_scaling"]["type"] == "dynamic"


def test_plugin_config_exports_back_to_an_equivalent_official_config(official_dir):
    directory, _ = official_dir
    config = AutoConfig.from_pretrained(directory)
    again = InternVL3Config.from_dict(official_config_to_plugin(plugin_config_to_official(config)))
    assert again.to_diff_dict() == config.to_diff_dict()


def test_released_official_config_implies_the_internvl3_token_ids(official_dir):
    directory, _ = official_dir
    config = json.loads((directory / "config.json").read_text())
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "eos_token_id"):
        del config[name]
    plugin = InternVL3Config.from_dict(config)
    assert (plugin.image_start_token_id, plugin.image_end_token_id, plugin.image_token_id) == (151665, 151666, 151667)
    assert plugin.eos_token_id == 151645
    exported = plugin_config_to_official(plugin)
    assert not {"image_token_id", "image_start_token_id", "image_end_token_id", "eos_token_id"} & exported.keys()


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
