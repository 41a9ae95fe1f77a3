"""The transformers-native `-hf` format (`InternVLForConditionalGeneration`, `model_type: internvl`).

Reading: `load_hf_config` turns a native `InternVLConfig` into an `InternVL3Config`; the weights' on-disk names are
renamed by `keys.HF_KEY_TABLE`, registered with transformers' loader, so
`InternVL3ForConditionalGeneration.from_pretrained(hf_dir, config=load_hf_config(hf_dir))` reads them directly.
Writing: `save_hf` hands the weights to transformers' own `InternVLForConditionalGeneration` and lets it save,
so the result is exactly what transformers writes and reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import cached_file

from ..modeling.chat_template import (
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from ..modeling.configuration_internvl3 import InternVL3Config, square_side
from .official import resolve_token_ids
from .serving import warn_if_engines_ignore_v2pe

# Tokenizer attributes transformers' InternVLProcessor reads (`tokenizer.start_image_token`, ...).
HF_TOKENIZER_SPECIAL_TOKENS = {
    "start_image_token": IMAGE_START_TOKEN,
    "end_image_token": IMAGE_END_TOKEN,
    "context_image_token": IMAGE_CONTEXT_TOKEN,
    "video_token": VIDEO_PLACEHOLDER,
}
# Fields both configs share, copied either way; one a native config.json leaves out takes `InternVLConfig`'s default.
SHARED_FIELDS = (
    "image_token_id",
    "image_seq_length",
    "downsample_ratio",
    "projector_hidden_act",
    "vision_feature_layer",
    "tie_word_embeddings",
)
# Native image processor setting → `InternVL3Config` field; one the preprocessor config leaves out keeps the
# plugin default.
PREPROCESSOR_FIELDS = {
    "min_patches": "min_dynamic_patch",
    "max_patches": "max_dynamic_patch",
    "crop_to_patches": "dynamic_image_size",
}


def plugin_config_to_hf(config: InternVL3Config) -> InternVLConfig:
    """The native config with the same architecture (tiling settings live in its image processor)."""
    if config.ps_version != "v2":
        raise ValueError("transformers' native InternVL implements only ps_version='v2'; this model uses 'v1'.")
    text_config = config.text_config.to_dict()
    text_config["eos_token_id"] = config.eos_token_id
    return InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=text_config,
        vision_feature_select_strategy="default",
        dtype=config.dtype,
        **{name: getattr(config, name) for name in SHARED_FIELDS},
    )


def hf_config_to_plugin(config_dict: dict, source: str | Path | None = None, preprocessor: dict | None = None) -> dict:
    """`InternVL3Config` keyword arguments for a native `config.json` dict (and its `preprocessor_config.json`).

    The native config stores only the `<IMG_CONTEXT>` id; `<img>` and `</img>` come from the tokenizer of checkpoint
    `source`, as the native processor takes them.
    """
    if config_dict.get("model_type") != "internvl":
        raise ValueError(f"Expected a transformers InternVL config (model_type 'internvl'), got {config_dict.get('model_type')!r}.")
    if config_dict.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("Only vision_feature_select_strategy='default' (drop the CLS token) matches InternVL3.")
    text_config = dict(config_dict.get("text_config") or {})
    vision_config = config_dict.get("vision_config") or {}
    settings = {name: config_dict.get(name, getattr(InternVLConfig, name)) for name in SHARED_FIELDS}
    settings.update(
        vision_config=vision_config,
        text_config=text_config,
        eos_token_id=text_config.get("eos_token_id", InternVL3Config.eos_token_id),
        force_image_size=square_side(vision_config.get("image_size", InternVLVisionConfig.image_size)),
    )
    settings.update(_image_span_ids(source, settings["image_token_id"]))
    for native, ours in PREPROCESSOR_FIELDS.items():
        if native in (preprocessor or {}):
            settings[ours] = preprocessor[native]
    return settings


def _image_span_ids(source: str | Path | None, image_token_id: int) -> dict[str, int]:
    """`<img>` / `</img>` ids from the checkpoint's tokenizer (official fallback and warning without one), checked
    against the config's `<IMG_CONTEXT>` id."""
    ids = resolve_token_ids(source, {"image_token_id": image_token_id})
    return {field: ids[field] for field in ("image_start_token_id", "image_end_token_id")}


def load_hf_config(path: str | Path) -> InternVL3Config:
    """Read `config.json` (+ `preprocessor_config.json`) of a `-hf` checkpoint into an `InternVL3Config`."""
    config = json.loads(Path(cached_file(str(path), "config.json")).read_text())
    preprocessor_file = cached_file(str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    preprocessor = json.loads(Path(preprocessor_file).read_text()) if preprocessor_file else None
    return InternVL3Config(**hf_config_to_plugin(config, path, preprocessor))


def to_native_model(model) -> InternVLForConditionalGeneration:
    """A native model sharing `model`'s tensors (no copy): in-memory parameter and buffer names are identical by
    design. Non-persistent buffers (the rotary `inv_freq`) are not in the state dict: they are shared by name."""
    with torch.device("meta"):
        native = InternVLForConditionalGeneration(plugin_config_to_hf(model.config))
    native.load_state_dict(model.state_dict(), strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, buffer in list(native.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            native.get_submodule(module_name)._buffers[buffer_name] = buffers[name]
    native.generation_config = model.generation_config
    return native.eval()


def save_hf(model, save_directory: str | Path, processor=None) -> Path:
    """Write `model` (and processor) so that `transformers.InternVLForConditionalGeneration` loads it."""
    warn_if_engines_ignore_v2pe(model.config)
    save_directory = Path(save_directory)
    to_native_model(model).save_pretrained(save_directory)
    if processor is not None:
        save_hf_processor(processor, model.config, save_directory)
    return save_directory


def save_hf_processor(processor, config: InternVL3Config, save_directory: Path) -> None:
    """Write the files `transformers.InternVLProcessor.from_pretrained` reads.

    Written file by file: constructing `InternVLProcessor` itself requires torchvision (its video processor).
    """
    GotOcr2ImageProcessorPil(
        size={"height": config.force_image_size, "width": config.force_image_size},
        crop_to_patches=config.dynamic_image_size,
        min_patches=config.min_dynamic_patch,
        max_patches=config.max_dynamic_patch,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    ).save_pretrained(save_directory)
    processor.tokenizer.save_pretrained(save_directory)
    tokenizer_config_file = save_directory / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    tokenizer_config["extra_special_tokens"] = dict(HF_TOKENIZER_SPECIAL_TOKENS)
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    processor_config = {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}
    (save_directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    (save_directory / "chat_template.jinja").write_text(hf_chat_template(processor.chat_template))


def hf_chat_template(template: str) -> str:
    """The plugin template with the native processor's placeholders (`<IMG_CONTEXT>` per image, `<video>`)."""
    return template.replace(IMAGE_PLACEHOLDER, IMAGE_CONTEXT_TOKEN)
