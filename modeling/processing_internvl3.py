# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""Processor of InternVL3: Qwen2 tokenizer + tiling image processor + the official prompt expansion.

Self-contained (transformers, numpy and sibling files only): copied into checkpoints for `trust_remote_code`.

Every `<image>` in the text becomes `<img>` + `<IMG_CONTEXT>` x (image_seq_length · tiles) + `</img>`, and every
`<video>` becomes one `<img>…</img>` line per frame (one tile each), labelled as the official code path the prompt
follows labels it (`VIDEO_FRAME_FORMATS`).
"""

import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import cached_file

from .chat_template import (
    CHAT_TEMPLATE,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_START_TOKEN,
    VIDEO_PLACEHOLDER,
    build_chat_template,
)
from .configuration_internvl3 import (
    OFFICIAL_CONFIG_DEFAULTS,
    OFFICIAL_VISION_DEFAULTS,
    TOKEN_ID_FIELDS,
    InternVL3Config,
    check_token_ids,
    square_side,
    tokens_per_tile,
)
from .image_processing_internvl3 import InternVL3ImageProcessor, InternVL3ImageProcessorKwargs, split_tile_budget

# A video placeholder takes its newline along: the MPO frame format drops it.
_PLACEHOLDER_PATTERN = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}\n?")


@dataclass(frozen=True)
class VideoFrameFormat:
    """How `<video>\\n` is written out: `label.format(i)` + image span per frame, joined by newlines, then the
    placeholder's newline unless `drop_newline`."""

    label: str
    drop_newline: bool = False


# The official code paths disagree; a prompt follows the path its data came from: `chat()` / the README video
# prompt at inference, `internvl_chat_finetune.py` for SFT data, `internvl_chat_mpo.py` for preference data.
VIDEO_FRAME_FORMATS = {
    "chat": VideoFrameFormat("Frame{}: "),
    "sft": VideoFrameFormat("Frame-{}: "),
    "mpo": VideoFrameFormat("Frame{}: ", drop_newline=True),
}

# Where `from_pretrained` finds a file; forwarded when the processor settings are read from config.json.
_FILE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")

# Settings a config.json leaves out take the defaults of the class that wrote it. The official InternVLChatConfig
# constructor defaults differ from the values its released checkpoints ship (which always write them all).
_PROCESSOR_FIELDS = (
    "force_image_size",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "use_thumbnail",
    "dynamic_image_size",
    "downsample_ratio",
    "system_message",
)
_MODEL_CONFIG_DEFAULTS = {
    "internvl_chat": {name: OFFICIAL_CONFIG_DEFAULTS[name] for name in _PROCESSOR_FIELDS},
    "internvl3": {name: getattr(InternVL3Config, name) for name in _PROCESSOR_FIELDS},
}
# Official InternVisionConfig defaults (InternVLVisionConfig has the same patch size).
_VISION_DEFAULTS = {name: OFFICIAL_VISION_DEFAULTS[name] for name in ("image_size", "patch_size")}


class InternVL3ProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    share_tile_budget (`bool`, *optional*, defaults to `False`):
        `True` gives each image of a several-image sample `max(1, max_patches // num_images)` tiles at most: the
        official training rule (training collators set it). The default tiles every image with the full
        `max_patches`, as the official `chat()` / `batch_chat()` inference does.
    video_frame_format (`str`, *optional*, defaults to `"chat"`):
        How video frames are labelled, a key of `VIDEO_FRAME_FORMATS`: `"chat"` (`Frame1: `, official inference),
        `"sft"` (`Frame-1: `, official fine-tuning data) or `"mpo"` (`Frame1: `, no newline after the last frame,
        official preference data).
    image_sizes (`list[tuple[int, int]]`, *optional*):
        `(height, width)` of each image, in place of `images`: the text is expanded with the tiles these sizes
        give, without decoding any image, and no `pixel_values` are returned (exact token counts for planning a
        dataset). Flat in placeholder order, or one list per sample.
    video_num_frames (`list[int]`, *optional*):
        Frames of each video, in place of `videos`, in the same way.
    jpeg_seed (`int`, *optional*):
        Training augmentation (official `data_augment`): seeds one generator for the call, from which every tile
        (each image's tiles and thumbnail, then each video frame) draws its own JPEG quality; see the image
        processor's `jpeg_rng`. A seed rather than a generator, because processor kwargs are deep-copied.
    """

    images_kwargs: InternVL3ImageProcessorKwargs
    share_tile_budget: bool
    video_frame_format: str
    image_sizes: list
    video_num_frames: list
    jpeg_seed: int


def processor_settings_from_model_config(config: dict) -> dict:
    """Processor settings (`image_processor`, `image_seq_length`, `chat_template`) from a model's config.json.

    Works for official OpenGVLab configs (`model_type: internvl_chat`) and for the plugin's (`internvl3`), which
    use the same top-level names: force_image_size, min/max_dynamic_patch, use_thumbnail, dynamic_image_size,
    downsample_ratio, system_message and vision_config.patch_size.
    """
    model_type = config.get("model_type")
    if model_type not in _MODEL_CONFIG_DEFAULTS:
        raise ValueError(
            f"Cannot build an InternVL3 processor from a config.json with model_type={model_type!r}: expected one "
            f"of {sorted(_MODEL_CONFIG_DEFAULTS)}. Point at an InternVL checkpoint, or at a directory written by "
            "InternVL3Processor.save_pretrained."
        )
    settings = {**_MODEL_CONFIG_DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}
    vision = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    # The official model uses `force_image_size or vision_config.image_size` as the tile side.
    tile_size = settings["force_image_size"] or square_side(vision["image_size"])
    patch_size = square_side(vision["patch_size"])
    image_processor = {
        "size": {"height": tile_size, "width": tile_size},
        "min_patches": settings["min_dynamic_patch"],
        "max_patches": settings["max_dynamic_patch"],
        "use_thumbnail": settings["use_thumbnail"],
        "dynamic_image_size": settings["dynamic_image_size"],
    }
    system_message = settings["system_message"]
    return {
        "image_processor": image_processor,
        "image_seq_length": tokens_per_tile(tile_size, patch_size, settings["downsample_ratio"]),
        "chat_template": build_chat_template(system_message) if system_message else CHAT_TEMPLATE,
    }


class InternVL3Processor(ProcessorMixin):
    r"""
    InternVL3 processor: expands `<image>` / `<video>` placeholders, tiles the images and tokenizes.

    Args:
        image_processor (`InternVL3ImageProcessor`, *optional*):
            Tiling image processor; a default one (448 px tiles, 1–12 tiles + thumbnail) when omitted.
        tokenizer (`PreTrainedTokenizerBase`):
            A tokenizer holding `<img>`, `</img>` and `<IMG_CONTEXT>` as single tokens (the InternVL3 Qwen2 one).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to the official `internvl2_5` conversation (`chat_template.CHAT_TEMPLATE`).
        image_seq_length (`int`, *optional*, defaults to 256):
            `<IMG_CONTEXT>` tokens per tile: `(tile_size // patch_size)² · downsample_ratio²`.
    """

    text_kwargs = {"padding_side": "left"}
    valid_processor_kwargs = InternVL3ProcessorKwargs
    share_tile_budget = False

    image_placeholder = IMAGE_PLACEHOLDER
    video_placeholder = VIDEO_PLACEHOLDER
    image_token = IMAGE_CONTEXT_TOKEN
    start_image_token = IMAGE_START_TOKEN
    end_image_token = IMAGE_END_TOKEN

    def __init__(
        self,
        image_processor: InternVL3ImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("InternVL3Processor needs a tokenizer (the InternVL3 Qwen2 tokenizer).")
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}.")
        image_processor = image_processor if image_processor is not None else InternVL3ImageProcessor()
        chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
        # Inference pads on the left (generation); code that pads the tokenizer itself (pipelines) must agree.
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.image_token_id = self._single_token_id(tokenizer, IMAGE_CONTEXT_TOKEN)
        self.start_image_token_id = self._single_token_id(tokenizer, IMAGE_START_TOKEN)
        self.end_image_token_id = self._single_token_id(tokenizer, IMAGE_END_TOKEN)
        # Every token of an image span, for `mm_token_type_ids` and for the truncation check.
        self.image_token_ids = [self.image_token_id, self.start_image_token_id, self.end_image_token_id]

    @staticmethod
    def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"The tokenizer splits {token!r} into {len(ids)} tokens; InternVL3 needs it as one special token. "
                "Use the InternVL3 tokenizer, or add <img>, </img> and <IMG_CONTEXT> with add_special_tokens."
            )
        return ids[0]

    def image_span(self, num_tiles: int) -> str:
        """The text an image of `num_tiles` tiles becomes: `<img>` + `<IMG_CONTEXT>` x (seq · tiles) + `</img>`."""
        return f"{IMAGE_START_TOKEN}{IMAGE_CONTEXT_TOKEN * (self.image_seq_length * num_tiles)}{IMAGE_END_TOKEN}"

    def video_span(self, num_frames: int, frame_format: str = "chat") -> str:
        """The text `<video>` becomes: one labelled `<img>…</img>` line per frame, labelled as
        `VIDEO_FRAME_FORMATS[frame_format]` says (the placeholder's own newline is not part of it)."""
        label = _video_frame_format(frame_format).label
        return "\n".join(label.format(i + 1) + self.image_span(1) for i in range(num_frames))

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        videos: list | None = None,
        **kwargs: Unpack[InternVL3ProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            images: Images (PIL, numpy, torch or file paths), either a flat list consumed in the order of the
                `<image>` placeholders across the batch, or one list per sample.
            text (`str` or `list[str]`): Prompts with `<image>` / `<video>` placeholders (see `apply_chat_template`).
            videos: Videos, each a list of frames, either a flat list in placeholder order or one list per sample.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` and, when there are images or videos,
            `pixel_values` (every tile in text order) and `image_num_patches` (tiles per `<img>` span; one per frame).
        """
        if kwargs.pop("audio", None) is not None:
            raise ValueError("InternVL3Processor takes no audio input.")
        texts = self._check_text(text)
        output_kwargs = self._merge_kwargs(
            InternVL3ProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        # `_merge_kwargs` lets a tokenizer saved with `padding_side` override the processor default; generation
        # needs left padding whatever the tokenizer file says, so only an explicit per-call value wins.
        if "padding_side" not in kwargs and "padding_side" not in kwargs.get("text_kwargs", {}):
            text_kwargs["padding_side"] = self.text_kwargs["padding_side"]
        # Tensors are made once, at the end, from every part together.
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop(
            "return_mm_token_type_ids", output_kwargs["return_mm_token_type_ids"]
        )
        return_offsets = text_kwargs.pop(
            "return_text_replacement_offsets", output_kwargs["return_text_replacement_offsets"]
        )

        frame_format = output_kwargs.get("video_frame_format", "chat")
        share_tile_budget = output_kwargs["share_tile_budget"]
        if output_kwargs.get("jpeg_seed") is not None:
            images_kwargs["jpeg_rng"] = random.Random(output_kwargs["jpeg_seed"])
        _video_frame_format(frame_format)  # an unknown name fails before any image is decoded
        image_sizes, video_counts = output_kwargs.get("image_sizes"), output_kwargs.get("video_num_frames")
        plan_only = image_sizes is not None or video_counts is not None
        if plan_only and (images is not None or videos is not None):
            raise ValueError(
                "Pass images and videos, or image_sizes and video_num_frames (planning without pixels), not both."
            )
        if plan_only:
            images_per_sample = self._visuals_per_sample(
                image_sizes, texts, IMAGE_PLACEHOLDER, "image_sizes", _is_size_batch
            )
            videos_per_sample = self._visuals_per_sample(
                video_counts, texts, VIDEO_PLACEHOLDER, "video_num_frames", _is_image_batch
            )
        else:
            images_per_sample = self._visuals_per_sample(images, texts, IMAGE_PLACEHOLDER, "images", _is_image_batch)
            videos_per_sample = self._visuals_per_sample(videos, texts, VIDEO_PLACEHOLDER, "videos", _is_video_batch)

        expanded, offsets, spans, tiles = [], [], [], []
        for sample, sample_images, sample_videos in zip(texts, images_per_sample, videos_per_sample):
            if plan_only:
                image_kwargs = self._sample_images_kwargs(len(sample_images), images_kwargs, share_tile_budget)
                count_tiles = self.image_processor.get_number_of_image_patches
                image_tiles = [count_tiles(*size, image_kwargs) for size in sample_images]
                video_frames = list(sample_videos)
            else:
                image_arrays = self._tile_images(sample_images, images_kwargs, share_tile_budget)
                video_arrays = [self._tile_frames(frames, images_kwargs) for frames in sample_videos]
                image_tiles, video_frames = [len(a) for a in image_arrays], [len(a) for a in video_arrays]
            sample_text, sample_offsets, order = self._expand_sample(sample, image_tiles, video_frames, frame_format)
            expanded.append(sample_text)
            offsets.append(sample_offsets)
            # Tiles of each `<img>` span in text order: an image's tiles, or one per video frame.
            spans.append(
                [n for kind, i in order for n in ([image_tiles[i]] if kind == "image" else [1] * video_frames[i])]
            )
            if not plan_only:
                tiles += [image_arrays[i] if kind == "image" else video_arrays[i] for kind, i in order]

        text_inputs = self.tokenizer(expanded, **text_kwargs)
        if text_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
            self._check_image_spans_kept(text_inputs["input_ids"], spans, expanded, text_kwargs)

        data = dict(text_inputs)
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        if tiles:
            data["pixel_values"] = np.concatenate(tiles)
        if any(spans):
            data["image_num_patches"] = np.array([n for sample_spans in spans for n in sample_spans], dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    @staticmethod
    def _check_text(text: str | list[str] | None) -> list[str]:
        if text is None:
            raise ValueError(
                "InternVL3Processor needs `text` with an `<image>` placeholder per image; to tile images alone "
                "call processor.image_processor(images)."
            )
        texts = [text] if isinstance(text, str) else list(text)
        for index, sample in enumerate(texts):
            if not isinstance(sample, str):
                raise TypeError(f"text must be a string or a list of strings; sample {index} is a {type(sample)}.")
            for token in (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN):
                if token in sample:
                    raise ValueError(
                        f"Sample {index} already contains {token}: write one `<image>` (or `<video>`) placeholder "
                        "per image and let the processor expand it, so tokens and pixel_values always match."
                    )
        return texts

    @staticmethod
    def _visuals_per_sample(visuals, texts: list[str], placeholder: str, name: str, is_batch) -> list[list]:
        """Group images (or videos) by sample, checking them against the placeholders of each sample.

        `visuals` is a flat sequence consumed in placeholder order across the batch, or one sequence per sample.
        """
        counts = [sample.count(placeholder) for sample in texts]
        if visuals is None:
            visuals = []
        elif not is_batch(visuals):
            visuals = [visuals]
        nested = len(visuals) > 0 and all(is_batch(item) for item in visuals)
        if nested:
            if len(visuals) != len(texts):
                raise ValueError(
                    f"{name} has one list per sample but {len(visuals)} lists for {len(texts)} text samples; give one "
                    f"(possibly empty) list per sample, or a flat list in {placeholder} order."
                )
            for index, (given, count) in enumerate(zip(visuals, counts)):
                if len(given) != count:
                    raise ValueError(
                        f"Sample {index} has {count} {placeholder} placeholder(s) but {len(given)} {name} were given "
                        f"for it; pass exactly one per placeholder."
                    )
            return [list(given) for given in visuals]
        if len(visuals) != sum(counts):
            per_sample = ", ".join(f"sample {index}: {count}" for index, count in enumerate(counts))
            raise ValueError(
                f"The text has {sum(counts)} {placeholder} placeholder(s) ({per_sample}) but {len(visuals)} {name} "
                f"were given; pass exactly one per placeholder, in order."
            )
        starts = np.cumsum([0, *counts])
        return [list(visuals[start:end]) for start, end in zip(starts[:-1], starts[1:])]

    def _sample_images_kwargs(self, num_images: int, images_kwargs: dict, share_tile_budget: bool) -> dict:
        """The image kwargs of one sample, its tile budget split between its images if asked."""
        kwargs = dict(images_kwargs)
        if share_tile_budget and num_images > 1:
            kwargs["min_patches"], kwargs["max_patches"] = split_tile_budget(
                kwargs.get("min_patches", self.image_processor.min_patches),
                kwargs.get("max_patches", self.image_processor.max_patches),
                num_images,
            )
        return kwargs

    def _tile_images(self, images: list, images_kwargs: dict, share_tile_budget: bool) -> list[np.ndarray]:
        """Tiles of each image of one sample."""
        if not images:
            return []
        kwargs = self._sample_images_kwargs(len(images), images_kwargs, share_tile_budget)
        processed = self.image_processor(images, **kwargs)
        boundaries = np.cumsum(processed["image_num_patches"])[:-1]
        return np.split(processed["pixel_values"], boundaries)

    def _tile_frames(self, frames: list, images_kwargs: dict) -> np.ndarray:
        if len(frames) == 0:
            raise ValueError("A video has no frames; pass each video as a non-empty list of frames.")
        return self.image_processor.preprocess_frames(list(frames), **images_kwargs)["pixel_values"]

    def _expand_sample(
        self, text: str, image_tiles: list[int], video_frames: list[int], frame_format: str
    ) -> tuple[str, list[dict], list[tuple[str, int]]]:
        """Replace the placeholders of one sample, given the tiles of each image and the frames of each video.

        Returns the expanded text, the replacement offsets (the `text_replacement_offsets` format that
        `apply_chat_template(return_assistant_tokens_mask=True)` needs) and which image or video each placeholder
        was, in text order (`("image", i)` / `("video", j)`).
        """
        image_index, video_index = iter(range(len(image_tiles))), iter(range(len(video_frames)))
        pieces, offsets, order = [], [], []
        last, shift = 0, 0
        for match in _PLACEHOLDER_PATTERN.finditer(text):
            if match.group() == IMAGE_PLACEHOLDER:
                index = next(image_index)
                replacement, kind = self.image_span(image_tiles[index]), "image"
            else:
                index = next(video_index)
                drop_newline = _video_frame_format(frame_format).drop_newline
                newline = "" if drop_newline else match.group()[len(VIDEO_PLACEHOLDER) :]
                replacement, kind = self.video_span(video_frames[index], frame_format) + newline, "video"
            order.append((kind, index))
            start, end = match.span()
            pieces += [text[last:start], replacement]
            offsets.append(
                {
                    "type": kind,
                    "span": (start, end),
                    "new_span": (start + shift, start + shift + len(replacement)),
                    "text": match.group(),
                    "replacement": replacement,
                }
            )
            shift += len(replacement) - (end - start)
            last = end
        pieces.append(text[last:])
        return "".join(pieces), offsets, order

    def _check_image_spans_kept(
        self, input_ids: list[list[int]], spans: list[list[int]], texts: list[str], text_kwargs: dict
    ) -> None:
        """Refuse a truncation that removes any image token: the model would get tiles without their tokens."""
        span_ids = set(self.image_token_ids)
        for index, (ids, sample_spans) in enumerate(zip(input_ids, spans)):
            expected = sum(self.image_seq_length * tiles + 2 for tiles in sample_spans)
            kept = sum(token in span_ids for token in ids)
            if kept != expected:
                length = len(
                    self.tokenizer(texts[index], add_special_tokens=text_kwargs.get("add_special_tokens", True))[
                        "input_ids"
                    ]
                )
                limit = text_kwargs.get("max_length") or self.tokenizer.model_max_length
                raise ValueError(
                    f"Sample {index} is {length} tokens long with its image spans expanded, and truncating it to "
                    f"max_length={limit} would cut {expected - kept} of its {expected} image tokens (<img>, "
                    "<IMG_CONTEXT>, </img>). Image tokens are never truncated: raise max_length, lower max_patches, "
                    "use fewer images or shorten the text."
                )

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """Tokens and tiles each image of the given (height, width) sizes takes (used by serving engines)."""
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(InternVL3ProcessorKwargs, **kwargs)["images_kwargs"]
        num_patches = [self.image_processor.get_number_of_image_patches(*size, images_kwargs) for size in image_sizes]
        num_tokens = [self.image_seq_length * patches + 2 for patches in num_patches]
        return MultiModalData(num_image_tokens=num_tokens, num_image_patches=num_patches)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> tuple[dict, dict]:
        """The saved processor settings, or, for a checkpoint without processor files (an official OpenGVLab
        directory, or a plugin model saved alone), settings read from its config.json."""
        file_kwargs = {key: kwargs[key] for key in _FILE_KWARGS if key in kwargs}
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        if "image_processor" not in processor_dict:
            config_file = cached_file(
                pretrained_model_name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **file_kwargs
            )
            if config_file is None:
                raise OSError(
                    f"{pretrained_model_name_or_path} has neither processor_config.json nor config.json; point at an "
                    "InternVL checkpoint or at a directory written by InternVL3Processor.save_pretrained."
                )
            with open(config_file, encoding="utf-8") as handle:
                settings = processor_settings_from_model_config(json.load(handle))
            # A chat template file found next to the config wins over the one built from it.
            processor_dict = {**settings, **processor_dict}
        return processor_dict, kwargs

    @classmethod
    def _get_arguments_from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, processor_dict: dict | None = None, **kwargs
    ) -> list:
        """Build the image processor from the settings directly (no AutoImageProcessor registration needed)."""
        image_processor = InternVL3ImageProcessor.from_dict(processor_dict["image_processor"])
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        _check_tokenizer_against_model_config(pretrained_model_name_or_path, tokenizer, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]


def _check_tokenizer_against_model_config(path: str | os.PathLike, tokenizer, **kwargs) -> None:
    """Refuse a tokenizer whose `<IMG_CONTEXT>`, `<img>`, `</img>` or `<|im_end|>` ids differ from the ones the model
    config.json beside it fixes (a plugin config's fields, its defaults where left out; an official config fixes
    none: its ids are its tokenizer's)."""
    file_kwargs = {key: kwargs[key] for key in _FILE_KWARGS if key in kwargs}
    config_file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **file_kwargs)
    if config_file is None:
        return
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("model_type") == InternVL3Config.model_type:
        expected = {field: config.get(field, getattr(InternVL3Config, field)) for field in TOKEN_ID_FIELDS}
    else:
        expected = {field: config[field] for field in TOKEN_ID_FIELDS if field in config}
    check_token_ids(expected, tokenizer, model_source=config_file, tokenizer_source=f"the tokenizer of {path}")


def _video_frame_format(name: str) -> VideoFrameFormat:
    if name not in VIDEO_FRAME_FORMATS:
        raise ValueError(f"video_frame_format must be one of {sorted(VIDEO_FRAME_FORMATS)}, got {name!r}.")
    return VIDEO_FRAME_FORMATS[name]


def _is_image_batch(value) -> bool:
    """A list of images (not a single image)."""
    return isinstance(value, (list, tuple))


def _is_size_batch(value) -> bool:
    """A list of `(height, width)` sizes (not a single size)."""
    return isinstance(value, (list, tuple)) and all(isinstance(size, (list, tuple)) for size in value)


def _is_video(value) -> bool:
    """A video: a list of frames, or a `(frames, ...)` 4-D array or tensor."""
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", None) == 4


def _is_video_batch(value) -> bool:
    """A list of videos, not a single video."""
    return isinstance(value, (list, tuple)) and all(_is_video(video) for video in value)


# Saved processors carry this code (auto_map), so AutoProcessor loads them where the package is absent.
InternVL3Processor.register_for_auto_class()


def processor_for_config(tokenizer: PreTrainedTokenizerBase, config: InternVL3Config) -> InternVL3Processor:
    """An `InternVL3Processor` whose tiling, tokens per tile and system message follow a model's `config`, for a
    checkpoint that ships no processor files of its own.

    Raises a `ValueError` if `tokenizer` puts `<IMG_CONTEXT>`, `<img>`, `</img>` or `<|im_end|>` at other ids than
    `config`: prompts built by the processor would not hold the ids the model looks for."""
    config.check_tokenizer(tokenizer, tokenizer_source="the tokenizer given to processor_for_config")
    settings = processor_settings_from_model_config(config.to_dict())
    return InternVL3Processor(
        image_processor=InternVL3ImageProcessor(**settings["image_processor"]),
        tokenizer=tokenizer,
        image_seq_length=settings["image_seq_length"],
        chat_template=settings["chat_template"],
    )


__all__ = ["InternVL3Processor", "processor_settings_from_model_config", "processor_for_config"]
