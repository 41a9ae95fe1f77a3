"""Text-only LM loss with InternVL's per-sample token weights (`token` 1, `square` 1/√l, `sample` 1/l).

l is a sample's number of supervised target tokens; samples are told apart by integer `position_ids`
restarting at 0 (packed rows) or by rows. The loss is Σ w·CE / W with W the weight total of the whole optimizer
step (all gradient-accumulation micro-batches and all data-parallel ranks), so it does not depend on how the step
is split.

The per-target negative log-likelihood comes either from full logits (`weighted_lm_loss`) or from TRL's fused LM
head, which scores only the supervised positions without materialising `(batch, seq, vocab)` logits
(`weighted_nll`, used by `InternVL3Trainer`); both share `target_weights` and the normaliser.
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


def weighted_nll(
    nll: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    weighting: str,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Σ w·nll / normalizer (default: this batch's own weight total), the weights of `target_weights`.

    `nll` is the `(batch, seq-1)` negative log-likelihood of every shifted target: cross-entropy over full logits
    (`weighted_lm_loss`) or `-log_probs` of TRL's fused LM head (`InternVL3Trainer`). Values at ignored targets are
    not read (they get weight 0 and are zeroed, so they may be anything finite or not).
    """
    weights = target_weights(labels, position_ids, weighting)
    if nll.shape != weights.shape:
        raise ValueError(f"nll must hold one value per shifted target {tuple(weights.shape)}, got {tuple(nll.shape)}.")
    per_target = torch.where(weights > 0, nll.double(), torch.zeros((), dtype=torch.float64, device=nll.device))
    total = (per_target * weights).sum()
    normalizer = weights.sum() if normalizer is None else normalizer
    return (total / normalizer).to(nll.dtype if nll.dtype == torch.float64 else torch.float32)


def weighted_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    weighting: str,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Σ w·CE / normalizer (default: this batch's own weight total), from full `(batch, seq, vocab)` logits."""
    targets = shifted_targets(labels, position_ids)
    losses = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    nll = losses.view_as(targets).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return weighted_nll(nll, labels, position_ids, weighting, normalizer)
