"""Turn a `Sample` into model inputs: `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`.

The processor is the one inference uses: its chat template renders the conversation and marks each assistant
answer with `{% generation %}`, and it expands the image and video placeholders and tiles the images. Labels are
the marked tokens: exactly the assistant answers and their `<|im_end|>` (the official `preprocess_internvl2_5`),
never the system or user turns, the `<|im_start|>assistant\\n` header, the newline after `<|im_end|>`, or images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import jinja2
import PIL.Image
import torch

from ..modeling.chat_template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, video_prompt
from ..modeling.image_processing_internvl3 import open_image_file
from ..modeling.processing_internvl3 import InternVL3Processor
from .errors import DataError, DataErrorReason
from .sources import Sample

IGNORE_INDEX = -100


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
    """Encodes samples for training; `encode(sample, with_pixels=False)` gives the exact length from the image
    headers only (nothing is decoded).

    `video_frame_format` labels video frames as the official path the data follows (`"sft"` for fine-tuning data,
    `"mpo"` for preference data; see `VIDEO_FRAME_FORMATS`). With `sample.data_augment`, every tile is JPEG
    re-encoded at its own quality, drawn from this encoder's generator (`seed`).
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
        sizes = [image_size(image, origin) for image in sample.images]  # headers first: the same errors either way
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
            raise DataError(
                f"{sample.origin}: the chat template rejected the conversation ({error}).",
                DataErrorReason.TEMPLATE_REJECTED,
            ) from error
        input_ids = list(out["input_ids"][0])
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, out["assistant_masks"][0])]
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise DataError(
                f"{sample.origin}: {len(input_ids)} tokens exceed max_length={self.max_length}; truncating would cut "
                "its image tokens or answer. Raise max_length, lower max_dynamic_patch, or drop the sample.",
                DataErrorReason.TOO_LONG,
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"{sample.origin}: no assistant answer to learn from (all labels are masked).",
                DataErrorReason.NOTHING_TO_LEARN,
            )
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
        raise DataError(f"{origin}: image file {image} does not exist.", DataErrorReason.MISSING_IMAGE) from None
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise DataError(
            f"{origin}: image file {image} is not a readable image ({error}).", DataErrorReason.CORRUPT_IMAGE
        ) from None


def open_image(image, origin: str) -> PIL.Image.Image:
    """A sample's image (a path or a PIL image) decoded like the official loader."""
    if isinstance(image, PIL.Image.Image):
        return image
    try:
        return open_image_file(image)
    except (FileNotFoundError, ValueError) as error:
        missing = isinstance(error, FileNotFoundError)
        reason = DataErrorReason.MISSING_IMAGE if missing else DataErrorReason.CORRUPT_IMAGE
        raise DataError(f"{origin}: {error}", reason) from error


def _content_items(content, origin: str) -> list[dict]:
    """A message content as chat-template items: a string is one text item, `None` none."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, (list, tuple)) and all(isinstance(item, dict) for item in content):
        return list(content)
    raise DataError(
        f"{origin}: a message content must be a string or a list of {{'type': ...}} items, got {content!r}.",
        DataErrorReason.UNSUPPORTED_CONTENT,
    )


def _check_answers(sample: Sample) -> None:
    """Answers must hold text and no placeholder: labels never cover an image, and an empty answer has nothing to
    mark (the template renders its header only)."""
    for index, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        items = _content_items(message["content"], sample.origin)
        if any(item.get("type") in ("image", "video") for item in items) or any(
            IMAGE_PLACEHOLDER in (item.get("text") or "") or VIDEO_PLACEHOLDER in (item.get("text") or "")
            for item in items
        ):
            raise DataError(
                f"{sample.origin}: an assistant answer holds an {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder.",
                DataErrorReason.PLACEHOLDER_MISMATCH,
            )
        if not any(item.get("text") for item in items):
            raise DataError(f"{sample.origin}: assistant turn {index} is empty.", DataErrorReason.EMPTY_CONVERSATION)


def _check_placeholder_counts(sample: Sample) -> None:
    """One `<image>` per image and one `<video>` per video (a content item renders as one placeholder)."""
    counts = {IMAGE_PLACEHOLDER: 0, VIDEO_PLACEHOLDER: 0}
    kinds = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
    for message in sample.messages:
        for item in _content_items(message["content"], sample.origin):
            if item.get("type") in kinds:
                counts[kinds[item["type"]]] += 1
            for placeholder in counts:
                counts[placeholder] += (item.get("text") or "").count(placeholder)
    images, videos = len(sample.images), len(sample.videos)
    if counts[IMAGE_PLACEHOLDER] > images or counts[VIDEO_PLACEHOLDER] > videos:
        raise DataError(
            f"{sample.origin}: more {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholders than images ({images}) "
            f"and videos ({videos}).",
            DataErrorReason.PLACEHOLDER_MISMATCH,
        )
    if counts[IMAGE_PLACEHOLDER] < images or counts[VIDEO_PLACEHOLDER] < videos:
        raise DataError(
            f"{sample.origin}: {images} images and {videos} videos but fewer placeholders in the text.",
            DataErrorReason.PLACEHOLDER_MISMATCH,
        )


def _with_video_items(messages: list[dict], videos: list, origin: str) -> list[dict]:
    """The messages with each video as a content item carrying its frames (where `apply_chat_template` reads
    videos from); a `<video>\\n` written into plain text becomes such an item, which the template renders back as
    the same `<video>\\n`."""
    frames = iter(videos)
    converted = []
    for message in messages:
        content = message["content"]
        if content is None:
            converted.append(message)
            continue
        if isinstance(content, str):
            if VIDEO_PLACEHOLDER not in content:
                converted.append(message)
                continue
            items = []
            for index, text in enumerate(content.split(video_prompt())):
                if VIDEO_PLACEHOLDER in text:
                    raise DataError(
                        f"{origin}: a {VIDEO_PLACEHOLDER} placeholder must end its line ({video_prompt()!r}).",
                        DataErrorReason.PLACEHOLDER_MISMATCH,
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
