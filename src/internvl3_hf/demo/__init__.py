"""`internvl3-hf demo`: the whole InternVL3 recipe (native pre-training → SFT → MPO → Best-of-N) on a laptop.

A tiny InternVL3 learns synthetic visual QA (coloured shapes: perception questions, and reasoning in two or three
arithmetic steps over the counts of colours, from an imperfect annotator's step-by-step solutions) plus text-only
arithmetic; each stage is a recipe under `recipes/demo/` built by `internvl3_hf.train`. After each stage it answers
the same held-out questions, and the run ends with a table (95 % intervals, paired differences between stages), a
PNG of the loss curves and accuracies, and a chat with the final model reloaded through the Auto classes.
`run_recipe(output_dir, fast=False, seed=0)` is the entry point.
"""

from __future__ import annotations

__all__ = ["run_recipe"]


def run_recipe(*args, **kwargs):
    from .recipe import run_recipe as run

    return run(*args, **kwargs)
