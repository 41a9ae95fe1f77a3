"""Load a checkpoint in any supported format and write it in any other (`internvl3-hf convert`)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import cached_file

from ..modeling.configuration_internvl3 import InternVL3Config
from ..modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from ..modeling.processing_internvl3 import InternVL3Processor, processor_for_config
from . import hf, official

FORMATS = ("plugin", "official", "hf")
MODEL_TYPE_TO_FORMAT = {"internvl3": "plugin", "internvl_chat": "official", "internvl": "hf"}


def detect_format(path: str | Path) -> str:
    """`plugin`, `official` or `hf`, from the `model_type` of the checkpoint's config.json (local dir or Hub id)."""
    local = Path(path).expanduser()
    if str(path).startswith(("/", ".", "~")) and not local.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory.")
    config_file = Path(cached_file(str(local) if local.is_dir() else str(path), "config.json"))
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_TYPE_TO_FORMAT:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected one of {sorted(MODEL_TYPE_TO_FORMAT)} "
            "(internvl3-hf plugin, official OpenGVLab InternVL, transformers-native InternVL)."
        )
    return MODEL_TYPE_TO_FORMAT[model_type]


def load_checkpoint(path: str | Path, **from_pretrained_kwargs) -> InternVL3ForConditionalGeneration:
    """Load an InternVL3 checkpoint of any supported format into the plugin's model class."""
    if detect_format(path) == "hf":
        from_pretrained_kwargs.setdefault("config", hf.load_hf_config(path))
    return InternVL3ForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)


def load_processor(path: str | Path, model_config: InternVL3Config) -> InternVL3Processor | None:
    """The plugin processor for a checkpoint of any supported format (`None` if it ships no tokenizer).

    Raises a `ValueError` if its tokenizer puts the image or end-of-turn tokens at other ids than `model_config`
    (which may differ from the checkpoint's config.json, e.g. after overrides)."""
    if not any(
        cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    if detect_format(path) == "hf":
        # transformers' InternVLProcessor needs torchvision; the tiling settings are already in the model config.
        return processor_for_config(AutoTokenizer.from_pretrained(path), model_config)
    processor = InternVL3Processor.from_pretrained(path)
    model_config.check_tokenizer(processor.tokenizer, tokenizer_source=f"the tokenizer of {path}")
    return processor


def save_checkpoint(model, processor, save_directory: str | Path, to: str) -> Path:
    """Write `model` (and `processor`) in format `to`: `plugin` (default `save_pretrained`), `official` or `hf`."""
    if to not in FORMATS:
        raise ValueError(f"Unknown checkpoint format {to!r}; choose one of {FORMATS}.")
    save_directory = Path(save_directory)
    if to == "official":
        return official.save_official(model, save_directory, processor)
    if to == "hf":
        return hf.save_hf(model, save_directory, processor)
    model.save_pretrained(save_directory)
    if processor is not None:
        processor.save_pretrained(save_directory)
    return save_directory


def convert(source: str | Path, destination: str | Path, to: str) -> Path:
    """Read `source` in whatever format it is and write it to `destination` in format `to`, dtype unchanged."""
    model = load_checkpoint(source, dtype="auto")
    processor = load_processor(source, model.config)
    return save_checkpoint(model, processor, destination, to)
