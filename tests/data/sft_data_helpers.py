"""Helpers and fixtures for the SFT data tests: the tiny processor, solid-colour images, official meta/JSONL files.

Fixtures live here (imported by the test modules) rather than in a second `conftest.py`, so that no test module
can pick up the wrong `conftest` from `sys.modules`.

The tiny config tiles images into 28-px tiles with 4 `<IMG_CONTEXT>` tokens each (up to 12 tiles + a thumbnail).
Images are solid colours so that every tile of `pixel_values` tells which image (or frame) it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest

from internvl3_hf.data import SupervisedEncoder
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import tiny_config

TOKENS_PER_TILE = 4
IGNORE = -100


@pytest.fixture(scope="session")
def processor(tokenizer):
    return processor_for_config(tokenizer, tiny_config(tokenizer))


@pytest.fixture
def encoder(processor):
    return SupervisedEncoder(processor, max_length=None, seed=0)


def span(tiles: int) -> str:
    """Hand-written expansion of one image of `tiles` tiles (independent of the processor's own helper)."""
    return "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>"


def save_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path)
    return path


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Seeded RGB noise (PIL's own `effect_noise` is not seeded)."""
    import torch

    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return PIL.Image.fromarray(pixels.numpy())


def write_official(directory: Path, records: list, name: str = "train", **meta_entry) -> Path:
    """`directory/<name>.jsonl` (records may be dicts or raw strings) and `directory/meta.json`; returns meta path.

    The meta entry uses paths relative to the meta file, as the official configs often do.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [record if isinstance(record, str) else json.dumps(record, ensure_ascii=False) for record in records]
    (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    entry = {"root": ".", "annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1}
    entry.update(meta_entry)
    meta = directory / "meta.json"
    existing = json.loads(meta.read_text()) if meta.exists() else {}
    existing[name] = entry
    meta.write_text(json.dumps(existing), encoding="utf-8")
    return meta


def supervised_runs(tokenizer, encoded) -> list[str]:
    """The decoded text of every maximal run of supervised tokens, in order."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE:
            assert label == token, "a supervised label differs from its input token"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def normalized_colour(processor, colour: tuple[int, int, int]) -> list[float]:
    """What a solid `colour` becomes in `pixel_values` (per channel, after rescale and normalisation)."""
    image_processor = processor.image_processor
    return [
        (value / 255 - mean) / std
        for value, mean, std in zip(colour, image_processor.image_mean, image_processor.image_std)
    ]


def tile_colours(processor, pixel_values, palette: dict) -> list:
    """The palette name of every tile of `pixel_values` (each tile must be one solid palette colour)."""
    import torch

    names = []
    references = {name: torch.tensor(normalized_colour(processor, colour)) for name, colour in palette.items()}
    for tile in pixel_values:
        means = tile.flatten(1).mean(1)
        assert float(tile.flatten(1).std(1).max()) < 0.02, "tile is not a solid colour"
        distances = {name: float((means - ref).abs().max()) for name, ref in references.items()}
        name = min(distances, key=distances.get)
        distance = distances[name]
        assert distance < 0.03, f"tile colour {means.tolist()} matches no palette colour"
        names.append(name)
    return names
