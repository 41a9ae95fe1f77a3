"""The official OpenGVLab format (`model_type: internvl_chat`, `InternVLChatModel` remote code).

Reading: `import internvl3_hf` registers `internvl_chat` with `AutoConfig` (translated into `InternVL3Config`) and
the weight renamings of `keys.OFFICIAL_KEY_TABLE` with transformers' loader, so
`AutoModelForImageTextToText.from_pretrained(official_dir)` works with no conversion step and no remote code.
Writing: `save_official` is the explicit export (fused `attn.qkv`, official key names and `config.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import InternVLVisionConfig, Qwen2Config

from ..modeling.configuration_internvl3 import InternVL3Config
from .serving import warn_if_engines_ignore_v2pe
from .keys import OFFICIAL_KEY_TABLE, OFFICIAL_QKV, PLUGIN_QKV, rename_key

# Token ids an official config.json leaves implicit: every Qwen2-based InternVL3 tokenizer has them, and the official
# chat() looks them up in the tokenizer. An export writes one only when a model differs (e.g. a tiny test model).
IMPLICIT_TOKEN_IDS = {
    "image_token_id": 151667,  # <IMG_CONTEXT>
    "image_start_token_id": 151665,  # <img>
    "image_end_token_id": 151666,  # </img>
    "eos_token_id": 151645,  # <|im_end|>: chat() stops on it
}
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# (official vision_config field, InternVLVisionConfig field)
VISION_FIELDS = [
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("hidden_act", "hidden_act"),
    ("norm_type", "norm_type"),
    ("layer_norm_eps", "layer_norm_eps"),
    ("image_size", "image_size"),
    ("patch_size", "patch_size"),
    ("num_channels", "num_channels"),
    ("qkv_bias", "attention_bias"),
    ("qk_normalization", "use_qk_norm"),
    ("initializer_factor", "layer_scale_init_value"),
    ("initializer_range", "initializer_range"),
    ("attention_dropout", "attention_dropout"),
    ("dropout", "projection_dropout"),
]
# Constructor defaults of the official InternVisionConfig / InternVLChatConfig: a field a config.json leaves out means
# these (released configs write them all; they differ from InternVL3's values).
OFFICIAL_VISION_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}
OFFICIAL_DEFAULTS = {
    "select_layer": -1,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": None,
    "dynamic_image_size": False,
    "use_thumbnail": False,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "system_message": None,
}
# Official vision fields with no InternVLVisionConfig counterpart, kept verbatim so an export restores them.
VISION_PASSTHROUGH = ("drop_path_rate", "use_flash_attn")
# Top-level fields shared verbatim by both configs.
SHARED_FIELDS = (
    "downsample_ratio",
    "force_image_size",
    "ps_version",
    "template",
    "system_message",
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _refuse_unsupported(config_dict: dict) -> None:
    llm = config_dict.get("llm_config") or {}
    architecture = (llm.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if architecture != "Qwen2ForCausalLM":
        raise ValueError(
            f"This official InternVL checkpoint uses a {architecture} language model; internvl3-hf supports the "
            "Qwen2-based InternVL3 models (1B, 2B, 8B, 14B, 38B, 78B). InternVL3-9B (InternLM3) is not supported."
        )
    for flag in ("use_backbone_lora", "use_llm_lora"):
        if config_dict.get(flag):
            raise ValueError(
                f"The official config has {flag}={config_dict[flag]}: its weights carry unmerged LoRA adapters. "
                "Merge them with the official tools (merge_lora.py) and load the merged checkpoint."
            )
    if config_dict.get("pad2square"):
        raise ValueError("pad2square=True (pad images to squares) is not supported; InternVL3 checkpoints use False.")


def official_config_to_plugin(config_dict: dict) -> dict:
    """Keyword arguments of `InternVL3Config` for an official `internvl_chat` config dict."""
    _refuse_unsupported(config_dict)
    config_dict = {**OFFICIAL_DEFAULTS, **config_dict}
    official_vision = {**OFFICIAL_VISION_DEFAULTS, **(config_dict.get("vision_config") or {})}
    vision = {ours: official_vision[theirs] for theirs, ours in VISION_FIELDS if theirs in official_vision}
    vision.update({name: official_vision[name] for name in VISION_PASSTHROUGH if name in official_vision})
    llm = {k: v for k, v in (config_dict.get("llm_config") or {}).items() if k not in ("architectures", "auto_map")}
    llm["model_type"] = "qwen2"
    # Released llm_configs carry the training flag use_cache=false; kept, it would make `generate` recompute the
    # whole sequence at every step (the official chat() overrides it with use_cache=True too).
    llm["use_cache"] = True
    plugin = {name: config_dict[name] for name in SHARED_FIELDS if name in config_dict}
    plugin.update(
        vision_config=InternVLVisionConfig(**vision),
        text_config=Qwen2Config(**llm),
        vision_feature_layer=config_dict["select_layer"],
        tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
    )
    plugin.update({name: config_dict.get(name, default) for name, default in IMPLICIT_TOKEN_IDS.items()})
    force = plugin["force_image_size"] or _first(vision["image_size"])
    patch = _first(vision["patch_size"])
    plugin["force_image_size"] = force
    plugin["image_seq_length"] = round((force // patch) ** 2 * plugin["downsample_ratio"] ** 2)
    if config_dict.get("dtype") or config_dict.get("torch_dtype"):
        plugin["dtype"] = config_dict.get("dtype") or config_dict.get("torch_dtype")
    return plugin


def plugin_config_to_official(config: InternVL3Config) -> dict:
    """The official `config.json` dict for `config` (what `InternVLChatConfig.to_dict` would write)."""
    vision = config.vision_config
    official_vision = {theirs: getattr(vision, ours) for theirs, ours in VISION_FIELDS}
    official_vision["image_size"] = _first(official_vision["image_size"])
    official_vision["patch_size"] = _first(official_vision["patch_size"])
    official_vision.update({name: getattr(vision, name) for name in VISION_PASSTHROUGH if hasattr(vision, name)})
    official_vision.update(architectures=["InternVisionModel"], model_type="intern_vit_6b")

    llm = config.text_config.to_dict()
    for name in ("_name_or_path", "transformers_version", "dtype", "output_hidden_states", "return_dict"):
        llm.pop(name, None)
    rope = dict(llm.pop("rope_parameters", None) or {})
    llm["rope_theta"] = rope.pop("rope_theta", 10000.0)
    llm["rope_scaling"] = ({**rope, "type": rope["rope_type"]} if rope.get("rope_type", "default") != "default" else None)
    llm["architectures"] = ["Qwen2ForCausalLM"]

    official = {name: getattr(config, name) for name in SHARED_FIELDS}
    official.update(
        architectures=["InternVLChatModel"],
        auto_map=dict(OFFICIAL_AUTO_MAP),
        model_type="internvl_chat",
        vision_config=official_vision,
        llm_config=llm,
        select_layer=config.vision_feature_layer,
        pad2square=False,
        use_backbone_lora=0,
        use_llm_lora=0,
        image_fold=None,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_size=config.text_config.hidden_size,
    )
    official.update(
        {name: getattr(config, name) for name, default in IMPLICIT_TOKEN_IDS.items() if getattr(config, name) != default}
    )
    if config.dtype is not None:
        official["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    return official


def plugin_state_dict_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory parameter names → official names, fusing the vision q/k/v projections into `attn.qkv`."""
    official: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if PLUGIN_QKV[1] in key or PLUGIN_QKV[2] in key:
            continue
        if PLUGIN_QKV[0] in key:
            parts = [state_dict[key.replace(PLUGIN_QKV[0], name)] for name in PLUGIN_QKV]
            key, tensor = key.replace(PLUGIN_QKV[0], OFFICIAL_QKV), torch.cat(parts, dim=0)
        official[rename_key(key, OFFICIAL_KEY_TABLE, reverse=True)] = tensor.contiguous()
    return official


def save_official(model, save_directory: str | Path, processor=None, *, max_shard_size: str = "5GB") -> Path:
    """Write `model` (and the processor's tokenizer) in the official OpenGVLab layout."""
    warn_if_engines_ignore_v2pe(model.config)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    state_dict = plugin_state_dict_to_official(model.state_dict())
    if model.config.tie_word_embeddings:
        state_dict.pop("language_model.lm_head.weight", None)
    save_torch_state_dict(state_dict, save_directory, max_shard_size=max_shard_size)
    official = plugin_config_to_official(model.config)
    (save_directory / "config.json").write_text(json.dumps(official, indent=2, ensure_ascii=False) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(save_directory)
    if processor is not None:
        processor.tokenizer.save_pretrained(save_directory)
    return save_directory


class InternVLChatConfig(InternVL3Config):
    """The `internvl_chat` entry of `AutoConfig`: it reads an official config.json as an `InternVL3Config`."""

    model_type = "internvl_chat"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> InternVL3Config:
        return InternVL3Config.from_dict(config_dict, **kwargs)
