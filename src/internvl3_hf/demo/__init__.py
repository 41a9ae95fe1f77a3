"""`internvl3-hf demo`: the whole InternVL3 recipe (native pre-training → SFT → MPO → Best-of-N) on a laptop.

A tiny InternVL3 learns synthetic visual QA (coloured shapes: colour, shape, count, position, and step-by-step
sums of counts) plus text-only arithmetic; after each stage it answers the same held-out questions, and the run
ends with a table, a PNG of the loss curves and accuracies, and a chat with the final model reloaded through the
Auto classes. `run_recipe(output_dir, fast=False)` is the entry point.
"""

from __future__ import annotations

__all__ = ["run_recipe"]


def run_recipe(*args, **kwargs):
    from .recipe import run_recipe as run

    return run(*args, **kwargs)
