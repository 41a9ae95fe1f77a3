"""pack_samples (token and tile budgets, never splitting, every sample once) and SFTCollator (padded / packed)."""

from __future__ import annotations

import random

import pytest
import torch

from internvl3_hf.data import IGNORE_INDEX, EncodedSample, SFTCollator, pack_samples


def check_packing(lengths, tiles, max_tokens, max_tiles, groups):
    flat = [index for group in groups for index in group]
    assert sorted(flat) == list(range(len(lengths))), "every sample exactly once"
    assert all(group for group in groups)
    for group in groups:
        assert group == sorted(group)
        if len(group) > 1:  # an oversized sample may sit alone; any shared group respects both budgets
            assert sum(lengths[i] for i in group) <= max_tokens
            assert max_tiles is None or sum(tiles[i] for i in group) <= max_tiles
        else:
            (index,) = group
            fits = lengths[index] <= max_tokens and (max_tiles is None or tiles[index] <= max_tiles)
            if not fits:
                continue
            assert sum(lengths[i] for i in group) <= max_tokens


@pytest.mark.parametrize(
    "lengths, tiles, max_tokens, max_tiles, expected",
    [
        ([10, 10, 10, 10], [0, 0, 0, 0], 20, None, [[0, 1], [2, 3]]),
        ([10, 10, 10, 10], [0, 0, 0, 0], 40, None, [[0, 1, 2, 3]]),
        ([10, 10, 10, 10], [2, 2, 2, 2], 40, 4, [[0, 1], [2, 3]]),  # tiles bind before tokens
        ([10, 10, 10, 10], [5, 0, 0, 0], 40, 4, [[0], [1, 2, 3]]),  # a sample over the tile budget sits alone
        ([50, 5, 5], [0, 0, 0], 20, None, [[0], [1, 2]]),  # a sample over the token budget sits alone
        ([12, 8, 7, 3], [0, 0, 0, 0], 15, None, [[0, 3], [1, 2]]),  # best fit decreasing
        ([20], [1], 20, 1, [[0]]),  # exactly at both budgets
        ([], [], 20, None, []),
    ],
)
def test_pack_samples_table(lengths, tiles, max_tokens, max_tiles, expected):
    groups = pack_samples(lengths, tiles, max_tokens, max_tiles)
    assert sorted(groups) == sorted(expected)
    check_packing(lengths, tiles, max_tokens, max_tiles, groups)


@pytest.mark.parametrize("seed", range(5))
def test_pack_samples_random(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(100, 400)]) for _ in range(60)]
    tiles = [rng.choice([0, 0, 1, 3, 7, 13]) for _ in range(60)]
    max_tokens, max_tiles = 512, 16
    groups = pack_samples(lengths, tiles, max_tokens, max_tiles)
    check_packing(lengths, tiles, max_tokens, max_tiles, groups)
    assert len(groups) < len(lengths) / 2  # it actually packs
    assert pack_samples(lengths, tiles, max_tokens, max_tiles) == groups  # deterministic
    # Lower bound: no packing can use fewer rows than the token or tile total needs.
    assert len(groups) >= max(sum(lengths) / max_tokens, sum(tiles) / max_tiles)


# --------------------------------------------------------------------------------------------------- collator
def encoded(length: int, tiles: list[int], first_label: int, seed: int) -> EncodedSample:
    generator = torch.Generator().manual_seed(seed)
    ids = (torch.arange(length) + 100 * seed).tolist()
    labels = [IGNORE_INDEX] * first_label + ids[first_label:]
    pixels = torch.randn((sum(tiles), 3, 28, 28), generator=generator) if tiles else None
    return EncodedSample(ids, labels, tiles, pixels)


@pytest.fixture
def items():
    return [[encoded(5, [2], 3, 1)], [encoded(3, [], 1, 2)], [encoded(4, [1, 3], 2, 3)]]


def test_padded_collation(items):
    batch = SFTCollator(pad_token_id=0)(items)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask", "pixel_values", "image_num_patches"}
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 3, 0]]
    assert batch["input_ids"][1].tolist() == [200, 201, 202, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 201, 202, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["image_num_patches"].tolist() == [2, 1, 3]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0][0].pixel_values, items[2][0].pixel_values]))


def test_padding_free_collation(items):
    batch = SFTCollator(pad_token_id=0, padding_free=True)(items)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 12)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["input_ids"][0].tolist() == [100, 101, 102, 103, 104, 200, 201, 202, 300, 301, 302, 303]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 103, 104, -100, 201, 202, -100, -100, 302, 303]
    assert batch["image_num_patches"].tolist() == [2, 1, 3]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0][0].pixel_values, items[2][0].pixel_values]))


def test_packed_items_need_padding_free(items):
    packed = [[items[0][0], items[1][0]], items[2]]
    with pytest.raises(ValueError, match="padding_free=True"):
        SFTCollator(pad_token_id=0)(packed)
    batch = SFTCollator(pad_token_id=0, padding_free=True)(packed)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]


def test_text_only_batch_has_no_pixels():
    batch = SFTCollator(pad_token_id=0)([[encoded(3, [], 1, 1)]])
    assert "pixel_values" not in batch and "image_num_patches" not in batch
