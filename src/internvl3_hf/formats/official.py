"""The official OpenGVLab format (`model_type: internvl_chat`, `InternVLChatModel` remote code).

Reading: `import internvl3_hf` registers `internvl_chat` with `AutoConfig` (translated into `InternVL3Config`) and
the weight renamings of `keys.OFFICIAL_KEY_TABLE` with transformers' loader, so
`AutoModelForImageTextToText.from_pretrained(official_dir)` works with no conversion step and no remote code.
Writing: `save_official` is the explicit export (fused `attn.qkv`, official key names and `config.json`).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, try_to_load_from_cache
from transformers import AutoTokenizer, InternVLVisionConfig, Qwen2Config

from ..modeling.configuration_internvl3 import (
    OFFICIAL_CONFIG_DEFAULTS,
    OFFICIAL_VISION_DEFAULTS,
    TOKEN_ID_FIELDS,
    InternVL3Config,
    square_side,
    tokens_per_tile,
)
from .serving import warn_if_engines_ignore_v2pe
from .keys import OFFICIAL_KEY_TABLE, OFFICIAL_QKV, PLUGIN_QKV, rename_key

logger = logging.getLogger(__name__)

# The released InternVL3 (Qwen2.5) tokenizer's ids: used only for a checkpoint saved without its tokenizer.
QWEN25_TOKEN_IDS = {field: getattr(InternVL3Config, field) for field in TOKEN_ID_FIELDS}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
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
# Official vision fields with no InternVLVisionConfig counterpart, kept verbatim so an export restores them.
VISION_PASSTHROUGH = ("drop_path_rate", "use_flash_attn")
# Top-level fields shared verbatim by both configs.
SHARED_FIELDS = (
    "downsample_ratio",
    "force_image_size",
    "ps_version",
    "template",
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
)
# transformers 5 fields of the exported llm_config that the official stack's Qwen2Config (transformers 4.37) lacks.
LLM_FIELDS_NOT_OFFICIAL = (
    "_name_or_path", "transformers_version", "dtype", "output_hidden_states", "return_dict", "layer_types",
)


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


def tokenizer_token_ids(source: str | Path | None) -> dict[str, int] | None:
    """The ids `TOKEN_ID_FIELDS` get from the tokenizer saved with checkpoint `source`, as the official code takes
    them (`tokenizer.convert_tokens_to_ids`); `None` where it has no tokenizer.

    `source` is a folder or a Hub id; reading a config never downloads, so a Hub checkpoint's tokenizer is read from
    the local cache only.
    """
    folder = _tokenizer_folder(source)
    if folder is None:
        return None
    stamp = tuple((name, path.stat().st_mtime_ns, path.stat().st_size) for name in TOKENIZER_FILES
                  if (path := folder / name).is_file())
    return dict(_token_ids_in_folder(str(folder), stamp))


# Loading a checkpoint reads its config.json several times (AutoConfig, AutoTokenizer, AutoProcessor): the tokenizer
# is built once per folder whose tokenizer files are unchanged (`stamp` only keys the cache).
@functools.lru_cache(maxsize=16)
def _token_ids_in_folder(folder: str, stamp: tuple) -> dict[str, int]:
    # The LLM's config stands in for the checkpoint's: AutoTokenizer would read config.json, i.e. come back here.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=Qwen2Config(), local_files_only=True)
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in TOKEN_ID_FIELDS.items()}
    missing = [TOKEN_ID_FIELDS[field] for field, token_id in ids.items() if token_id in (None, tokenizer.unk_token_id)]
    if missing:
        raise ValueError(
            f"The tokenizer in {folder} has no {', '.join(missing)} token: an InternVL checkpoint's tokenizer holds "
            f"{', '.join(TOKEN_ID_FIELDS.values())} as single tokens. Save the checkpoint's own tokenizer there."
        )
    return ids


def _tokenizer_folder(source: str | Path | None) -> Path | None:
    """The local folder holding checkpoint `source`'s tokenizer files (a Hub id's cached snapshot), or `None`."""
    if source is None:
        return None
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None
    for name in TOKENIZER_FILES:
        cached = try_to_load_from_cache(str(source), name)
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def resolve_token_ids(source: str | Path | None, stored: dict[str, Any] | None = None) -> dict[str, int]:
    """The token ids of an official checkpoint: its tokenizer's, else ids its config.json stores (`stored`, written by
    older exports), else the released Qwen2.5 ones, with a warning."""
    stored = {field: value for field, value in (stored or {}).items() if field in TOKEN_ID_FIELDS}
    from_tokenizer = tokenizer_token_ids(source)
    if from_tokenizer is None:
        fallback = {**QWEN25_TOKEN_IDS, **stored}
        if stored.keys() != QWEN25_TOKEN_IDS.keys():
            logger.warning(
                "%s has no tokenizer beside its config.json (for a Hub checkpoint: in the local cache), so the ids "
                "of %s cannot be read from it; using %s (the "
                "released InternVL3 / Qwen2.5 tokenizer's). Save the checkpoint's tokenizer there if it uses other "
                "ids.",
                source if source is not None else "This official config (no checkpoint folder given)",
                ", ".join(TOKEN_ID_FIELDS.values()),
                fallback,
            )
        return fallback
    disagree = [
        f"{field}={value} but {TOKEN_ID_FIELDS[field]} is {from_tokenizer[field]}"
        for field, value in stored.items()
        if value != from_tokenizer[field]
    ]
    if disagree:
        raise ValueError(
            f"{source}: config.json stores token ids that its tokenizer contradicts ({', '.join(disagree)}). Prompts "
            "hold the tokenizer's ids; remove those fields from config.json or save the checkpoint's own tokenizer."
        )
    return from_tokenizer


def official_config_to_plugin(config_dict: dict, source: str | Path | None = None) -> dict:
    """Keyword arguments of `InternVL3Config` for an official `internvl_chat` config dict.

    `source` is the checkpoint (folder or Hub id) the dict came from: its tokenizer gives the token ids.
    """
    _refuse_unsupported(config_dict)
    config_dict = {**OFFICIAL_CONFIG_DEFAULTS, **config_dict}
    official_vision = {**OFFICIAL_VISION_DEFAULTS, **(config_dict.get("vision_config") or {})}
    vision = {ours: official_vision[theirs] for theirs, ours in VISION_FIELDS if theirs in official_vision}
    vision.update({name: official_vision[name] for name in VISION_PASSTHROUGH if name in official_vision})
    llm = {k: v for k, v in (config_dict.get("llm_config") or {}).items() if k not in ("architectures", "auto_map")}
    llm["model_type"] = "qwen2"
    # Released llm_configs carry the training flag use_cache=false; kept, it would make `generate` recompute the
    # whole sequence at every step (the official chat() overrides it with use_cache=True too).
    llm["use_cache"] = True
    # Released llm_configs carry dynamic rope_scaling x2, which transformers 4.37's Qwen2 (the official stack) ignores.
    rope_scaling = llm.pop("rope_scaling", None)
    plugin = {name: config_dict[name] for name in (*SHARED_FIELDS, "system_message") if name in config_dict}
    plugin.update(
        vision_config=InternVLVisionConfig(**vision),
        text_config=Qwen2Config(**llm),
        vision_feature_layer=config_dict["select_layer"],
        tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
        official_rope_scaling=rope_scaling,
    )
    stored_ids = {field: config_dict[field] for field in TOKEN_ID_FIELDS if field in config_dict}
    plugin.update(resolve_token_ids(source, stored_ids))
    force = plugin["force_image_size"] or square_side(vision["image_size"])
    patch = square_side(vision["patch_size"])
    plugin["force_image_size"] = force
    plugin["image_seq_length"] = tokens_per_tile(force, patch, plugin["downsample_ratio"])
    if config_dict.get("dtype") or config_dict.get("torch_dtype"):
        plugin["dtype"] = config_dict.get("dtype") or config_dict.get("torch_dtype")
    return plugin


def plugin_config_to_official(config: InternVL3Config) -> dict:
    """The official `config.json` dict for `config`: only fields `InternVLChatConfig.to_dict` writes (no token ids,
    which the official code reads from the tokenizer)."""
    vision = config.vision_config
    official_vision = {theirs: getattr(vision, ours) for theirs, ours in VISION_FIELDS}
    official_vision["image_size"] = square_side(official_vision["image_size"])
    official_vision["patch_size"] = square_side(official_vision["patch_size"])
    official_vision.update({name: getattr(vision, name) for name in VISION_PASSTHROUGH if hasattr(vision, name)})
    official_vision.update(architectures=["InternVisionModel"], model_type="intern_vit_6b")

    llm = config.text_config.to_dict()
    if config.text_config.dtype is not None:
        llm["torch_dtype"] = str(config.text_config.dtype).removeprefix("torch.")
    for name in LLM_FIELDS_NOT_OFFICIAL:
        llm.pop(name, None)
    rope = dict(llm.pop("rope_parameters", None) or {})
    llm["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if config.official_rope_scaling is not None:
        llm["rope_scaling"] = config.official_rope_scaling
    elif rope.get("rope_type", "default") != "default":
        llm["rope_scaling"] = {**rope, "type": rope["rope_type"]}
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
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_size=config.text_config.hidden_size,
    )
    # The official model uses `config.system_message` whenever the field exists, so a null one would replace the
    # template's default system message: it is written only when set.
    if config.system_message:
        official["system_message"] = config.system_message
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
    """Write `model` (and the processor's tokenizer) in the official OpenGVLab layout.

    The official config.json has no token-id fields: readers take the ids from the tokenizer saved beside it.
    """
    warn_if_engines_ignore_v2pe(model.config)
    own_ids = {field: getattr(model.config, field) for field in TOKEN_ID_FIELDS}
    if processor is not None:
        model.config.check_tokenizer(processor.tokenizer, tokenizer_source="the processor's tokenizer")
    elif own_ids != QWEN25_TOKEN_IDS:
        logger.warning(
            "Saving an official checkpoint without a tokenizer: the official format keeps the token ids %s only in "
            "the tokenizer, so readers of %s will assume the Qwen2.5 ones %s. Pass the processor to save its "
            "tokenizer.",
            own_ids,
            save_directory,
            QWEN25_TOKEN_IDS,
        )
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
        save_official_tokenizer_files(processor.tokenizer, save_directory)
    return save_directory


def save_official_tokenizer_files(tokenizer, save_directory: Path) -> None:
    """Write the tokenizer files the official stack (transformers 4.37, loading with `use_fast=False`) reads.

    `vocab.json` and `merges.txt`, and no `tokenizer.json`: its `tokenizers` cannot read one written by a newer
    release, and without it transformers (4.37 and 5) builds the fast tokenizer from these two files, as released
    InternVL3 checkpoints ship it.
    `special_tokens_map.json` with `additional_special_tokens`: it does not know transformers 5's
    `extra_special_tokens`, and its `chat()` decodes with `skip_special_tokens`, which skips only declared ones.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.model.save(str(save_directory))
    else:
        tokenizer.save_vocabulary(str(save_directory))
    extra = getattr(tokenizer, "extra_special_tokens", None) or []
    if isinstance(extra, dict):  # named tokens (`{"image_token": ...}`) of multimodal tokenizers
        extra = list(extra.values())
    special = {**tokenizer.special_tokens_map, "additional_special_tokens": list(extra)}
    (save_directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    (save_directory / "tokenizer.json").unlink(missing_ok=True)


class InternVLChatConfig(InternVL3Config):
    """The `internvl_chat` entry of `AutoConfig`: it reads an official config.json as an `InternVL3Config`."""

    model_type = "internvl_chat"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> InternVL3Config:
        return InternVL3Config.from_dict(config_dict, **kwargs)
