"""SFTDataset: bad samples are reported with `file:line`, counted by reason, and never stop a run (drop mode)."""

from __future__ import annotations

import json
import logging
from collections import Counter

import PIL.Image
import pytest
from sft_data_helpers import noise_image, processor, save_image, write_official  # noqa: F401

from internvl3_hf.data import DataError, Sample, SFTDataset, SupervisedEncoder, read_official_meta

MAX_LENGTH = 160  # the default system prompt + a short question and answer + a 3-tile image fit; 'long ' x 200 does not


def qa(question: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def setup_images(root):
    save_image(root / "ok.png", (56, 28), (200, 30, 30))
    (root / "garbage.png").write_bytes(b"\x89PNG this is not an image at all" * 4)


# reason → a JSONL line that must be dropped for that reason (the line sits between two good lines)
BAD_LINES = {
    "missing image": qa("<image>\nWhat colour?", "red", image="missing.png"),
    "corrupt image": qa("<image>\nWhat colour?", "red", image="garbage.png"),
    "placeholder count": qa("Image-1: <image>\nImage-2: <image>\nSame?", "yes", image="ok.png"),
    "too many images": qa("<image>\nWhat colour?", "red", image=["ok.png", "ok.png"]),
    "too long": qa("long " * 200, "red"),
    "nothing to learn": {"conversations": [{"from": "human", "value": "hello"}]},
}
REASONS = {"too many images": "placeholder count"}
MESSAGES = {
    "missing image": "does not exist",
    "corrupt image": "not a readable image",
    "placeholder count": "more <image>/<video> placeholders than images",
    "too many images": "fewer placeholders",
    "too long": "truncat",
    "nothing to learn": "no assistant answer",
}


def good_lines():
    return [qa("<image>\nWhat colour?", "red", image="ok.png"), qa("hello", "hello world")]


def load(tmp_path, bad):
    setup_images(tmp_path)
    first, last = good_lines()
    (source,), errors = read_official_meta(write_official(tmp_path, [first, bad, last]))
    assert errors == []
    return source.samples, tmp_path / "train.jsonl"


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_dropped_counted_and_logged(tmp_path, processor, case, caplog):
    samples, annotation = load(tmp_path, BAD_LINES[case])
    with caplog.at_level(logging.WARNING, logger="internvl3_hf.data.dataset"):
        dataset = SFTDataset(samples, SupervisedEncoder(processor, max_length=MAX_LENGTH, seed=0))
    assert dataset.dropped == Counter({REASONS.get(case, case): 1})
    assert [s.origin for s in dataset.samples] == [f"{annotation}:1", f"{annotation}:3"]
    (warning,) = [record.getMessage() for record in caplog.records if "dropped sample" in record.getMessage()]
    assert f"{annotation}:2: " in warning and MESSAGES[case] in warning, warning
    assert len(dataset) == 2 and all(len(item) == 1 for item in (dataset[0], dataset[1]))


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_raise_mode_raises_with_file_and_line(tmp_path, processor, case):
    samples, annotation = load(tmp_path, BAD_LINES[case])
    with pytest.raises(DataError, match=MESSAGES[case].replace("<", ".").replace(">", ".")) as raised:
        SFTDataset(samples, SupervisedEncoder(processor, max_length=MAX_LENGTH), on_error="raise")
    assert str(raised.value).startswith(f"{annotation}:2: ")


def test_all_bad_lines_together(tmp_path, processor):
    """One file holding every kind of bad line (reader errors included): nothing raises, everything is counted."""
    setup_images(tmp_path)
    first, last = good_lines()
    lines = [first, *BAD_LINES.values(), qa("hi", "5", conversations=[{"from": "bot", "value": "x"}]),
             {"conversations": []}, "{not json", last]
    (source,), read_errors = read_official_meta(write_official(tmp_path, lines))
    dataset = SFTDataset(source.samples, SupervisedEncoder(processor, max_length=MAX_LENGTH))
    annotation = tmp_path / "train.jsonl"
    assert [e.split(": ")[0] for e in read_errors] == [f"{annotation}:{n}" for n in (8, 9, 10)]
    assert dataset.dropped == Counter(
        {"missing image": 1, "corrupt image": 1, "placeholder count": 2, "too long": 1, "nothing to learn": 1}
    )
    assert [s.origin for s in dataset.samples] == [f"{annotation}:1", f"{annotation}:11"]


def test_decode_failure_during_training_is_skipped(tmp_path, processor, caplog):
    """A file whose header reads but whose data is cut off passes planning, then fails in `__getitem__`: it is
    counted and skipped (the next item is served), never crashing the run."""
    setup_images(tmp_path)
    noise_image(56, 28).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    samples, annotation = load(tmp_path, qa("<image>\nWhat colour?", "red", image="cut.png"))
    dataset = SFTDataset(samples, SupervisedEncoder(processor, max_length=MAX_LENGTH))
    assert len(dataset) == 3 and not dataset.dropped  # planning reads headers only
    with caplog.at_level(logging.WARNING, logger="internvl3_hf.data.dataset"):
        (item,) = dataset[1]
    assert dataset.dropped == Counter({"corrupt image": 1})
    assert item.input_ids == dataset.encoder.encode(dataset.samples[2], with_pixels=False).input_ids
    assert any(f"{annotation}:2: " in record.getMessage() for record in caplog.records)
    with pytest.raises(DataError, match=f"{annotation}:2: "):
        SFTDataset(samples, SupervisedEncoder(processor), on_error="raise")[1]


def test_packed_group_loses_only_the_bad_sample(tmp_path, processor):
    setup_images(tmp_path)
    noise_image(28, 28).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    samples, _ = load(tmp_path, qa("<image>\nWhat colour?", "red", image="cut.png"))
    dataset = SFTDataset(samples, SupervisedEncoder(processor), max_packed_tokens=10_000)
    assert len(dataset) == 1
    item = dataset[0]
    assert len(item) == 2 and dataset.dropped == Counter({"corrupt image": 1})


def test_nothing_usable_is_an_error(processor):
    with pytest.raises(ValueError, match="No usable training sample"):
        SFTDataset([Sample([{"role": "user", "content": "hi"}])], SupervisedEncoder(processor))
    with pytest.raises(ValueError, match="on_error"):
        SFTDataset([Sample([{"role": "user", "content": "hi"}])], SupervisedEncoder(processor), on_error="skip")


def test_dataset_packing_groups_and_lengths(processor):
    samples = [
        Sample([{"role": "user", "content": "hello " * n}, {"role": "assistant", "content": "5"}], origin=f"s{n}")
        for n in (1, 30, 2, 60, 3)
    ]
    encoder = SupervisedEncoder(processor)
    lengths = [len(encoder.encode(s, with_pixels=False).input_ids) for s in samples]
    budget = max(lengths) + min(lengths)
    dataset = SFTDataset(samples, encoder, max_packed_tokens=budget)
    seen = sorted(index for group in dataset.groups for index in group)
    assert seen == list(range(len(samples)))
    assert all(sum(lengths[i] for i in group) <= budget for group in dataset.groups)
    assert dataset.lengths == [sum(lengths[i] for i in group) for group in dataset.groups]
    assert len(dataset) < len(samples)
    for index, group in enumerate(dataset.groups):
        assert [e.input_ids for e in dataset[index]] == [encoder.encode(samples[i]).input_ids for i in group]


def test_drop_reason_does_not_depend_on_the_file_path(tmp_path, processor):
    """The count follows the raise site's reason, not the message, which starts with the file path: a dataset
    stored under `.../empty_placeholder_answers/` must not count its drops as 'placeholder count'."""
    directory = tmp_path / "empty_placeholder_answers"
    (source,), _ = read_official_meta(write_official(directory, [qa("long " * 200, "red"), qa("hello", "5")]))
    dataset = SFTDataset(source.samples, SupervisedEncoder(processor, max_length=MAX_LENGTH))
    assert dataset.dropped == Counter({"too long": 1})


def test_max_length_fits_the_good_lines(processor):
    """Guard for the table above: the good lines fit MAX_LENGTH and the long one does not."""
    encoder = SupervisedEncoder(processor)
    sample = Sample([{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
                    images=[PIL.Image.new("RGB", (56, 28))])
    assert len(encoder.encode(sample, with_pixels=False).input_ids) <= MAX_LENGTH
    long = Sample([{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "red"}])
    assert len(encoder.encode(long, with_pixels=False).input_ids) > MAX_LENGTH
    assert json.dumps(BAD_LINES)  # the table is plain JSON
