"""Preference data for MPO: sources, pair encoding, a `datasets.Dataset` TRL accepts, and the pair collator.

A preference pair is one prompt conversation with two answers. Both `prompt + chosen` and `prompt + rejected` go
through the SFT `SupervisedEncoder` (the chat template with its system prompt, labels on the answer and its
`<|im_end|>` only, images expanded with the dynamic tiling, refusing any sample that `max_length` would cut), so
the prompt tokens of the two rows are identical and so are their image tiles: the collator keeps ONE copy of the
tiles per pair, and the trainer runs the vision tower once for both rows.

Sources:
- the official MMPR layout: JSONL lines `{"image": str | [str], "video": str, "question", "chosen", "rejected"}`
  (`<image>\\n` prepended to the question when it has no placeholder) and the SFT-style meta JSON;
- Hugging Face datasets in TRL's preference layout: `prompt` (a string or chat messages), `chosen`, `rejected`
  (strings or one assistant message each) and `images` (or `image`), plus optional `videos`;
- synthetic coloured-square pairs (chosen: the square's colour, rejected: another colour).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..data.collator import image_tiles
from ..data.encoding import IGNORE_INDEX, EncodedSample, SupervisedEncoder
from ..data.errors import DataError, DataErrorReason, drop_reason
from ..data.sources import (
    ROLES,
    Sample,
    Source,
    add_missing_placeholders,
    read_jsonl_records,
    read_meta,
    resolve_video,
)
from ..data.synthetic import COLOUR_QUESTION, COLOURS, shape_image
from ..modeling.chat_template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, image_prompt, video_prompt

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- pairs
@dataclass
class PreferencePair:
    """One prompt conversation (ending with a user turn, string contents with `<image>`/`<video>` placeholders)
    and its chosen and rejected answers."""

    prompt: list[dict]
    chosen: str
    rejected: str
    images: list[Any] = field(default_factory=list)  # paths or PIL images, in placeholder order
    videos: list[list[Any]] = field(default_factory=list)  # each a list of frames
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    origin: str = "?"

    def samples(self) -> tuple[Sample, Sample]:
        """`(prompt + chosen, prompt + rejected)` as SFT samples sharing the images."""
        return self._sample(self.chosen), self._sample(self.rejected)

    def _sample(self, answer: str) -> Sample:
        messages = [dict(message) for message in self.prompt] + [{"role": "assistant", "content": answer}]
        return Sample(
            messages=messages,
            images=list(self.images),
            videos=[list(video) for video in self.videos],
            data_augment=self.data_augment,
            max_dynamic_patch=self.max_dynamic_patch,
            origin=self.origin,
        )


def _message_text(content: Any, origin: str, image_counter: list[int], num_images: int) -> str:
    """A message content as text: typed parts (`{"type": "image"|"video"|"text"}`) rendered like the chat template."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise DataError(
            f"{origin}: a message content must be a string or a list of parts, got {content!r}.",
            DataErrorReason.UNSUPPORTED_CONTENT,
        )
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text += part.get("text") or ""
        elif kind == "image":
            image_counter[0] += 1
            text += image_prompt(image_counter[0], num_images)
        elif kind == "video":
            text += video_prompt()
        else:
            raise DataError(
                f"{origin}: unsupported message part {part!r}; use text, image or video parts.",
                DataErrorReason.UNSUPPORTED_CONTENT,
            )
    return text


def _count_image_parts(messages: list) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def _prompt_messages(prompt: Any, origin: str) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{origin}: empty prompt.", DataErrorReason.EMPTY_CONVERSATION)
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise DataError(f"{origin}: empty or missing prompt.", DataErrorReason.EMPTY_CONVERSATION)
    num_images, counter = _count_image_parts(prompt), [0]
    messages = []
    for message in prompt:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(
                f"{origin}: unknown role {role!r}; use system, user or assistant.", DataErrorReason.UNKNOWN_ROLE
            )
        messages.append({"role": role, "content": _message_text(message.get("content"), origin, counter, num_images)})
    if messages[-1]["role"] != "user":
        raise DataError(
            f"{origin}: the prompt must end with a user turn, not {messages[-1]['role']!r}.",
            DataErrorReason.NO_USER_TURN,
        )
    return messages


def _answer_text(answer: Any, origin: str, name: str) -> str:
    if isinstance(answer, list):
        if len(answer) != 1 or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
            raise DataError(
                f"{origin}: {name!r} must be a string or a single assistant message.", DataErrorReason.INVALID_RECORD
            )
        answer = answer[0].get("content")
        if not isinstance(answer, str):
            parts = answer or []
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in parts):
                raise DataError(
                    f"{origin}: the {name!r} answer may hold text only.", DataErrorReason.UNSUPPORTED_CONTENT
                )
            answer = "".join(part.get("text") or "" for part in parts)
    if not isinstance(answer, str) or not answer:
        raise DataError(f"{origin}: empty or missing {name!r} answer.", DataErrorReason.EMPTY_CONVERSATION)
    if IMAGE_PLACEHOLDER in answer or VIDEO_PLACEHOLDER in answer:
        raise DataError(
            f"{origin}: the {name!r} answer holds an {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder.",
            DataErrorReason.PLACEHOLDER_MISMATCH,
        )
    return answer


def _with_placeholders(pair: PreferencePair) -> PreferencePair:
    """Official rule: with no placeholder at all, `<image>\\n` (per image) / `<video>\\n` lead the first user turn."""
    probe = Sample(messages=pair.prompt, images=pair.images, videos=pair.videos, origin=pair.origin)
    add_missing_placeholders(probe)  # edits pair.prompt in place; raises DataError without a user turn
    return pair


def pair_from_row(row: dict, origin: str = "?", root: Path | None = None) -> PreferencePair:
    """A pair from a dataset row: TRL's layout (`prompt`/`chosen`/`rejected`/`images`) or the official MMPR
    one (`question`/`chosen`/`rejected`/`image`/`video`; paths relative to `root`)."""
    origin = row.get("origin") or origin
    if "prompt" in row:
        prompt = _prompt_messages(row["prompt"], origin)
    elif "question" in row:
        prompt = _prompt_messages(str(row.get("question") or ""), origin)
    else:
        raise DataError(
            f"{origin}: no 'prompt' (TRL layout) or 'question' (official layout).", DataErrorReason.INVALID_RECORD
        )
    images = row.get("images")
    if images is None:
        images = row.get("image")
    images = [] if images is None else [images] if isinstance(images, (str, Path, PIL.Image.Image)) else list(images)
    videos = list(row.get("videos") or [])
    if isinstance(row.get("video"), (str, Path)):  # official: one video, a directory of frames
        videos = [row["video"]]
    videos = [  # a video is a list of frames, or a directory of frame images
        resolve_video((root or Path(".")) / video, origin) if isinstance(video, (str, Path)) else video
        for video in videos
    ]
    if root is not None:
        images = [root / image if isinstance(image, (str, Path)) else image for image in images]
    max_dynamic_patch = row.get("max_dynamic_patch")
    pair = PreferencePair(
        prompt=prompt,
        chosen=_answer_text(row.get("chosen"), origin, "chosen"),
        rejected=_answer_text(row.get("rejected"), origin, "rejected"),
        images=images,
        videos=[list(video) for video in videos],
        data_augment=bool(row.get("data_augment") or False),
        max_dynamic_patch=int(max_dynamic_patch) if max_dynamic_patch is not None else None,
        origin=origin,
    )
    return _with_placeholders(pair)


# --------------------------------------------------------------------------------------------------- sources
def read_preference_jsonl(
    annotation: str | Path, root: str | Path, data_augment: bool = False, max_dynamic_patch: int | None = None
) -> tuple[list[PreferencePair], list[str]]:
    """Pairs of one official MMPR annotation file, and the errors (`file:line: ...`) of the unreadable lines."""

    def convert(record: Any, origin: str) -> PreferencePair:
        if not isinstance(record, dict):
            raise DataError(f"{origin}: a line must be a JSON object.", DataErrorReason.INVALID_RECORD)
        record = {**record, "data_augment": data_augment, "max_dynamic_patch": max_dynamic_patch}
        record.pop("origin", None)
        return pair_from_row(record, origin, Path(root))

    return read_jsonl_records(annotation, convert)


def read_preference_meta(meta_path: str | Path) -> tuple[list[Source], list[str]]:
    """Every dataset of an official MPO meta JSON (`root`, `annotation`, `repeat_time`, `data_augment`, ...)."""
    return read_meta(meta_path, read_preference_jsonl)


def pairs_from_hf_dataset(dataset: Iterable[dict], name: str = "dataset") -> tuple[list[PreferencePair], list[str]]:
    """Pairs of a Hugging Face preference dataset (TRL or MMPR column layout)."""
    pairs, errors = [], []
    for index, row in enumerate(dataset):
        try:
            pairs.append(pair_from_row(dict(row), f"{name}[{index}]"))
        except DataError as error:
            errors.append(str(error))
    return pairs, errors


def synthetic_preference_pairs(count: int, seed: int = 0, image_size: int = 56) -> list[PreferencePair]:
    """`count` "What colour is the square?" pairs: chosen names the square's colour, rejected another colour."""
    rng = random.Random(seed)
    colours = sorted(COLOURS)
    pairs = []
    for index in range(count):
        colour = colours[index % len(colours)] if index < len(colours) else rng.choice(colours)
        wrong = rng.choice([other for other in colours if other != colour])
        pairs.append(
            PreferencePair(
                prompt=[{"role": "user", "content": image_prompt(1, 1) + COLOUR_QUESTION}],
                chosen=f"The square is {colour}.",
                rejected=f"The square is {wrong}.",
                images=[shape_image(colour, image_size)],
                origin=f"synthetic_pairs[{index}]",
            )
        )
    return pairs


# --------------------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedPair:
    chosen: EncodedSample
    rejected: EncodedSample
    origin: str = "?"

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """The pair's tiles, once (those of the chosen row; the rejected row has the same)."""
        return self.chosen.pixel_values

    @property
    def image_num_patches(self) -> list[int]:
        return self.chosen.image_num_patches


class PreferenceEncoder:
    """Encodes a pair as two SFT rows; the image tiles are decoded and tiled once, for the chosen row."""

    def __init__(self, processor, max_length: int | None = None, seed: int | None = None):
        self.encoder = SupervisedEncoder(processor, max_length, seed, video_frame_format="mpo")

    def encode(self, pair: PreferencePair, with_pixels: bool = True) -> EncodedPair:
        chosen_sample, rejected_sample = pair.samples()
        chosen = self.encoder.encode(chosen_sample, with_pixels=with_pixels)
        rejected = self.encoder.encode(rejected_sample, with_pixels=False)
        if chosen.image_num_patches != rejected.image_num_patches:  # same images, same budget: cannot happen
            raise DataError(
                f"{pair.origin}: chosen and rejected tile the images differently.", DataErrorReason.INVALID_RECORD
            )
        start = _answer_start(chosen)
        if start != _answer_start(rejected) or chosen.input_ids[:start] != rejected.input_ids[:start]:
            raise DataError(
                f"{pair.origin}: the chosen and rejected rows do not share their prompt tokens.",
                DataErrorReason.INVALID_RECORD,
            )
        return EncodedPair(chosen, rejected, pair.origin)


def _answer_start(encoded: EncodedSample) -> int:
    return next(index for index, label in enumerate(encoded.labels) if label != IGNORE_INDEX)


def plan_pairs(
    pairs: list[PreferencePair], encoder: PreferenceEncoder, on_error: str = "drop"
) -> tuple[list[PreferencePair], Counter]:
    """The usable pairs (exact lengths checked without decoding pixels) and the drop counts by reason.

    Bad pairs (missing/corrupt image, placeholder mismatch, too long for `max_length`, unknown role, nothing to
    learn) are logged with their origin and dropped; `on_error="raise"` raises on the first one instead.
    """
    if on_error not in ("drop", "raise"):
        raise ValueError(f"on_error must be 'drop' or 'raise', got {on_error!r}.")
    kept, dropped = [], Counter()
    for pair in pairs:
        try:
            encoder.encode(pair, with_pixels=False)
        except DataError as error:
            if on_error == "raise":
                raise
            dropped[drop_reason(error)] += 1
            logger.warning("dropped preference pair: %s", error)
            continue
        kept.append(pair)
    if not kept:
        raise ValueError(f"No usable preference pair: all {len(pairs)} were dropped ({dict(dropped)}).")
    return kept, dropped


def preference_dataset(pairs: list[PreferencePair]):
    """The pairs as a `datasets.Dataset` (what TRL's trainers take): columns `prompt` (chat messages), `chosen`,
    `rejected`, `images`, `videos`, `origin`, `data_augment`, `max_dynamic_patch`.

    Image paths stay paths (decoded by the collator); in-memory images are stored with the `Image` feature.
    """
    from datasets import Dataset, Features, Image, List, Value

    def visual(values) -> Any:
        in_memory = any(not isinstance(value, (str, Path)) for value in values)
        return Image() if in_memory else Value("string")

    def stored(value):
        return str(value) if isinstance(value, Path) else value

    rows = [
        {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in pair.prompt],
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "images": [stored(image) for image in pair.images],
            "videos": [[stored(frame) for frame in video] for video in pair.videos],
            "origin": pair.origin,
            "data_augment": pair.data_augment,
            "max_dynamic_patch": pair.max_dynamic_patch,
        }
        for pair in pairs
    ]
    features = Features(
        {
            "prompt": List({"role": Value("string"), "content": Value("string")}),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "images": List(visual(image for pair in pairs for image in pair.images)),
            "videos": List(List(visual(frame for pair in pairs for video in pair.videos for frame in video))),
            "origin": Value("string"),
            "data_augment": Value("bool"),
            "max_dynamic_patch": Value("int64"),
        }
    )
    return Dataset.from_list(rows, features=features)


# --------------------------------------------------------------------------------------------------- collation
class MPODataCollator:
    """Collates preference rows (dataset rows in either layout, or `PreferencePair`s) for `MPOTrainer`.

    Two layouts, for B pairs, right-padded:

    - separate rows (`share_prompt=False`, TRL's layout): `input_ids`, `attention_mask`, `completion_mask` of shape
      `(2B, L)`, rows `[chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}]`;
    - shared prompt (`share_prompt=True`): `(B, L)`, one row per pair `[prompt | chosen | p | rejected]`, where `p`
      repeats the prompt's last token so that the first rejected token is predicted from the same hidden state as
      in its own row; `segment_ids` marks the prompt 0, its last token and the chosen part 1, `p` and the rejected
      part 2 (padding 0).
      The trainer builds the mask that hides the chosen part from the rejected one, and the positions that make the
      rejected part continue from the prompt.

    `completion_mask` is 1 exactly on the answer tokens and their `<|im_end|>`. With images: `pixel_values` holding
    each pair's tiles ONCE (`(tiles, 3, S, S)`, pair order) with `image_num_patches` (tiles per image, pair order).
    Rows that carry precomputed `ref_chosen_logps`/`ref_rejected_logps` pass them on as `(B,)` tensors.

    A pair that fails only now (an image that cannot be decoded) is logged, counted in `dropped` and replaced by
    the previous good pair, so that a long run does not stop; it raises if no pair has been good yet.
    """

    def __init__(self, processor, max_length: int | None = None, seed: int | None = None, share_prompt: bool = False):
        self.encoder = PreferenceEncoder(processor, max_length, seed)
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.share_prompt = share_prompt
        self.dropped: Counter = Counter()
        self._last_good: tuple[EncodedPair, tuple[float, float] | None] | None = None

    def encode(self, row: dict | PreferencePair) -> EncodedPair:
        pair = row if isinstance(row, PreferencePair) else pair_from_row(dict(row), "row")
        return self.encoder.encode(pair)

    def __call__(self, rows: list) -> dict[str, torch.Tensor]:
        pairs, reference = [], []
        for row in rows:
            try:
                encoded = (self.encode(row), _reference_logps(row))
                self._last_good = encoded
            except DataError as error:
                self.dropped[drop_reason(error)] += 1
                if self._last_good is None:
                    raise
                logger.warning("replaced a preference pair that failed to load by the previous one: %s", error)
                encoded = self._last_good
            pairs.append(encoded[0])
            reference.append(encoded[1])
        batch = self.collate(pairs)
        if all(values is not None for values in reference):
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.tensor(reference, dtype=torch.float32).T
        return batch

    def collate(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        rows = [_shared_row(pair) for pair in pairs] if self.share_prompt else _separate_rows(pairs)
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (ids, completion, segments) in enumerate(rows):
            input_ids[index, : len(ids)] = torch.tensor(ids)
            attention_mask[index, : len(ids)] = 1
            completion_mask[index, : len(ids)] = torch.tensor(completion)
            segment_ids[index, : len(ids)] = torch.tensor(segments)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        if self.share_prompt:
            batch["segment_ids"] = segment_ids
        return {**batch, **image_tiles(pairs)}


PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT = 0, 1, 2


def _completion(row: EncodedSample) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in row.labels]


def _separate_rows(pairs: list[EncodedPair]) -> list[tuple[list[int], list[int], list[int]]]:
    rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    return [(row.input_ids, _completion(row), [PROMPT_SEGMENT] * len(row.input_ids)) for row in rows]


def _shared_row(pair: EncodedPair) -> tuple[list[int], list[int], list[int]]:
    """`[prompt | chosen | last prompt token | rejected]`, its completion mask and segment ids."""
    chosen, rejected = pair.chosen, pair.rejected
    start = _answer_start(chosen)  # the prompt is `input_ids[:start]` in both rows (checked by the encoder)
    ids = chosen.input_ids + [chosen.input_ids[start - 1]] + rejected.input_ids[start:]
    completion = _completion(chosen) + [0] + _completion(rejected)[start:]
    # The prompt's last token opens the chosen segment and its copy the rejected one: each answer then sees the
    # prompt up to that token exactly once, as in its own row.
    segments = (
        [PROMPT_SEGMENT] * (start - 1)
        + [CHOSEN_SEGMENT] * (len(chosen.input_ids) - start + 1)
        + [REJECTED_SEGMENT] * (len(rejected.input_ids) - start + 1)
    )
    return ids, completion, segments


def _reference_logps(row) -> tuple[float, float] | None:
    """Precomputed reference log-probs a dataset row carries (`ref_chosen_logps`, `ref_rejected_logps`), if any."""
    if not isinstance(row, dict) or row.get("ref_chosen_logps") is None or row.get("ref_rejected_logps") is None:
        return None
    return float(row["ref_chosen_logps"]), float(row["ref_rejected_logps"])
