"""Data sources: official meta JSON + JSONL (paths, flags, repeat_time, per-line errors), HF datasets, mixing."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import PIL.Image
import pytest
from sft_data_helpers import encoder, processor, save_image, supervised_runs, write_official  # noqa: F401

from internvl3_hf.data import (
    DataError,
    Sample,
    SFTDataset,
    Source,
    mix_sources,
    read_official_meta,
    samples_from_hf_dataset,
)
from internvl3_hf.data.sources import read_official_jsonl


def qa(question: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def test_meta_paths_flags_and_record_fields(tmp_path):
    save_image(tmp_path / "images" / "a.png", (28, 28), (255, 0, 0))
    records = [
        qa("<image>\nWhat colour?", "red", image="a.png", id=0),
        qa("How many shapes?", "3"),
        {"image": ["a.png", "a.png"], "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"},
            {"from": "gpt", "value": "yes"},
        ]},
    ]
    meta = write_official(tmp_path / "ann", records, root=str(tmp_path / "images"), data_augment=True,
                          max_dynamic_patch=4, repeat_time=1)
    (source,), errors = read_official_meta(meta)
    assert errors == [] and source.name == "train" and source.repeat_time == 1.0
    first, text_only, multi = source.samples
    assert first.images == [tmp_path / "images" / "a.png"]  # absolute root kept, annotation relative to the meta
    assert first.messages == [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "red"},
    ]
    assert text_only.images == [] and text_only.videos == []
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant"]
    assert multi.messages[1]["content"].count("<image>") == 2  # placeholders present: nothing prepended
    assert all(s.data_augment and s.max_dynamic_patch == 4 for s in source.samples)
    annotation = tmp_path / "ann" / "train.jsonl"
    assert [s.origin for s in source.samples] == [f"{annotation}:{line}" for line in (1, 2, 3)]


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(qa("hi", "5")) + "\n\n" + json.dumps(qa("hello", "6")) + "\n")
    samples, errors = read_official_jsonl(path, tmp_path)
    assert errors == [] and [s.origin for s in samples] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "5"}]}', "unknown role 'bot'"),
        ('{"conversations": []}', "empty or missing 'conversations'"),
        ('{"image": "a.png"}', "empty or missing 'conversations'"),
        ('{"conversations": [{"from": "gpt", "value": "5"}]}', "no user turn"),
        ('{"conversations": [', "invalid JSON"),
        ('{"video": "nope", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "5"}]}',
         "is not a directory of frames"),
    ],
    ids=["unknown-role", "empty-conversation", "no-conversation", "no-user-turn", "invalid-json", "video-not-a-dir"],
)
def test_unreadable_line_is_reported_with_file_and_line(tmp_path, line, message):
    """Lines that cannot become a sample are reported with `file:line`; the lines around them are kept."""
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([json.dumps(qa("hi", "5")), line, json.dumps(qa("hello", "6"))]) + "\n")
    samples, errors = read_official_jsonl(path, tmp_path)
    assert [s.origin for s in samples] == [f"{path}:1", f"{path}:3"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: ") and message in errors[0], errors


def test_meta_without_annotation_is_an_error(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"broken": {"root": "."}}))
    with pytest.raises(DataError, match=r"meta\.json: dataset 'broken' has no 'annotation'"):
        read_official_meta(meta)


@pytest.mark.parametrize(
    "repeat_time, expected",
    [
        (1, [0, 1, 2, 3]),
        (0.5, [0, 1]),  # the first half of the lines
        (0.25, [0]),
        (2, [0, 0, 1, 1, 2, 2, 3, 3]),
        (1.5, [0, 0, 1, 1, 2, 3]),
        (0, []),
    ],
)
def test_repeat_time(tmp_path, repeat_time, expected):
    records = [qa(f"question {index}", str(index)) for index in range(4)]
    sources, _ = read_official_meta(write_official(tmp_path, records, repeat_time=repeat_time))
    assert sources[0].repeat_time == float(repeat_time)
    mixed = mix_sources(sources, seed=0)
    assert sorted(int(sample.messages[1]["content"]) for sample in mixed) == expected


def test_mix_sources_shuffles_deterministically_across_sources(tmp_path):
    write_official(tmp_path, [qa(f"a{i}", f"a{i}") for i in range(6)], name="first", repeat_time=0.5)
    meta = write_official(tmp_path, [qa(f"b{i}", f"b{i}") for i in range(3)], name="second", repeat_time=2)
    sources, errors = read_official_meta(meta)
    assert errors == [] and [s.name for s in sources] == ["first", "second"]
    mixed = mix_sources(sources, seed=0)
    answers = [s.messages[1]["content"] for s in mixed]
    assert Counter(answers) == Counter({"a0": 1, "a1": 1, "a2": 1, "b0": 2, "b1": 2, "b2": 2})
    assert answers == [s.messages[1]["content"] for s in mix_sources(sources, seed=0)]
    assert any(
        answers != [s.messages[1]["content"] for s in mix_sources(sources, seed=seed)] for seed in range(1, 5)
    )
    assert answers != sorted(answers)  # shuffled, not source after source


def test_repeated_samples_are_independent_objects_for_placeholder_insertion(tmp_path):
    """Prepending `<image>` happens once per line, however often the line repeats."""
    save_image(tmp_path / "a.png", (28, 28), (0, 0, 0))
    sources, _ = read_official_meta(write_official(tmp_path, [qa("What?", "5", image="a.png")], repeat_time=3))
    mixed = mix_sources(sources)
    assert len(mixed) == 3 and all(s.messages[0]["content"] == "<image>\nWhat?" for s in mixed)


# --------------------------------------------------------------------------------------------------- HF datasets
def hf_rows():
    red = PIL.Image.new("RGB", (56, 28), (200, 30, 30))
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": [red],
        },
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                {"role": "user", "content": [{"type": "text", "text": "2 + 3 = ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "5"}]},
            ],
            "images": [],
        },
    ]


def test_hf_dataset_messages_and_images_layout(tokenizer, encoder):
    dataset = datasets.Dataset.from_list(hf_rows())
    samples, errors = samples_from_hf_dataset(dataset, name="hf", data_augment=True)
    assert errors == [] and [s.origin for s in samples] == ["hf[0]", "hf[1]"]
    assert isinstance(samples[0].images[0], PIL.Image.Image) and samples[1].images == []
    assert all(s.data_augment for s in samples)
    image, text = (encoder.encode(sample) for sample in samples)
    assert supervised_runs(tokenizer, image) == ["red<|im_end|>"] and image.image_num_patches == [3]
    assert image.pixel_values.shape == (3, 3, 28, 28)
    assert supervised_runs(tokenizer, text) == ["5<|im_end|>"] and text.pixel_values is None
    assert "You are a helpful assistant." in tokenizer.decode(text.input_ids)


def test_hf_dataset_string_content_and_bad_rows():
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "5"}]},
        {"messages": []},
    ]
    samples, errors = samples_from_hf_dataset(datasets.Dataset.from_list(rows), name="mine")
    assert [s.origin for s in samples] == ["mine[0]"]
    assert errors[0].startswith("mine[1]: unknown role 'bot'") and errors[1].startswith("mine[2]: empty")


def test_hf_and_official_data_mix_into_one_training_set(tmp_path, tokenizer, processor):
    from internvl3_hf.data import SFTCollator, SupervisedEncoder

    save_image(tmp_path / "blue.png", (28, 28), (30, 30, 200))
    meta = write_official(tmp_path, [qa("What colour?", "blue", image="blue.png"), qa("hello", "hello world")])
    official, errors = read_official_meta(meta)
    hf_samples, hf_errors = samples_from_hf_dataset(datasets.Dataset.from_list(hf_rows()), name="hf")
    assert errors == hf_errors == []
    mixed = mix_sources([*official, Source("hf", hf_samples, repeat_time=2)], seed=1)
    assert Counter(s.origin.split("[")[0].split(":")[0] for s in mixed) == Counter(
        {str(tmp_path / "train.jsonl"): 2, "hf": 4}
    )
    dataset = SFTDataset(mixed, SupervisedEncoder(processor, seed=0))
    assert len(dataset) == 6 and not dataset.dropped
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == 6
    assert batch["image_num_patches"].tolist().count(3) == 2 and batch["image_num_patches"].tolist().count(1) == 1
    assert batch["pixel_values"].shape[0] == int(batch["image_num_patches"].sum()) == 7


def test_sample_defaults():
    sample = Sample([{"role": "user", "content": "hi"}])
    assert sample.images == [] and sample.videos == [] and not sample.data_augment and sample.origin == "?"
