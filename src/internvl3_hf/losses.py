"""Text-only LM loss with InternVL's per-sample token weights (`token` 1, `square` 1/√l, `sample` 1/l).

l is a sample's number of supervised target tokens; samples are told apart by integer `position_ids`
restarting at 0 (packed rows) or by rows. The loss is Σ w·CE / W with W the weight total of the whole optimizer
step (all gradient-accumulation micro-batches and all data-parallel ranks), so it does not depend on how the step
is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.encoding import IGNORE_INDEX

WEIGHTINGS = ("token", "square", "sample")


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets `(batch, seq-1)`; a target that starts a new packed sample is ignored."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def target_weights(labels: torch.Tensor, position_ids: torch.Tensor | None, weighting: str) -> torch.Tensor:
    """Float64 weight of every shifted target (0 where ignored)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    targets = shifted_targets(labels, position_ids)
    supervised = targets != IGNORE_INDEX
    if weighting == "token":
        return supervised.double()
    starts = torch.zeros_like(labels, dtype=torch.bool) if position_ids is None else position_ids == 0
    starts[:, 0] = True
    # One id per (row, sample): restarts within a row, and every row starts a new sample.
    segment = torch.cumsum(starts.flatten(), 0).view_as(labels)[:, 1:] - 1
    counts = torch.zeros(int(segment.max()) + 1, dtype=torch.float64, device=labels.device)
    counts.index_add_(0, segment[supervised], torch.ones(int(supervised.sum()), dtype=torch.float64, device=labels.device))
    per_token = counts[segment].clamp(min=1)
    weights = per_token.rsqrt() if weighting == "square" else per_token.reciprocal()
    return torch.where(supervised, weights, torch.zeros_like(weights))


def weighted_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    weighting: str,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Σ w·CE / normalizer (default: this batch's own weight total)."""
    weights = target_weights(labels, position_ids, weighting)
    targets = shifted_targets(labels, position_ids)
    losses = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    total = (losses.double() * weights.flatten()).sum()
    normalizer = weights.sum() if normalizer is None else normalizer
    return (total / normalizer).to(logits.dtype if logits.dtype == torch.float64 else torch.float32)
