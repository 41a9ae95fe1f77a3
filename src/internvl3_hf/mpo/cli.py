"""MPO from one YAML recipe (`internvl3-hf mpo --config recipes/tiny_cpu_mpo.yaml`), like `train` for SFT.

Recipe sections: `model` (as for SFT: `name_or_path`, `dtype`, freeze flags, ...), `lora` (optional: PEFT LoRA, the
reference is then the adapter-disabled base), `data` (`sources`, `seed`, `on_error`) and `training` (every
`MPOConfig` field: `w_p`/`w_q`/`w_g`, `beta`, `reward_shift_update`, `max_length`, and the `TrainingArguments`).
Data source types: `official_meta` (MMPR meta JSON), `official_jsonl` (`path`, `root`), `hf` (`path`, `split`;
TRL or MMPR column layout) and `synthetic` (`count`, `seed`; coloured-square pairs).
"""

from __future__ import annotations

import argparse
import logging

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy imports (TRL, datasets) happen when a command runs, not when the CLI is built
    from .data import PreferencePair
    from .trainer import MPOTrainer

logger = logging.getLogger(__name__)


def build_preference_pairs(settings: dict) -> list[PreferencePair]:
    """Every source of the recipe's `data` section, mixed by `repeat_time`; unreadable records logged."""
    from ..train import read_recipe_sources
    from .data import pairs_from_hf_dataset, read_preference_jsonl, read_preference_meta, synthetic_preference_pairs

    def synthetic(source: dict) -> list[PreferencePair]:
        pairs = synthetic_preference_pairs(int(source.get("count", 8)), int(source.get("seed", 0)))
        if source.get("system"):
            for pair in pairs:
                pair.prompt.insert(0, {"role": "system", "content": str(source["system"])})
        return pairs

    return read_recipe_sources(
        settings,
        read_meta=read_preference_meta,
        read_jsonl=read_preference_jsonl,
        from_hf=lambda dataset, name, source: pairs_from_hf_dataset(dataset, name),
        synthetic=synthetic,
        noun="preference records",
    )


def lora_config(settings: dict):
    """The `LoraConfig` of a recipe's `lora` section (same keys and defaults as for SFT)."""
    from peft import LoraConfig

    from ..train import LLM_LORA_TARGETS, VISION_LORA_TARGETS

    target = settings.get("target", "llm")
    patterns = {"llm": [LLM_LORA_TARGETS], "vision": [VISION_LORA_TARGETS], "both": [LLM_LORA_TARGETS, VISION_LORA_TARGETS]}
    if target not in patterns:
        raise ValueError(f"lora.target must be one of {sorted(patterns)}, got {target!r}.")
    rank = int(settings.get("r", 16))
    return LoraConfig(
        r=rank,
        lora_alpha=int(settings.get("alpha", 2 * rank)),
        lora_dropout=float(settings.get("dropout", 0.05)),
        target_modules="|".join(f"(?:{pattern})" for pattern in patterns[target]),
        modules_to_save=settings.get("modules_to_save"),
    )


def build_mpo_trainer(recipe: dict) -> MPOTrainer:
    """The configured `MPOTrainer` (policy, reference, planned preference data) without starting it."""
    from ..train import apply_freezing, build_model_and_processor
    from .config import MPOConfig
    from .data import PreferenceEncoder, plan_pairs, preference_dataset
    from .trainer import MPOTrainer

    model_settings, data_settings = recipe.get("model", {}), recipe.get("data", {})
    # The arguments first: under ZeRO-3 they make `from_pretrained` shard the weights while loading.
    args = MPOConfig(**{"report_to": [], **recipe.get("training", {})})
    model, processor = build_model_and_processor(model_settings)
    apply_freezing(model, model_settings)
    peft_config = lora_config(recipe["lora"]) if recipe.get("lora") else None
    ref_model = None
    if peft_config is None and model_settings.get("name_or_path", "tiny") != "tiny":
        # Full fine-tuning: a second load of the checkpoint, frozen (the official trainer does the same).
        ref_model, _ = build_model_and_processor(model_settings)
        ref_model.eval().requires_grad_(False)
    encoder = PreferenceEncoder(processor, args.max_length, data_settings.get("seed", 0))
    pairs, dropped = plan_pairs(build_preference_pairs(data_settings), encoder, data_settings.get("on_error", "drop"))
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
    return trainer


def run_mpo(recipe: dict, resume_from_checkpoint: str | bool | None = None) -> MPOTrainer:
    """Train as the recipe says and save the result (checkpoint, or the LoRA adapter) to `output_dir`."""
    trainer = build_mpo_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


def _mpo(args: argparse.Namespace) -> None:
    from ..train import load_recipe

    trainer = run_mpo(load_recipe(args.config, args.set), resume_from_checkpoint=args.resume)
    logs = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    if logs:
        first, last = logs[0], logs[-1]
        print(
            f"trained {trainer.state.global_step} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, reward "
            f"accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, margin "
            f"{first['rewards/margins']:.3f} -> {last['rewards/margins']:.3f}, reward shift {trainer.reward_shift.value:.4f}"
        )
    print(f"saved to {trainer.args.output_dir}")


def add_mpo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `internvl3-hf mpo --config RECIPE [--set section.key=value] [--resume [CHECKPOINT]]`."""
    parser = subparsers.add_parser("mpo", help="MPO preference optimization from a YAML recipe (see recipes/)")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    parser.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the last (or a given) checkpoint")
    parser.set_defaults(func=_mpo)
    return parser
