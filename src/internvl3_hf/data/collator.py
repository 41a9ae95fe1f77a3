"""Batches of encoded samples: right-padded rows, or one padding-free packed row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoding import IGNORE_INDEX, EncodedSample


def image_tiles(items: Sequence) -> dict[str, torch.Tensor]:
    """`pixel_values` (the items' tiles, concatenated in order) and `image_num_patches` (tiles per image, in the
    same order) of encoded items that carry them (`EncodedSample`, `EncodedPair`); empty when none has an image."""
    tiles = [item.pixel_values for item in items if item.pixel_values is not None]
    if not tiles:
        return {}
    return {
        "pixel_values": torch.cat(tiles),
        "image_num_patches": torch.tensor([n for item in items for n in item.image_num_patches]),
    }


class SFTCollator:
    """Collate `SFTDataset` items.

    `padding_free=True` (packing) concatenates every sample of the micro-batch into one row with no attention mask
    and per-sample `position_ids` restarting at 0: transformers then isolates the samples (block-diagonal masks for
    eager/sdpa/flex, varlen kernels for FlashAttention) and V2PE restarts per sample. Otherwise each item is one
    sample on its own right-padded row with an attention mask.
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, items: list[list[EncodedSample]]) -> dict[str, torch.Tensor]:
        samples = [sample for item in items for sample in item]
        rows = [samples] if self.padding_free else [[sample] for sample in samples]
        if not self.padding_free and any(len(item) > 1 for item in items):
            raise ValueError("Packed dataset items need SFTCollator(padding_free=True).")
        return {**self._rows(rows), **image_tiles(samples)}

    def _rows(self, rows: list[list[EncodedSample]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(sample.input_ids) for sample in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, samples in enumerate(rows):
            cursor = 0
            for sample in samples:
                length = len(sample.input_ids)
                input_ids[row, cursor : cursor + length] = torch.tensor(sample.input_ids)
                labels[row, cursor : cursor + length] = torch.tensor(sample.labels)
                position_ids[row, cursor : cursor + length] = torch.arange(length)
                attention_mask[row, cursor : cursor + length] = 1
                cursor += length
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not self.padding_free:
            batch["attention_mask"] = attention_mask
        return batch
