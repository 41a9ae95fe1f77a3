"""Trainers from recipes: `build_trainer` (SFT / native pre-training) and `build_mpo_trainer` (MPO), side by side.

Each takes a recipe dict (as `load_recipe` returns, or written in Python) or its typed form (`SFTRecipe`,
`MPORecipe`; see `internvl3_hf.recipes` for every section and key), checks it, and returns the configured trainer
without starting it; `run_training` / `run_mpo` also train and save. `internvl3-hf train|mpo --config RECIPE` call
them. Both share the model loading, freezing, LoRA and data-source steps below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, Trainer

from .compile import compile_blocks
from .data import SFTCollator, SFTDataset, SupervisedEncoder, mix_sources, read_official_meta, samples_from_hf_dataset
from .data.sources import Sample, Source, read_official_jsonl
from .data.synthetic import synthetic_samples
from .errors import UserError, require_checkpoint
from .formats.convert import load_checkpoint, load_processor
from .modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from .modeling.processing_internvl3 import processor_for_config
from .recipes import (
    LLM_LORA_TARGETS,
    VISION_LORA_TARGETS,
    DataArgs,
    LoraArgs,
    ModelArgs,
    MPORecipe,
    RecipeError,
    SFTDataArgs,
    SFTRecipe,
    SourceArgs,
    load_recipe,
    lora_config,
    parse_section,
)
from .sft import InternVL3Trainer
from .tiny import build_tiny_tokenizer, tiny_config

if TYPE_CHECKING:  # TRL's DPOTrainer is imported when an MPO trainer is built
    from .mpo.data import PreferencePair
    from .mpo.trainer import MPOTrainer

logger = logging.getLogger(__name__)

__all__ = [
    "LLM_LORA_TARGETS",
    "VISION_LORA_TARGETS",
    "apply_compile_blocks",
    "apply_freezing",
    "apply_lora",
    "build_model_and_processor",
    "build_mpo_trainer",
    "build_preference_pairs",
    "build_samples",
    "build_trainer",
    "load_recipe",
    "read_recipe_sources",
    "run_mpo",
    "run_training",
    "scale_vision_learning_rate",
]


# --------------------------------------------------------------------------------------------------- builders
def build_trainer(
    recipe: Mapping[str, Any] | SFTRecipe,
    *,
    model: InternVL3ForConditionalGeneration | None = None,
    processor: Any = None,
    samples: list[Sample] | None = None,
) -> InternVL3Trainer:
    """The configured `InternVL3Trainer` (model, data, collator, arguments) without starting it.

    From Python, `model` and `processor` (both or neither) replace loading `recipe.model` (its freeze flags and the
    `lora` section still apply), and `samples` replaces reading `data.sources`."""
    recipe = SFTRecipe.from_dict(recipe)
    data, options = recipe.data, recipe.options
    if samples is None:
        check_source_paths(data)
    model, processor = _model_and_processor(recipe.model, model, processor)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora)
    encoder = SupervisedEncoder(processor, data.max_length, data.seed)
    dataset = SFTDataset(
        build_samples(data) if samples is None else samples,
        encoder,
        max_packed_tokens=data.max_packed_tokens,
        max_packed_tiles=data.max_packed_tiles,
        on_error=data.on_error,
    )
    # torch.compile of each repeated block, before the trainer wraps the model (`torch_compile` would compile the
    # whole model, whose data-dependent V2PE/packing code graph-breaks and recompiles).
    apply_compile_blocks(model, options.compile_blocks)
    trainer = InternVL3Trainer(
        model=model,
        args=recipe.training_arguments(),
        train_dataset=dataset,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id, padding_free=data.max_packed_tokens is not None),
        processing_class=processor,
        loss_weighting=data.loss_weighting,
        fused_lm_head=options.fused_lm_head,
    )
    scale_vision_learning_rate(trainer, options.vision_lr_scale)
    return trainer


def build_mpo_trainer(
    recipe: Mapping[str, Any] | MPORecipe,
    *,
    model: InternVL3ForConditionalGeneration | None = None,
    processor: Any = None,
    pairs: list[PreferencePair] | None = None,
) -> MPOTrainer:
    """The configured `MPOTrainer` (policy, reference, planned preference data) without starting it. With `lora`,
    the reference is the adapter-disabled base; without, a frozen second load of the checkpoint (as the official
    trainer), except for the tiny model or a given `model`, which TRL copies.

    From Python, `model` and `processor` (both or neither) replace loading `recipe.model` (its freeze flags and the
    `lora` section still apply), and `pairs` replaces reading `data.sources`."""
    from .mpo.data import PreferenceEncoder, plan_pairs, preference_dataset
    from .mpo.trainer import MPOTrainer

    recipe = MPORecipe.from_dict(recipe)
    if pairs is None:
        check_source_paths(recipe.data)
    # The arguments first: under ZeRO-3 they make `from_pretrained` shard the weights while loading.
    args = recipe.training_arguments()
    given_model = model is not None
    model, processor = _model_and_processor(recipe.model, model, processor)
    peft_config = lora_config(recipe.lora) if recipe.lora is not None else None
    ref_model = None
    if peft_config is None and not given_model and recipe.model.name_or_path != "tiny":
        ref_model, _ = build_model_and_processor(recipe.model)
        ref_model.eval().requires_grad_(False)
    encoder = PreferenceEncoder(processor, args.max_length, recipe.data.seed)
    if pairs is None:
        pairs = build_preference_pairs(recipe.data)
    pairs, dropped = plan_pairs(pairs, encoder, recipe.data.on_error)
    if dropped:
        logger.warning("dropped %d preference pairs: %s", sum(dropped.values()), dict(dropped))
    trainer = MPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=preference_dataset(pairs),
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.dropped = dropped
    scale_vision_learning_rate(trainer, recipe.options.vision_lr_scale)
    return trainer


def run_training(recipe: Mapping[str, Any] | SFTRecipe, resume_from_checkpoint: str | bool | None = None) -> InternVL3Trainer:
    """Train as the recipe says and save the result (plugin checkpoint, or the LoRA adapter) to `output_dir`."""
    trainer = build_trainer(recipe)
    dropped = trainer.train_dataset.dropped
    if dropped:
        logger.warning("dropped %d samples: %s", sum(dropped.values()), dict(dropped))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


def run_mpo(recipe: Mapping[str, Any] | MPORecipe, resume_from_checkpoint: str | bool | None = None) -> MPOTrainer:
    """Train as the recipe says and save the result (checkpoint, or the LoRA adapter) to `output_dir`."""
    trainer = build_mpo_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


# --------------------------------------------------------------------------------------------------- model
def _model_and_processor(settings: ModelArgs, model, processor) -> tuple[InternVL3ForConditionalGeneration, Any]:
    """The given model and processor, or the recipe's loaded; the recipe's freeze flags applied."""
    if (model is None) != (processor is None):
        raise TypeError("Give both `model` and `processor`, or neither (then the recipe's `model` section loads them).")
    if model is None:
        model, processor = build_model_and_processor(settings)
    apply_freezing(model, settings)
    return model, processor


def build_model_and_processor(settings: ModelArgs | Mapping[str, Any]) -> tuple[InternVL3ForConditionalGeneration, Any]:
    """`name_or_path: tiny` builds the embedded tiny model; anything else is a checkpoint in any format."""
    settings = _typed(ModelArgs, settings, "model")
    if settings.name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(settings.seed)
        model = InternVL3ForConditionalGeneration(tiny_config(tokenizer, **settings.config_overrides))
        return model, processor_for_config(tokenizer, model.config)
    name = settings.name_or_path
    require_checkpoint(name, "model.name_or_path")
    kwargs: dict[str, Any] = {"dtype": settings.dtype}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if settings.quantization:
        kwargs["quantization_config"] = _bitsandbytes_config(settings.quantization)
    model = load_checkpoint(name, **kwargs)
    model.config.update(settings.config_overrides)
    processor = load_processor(name, model.config) or processor_for_config(AutoTokenizer.from_pretrained(name), model.config)
    return model, processor


def _bitsandbytes_config(bits: str):
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def apply_freezing(model: InternVL3ForConditionalGeneration, settings: ModelArgs | Mapping[str, Any]) -> None:
    """Official freeze flags: `freeze_vision` (`freeze_backbone`), `freeze_projector` (`freeze_mlp`),
    `freeze_llm`, and `unfreeze_vision_last_layers` k (train the last k ViT layers of a frozen ViT)."""
    settings = _typed(ModelArgs, settings, "model")
    parts = {
        "freeze_vision": [model.model.vision_tower],
        "freeze_projector": [model.model.multi_modal_projector],
        "freeze_llm": [model.model.language_model, model.lm_head],
    }
    for flag, modules in parts.items():
        if getattr(settings, flag):
            for module in modules:
                module.requires_grad_(False)
    last = settings.unfreeze_vision_last_layers
    if last:
        for layer in model.model.vision_tower.encoder.layer[-last:]:
            layer.requires_grad_(True)


def apply_lora(model, settings: LoraArgs | Mapping[str, Any]):
    """PEFT LoRA on the LLM and/or the ViT (`lora_config`: official defaults alpha = 2r, dropout 0.05)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def apply_compile_blocks(model, setting: bool | dict | None) -> None:
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


def scale_vision_learning_rate(trainer: Trainer, scale: float) -> None:
    """Train the vision tower at `scale` × the learning rate (the projector and the LLM at the full rate).

    The trainer keeps its own optimizer (`args.optim`, its weight-decay split and scheduler); the ViT's parameters
    only get param groups of their own, built when the trainer creates the optimizer (after PEFT wrapped the model).
    A slow ViT under a fast projector keeps a randomly initialised or freshly unfrozen ViT from drifting while the
    LLM learns to read it (the stage-1 "MLP warm-up" of LLaVA-style recipes freezes it instead).
    """
    if scale == 1.0:
        return
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise UserError(f"training.vision_lr_scale needs a plain torch optimizer; optim {trainer.args.optim!r} is not one.")
    weight_decay = trainer.args.weight_decay

    def build(model: torch.nn.Module, lr: float, **kwargs) -> torch.optim.Optimizer:
        decayed = set(trainer.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(("vision_tower" in name, name in decayed), []).append(parameter)
        return optimizer_cls(
            [
                {"params": params, "lr": lr * (scale if vision else 1.0), "weight_decay": weight_decay if decay else 0.0}
                for (vision, decay), params in groups.items()
            ],
            lr=lr,
            **kwargs,
        )

    # transformers' optimizer-factory protocol: `create_optimizer` calls `factory()(model, **optimizer_kwargs)`.
    trainer.optimizer_cls_and_kwargs = (lambda: build, optimizer_kwargs)


# --------------------------------------------------------------------------------------------------- data
def check_source_paths(data: DataArgs) -> None:
    """Refuse a local source file that does not exist, before a model is loaded (Hub datasets are not checked)."""
    for index, source in enumerate(data.sources):
        if source.type in ("official_meta", "official_jsonl") and not Path(source.path).is_file():
            raise UserError(f"data.sources.{index}.path: {source.path!r} does not exist (a {source.type} file).")
        if source.type == "official_jsonl" and not Path(source.root).is_dir():
            raise UserError(f"data.sources.{index}.root: {source.root!r} is not a directory.")


def build_samples(settings: SFTDataArgs | Mapping[str, Any]) -> list[Sample]:
    """Every source of the recipe's `data` section, mixed by `repeat_time`; read errors are logged and counted."""
    settings = _typed(SFTDataArgs, settings, "data")

    def synthetic(source: SourceArgs) -> list[Sample]:
        if source.system is not None:
            raise RecipeError("data.sources[].system applies to synthetic MPO pairs only.")
        return synthetic_samples(source.count, source.seed)

    return read_recipe_sources(
        settings,
        read_meta=read_official_meta,
        read_jsonl=read_official_jsonl,
        from_hf=lambda dataset, name, source: samples_from_hf_dataset(dataset, name, source.data_augment),
        synthetic=synthetic,
    )


def build_preference_pairs(settings: DataArgs | Mapping[str, Any]) -> list[PreferencePair]:
    """Every source of an MPO recipe's `data` section, mixed by `repeat_time`; unreadable records logged."""
    from .mpo.data import pairs_from_hf_dataset, read_preference_jsonl, read_preference_meta, synthetic_preference_pairs

    settings = _typed(DataArgs, settings, "data")

    def synthetic(source: SourceArgs) -> list[PreferencePair]:
        pairs = synthetic_preference_pairs(source.count, source.seed)
        if source.system:
            for pair in pairs:
                pair.prompt.insert(0, {"role": "system", "content": source.system})
        return pairs

    return read_recipe_sources(
        settings,
        read_meta=read_preference_meta,
        read_jsonl=read_preference_jsonl,
        from_hf=lambda dataset, name, source: pairs_from_hf_dataset(dataset, name),
        synthetic=synthetic,
        noun="preference records",
    )


def read_recipe_sources(
    settings: DataArgs,
    *,
    read_meta: Callable[[str], tuple[list[Source], list[str]]],
    read_jsonl: Callable[[str, str, bool, int | None], tuple[list, list[str]]],
    from_hf: Callable[[Any, str, SourceArgs], tuple[list, list[str]]],
    synthetic: Callable[[SourceArgs], list],
    noun: str = "records",
) -> list:
    """The `data` section's `sources` (types official_meta, official_jsonl, hf, synthetic), each read by the given
    reader (SFT samples or preference pairs), mixed by `repeat_time`; unreadable records logged and counted."""
    sources, errors = [], []
    for index, source in enumerate(settings.sources):
        name = source.name or f"{source.type}[{index}]"
        if source.type == "official_meta":
            meta_sources, meta_errors = read_meta(source.path)
            sources += meta_sources
            errors += meta_errors
            continue
        if source.type == "official_jsonl":
            items, source_errors = read_jsonl(source.path, source.root, source.data_augment, source.max_dynamic_patch)
        elif source.type == "hf":
            from datasets import load_dataset, load_from_disk

            path = source.path
            dataset = load_from_disk(path) if Path(path).is_dir() else load_dataset(path, split=source.split)
            items, source_errors = from_hf(dataset, name, source)
        else:
            items, source_errors = synthetic(source), []
        sources.append(Source(name, items, source.repeat_time))
        errors += source_errors
    for error in errors:
        logger.warning("skipped record: %s", error)
    if errors:
        logger.warning("%d %s could not be read", len(errors), noun)
    return mix_sources(sources, settings.seed)


def _typed(cls: type, settings: Any, section: str):
    """A section's dataclass, from itself or from its dict (the functions above take either)."""
    return settings if isinstance(settings, cls) else parse_section(cls, settings, section)
