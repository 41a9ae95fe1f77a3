"""InternVL3ImageProcessor: official dynamic tiling, normalisation, input types and errors."""

import numpy as np
import pytest
import torch
from PIL import Image

import io
import random

from internvl3_hf.modeling.image_processing_internvl3 import (
    InternVL3ImageProcessor,
    find_tile_grid,
    split_tile_budget,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def reference_tiles(image: Image.Image, grid: tuple[int, int], size: int, use_thumbnail: bool = True) -> np.ndarray:
    """The official transform, written out with PIL + numpy: resize to the grid, crop row-major, thumbnail last."""
    image = image.convert("RGB")
    columns, rows = grid
    canvas = image.resize((size * columns, size * rows))
    tiles = [
        canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(columns)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size)))
    arrays = [(np.asarray(tile, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD for tile in tiles]
    return np.stack(arrays).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("width", "height", "grid", "tiles"),
    [
        (448, 448, (1, 1), 1),
        (1000, 1000, (3, 3), 10),
        (800, 600, (4, 3), 13),
        (1920, 1080, (4, 2), 9),
        (300, 1000, (1, 3), 4),
        (2000, 500, (4, 1), 5),
        (640, 480, (4, 3), 13),  # small images are upscaled onto the grid
    ],
)
def test_worked_examples_max_12(width, height, grid, tiles):
    processor = InternVL3ImageProcessor()
    assert find_tile_grid(width, height, 1, 12, 448) == grid
    assert processor.get_number_of_image_patches(height, width) == tiles


def test_exact_tie_takes_larger_grid_only_for_large_images():
    # w/h = 1.5 is exactly between (1, 1) and (2, 1): the larger grid wins only above half its pixel area.
    assert find_tile_grid(600, 400, 1, 2, 448) == (2, 1)
    assert find_tile_grid(300, 200, 1, 2, 448) == (1, 1)


def test_equal_area_ties_follow_the_official_grid_order():
    # min = max = 4 leaves 4x1, 1x4 and 2x2. For w/h = 2.5, 4x1 and 2x2 tie (|2.5 - 4| = |2.5 - 1|). The official
    # code scans a set sorted by area, i.e. 4x1 before 2x2, so the "later" grid that wins the tie is 2x2
    # (transformers' GotOcr2 scans 2x2 first and picks 4x1).
    assert find_tile_grid(100, 40, 4, 4, 28) == (2, 2)


def test_tile_counts_of_processed_images_match_the_grid():
    processor = InternVL3ImageProcessor(size=28)
    sizes = [(28, 28), (60, 60), (50, 38), (96, 54), (20, 66), (120, 30)]
    out = processor([random_image(w, h) for w, h in sizes])
    expected = [processor.get_number_of_image_patches(h, w) for w, h in sizes]
    assert out["image_num_patches"].tolist() == expected == [1, 10, 13, 9, 4, 5]
    assert out["pixel_values"].shape == (sum(expected), 3, 28, 28)
    assert out["pixel_values"].dtype == np.float32


def test_pixel_values_match_reference_transform():
    # RGBA input: the official `.convert("RGB")` drops alpha rather than compositing it.
    image = random_image(70, 50, mode="RGBA")
    out = InternVL3ImageProcessor(size=28, max_patches=6)(image, return_tensors="pt")
    expected = reference_tiles(image, grid=(3, 2), size=28)  # w/h = 1.4 is closest to 3/2
    assert out["image_num_patches"].tolist() == [7]
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_num_patches"].dtype == torch.int64
    np.testing.assert_allclose(out["pixel_values"].numpy(), expected, atol=1e-6, rtol=0)


def test_numpy_tensor_grayscale_and_path_inputs_equal_pil(tmp_path):
    processor = InternVL3ImageProcessor(size=28, max_patches=4)
    image = random_image(45, 30)
    path = tmp_path / "image.png"
    image.save(path)
    reference = processor(image)["pixel_values"]
    hwc = np.asarray(image)
    for variant in (hwc, hwc.transpose(2, 0, 1), torch.from_numpy(hwc.transpose(2, 0, 1).copy()), path, str(path)):
        np.testing.assert_array_equal(processor(variant)["pixel_values"], reference)
    gray = random_image(45, 30, mode="L")
    np.testing.assert_array_equal(
        processor(np.asarray(gray)[..., None])["pixel_values"], processor(gray.convert("RGB"))["pixel_values"]
    )


def test_min_max_patches_kwargs():
    processor = InternVL3ImageProcessor(size=28)
    square = random_image(84, 84)
    assert processor(square)["image_num_patches"].tolist() == [10]
    assert processor(square, max_patches=4)["image_num_patches"].tolist() == [5]
    # min_patches=2 rules out 1x1: a square image gets 1x2 (|1 - 1/2| < |1 - 2|) plus a thumbnail.
    assert processor(random_image(28, 28), min_patches=2, max_patches=2)["image_num_patches"].tolist() == [3]
    assert InternVL3ImageProcessor(size=28, max_patches=1)(square)["image_num_patches"].tolist() == [1]


def test_thumbnail_and_dynamic_switches():
    image = random_image(84, 56)
    assert InternVL3ImageProcessor(size=28)(image)["image_num_patches"].tolist() == [7]
    assert InternVL3ImageProcessor(size=28, use_thumbnail=False)(image)["image_num_patches"].tolist() == [6]
    single = InternVL3ImageProcessor(size=28, dynamic_image_size=False)(image)
    assert single["image_num_patches"].tolist() == [1]
    np.testing.assert_allclose(single["pixel_values"], reference_tiles(image, (1, 1), 28), atol=1e-6, rtol=0)


def test_split_tile_budget():
    assert split_tile_budget(1, 12, 1) == (1, 12)
    assert split_tile_budget(1, 12, 3) == (1, 4)
    assert split_tile_budget(1, 12, 20) == (1, 1)
    assert split_tile_budget(4, 12, 6) == (2, 2)


def test_video_frames_are_one_tile_each():
    processor = InternVL3ImageProcessor(size=28)
    frames = [random_image(90, 40, seed=i) for i in range(3)]
    out = processor.preprocess_frames(frames, max_patches=12)
    assert out["image_num_patches"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(out["pixel_values"][1:2], reference_tiles(frames[1], (1, 1), 28), atol=1e-6, rtol=0)


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    processor = InternVL3ImageProcessor(size=28)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not a png" * 10)
    with pytest.raises(ValueError, match=r"Could not decode the image file .*corrupt\.png.*UnidentifiedImageError"):
        processor(corrupt)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="Unsupported image of type int"):
        processor([3])


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="min_patches <= max_patches"):
        InternVL3ImageProcessor(min_patches=5, max_patches=2)
    with pytest.raises(ValueError, match="square"):
        InternVL3ImageProcessor(size={"height": 28, "width": 56})
    with pytest.raises(ValueError, match="min_patches <= max_patches"):
        InternVL3ImageProcessor(size=28)(random_image(28, 28), max_patches=0)


def test_save_and_load_round_trip(tmp_path):
    processor = InternVL3ImageProcessor(size=28, min_patches=2, max_patches=5, use_thumbnail=False)
    processor.save_pretrained(tmp_path)
    loaded = InternVL3ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_image(70, 30)
    np.testing.assert_array_equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


class RecordingRandom(random.Random):
    """A seeded generator that records every JPEG quality it draws."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.qualities = []

    def randint(self, low: int, high: int) -> int:
        value = super().randint(low, high)
        self.qualities.append((low, high, value))
        return value


def test_jpeg_augmentation_draws_one_quality_per_tile_thumbnail_included():
    """Official `build_transform(is_train=True)` runs on every tile: each tile (and the thumbnail) gets its own
    JPEG quality in 75..100, applied to the 8-bit tile before normalisation."""
    image = random_image(70, 50)
    rng = RecordingRandom(seed=3)
    out = InternVL3ImageProcessor(size=28, max_patches=6)(image, jpeg_rng=rng)
    assert out["image_num_patches"].tolist() == [7]  # 3x2 grid + thumbnail
    assert len(rng.qualities) == 7 and all((low, high) == (75, 100) for low, high, _ in rng.qualities)
    qualities = [quality for *_, quality in rng.qualities]
    assert len(set(qualities)) > 1

    # Written out with PIL: the reference tiles, each saved as a JPEG of its own quality and decoded again.
    clean = reference_tiles(image, grid=(3, 2), size=28)
    pil_tiles = [
        Image.fromarray(np.round((tile.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(np.uint8))
        for tile in clean
    ]
    expected = []
    for tile, quality in zip(pil_tiles, qualities):
        buffer = io.BytesIO()
        tile.save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
        expected.append(((decoded / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    np.testing.assert_allclose(out["pixel_values"], np.stack(expected), atol=1e-6, rtol=0)

    # The same seed gives the same tiles; no generator leaves the tiles untouched.
    again = InternVL3ImageProcessor(size=28, max_patches=6)(image, jpeg_rng=random.Random(3))
    np.testing.assert_array_equal(again["pixel_values"], out["pixel_values"])
    np.testing.assert_allclose(InternVL3ImageProcessor(size=28, max_patches=6)(image)["pixel_values"], clean, atol=1e-6)


def test_jpeg_augmentation_of_video_frames_draws_per_frame():
    rng = RecordingRandom(seed=0)
    frames = [random_image(40, 30, seed=i) for i in range(4)]
    out = InternVL3ImageProcessor(size=28).preprocess_frames(frames, jpeg_rng=rng)
    assert out["pixel_values"].shape[0] == 4 and len(rng.qualities) == 4


def test_jpeg_generator_is_not_saved(tmp_path):
    processor = InternVL3ImageProcessor(size=28)
    processor(random_image(28, 28), jpeg_rng=random.Random(0))
    assert "jpeg_rng" not in processor.to_dict()
