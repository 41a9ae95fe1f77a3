"""The SFT and MPO test corpora the token-path regression check runs on.

SFT: the label-table cases of `test_encoding.py`, the other samples the SFT data tests encode (many-frame video,
images in different turns, empty and placeholder answers, every bad line of `test_dataset.py`), a JPEG-augmented
sample, a `max_dynamic_patch` override and synthetic samples. MPO: the preference pairs of `tests/mpo/test_data.py`
(MMPR meta/JSONL with images, several images and a video; TRL-layout rows) and synthetic pairs.

Every entry is built from files written under a given directory, so the corpus is the same wherever it is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import PIL.Image
import torch
from sft_data_helpers import noise_image, save_image, write_official
from test_dataset import BAD_LINES, good_lines, setup_images
from test_encoding import CASES, PALETTE, _photo

from internvl3_hf.data import Sample, read_official_meta, samples_from_hf_dataset
from internvl3_hf.data.synthetic import synthetic_samples
from internvl3_hf.mpo import pairs_from_hf_dataset, read_preference_meta, synthetic_preference_pairs


def _official_samples(directory: Path, records: list, **meta_entry) -> list[Sample]:
    (source,), errors = read_official_meta(write_official(directory, records, **meta_entry))
    assert errors == []
    return source.samples


def sft_corpus(root: Path) -> dict[str, Sample]:
    corpus = {}
    for name, build in CASES.items():
        directory = root / "cases" / name
        directory.mkdir(parents=True)
        corpus[name] = build(directory)[0]

    clip = root / "long_video"
    for index in range(20):
        save_image(clip / "clip" / f"{index:03d}.png", (28, 28), (10 * index, 0, 0))
    turns = [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "5"}]
    corpus["video-twenty-frames"] = _official_samples(clip, [{"video": "clip", "conversations": turns}])[0]

    blue = PIL.Image.new("RGB", (28, 28), PALETTE["blue"])
    corpus["content-list-images-in-two-turns"] = Sample(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": "blue"},
        ],
        images=[blue, blue],
    )
    for name, messages in {
        "empty-answer-mid-conversation": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "blue"},
        ],
        "empty-last-answer": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}],
        "answer-with-placeholder": [
            {"role": "user", "content": "<image>\nhi"},
            {"role": "assistant", "content": "see <image>"},
        ],
        "unknown-role": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "5"}],
    }.items():
        corpus[name] = Sample(messages, images=[blue, blue] if "placeholder" in name else [], origin="x.jsonl:3")

    bad = root / "bad_lines"
    setup_images(bad)
    first, last = good_lines()
    samples = _official_samples(bad, [first, *BAD_LINES.values(), last])
    corpus["good-line-image"], corpus["good-line-text"] = samples[0], samples[-1]
    for name, sample in zip(BAD_LINES, samples[1:-1]):
        corpus[f"bad-line-{name}"] = sample

    augmented = root / "augmented"
    augmented.mkdir()
    _photo(56, 28).save(augmented / "photo.png")
    noise_image(84, 56).save(augmented / "noise.png")
    records = [
        {"image": "photo.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "5"}]},
        {
            "image": ["noise.png", "photo.png"],
            "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "The first is noise."}],
        },
    ]
    photo, pair = _official_samples(augmented, records, data_augment=True, max_dynamic_patch=6)
    corpus["jpeg-augmented-image"], corpus["jpeg-augmented-two-images-max-patch-6"] = photo, pair

    for index, sample in enumerate(synthetic_samples(6, seed=1)):
        corpus[f"synthetic-{index}"] = sample
    return corpus


def mpo_corpus(root: Path) -> dict:
    """Preference pairs by name (each encodes as a chosen and a rejected row)."""
    images = root / "mmpr" / "images"
    save_image(images / "a.png", (56, 56), (255, 0, 0))
    save_image(images / "b.png", (28, 28), (0, 0, 255))
    for index in range(3):
        save_image(images / "clip" / f"{index:03d}.jpg", (28, 28), (0, 255, 0))
    records = [
        {"image": "a.png", "question": "What colour?", "chosen": "It is red.", "rejected": "Blue"},
        {"image": ["b.png", "a.png"], "question": "Compare.", "chosen": "different", "rejected": "same"},
        {"image": "a.png", "question": "Look: <image>\nColour?", "chosen": "red", "rejected": "green"},
        {"video": "clip", "question": "What happens?", "chosen": "green", "rejected": "red"},
        {"question": "Say hi.", "chosen": "hi", "rejected": "Hello there, friend."},
    ]
    (root / "mmpr" / "pairs.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    meta = {"mmpr_part": {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1}}
    (root / "mmpr" / "meta.json").write_text(json.dumps(meta))
    (source,), errors = read_preference_meta(root / "mmpr" / "meta.json")
    assert errors == []
    corpus = {f"mmpr-{index}": pair for index, pair in enumerate(source.samples)}

    red = PIL.Image.new("RGB", (28, 28), "red")
    rows = [
        {"prompt": "What colour?", "chosen": "red", "rejected": "blue", "images": [red]},
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            ],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
            "rejected": [{"role": "assistant", "content": "yes"}],
            "images": [red, red],
        },
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "hello", "rejected": "bye", "images": []},
    ]
    pairs, errors = pairs_from_hf_dataset(rows, "prefs")
    assert errors == []
    corpus.update({f"trl-{index}": pair for index, pair in enumerate(pairs)})
    corpus.update({f"synthetic-pair-{index}": pair for index, pair in enumerate(synthetic_preference_pairs(4, seed=3))})
    return corpus


def hf_rows_corpus() -> dict[str, Sample]:
    """The Hugging Face conversational rows of `test_sources.py` (content lists, string contents)."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Two squares."}]},
            ],
            "images": [PIL.Image.new("RGB", (56, 28), PALETTE["red"]), PIL.Image.new("RGB", (28, 28), PALETTE["blue"])],
        },
        {
            "messages": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A square."}],
            "images": [PIL.Image.new("RGB", (28, 56), PALETTE["yellow"])],
        },
    ]
    corpus = {}
    for index, row in enumerate(rows):  # one dataset each: a column holds either lists or strings
        (sample,), errors = samples_from_hf_dataset(datasets.Dataset.from_list([row]), "hf")
        assert errors == []
        corpus[f"hf-row-{index}"] = sample
    return corpus


def outcome(encode, sample) -> dict:
    """What encoding gives: ids, labels, tiles per span and pixels, or the error text after the origin."""
    from internvl3_hf.data import DataError

    try:
        encoded = encode(sample)
    except DataError as error:
        return {"error": str(error).split(": ", 1)[-1]}
    pixels = encoded.pixel_values
    return {
        "input_ids": list(encoded.input_ids),
        "labels": list(encoded.labels),
        "image_num_patches": list(encoded.image_num_patches),
        "pixel_values": None if pixels is None else pixels.to(torch.float32),
    }
