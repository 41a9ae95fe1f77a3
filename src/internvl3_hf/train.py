"""SFT / native pre-training from one YAML recipe: model, freezing, LoRA, data, `Trainer`.

`internvl3-hf train --config recipes/tiny_cpu_sft.yaml` (or `accelerate launch -m internvl3_hf.cli train ...`)
calls `run_training`, which a Python user can call the same way with a dict.

Sections: `model` (checkpoint, dtype, attention, V2PE, freezing), `lora`, `data` (sources, lengths, packing,
`loss_weighting`) and `training`: `TrainingArguments` fields plus `fused_lm_head` (default true: the loss goes through
TRL's fused LM head and never materialises `(batch, seq, vocab)` logits; false computes it from full logits) and
`compile_blocks` (default false: true compiles every LLM decoder layer and ViT encoder layer with `torch.compile`,
dynamic shapes; a mapping passes `language`/`vision` flags and `torch.compile` arguments, e.g. `{backend: aot_eager}`
on a machine without a C++ compiler; see `internvl3_hf.compile`. Not `torch_compile`, which compiles the whole model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, TrainingArguments

from .compile import compile_blocks
from .data import SFTCollator, SFTDataset, SupervisedEncoder, mix_sources, read_official_meta, samples_from_hf_dataset
from .data.sources import Sample, Source, read_official_jsonl
from .data.synthetic import synthetic_samples
from .formats.convert import load_checkpoint, load_processor
from .modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from .processing import processor_for_config
from .sft import InternVL3Trainer
from .tiny import build_tiny_tokenizer, tiny_config

logger = logging.getLogger(__name__)

LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_LORA_TARGETS = r".*vision_tower\.encoder\.layer\.\d+\.(attention\.(q|k|v)_proj|attention\.projection_layer|mlp\.fc[12])"
RECIPE_SECTIONS = {"model", "lora", "data", "training"}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """A recipe dict from YAML, with `section.key=value` overrides (values parsed as YAML)."""
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        key, _, value = override.partition("=")
        if not _:
            raise ValueError(f"Override {override!r} must look like section.key=value.")
        *parents, leaf = key.split(".")
        node = recipe
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    unknown = set(recipe) - RECIPE_SECTIONS
    if unknown:
        raise ValueError(f"Unknown recipe sections {sorted(unknown)}; expected {sorted(RECIPE_SECTIONS)}.")
    return recipe


def build_model_and_processor(settings: dict) -> tuple[InternVL3ForConditionalGeneration, Any]:
    """`name_or_path: tiny` builds the embedded tiny model; anything else is a checkpoint in any format."""
    name = settings.get("name_or_path", "tiny")
    overrides = {key: settings[key] for key in ("v2pe_mode", "v2pe_delta") if key in settings}
    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(settings.get("seed", 0))
        model = InternVL3ForConditionalGeneration(tiny_config(tokenizer, **overrides))
        return model, processor_for_config(tokenizer, model.config)
    kwargs = {"dtype": settings.get("dtype", "auto")}
    if settings.get("attn_implementation"):
        kwargs["attn_implementation"] = settings["attn_implementation"]
    if settings.get("quantization") in ("4bit", "8bit"):
        kwargs["quantization_config"] = _bitsandbytes_config(settings["quantization"])
    model = load_checkpoint(name, **kwargs)
    model.config.update(overrides)
    processor = load_processor(name, model.config) or processor_for_config(AutoTokenizer.from_pretrained(name), model.config)
    return model, processor


def _bitsandbytes_config(bits: str):
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def apply_freezing(model: InternVL3ForConditionalGeneration, settings: dict) -> None:
    """Official freeze flags: `freeze_vision` (`freeze_backbone`), `freeze_projector` (`freeze_mlp`),
    `freeze_llm`, and `unfreeze_vision_last_layers` k (train the last k ViT layers of a frozen ViT)."""
    parts = {
        "freeze_vision": [model.model.vision_tower],
        "freeze_projector": [model.model.multi_modal_projector],
        "freeze_llm": [model.model.language_model, model.lm_head],
    }
    for flag, modules in parts.items():
        if settings.get(flag):
            for module in modules:
                module.requires_grad_(False)
    last = int(settings.get("unfreeze_vision_last_layers", 0))
    if last:
        for layer in model.model.vision_tower.encoder.layer[-last:]:
            layer.requires_grad_(True)


def apply_lora(model, settings: dict):
    """PEFT LoRA on the LLM and/or the ViT (official defaults: alpha = 2r, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    target = settings.get("target", "llm")
    patterns = {"llm": [LLM_LORA_TARGETS], "vision": [VISION_LORA_TARGETS], "both": [LLM_LORA_TARGETS, VISION_LORA_TARGETS]}
    if target not in patterns:
        raise ValueError(f"lora.target must be one of {sorted(patterns)}, got {target!r}.")
    rank = int(settings.get("r", 16))
    config = LoraConfig(
        r=rank,
        lora_alpha=int(settings.get("alpha", 2 * rank)),
        lora_dropout=float(settings.get("dropout", 0.05)),
        target_modules="|".join(f"(?:{pattern})" for pattern in patterns[target]),
        modules_to_save=settings.get("modules_to_save"),
    )
    return get_peft_model(model, config)


def build_samples(settings: dict) -> list[Sample]:
    """Every source of the recipe, mixed by `repeat_time`; read errors are logged and counted."""
    return read_recipe_sources(
        settings,
        read_meta=read_official_meta,
        read_jsonl=read_official_jsonl,
        from_hf=lambda dataset, name, source: samples_from_hf_dataset(dataset, name, bool(source.get("data_augment"))),
        synthetic=lambda source: synthetic_samples(int(source.get("count", 8)), int(source.get("seed", 0))),
    )


def read_recipe_sources(
    settings: dict,
    *,
    read_meta: Callable[[str], tuple[list[Source], list[str]]],
    read_jsonl: Callable[[str, str, bool, int | None], tuple[list, list[str]]],
    from_hf: Callable[[Any, str, dict], tuple[list, list[str]]],
    synthetic: Callable[[dict], list],
    noun: str = "records",
) -> list:
    """The recipe `data` section's `sources` (types official_meta, official_jsonl, hf, synthetic), each read by the
    given reader (SFT samples or preference pairs), mixed by `repeat_time`; unreadable records logged and counted."""
    sources, errors = [], []
    for index, source in enumerate(settings.get("sources", [])):
        kind = source.get("type")
        name = source.get("name", f"{kind}[{index}]")
        if kind == "official_meta":
            meta_sources, meta_errors = read_meta(source["path"])
            sources += meta_sources
            errors += meta_errors
            continue
        if kind == "official_jsonl":
            items, source_errors = read_jsonl(
                source["path"], source.get("root", "."), bool(source.get("data_augment")), source.get("max_dynamic_patch")
            )
        elif kind == "hf":
            from datasets import load_dataset, load_from_disk

            path = source["path"]
            dataset = load_from_disk(path) if Path(path).is_dir() else load_dataset(path, split=source.get("split", "train"))
            items, source_errors = from_hf(dataset, name, source)
        elif kind == "synthetic":
            items, source_errors = synthetic(source), []
        else:
            raise ValueError(f"Unknown data source type {kind!r}; use official_meta, official_jsonl, hf or synthetic.")
        sources.append(Source(name, items, float(source.get("repeat_time", 1.0))))
        errors += source_errors
    for error in errors:
        logger.warning("skipped record: %s", error)
    if errors:
        logger.warning("%d %s could not be read", len(errors), noun)
    return mix_sources(sources, int(settings.get("seed", 0)))


def build_trainer(recipe: dict) -> InternVL3Trainer:
    """The configured `InternVL3Trainer` (model, data, collator, arguments) without starting it."""
    model_settings, data_settings = recipe.get("model", {}), recipe.get("data", {})
    model, processor = build_model_and_processor(model_settings)
    apply_freezing(model, model_settings)
    if recipe.get("lora"):
        model = apply_lora(model, recipe["lora"])
    encoder = SupervisedEncoder(processor, data_settings.get("max_length"), data_settings.get("seed", 0))
    packed = data_settings.get("max_packed_tokens") is not None
    dataset = SFTDataset(
        build_samples(data_settings),
        encoder,
        max_packed_tokens=data_settings.get("max_packed_tokens"),
        max_packed_tiles=data_settings.get("max_packed_tiles"),
        on_error=data_settings.get("on_error", "drop"),
    )
    training = {"report_to": [], "remove_unused_columns": False, **recipe.get("training", {})}
    # Not a TrainingArguments field: the loss through TRL's fused LM head, without (batch, seq, vocab) logits.
    fused_lm_head = training.pop("fused_lm_head", True)
    if not isinstance(fused_lm_head, bool):
        raise TypeError(f"training.fused_lm_head must be true or false, got {fused_lm_head!r}.")
    # Not a TrainingArguments field either: torch.compile of each repeated block (torch_compile compiles the whole
    # model, whose data-dependent V2PE/packing code graph-breaks and recompiles).
    apply_compile_blocks(model, training.pop("compile_blocks", False))
    args = TrainingArguments(**training)
    trainer = InternVL3Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id, padding_free=packed),
        processing_class=processor,
        loss_weighting=data_settings.get("loss_weighting", "square"),
        fused_lm_head=fused_lm_head,
    )
    return trainer


def apply_compile_blocks(model, setting) -> None:
    """`training.compile_blocks`: false/null (off), true (`compile_blocks(model)`), or a mapping of its keyword
    arguments (`language`, `vision`, and `torch.compile`'s, e.g. `backend`, `mode`)."""
    if setting is None or setting is False:
        return
    if setting is True:
        setting = {}
    if not isinstance(setting, dict):
        raise TypeError(f"training.compile_blocks must be true, false or a mapping of options, got {setting!r}.")
    count = compile_blocks(model, **setting)
    logger.info("compiled %d blocks with torch.compile", count)


def run_training(recipe: dict, resume_from_checkpoint: str | bool | None = None) -> InternVL3Trainer:
    """Train as the recipe says and save the result (plugin checkpoint, or the LoRA adapter) to `output_dir`."""
    trainer = build_trainer(recipe)
    dropped = trainer.train_dataset.dropped
    if dropped:
        logger.warning("dropped %d samples: %s", sum(dropped.values()), dict(dropped))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer
