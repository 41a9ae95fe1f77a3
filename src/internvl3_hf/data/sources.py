"""Training data sources: the official InternVL meta JSON + JSONL layout and Hugging Face `datasets`.

Every source becomes a list of `Sample`s in one format: chat-template messages (roles system/user/assistant),
the sample's image paths or images, its videos (each a list of frames), and where it came from (`file:line`) so
that a bad sample is reported precisely.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..modeling.chat_template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, image_prompt, video_prompt
from .errors import DataError, DataErrorReason

ROLES = ("system", "user", "assistant")
OFFICIAL_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # official turn names → ROLES
T = TypeVar("T")


@dataclass
class Sample:
    messages: list[dict]
    images: list[Any] = field(default_factory=list)  # paths or PIL images, in placeholder order
    videos: list[list[Any]] = field(default_factory=list)  # each a list of frames (paths or PIL images)
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    origin: str = "?"


@dataclass
class Source:
    """One dataset of a mixture: its samples and how often it is drawn (`repeat_time`, official semantics)."""

    name: str
    samples: list[Sample]
    repeat_time: float = 1.0


def official_record_to_sample(
    record: dict, root: Path, origin: str, data_augment: bool = False, max_dynamic_patch: int | None = None
) -> Sample:
    """One official JSONL line (`image` str|list, `video`, `conversations` of human/gpt/system turns)."""
    conversations = record.get("conversations")
    if not conversations:
        raise DataError(f"{origin}: empty or missing 'conversations'.", DataErrorReason.EMPTY_CONVERSATION)
    messages = []
    for turn in conversations:
        role = OFFICIAL_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(
                f"{origin}: unknown role {turn.get('from')!r}; official turns are 'system', 'human' and 'gpt'.",
                DataErrorReason.UNKNOWN_ROLE,
            )
        messages.append({"role": role, "content": str(turn.get("value", ""))})
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    videos = []
    if record.get("video"):
        videos = [resolve_video(root / record["video"], origin)]
    sample = Sample(
        messages=messages,
        images=[root / image for image in images],
        videos=videos,
        data_augment=data_augment,
        max_dynamic_patch=max_dynamic_patch,
        origin=origin,
    )
    add_missing_placeholders(sample)
    return sample


def resolve_video(path: Path, origin: str, num_frames: int = 8) -> list[Path]:
    """Frames of a video given as a directory of frame images, sampled like the official `get_index`."""
    if not path.is_dir():
        raise DataError(
            f"{origin}: video {path} is not a directory of frames; decode videos to frame images first "
            "(one file per frame, sorted by name).",
            DataErrorReason.UNREADABLE_VIDEO,
        )
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp"})
    if not frames:
        raise DataError(f"{origin}: video directory {path} holds no frame images.", DataErrorReason.UNREADABLE_VIDEO)
    segment = len(frames) / min(num_frames, len(frames))
    return [frames[int(segment / 2 + round(segment * index))] for index in range(min(num_frames, len(frames)))]


def add_missing_placeholders(sample: Sample) -> None:
    """Official rule: without any `<image>`/`<video>` placeholder, they are prepended to the first user turn."""
    user_turns = [message for message in sample.messages if message["role"] == "user"]
    if not user_turns:
        raise DataError(f"{sample.origin}: no user turn.", DataErrorReason.NO_USER_TURN)
    text = "".join(message["content"] for message in user_turns)
    prefix = ""
    if sample.images and IMAGE_PLACEHOLDER not in text:
        count = len(sample.images)
        prefix += "".join(image_prompt(number, count) for number in range(1, count + 1))
    if sample.videos and VIDEO_PLACEHOLDER not in text:
        prefix += video_prompt() * len(sample.videos)
    user_turns[0]["content"] = prefix + user_turns[0]["content"]


def read_jsonl_records(annotation: str | Path, convert: Callable[[Any, str], T]) -> tuple[list[T], list[str]]:
    """`convert(record, origin)` of every line of a JSONL file, and the errors (`file:line: ...`) of the lines that
    are not JSON or that `convert` refuses with a `DataError`; blank lines are skipped."""
    items, errors = [], []
    annotation = Path(annotation)
    with annotation.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            origin = f"{annotation}:{number}"
            try:
                items.append(convert(json.loads(line), origin))
            except json.JSONDecodeError as error:
                errors.append(f"{origin}: invalid JSON ({error.msg}).")
            except DataError as error:
                errors.append(str(error))
    return items, errors


def read_meta(
    meta_path: str | Path, read_annotation: Callable[[Path, Path, bool, int | None], tuple[list[T], list[str]]]
) -> tuple[list[Source], list[str]]:
    """Every dataset of an official meta JSON (`root`, `annotation`, `data_augment`, `repeat_time`,
    `max_dynamic_patch`), each annotation read by `read_annotation(annotation, root, data_augment, max_dynamic_patch)`;
    relative paths are relative to the meta file."""
    meta_path = Path(meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    sources, errors = [], []
    for name, entry in meta.items():
        for key in ("root", "annotation"):
            if key not in entry:
                raise DataError(f"{meta_path}: dataset {name!r} has no {key!r}.", DataErrorReason.INVALID_RECORD)
        annotation, root = (Path(entry[key]) for key in ("annotation", "root"))
        annotation = annotation if annotation.is_absolute() else meta_path.parent / annotation
        root = root if root.is_absolute() else meta_path.parent / root
        items, source_errors = read_annotation(
            annotation, root, bool(entry.get("data_augment", False)), entry.get("max_dynamic_patch")
        )
        sources.append(Source(name, items, float(entry.get("repeat_time", 1.0))))
        errors += source_errors
    return sources, errors


def read_official_jsonl(
    annotation: str | Path, root: str | Path, data_augment: bool = False, max_dynamic_patch: int | None = None
) -> tuple[list[Sample], list[str]]:
    """Samples of one official annotation file, and the errors of the lines that could not be read."""
    return read_jsonl_records(
        annotation,
        lambda record, origin: official_record_to_sample(record, Path(root), origin, data_augment, max_dynamic_patch),
    )


def read_official_meta(meta_path: str | Path) -> tuple[list[Source], list[str]]:
    """Every dataset of an official meta JSON (`root`, `annotation`, `data_augment`, `repeat_time`, ...)."""
    return read_meta(meta_path, read_official_jsonl)


def samples_from_hf_dataset(dataset: Iterable[dict], name: str = "dataset", data_augment: bool = False) -> tuple[list[Sample], list[str]]:
    """Samples of a Hugging Face dataset in the conversational layout: `messages` (+ `images`, `videos`)."""
    samples, errors = [], []
    for index, row in enumerate(dataset):
        origin = f"{name}[{index}]"
        try:
            messages = row.get("messages")
            if not messages:
                raise DataError(f"{origin}: empty or missing 'messages'.", DataErrorReason.EMPTY_CONVERSATION)
            for message in messages:
                if message.get("role") not in ROLES:
                    raise DataError(
                        f"{origin}: unknown role {message.get('role')!r}; use system, user or assistant.",
                        DataErrorReason.UNKNOWN_ROLE,
                    )
            samples.append(
                Sample(
                    messages=[dict(message) for message in messages],
                    images=list(row.get("images") or []),
                    videos=[list(video) for video in row.get("videos") or []],
                    data_augment=data_augment,
                    origin=origin,
                )
            )
        except DataError as error:
            errors.append(str(error))
    return samples, errors


def mix_sources(sources: list[Source], seed: int = 0) -> list[Sample]:
    """One shuffled list: a source with repeat_time r < 1 keeps its first r share, r > 1 repeats ⌊r⌋ times plus
    a share, as the official data loader does."""
    mixed = []
    for source in sources:
        whole, share = divmod(source.repeat_time, 1.0)
        mixed += source.samples * int(whole)
        mixed += source.samples[: math.floor(len(source.samples) * share)]
    random.Random(seed).shuffle(mixed)
    return mixed
