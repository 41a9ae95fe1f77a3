"""Multimodal packing: group samples into rows of at most `max_tokens` tokens and `max_tiles` image tiles."""

from __future__ import annotations


def pack_samples(lengths: list[int], tiles: list[int], max_tokens: int, max_tiles: int | None = None) -> list[list[int]]:
    """Best-fit-decreasing groups of sample indices; a sample (and so an image) is never split.

    Each group's total length is at most `max_tokens` and its total tiles at most `max_tiles`. A sample larger
    than a budget on its own gets a group of its own (the caller's length filter decides whether it exists).
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    groups: list[list[int]] = []
    free_tokens: list[int] = []
    free_tiles: list[float] = []
    tile_budget = float("inf") if max_tiles is None else max_tiles
    for index in order:
        best = None
        for group, (room, tile_room) in enumerate(zip(free_tokens, free_tiles)):
            fits = lengths[index] <= room and tiles[index] <= tile_room
            if fits and (best is None or room < free_tokens[best]):
                best = group
        if best is None:
            groups.append([])
            free_tokens.append(max_tokens)
            free_tiles.append(tile_budget)
            best = len(groups) - 1
        groups[best].append(index)
        free_tokens[best] -= lengths[index]
        free_tiles[best] -= tiles[index]
    return [sorted(group) for group in groups]
