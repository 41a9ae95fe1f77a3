"""`torch.compile` of InternVL3's repeated blocks: every Qwen2 decoder layer and every InternViT encoder layer.

`compile_blocks(model)` compiles each block in place with `nn.Module.compile` (dynamic shapes by default), so
parameter names, `state_dict`, `save_pretrained` and PEFT adapters are unchanged, and `copy.deepcopy` gives an
uncompiled copy. The YAML recipes turn it on with `training.compile_blocks: true` (see `internvl3_hf.train`).

Measured compilations (torch 2.13, transformers 5.23, `dynamic=True`), training on packed rows of any length as
`InternVL3Trainer` runs them (`use_cache=False`), all parameters trainable:

* LLM decoder layer: 1 compilation for rows of several packed samples (block-diagonal mask), 1 more the first time
  a row holds a single sample (no mask: plain causal attention). All layers share them, whatever their number.
* ViT encoder layer: 1 compilation for micro-batches of several tiles, 1 more the first time a micro-batch holds
  exactly one tile (dynamo specialises sizes 0 and 1). Text-only micro-batches do not run the ViT.

Each further input property guarded on adds its own compilation, e.g. a block input that does not require grad
(frozen embeddings or ViT under LoRA/freezing: first block vs the others), `torch.no_grad` evaluation, padded
multi-row batches, or generation with a KV cache (one per layer: compile blocks for training, not for `generate`).
Both block types run transformers' `GradientCheckpointingLayer.forward` wrapper, one code object, so all their
compilations count together against `torch._dynamo.config.recompile_limit` (default 8); past it dynamo silently
runs the new variants eagerly. Gradient checkpointing works inside the compiled blocks.
"""

from __future__ import annotations

from torch import nn
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

LANGUAGE_BLOCKS = (Qwen2DecoderLayer,)
VISION_BLOCKS = (InternVLVisionLayer,)


def compile_blocks(model: nn.Module, *, language: bool = True, vision: bool = True, **compile_kwargs) -> int:
    """Compile each LLM decoder layer and/or ViT encoder layer in place (`nn.Module.compile`, `dynamic=True` unless
    `compile_kwargs` say otherwise) and return how many blocks were compiled.

    Blocks, not the whole model: the code around them (V2PE positions, packed-sequence masks, image scatter) has
    data-dependent shapes that graph-break and recompile, while every block is one graph with a dynamic length.
    Training on packed rows needs at most 2 compilations per block type for any sequence length and tile count
    (module docstring: what adds more). Works on a `PeftModel` too (blocks are found by type, at any depth).
    """
    kinds = (LANGUAGE_BLOCKS if language else ()) + (VISION_BLOCKS if vision else ())
    if not kinds:
        raise ValueError("compile_blocks: language and vision are both False, nothing to compile.")
    blocks = [module for module in model.modules() if isinstance(module, kinds)]
    if not blocks:
        names = ", ".join(kind.__name__ for kind in kinds)
        raise ValueError(f"compile_blocks found no {names} in {type(model).__name__}: nothing to compile.")
    settings = {"dynamic": True, **compile_kwargs}
    for block in blocks:
        block.compile(**settings)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether `nn.Module.compile` was called on `module` (its `__call__` runs the compiled function)."""
    return getattr(module, "_compiled_call_impl", None) is not None


__all__ = ["compile_blocks", "is_compiled", "LANGUAGE_BLOCKS", "VISION_BLOCKS"]
