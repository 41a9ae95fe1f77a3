"""Turn a `Sample` into model inputs through the plugin's chat template and processor.

Labels cover exactly the assistant answers and their `<|im_end|>` (the official `preprocess_internvl2_5`):
never the system or user turns, the `<|im_start|>assistant\\n` header, the newline after `<|im_end|>`, or images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import jinja2
import PIL.Image
import torch

from ..modeling.chat_template import video_prompt
from ..modeling.image_processing_internvl3 import open_image_file, split_tile_budget
from ..modeling.processing_internvl3 import VIDEO_FRAME_FORMATS, InternVL3Processor
from .sources import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, DataError, Sample

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    image_num_patches: list[int]
    pixel_values: torch.Tensor | None = None  # (tiles, 3, S, S); None when only lengths were planned

    @property
    def num_tiles(self) -> int:
        return sum(self.image_num_patches)


class SupervisedEncoder:
    """Encodes samples for training; `encode(sample, with_pixels=False)` gives the exact length cheaply."""

    def __init__(
        self,
        processor: InternVL3Processor,
        max_length: int | None = None,
        seed: int | None = None,
        video_frame_format: str = "sft",
    ):
        self.processor = processor
        self.max_length = max_length
        self.rng = random.Random(seed)
        self.video_frame_format = video_frame_format

    def encode(self, sample: Sample, with_pixels: bool = True) -> EncodedSample:
        sizes = [self._size(image, sample.origin) for image in sample.images]
        frame_counts = [len(video) for video in sample.videos]
        image_tiles = self._image_tiles(sizes, sample)
        segments = self._segments(sample)
        order: list[tuple[str, int]] = []  # ("image" | "video", index) in the order the spans appear
        input_ids, labels = self._tokenize(segments, image_tiles, frame_counts, order, sample.origin)
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise DataError(
                f"{sample.origin}: {len(input_ids)} tokens exceed max_length={self.max_length}; truncating would cut "
                "its image tokens or answer. Raise max_length, lower max_dynamic_patch, or drop the sample."
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{sample.origin}: no assistant answer to learn from (all labels are masked).")
        # One <img> span per image and per video frame, in text order.
        num_patches = []
        for kind, index in order:
            num_patches += [image_tiles[index]] if kind == "image" else [1] * frame_counts[index]
        encoded = EncodedSample(input_ids, labels, num_patches)
        if with_pixels:
            images = [self._open(image, sample.origin) for image in sample.images]
            frames = [[self._open(frame, sample.origin) for frame in video] for video in sample.videos]
            encoded.pixel_values = self._pixels(images, frames, order, sample)
        return encoded

    @staticmethod
    def _size(image, origin: str) -> tuple[int, int]:
        """(width, height) from the file header only: planning a large dataset must not decode every image."""
        if isinstance(image, PIL.Image.Image):
            return image.size
        try:
            with PIL.Image.open(image) as opened:
                return opened.size
        except FileNotFoundError:
            raise DataError(f"{origin}: image file {image} does not exist.") from None
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise DataError(f"{origin}: image file {image} is not a readable image ({error}).") from None

    def _open(self, image, origin: str) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image
        try:
            return open_image_file(image)
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"{origin}: {error}") from error

    def _tile_budget(self, sample: Sample) -> dict:
        """Official training rule: a sample's images share `max_dynamic_patch` tiles."""
        image_processor = self.processor.image_processor
        max_patches = sample.max_dynamic_patch or image_processor.max_patches
        min_patches, max_patches = split_tile_budget(image_processor.min_patches, max_patches, max(1, len(sample.images)))
        return {"min_patches": min_patches, "max_patches": max_patches}

    def _image_tiles(self, sizes: list[tuple[int, int]], sample: Sample) -> list[int]:
        budget = self._tile_budget(sample)
        return [self.processor.image_processor.get_number_of_image_patches(h, w, budget) for w, h in sizes]

    def _segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, supervised) pieces at the assistant answers."""
        template = self.processor.apply_chat_template
        messages = _flatten_content(sample.messages, sample.origin)
        try:
            text = template(messages, tokenize=False)
        except Exception as error:  # jinja raises for unknown roles/content types: report, don't crash the run
            raise DataError(f"{sample.origin}: the chat template rejected the conversation ({error}).") from error
        segments, cursor = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(template(messages[:index], tokenize=False, add_generation_prompt=True))
            stop = len(template(messages[: index + 1], tokenize=False))
            end = text.find(END_OF_TURN, start, stop)
            if end < 0:
                raise DataError(f"{sample.origin}: assistant turn {index} is empty.")
            end += len(END_OF_TURN)
            segments += [(text[cursor:start], False), (text[start:end], True)]
            cursor = end
        segments.append((text[cursor:], False))
        return [(piece, supervised) for piece, supervised in segments if piece]

    def _tokenize(
        self,
        segments: list[tuple[str, bool]],
        image_tiles: list[int],
        video_frames: list[int],
        order: list[tuple[str, int]],
        origin: str,
    ) -> tuple[list[int], list[int]]:
        images, videos = iter(enumerate(image_tiles)), iter(enumerate(video_frames))
        input_ids, labels = [], []
        for piece, supervised in segments:
            if supervised and (IMAGE_PLACEHOLDER in piece or VIDEO_PLACEHOLDER in piece):
                raise DataError(f"{origin}: an assistant answer holds an {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder.")
            try:
                piece = self._expand(piece, images, videos, order)
            except StopIteration:
                raise DataError(
                    f"{origin}: more {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholders than images "
                    f"({len(image_tiles)}) and videos ({len(video_frames)})."
                ) from None
            ids = self.processor.tokenizer(piece, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        if next(images, None) is not None or next(videos, None) is not None:
            raise DataError(
                f"{origin}: {len(image_tiles)} images and {len(video_frames)} videos but fewer placeholders in the text."
            )
        return input_ids, labels

    def _expand(self, text: str, images, videos, order: list[tuple[str, int]]) -> str:
        """Replace placeholders by their spans, recording which image/video each is."""
        pieces = []
        for index, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                image_index, tiles = next(images)
                order.append(("image", image_index))
                pieces.append(self.processor.image_span(tiles))
            for video_index, video_part in enumerate(part.split(VIDEO_PLACEHOLDER)):
                if video_index:
                    video, num_frames = next(videos)
                    order.append(("video", video))
                    pieces.append(self.processor.video_span(num_frames, self.video_frame_format))
                    if VIDEO_FRAME_FORMATS[self.video_frame_format].drop_newline and video_part.startswith("\n"):
                        video_part = video_part[1:]
                pieces.append(video_part)
        return "".join(pieces)

    def _pixels(self, images, frames, order: list[tuple[str, int]], sample: Sample) -> torch.Tensor | None:
        """All tiles in the order their spans appear in the text."""
        image_processor = self.processor.image_processor
        jpeg_rng = random.Random(self.rng.getrandbits(32)) if sample.data_augment else None
        budget = self._tile_budget(sample)
        tiles = []
        for kind, index in order:
            if kind == "image":
                out = image_processor(images[index], return_tensors="pt", jpeg_rng=jpeg_rng, **budget)
            else:
                out = image_processor.preprocess_frames(frames[index], return_tensors="pt", jpeg_rng=jpeg_rng)
            tiles.append(out["pixel_values"])
        return torch.cat(tiles) if tiles else None


def _flatten_content(messages: list[dict], origin: str) -> list[dict]:
    """String contents, images numbered over the whole conversation (`Image-k:` when it holds several), so that
    rendering a prefix of the conversation gives a prefix of the full rendering."""
    count = sum(
        1 for m in messages if not isinstance(m["content"], str) for item in m["content"] if item.get("type") == "image"
    )
    flat, number = [], 0
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            parts = []
            for item in content:
                kind = item.get("type")
                if kind == "image":
                    number += 1
                    parts.append(f"Image-{number}: {IMAGE_PLACEHOLDER}\n" if count > 1 else f"{IMAGE_PLACEHOLDER}\n")
                elif kind == "video":
                    parts.append(f"{VIDEO_PLACEHOLDER}\n")
                elif kind == "text":
                    parts.append(item.get("text") or "")
                else:
                    raise DataError(f"{origin}: unsupported content type {kind!r}; use text, image or video.")
            content = "".join(parts)
        flat.append({**message, "content": content})
    return flat


class ChatTemplateEncoder:
    """Encodes samples for training through `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`:
    the chat template's `{% generation %}` marks decide the labels, the processor expands the placeholders and
    tiles the images. `encode(sample, with_pixels=False)` gives the exact length from the image headers only.
    """

    def __init__(
        self,
        processor: InternVL3Processor,
        max_length: int | None = None,
        seed: int | None = None,
        video_frame_format: str = "sft",
    ):
        self.processor = processor
        self.max_length = max_length
        self.rng = random.Random(seed)
        self.video_frame_format = video_frame_format

    def encode(self, sample: Sample, with_pixels: bool = True) -> EncodedSample:
        _check_answers(sample)
        _check_placeholder_counts(sample)
        origin = sample.origin
        # Official training rule: a sample's images share its `max_dynamic_patch` tiles.
        kwargs = {"share_tile_budget": True, "video_frame_format": self.video_frame_format}
        if sample.max_dynamic_patch:
            kwargs["max_patches"] = sample.max_dynamic_patch
        sizes = [image_size(image, origin) for image in sample.images]  # headers only: cheap, and fails early
        if with_pixels:
            kwargs["images"] = [open_image(image, origin) for image in sample.images]
            videos = [[open_image(frame, origin) for frame in video] for video in sample.videos]
            if sample.data_augment:
                kwargs["jpeg_seed"] = self.rng.getrandbits(32)
        else:
            kwargs["image_sizes"] = [(height, width) for width, height in sizes]
            kwargs["video_num_frames"] = [len(video) for video in sample.videos]
            videos = [None] * len(sample.videos)
        messages = _with_video_items(sample.messages, videos, origin)
        try:
            out = self.processor.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, processor_kwargs=kwargs
            )
        except jinja2.TemplateError as error:  # unknown roles/content types: report, don't crash the run
            raise DataError(f"{sample.origin}: the chat template rejected the conversation ({error}).") from error
        input_ids = list(out["input_ids"][0])
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, out["assistant_masks"][0])]
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise DataError(
                f"{sample.origin}: {len(input_ids)} tokens exceed max_length={self.max_length}; truncating would cut "
                "its image tokens or answer. Raise max_length, lower max_dynamic_patch, or drop the sample."
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{sample.origin}: no assistant answer to learn from (all labels are masked).")
        num_patches = [int(n) for n in out.get("image_num_patches", [])]
        encoded = EncodedSample(input_ids, labels, num_patches)
        if with_pixels and "pixel_values" in out:
            encoded.pixel_values = torch.from_numpy(out["pixel_values"])
        return encoded


def image_size(image, origin: str) -> tuple[int, int]:
    """(width, height) from the file header only: planning a large dataset must not decode every image."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    try:
        with PIL.Image.open(image) as opened:
            return opened.size
    except FileNotFoundError:
        raise DataError(f"{origin}: image file {image} does not exist.") from None
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise DataError(f"{origin}: image file {image} is not a readable image ({error}).") from None


def open_image(image, origin: str) -> PIL.Image.Image:
    """A sample's image (a path or a PIL image) decoded like the official loader."""
    if isinstance(image, PIL.Image.Image):
        return image
    try:
        return open_image_file(image)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{origin}: {error}") from error


def _content_items(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _check_answers(sample: Sample) -> None:
    """Answers must hold text and no placeholder: labels never cover an image, and an empty answer has nothing to
    mark (the template renders its header only)."""
    for index, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        items = _content_items(message["content"])
        if any(item.get("type") in ("image", "video") for item in items) or any(
            IMAGE_PLACEHOLDER in (item.get("text") or "") or VIDEO_PLACEHOLDER in (item.get("text") or "")
            for item in items
        ):
            raise DataError(
                f"{sample.origin}: an assistant answer holds an {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder."
            )
        if not any(item.get("text") for item in items):
            raise DataError(f"{sample.origin}: assistant turn {index} is empty.")


def _check_placeholder_counts(sample: Sample) -> None:
    """One `<image>` per image and one `<video>` per video (a content item renders as one placeholder)."""
    counts = {IMAGE_PLACEHOLDER: 0, VIDEO_PLACEHOLDER: 0}
    kinds = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
    for message in sample.messages:
        for item in _content_items(message["content"]):
            if item.get("type") in kinds:
                counts[kinds[item["type"]]] += 1
            for placeholder in counts:
                counts[placeholder] += (item.get("text") or "").count(placeholder)
    images, videos = len(sample.images), len(sample.videos)
    if counts[IMAGE_PLACEHOLDER] > images or counts[VIDEO_PLACEHOLDER] > videos:
        raise DataError(
            f"{sample.origin}: more {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholders than images ({images}) "
            f"and videos ({videos})."
        )
    if counts[IMAGE_PLACEHOLDER] < images or counts[VIDEO_PLACEHOLDER] < videos:
        raise DataError(f"{sample.origin}: {images} images and {videos} videos but fewer placeholders in the text.")


def _with_video_items(messages: list[dict], videos: list, origin: str) -> list[dict]:
    """The messages with each video as a content item carrying its frames (where `apply_chat_template` reads
    videos from); a `<video>\\n` written into plain text becomes such an item, which the template renders back as
    the same `<video>\\n`."""
    frames = iter(videos)
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            if VIDEO_PLACEHOLDER not in content:
                converted.append(message)
                continue
            items = []
            for index, text in enumerate(content.split(video_prompt())):
                if VIDEO_PLACEHOLDER in text:
                    raise DataError(
                        f"{origin}: a {VIDEO_PLACEHOLDER} placeholder must end its line ({video_prompt()!r})."
                    )
                if index:
                    items.append({"type": "video"})
                if text:
                    items.append({"type": "text", "text": text})
            content = items
        items = []
        for item in content:
            item = {key: value for key, value in item.items() if value is not None}
            video = next(frames) if item.get("type") == "video" else None
            items.append(item if video is None else {**item, "video": video})
        converted.append({**message, "content": items})
    return converted
