"""Helpers the MPO tests share (imported by the test modules of this folder)."""

from __future__ import annotations

import copy

import torch

# MPOConfig settings that keep a test run on the CPU in float32, without logging integrations.
CPU = {"use_cpu": True, "bf16": False, "report_to": [], "gradient_checkpointing": False}


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with every weight moved by `scale`·N(0, 1): a policy some way from its reference."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model
