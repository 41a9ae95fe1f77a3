"""`internvl3-hf mpo --config recipes/tiny_cpu_mpo.yaml`: MPO from one YAML recipe, like `train` for SFT.

The command is a thin face over `internvl3_hf.train.run_mpo` (the recipe sections and keys: `internvl3_hf.recipes`,
`MPORecipe`).
"""

from __future__ import annotations

import argparse

__all__ = ["add_mpo_parser"]


def _mpo(args: argparse.Namespace) -> None:
    # Imported here, so that building the command line does not import torch and TRL.
    from ..recipes import load_recipe
    from ..train import run_mpo

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
