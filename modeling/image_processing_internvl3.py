# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""Image processor of InternVL3: the official dynamic tiling (`dynamic_preprocess`) on the PIL/numpy backend.

Self-contained (PIL, numpy, transformers only; no torchvision): copied into checkpoints for `trust_remote_code`.
"""

import io
import os
import random
from functools import lru_cache

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
    is_valid_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_tensor

# Errors Pillow raises for unreadable files: OSError (UnidentifiedImageError, truncated data), SyntaxError (broken
# PNG chunks), ValueError (bad header fields) and DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
# Official `data_augment`: `build_transform(is_train=True)` picks one of the JPEG qualities 75..100 per tile.
JPEG_QUALITY_RANGE = (75, 100)


class InternVL3ImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    min_patches (`int`, *optional*, defaults to `self.min_patches`):
        Fewest tiles an image is cut into (official `min_dynamic_patch`); the thumbnail is extra.
    max_patches (`int`, *optional*, defaults to `self.max_patches`):
        Most tiles an image is cut into (official `max_dynamic_patch`); the thumbnail is extra.
    use_thumbnail (`bool`, *optional*, defaults to `self.use_thumbnail`):
        Append a whole-image thumbnail tile, last, when an image gives more than one tile.
    dynamic_image_size (`bool`, *optional*, defaults to `self.dynamic_image_size`):
        Tile dynamically; `False` resizes every image to a single tile.
    jpeg_rng (`random.Random`, *optional*):
        Training augmentation (official `data_augment`): every tile, thumbnail included, is re-encoded as a JPEG
        with its own quality drawn from this generator (uniform over 75..100, one draw per tile in tile order)
        before rescaling. `None` (the default) leaves the tiles untouched.
    """

    min_patches: int
    max_patches: int
    use_thumbnail: bool
    dynamic_image_size: bool
    jpeg_rng: random.Random | None


@lru_cache(maxsize=64)
def candidate_grids(min_patches: int, max_patches: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) grids with `min_patches <= columns * rows <= max_patches`, in the official order.

    The official code sorts a *set* by area; grids of equal area keep the set's iteration order, which decides
    exact ties in `find_tile_grid`. Building the same set the same way reproduces that order.
    """
    grids = {
        (columns, rows)
        for n in range(min_patches, max_patches + 1)
        for columns in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_patches <= columns * rows <= max_patches
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def find_tile_grid(width: int, height: int, min_patches: int, max_patches: int, tile_size: int) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to `width / height` (`find_closest_aspect_ratio`).

    On an exact tie the later (larger) grid wins only if the image has more than half the grid's pixels, so small
    images are not blown up onto many tiles.
    """
    aspect_ratio = width / height
    best_diff, best_grid = float("inf"), (1, 1)
    for columns, rows in candidate_grids(min_patches, max_patches):
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best_grid = diff, (columns, rows)
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * columns * rows:
            best_grid = (columns, rows)
    return best_grid


def split_tile_budget(min_patches: int, max_patches: int, num_images: int) -> tuple[int, int]:
    """(min_patches, max_patches) for each of `num_images` images sharing one sample.

    Official multi-image rule: each image gets `max(1, max_patches // num_images)` tiles at most. `min_patches` is
    lowered to that budget when it would exceed it, so the budget always wins.
    """
    per_image = max(1, max_patches // num_images)
    return min(min_patches, per_image), per_image


def open_image_file(path: str | os.PathLike) -> PIL.Image.Image:
    """Decode an image file to RGB exactly like the official loader (`Image.open(path).convert("RGB")`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Image file {os.fspath(path)!r} does not exist. Pass an existing local image path (URLs are not "
            "fetched), a PIL image, a numpy array or a torch tensor."
        )
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"Could not decode the image file {os.fspath(path)!r}: {type(error).__name__}: {error}. Make sure it is "
            "a complete image in a format Pillow reads (PNG, JPEG, WebP, ...); re-encode or drop it."
        ) from error


def jpeg_round_trip(tile: np.ndarray, quality: int) -> np.ndarray:
    """A `(3, H, W)` uint8 tile after saving it as a JPEG of `quality` and decoding it again."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(tile.transpose(1, 2, 0))).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB")).transpose(2, 0, 1)


def to_rgb_pil(image: ImageInput, input_data_format: str | ChannelDimension | None = None) -> PIL.Image.Image:
    """A PIL image, numpy array or torch tensor as an RGB PIL image.

    The conversion is PIL's `.convert("RGB")`, as in the official loader: alpha is dropped (not composited on
    white, which transformers' own `convert_to_rgb` does) and grayscale is replicated.
    """
    if not isinstance(image, PIL.Image.Image):
        array = image.numpy(force=True) if is_torch_tensor(image) else np.asarray(image)
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
        image = to_pil_image(array, input_data_format=input_data_format)
    return image.convert("RGB")


class InternVL3ImageProcessor(PilBackend):
    r"""
    InternVL3 image processor (PIL/numpy; works without torchvision).

    Each image is cut into `columns x rows` tiles of `size` pixels following the official `dynamic_preprocess`: the
    grid with the closest aspect ratio among those with `min_patches..max_patches` tiles, the whole image resized
    to the grid (PIL bicubic), tiles cropped row-major, then a whole-image thumbnail last when there is more than
    one tile. Tiles are scaled to [0, 1] and normalised with the ImageNet mean and std.

    Returns `pixel_values` `(total_tiles, 3, size, size)` float32 and `image_num_patches` (tiles per image).
    """

    valid_kwargs = InternVL3ImageProcessorKwargs
    model_input_names = ["pixel_values", "image_num_patches"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 448, "width": 448}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    min_patches = 1
    max_patches = 12
    use_thumbnail = True
    dynamic_image_size = True
    jpeg_rng = None

    def __init__(self, **kwargs: Unpack[InternVL3ImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._validate_tiling(self.size, self.min_patches, self.max_patches)

    @staticmethod
    def _validate_tiling(size: SizeDict, min_patches: int, max_patches: int) -> None:
        if size.height != size.width:
            raise ValueError(
                f"InternVL3 tiles are square but size={dict(size)}; pass one side, e.g. size=448 (force_image_size)."
            )
        if not 1 <= min_patches <= max_patches:
            raise ValueError(
                f"InternVL3ImageProcessor needs 1 <= min_patches <= max_patches, got min_patches={min_patches} and "
                f"max_patches={max_patches}."
            )

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        if not kwargs["do_resize"]:
            raise ValueError("InternVL3 always resizes images onto its tile grid; do_resize=False is not supported.")
        self._validate_tiling(kwargs["size"], kwargs["min_patches"], kwargs["max_patches"])

    def fetch_images(self, image_url_or_urls: ImageInput | str | os.PathLike | list) -> ImageInput:
        """Open file paths (str or `os.PathLike`) like the official loader; images pass through unchanged."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return open_image_file(image_url_or_urls)
        if not is_valid_image(image_url_or_urls):
            raise TypeError(
                f"Unsupported image of type {type(image_url_or_urls).__name__}: pass PIL images, numpy arrays, "
                "torch tensors or image file paths."
            )
        return image_url_or_urls

    def process_image(
        self, image: ImageInput, input_data_format: str | ChannelDimension | None = None, **kwargs
    ) -> np.ndarray:
        """One input image as a `(3, height, width)` uint8 RGB array (the backend's working format)."""
        return np.array(to_rgb_pil(image, input_data_format)).transpose(2, 0, 1)

    def tile_image(
        self,
        image: np.ndarray,
        tile_size: int,
        min_patches: int,
        max_patches: int,
        use_thumbnail: bool,
        dynamic_image_size: bool,
        resample: PILImageResampling,
    ) -> list[np.ndarray]:
        """Cut a `(3, H, W)` uint8 image into its tiles (row-major, thumbnail last), still uint8."""
        height, width = image.shape[-2:]
        columns, rows = (
            find_tile_grid(width, height, min_patches, max_patches, tile_size) if dynamic_image_size else (1, 1)
        )
        canvas = self.resize(image, SizeDict(height=tile_size * rows, width=tile_size * columns), resample=resample)
        tiles = [
            canvas[:, row * tile_size : (row + 1) * tile_size, column * tile_size : (column + 1) * tile_size]
            for row in range(rows)
            for column in range(columns)
        ]
        if use_thumbnail and len(tiles) > 1:
            tiles.append(self.resize(image, SizeDict(height=tile_size, width=tile_size), resample=resample))
        return tiles

    def _preprocess(
        self,
        images: list[np.ndarray],
        size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        return_tensors: str | TensorType | None,
        min_patches: int,
        max_patches: int,
        use_thumbnail: bool,
        dynamic_image_size: bool,
        jpeg_rng: random.Random | None = None,
        **kwargs,
    ) -> BatchFeature:
        pixel_values, image_num_patches = [], []
        for image in images:
            tiles = self.tile_image(
                image, size.height, min_patches, max_patches, use_thumbnail, dynamic_image_size, resample
            )
            image_num_patches.append(len(tiles))
            for tile in tiles:
                if jpeg_rng is not None:
                    tile = jpeg_round_trip(tile, jpeg_rng.randint(*JPEG_QUALITY_RANGE))
                if do_rescale:
                    tile = self.rescale(tile, rescale_factor)
                if do_normalize:
                    tile = self.normalize(tile, image_mean, image_std)
                pixel_values.append(tile)
        data = {
            "pixel_values": np.stack(pixel_values).astype(np.float32, copy=False),
            "image_num_patches": np.array(image_num_patches, dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_frames(self, frames: ImageInput, **kwargs: Unpack[InternVL3ImageProcessorKwargs]) -> BatchFeature:
        """Video frames: one tile each and no thumbnail (official `load_video` uses `dynamic_preprocess(max_num=1)`)."""
        return self(frames, **{**kwargs, "min_patches": 1, "max_patches": 1})

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles (thumbnail included) an image of this size gives, without processing it."""
        settings = {name: getattr(self, name) for name in self._valid_kwargs_names}
        settings.update({name: value for name, value in (images_kwargs or {}).items() if value is not None})
        settings = self._standardize_kwargs(**settings)
        if not settings["dynamic_image_size"]:
            return 1
        columns, rows = find_tile_grid(
            width, height, settings["min_patches"], settings["max_patches"], settings["size"].height
        )
        thumbnail = settings["use_thumbnail"] and columns * rows > 1
        return columns * rows + int(thumbnail)


# Saved processors carry this code (auto_map), so AutoProcessor loads them where the package is absent.
InternVL3ImageProcessor.register_for_auto_class()

__all__ = ["InternVL3ImageProcessor", "find_tile_grid", "jpeg_round_trip", "split_tile_budget"]
