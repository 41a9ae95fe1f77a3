# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""V2PE (variable visual position encoding, InternVL3 paper eqs. 2–4) as pure tensor functions.

Text tokens (`<img>` included) advance the position by 1; the m-th `<IMG_CONTEXT>` token of an image whose `<img>`
sits at p0 gets p0 + m·δ; the token after the image (`</img>`) resumes at ceil(last image position) + 1. δ = 1 is
the ordinary encoding.

Positions are built from integers only, in units of 1/`POSITION_UNITS` (δ = stride / 256), so nothing fractional
passes through collators, DeepSpeed's dtype casting or bf16; they become floats only at the very end, in float32
where that is exact (below 2**16) and float64 beyond.
"""

from typing import Any

import torch

POSITION_UNITS = 256  # positions live on a 1/256 grid: an image token with stride s advances by s/256
FLOAT32_EXACT_LIMIT = 2**16  # float32 holds every multiple of 1/256 below this
DEFAULT_DELTAS = tuple(1 / 2**k for k in range(9))  # {1, 1/2, ..., 1/256}


def delta_to_stride(delta: float) -> int:
    """The integer stride (in 1/256 position units) of a visual-token increment δ; δ must be on the 1/256 grid."""
    if not 0 < delta <= 1 or abs(round(delta * POSITION_UNITS) - delta * POSITION_UNITS) > 1e-9:
        raise ValueError(f"V2PE increments δ must be multiples of 1/{POSITION_UNITS} in (0, 1]; got {delta}.")
    return round(delta * POSITION_UNITS)


def image_spans(image_token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the image each token belongs to (row-major image order; -1 for other tokens) and image count.

    An image is a maximal run of `<IMG_CONTEXT>` tokens (its tiles are contiguous between `<img>` and `</img>`).
    """
    previous = torch.nn.functional.pad(image_token_mask[:, :-1], (1, 0), value=False)
    starts = image_token_mask & ~previous
    image_index = torch.cumsum(starts.flatten().long(), 0).view_as(image_token_mask) - 1
    return torch.where(image_token_mask, image_index, -1), starts.sum()


def v2pe_position_units(
    image_token_mask: torch.Tensor,
    image_strides: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    sample_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """V2PE positions in integer units of 1/256, `(batch, seq)` int64; padding gets 0.

    Args:
        image_token_mask: `(batch, seq)` bool, True at `<IMG_CONTEXT>` tokens.
        image_strides: `(num_images,)` int, each image's stride (δ·256), images in row-major order of appearance.
        token_mask: `(batch, seq)`, 1 at real tokens, 0 at padding (left or right); positions skip padding.
        sample_starts: `(batch, seq)` bool, True where a packed sample starts: its positions restart at 0.
    """
    image_index, _ = image_spans(image_token_mask)
    is_image = image_index >= 0
    strides = image_strides.to(image_token_mask.device, torch.long)
    increments = torch.full_like(image_index, POSITION_UNITS)
    if strides.numel():
        increments = torch.where(is_image, strides[image_index.clamp(min=0)], increments)
        corrections = _ceil_corrections(is_image, increments)
        if sample_starts is not None:  # a packed sample cut right after its image must not shift the next one
            corrections = corrections.masked_fill(sample_starts, 0)
        increments = increments + corrections
    if token_mask is not None:
        increments = increments * token_mask.long()
    totals = torch.cumsum(increments, dim=-1)
    if sample_starts is not None:
        # Restart each packed sample: subtract the running total reached just before its first token.
        before_start = torch.where(sample_starts, totals - increments, torch.zeros_like(totals))
        totals = totals - torch.cummax(before_start, dim=-1).values
    positions = totals - POSITION_UNITS
    if token_mask is not None:
        positions = positions * token_mask.long()
    return positions


def _ceil_corrections(is_image: torch.Tensor, increments: torch.Tensor) -> torch.Tensor:
    """Extra units on the token after each image so that it lands on ceil(last image position) + 1."""
    image_units = torch.where(is_image, increments, torch.zeros_like(increments))
    run_total = torch.cumsum(image_units, dim=-1)
    previous_is_image = torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
    first_after_image = previous_is_image & ~is_image
    # Units spent on the image that just ended = running image total here minus the total before that image.
    ends_total = torch.where(first_after_image, run_total, torch.zeros_like(run_total))
    starts = is_image & ~previous_is_image
    before_image = torch.where(starts, run_total - image_units, torch.zeros_like(run_total))
    spent = ends_total - torch.cummax(before_image, dim=-1).values
    return torch.where(first_after_image, (-spent) % POSITION_UNITS, torch.zeros_like(spent))


def units_to_positions(units: torch.Tensor) -> torch.Tensor:
    """Float positions, exact: float32 while every 1/256 step is representable, float64 beyond."""
    largest = int(units.abs().max()) if units.numel() else 0
    dtype = torch.float32 if largest < FLOAT32_EXACT_LIMIT * POSITION_UNITS else torch.float64
    return units.to(dtype) / POSITION_UNITS


def auto_image_strides(
    image_token_mask: torch.Tensor,
    token_mask: torch.Tensor | None,
    candidate_strides: list[int],
    max_position: int,
    sample_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per image, the largest candidate stride whose sample still ends below `max_position` (δ from the context
    length); a sample that fits with none gets the smallest. Every image of a row shares its row's δ."""
    starts = image_token_mask & ~torch.nn.functional.pad(image_token_mask[:, :-1], (1, 0), value=False)
    batch, length = image_token_mask.shape
    # One id per (row, packed sample): each sample is judged on its own positions.
    segment = torch.arange(batch, device=image_token_mask.device)[:, None] * (length + 1)
    if sample_starts is not None:
        segment = segment + torch.cumsum(sample_starts.long(), dim=-1)
    segment = segment.expand(batch, length)
    segment_of_image = segment[starts]
    chosen = torch.full((batch * (length + 1),), min(candidate_strides), dtype=torch.long, device=segment.device)
    for stride in sorted(candidate_strides):
        strides = torch.full_like(segment_of_image, stride)
        units = v2pe_position_units(image_token_mask, strides, token_mask, sample_starts)
        last = torch.zeros_like(chosen).scatter_reduce(0, segment.flatten(), units.flatten(), "amax")
        chosen = torch.where(last < max_position * POSITION_UNITS, stride, chosen)
    return chosen[segment_of_image]


def choose_image_strides(
    config: Any,
    image_token_mask: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    sample_starts: torch.Tensor | None = None,
    training: bool = False,
) -> torch.LongTensor:
    """Each image's stride (δ·256) under `config.v2pe_mode` (an `InternVL3Config`): `"random"` draws in training
    only, `"auto"` fits each sample below `v2pe_max_position`, otherwise `config.v2pe_stride`."""
    device = image_token_mask.device
    num_images = int(image_spans(image_token_mask)[1])
    if config.v2pe_mode == "random" and training:
        choices = torch.tensor(config.v2pe_strides, device=device)
        return choices[torch.randint(len(choices), (num_images,), device=device)]
    if config.v2pe_mode == "auto":
        limit = config.v2pe_max_position or config.text_config.max_position_embeddings
        return auto_image_strides(image_token_mask, token_mask, config.v2pe_strides, limit, sample_starts)
    return torch.full((num_images,), config.v2pe_stride, device=device, dtype=torch.long)


def v2pe_rope_position_ids(
    config: Any,
    image_token_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    image_strides: torch.LongTensor | None = None,
    training: bool = False,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """The rotary positions `(batch, seq)` of sequences that start in this call, and the per-image strides used.

    Padding (a 2-D `attention_mask`'s 0s) is skipped; integer `position_ids` mark packed samples where they are 0
    (positions restart there); `image_strides` (one per image, row-major order) override `config.v2pe_mode`.
    """
    length = image_token_mask.shape[1]
    token_mask = attention_mask[:, -length:] if attention_mask is not None and attention_mask.dim() == 2 else None
    sample_starts = position_ids == 0 if position_ids is not None else None
    if image_strides is None:
        image_strides = choose_image_strides(config, image_token_mask, token_mask, sample_starts, training)
    else:
        num_images = int(image_spans(image_token_mask)[1])
        if image_strides.numel() != num_images:
            raise ValueError(
                f"v2pe_strides holds {image_strides.numel()} strides but input_ids hold {num_images} images "
                "(one stride per image, in order of appearance, row by row)."
            )
        image_strides = image_strides.to(device=image_token_mask.device, dtype=torch.long)
    units = v2pe_position_units(image_token_mask, image_strides, token_mask, sample_starts)
    return units_to_positions(units), image_strides
