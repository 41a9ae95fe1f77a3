"""`DataError` reason codes: every raise site names its reason, and the drop counts go by it, never by the message.

One test per family of raise sites: the SFT readers (errors reported per line), the SFT encoder (counted by
`SFTDataset`), the MPO pair reader (counted by `MPODataCollator` and `plan_pairs`) and the MPO pair encoder.
"""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest

from internvl3_hf.data import DataError, DataErrorReason, Sample, SFTDataset, SupervisedEncoder
from internvl3_hf.data.errors import drop_reason
from internvl3_hf.data.sources import official_record_to_sample, read_official_meta
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.mpo import MPODataCollator, PreferenceEncoder, PreferencePair, plan_pairs
from internvl3_hf.tiny import tiny_config

Reason = DataErrorReason


@pytest.fixture(scope="module")
def processor(tokenizer):
    return processor_for_config(tokenizer, tiny_config(tokenizer))


@pytest.mark.parametrize("reason", list(DataErrorReason))
def test_a_reason_decides_the_count_whatever_the_message(reason):
    misleading = "train.jsonl:3: image file missing.png does not exist; the placeholder is empty."
    assert drop_reason(DataError(misleading, reason=reason)) == reason.value
    assert drop_reason(DataError(misleading, reason=reason.value)) == reason.value  # the value names it too


def test_a_reason_is_required_and_known():
    with pytest.raises(TypeError, match="reason"):
        DataError("x.jsonl:1: too long")
    with pytest.raises(ValueError, match="'truncated' is not a valid DataErrorReason"):
        DataError("x.jsonl:1: too long", reason="truncated")


def test_copies_and_pickles_keep_the_reason():
    """Errors cross process boundaries (data loader workers) and get copied; the reason must travel with them."""
    error = DataError("x.jsonl:1: 400 tokens exceed max_length=160.", Reason.TOO_LONG)
    for clone in (copy.deepcopy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is DataError and str(clone) == str(error) and clone.reason is Reason.TOO_LONG


# ----------------------------------------------------------------------------------------- SFT readers
def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def read_official_record(tmp_path: Path, record: dict) -> Sample:
    return official_record_to_sample(record, tmp_path, "train.jsonl:4")


def read_meta_without_root(tmp_path: Path, record: dict) -> None:
    (tmp_path / "meta.json").write_text('{"broken": {"annotation": "train.jsonl"}}')
    read_official_meta(tmp_path / "meta.json")


READER_CASES = {
    "official: no conversations": (read_official_record, {"conversations": []}, Reason.EMPTY_CONVERSATION),
    "official: unknown role": (
        read_official_record, {"conversations": [turn("bot", "hi"), turn("gpt", "x")]}, Reason.UNKNOWN_ROLE),
    "official: no user turn": (
        read_official_record, {"conversations": [turn("gpt", "x")], "image": "a.png"}, Reason.NO_USER_TURN),
    "official: video not a directory": (
        read_official_record, {"conversations": [turn("human", "hi"), turn("gpt", "x")], "video": "clip.mp4"},
        Reason.UNREADABLE_VIDEO),
    "official: video without frames": (
        read_official_record, {"conversations": [turn("human", "hi"), turn("gpt", "x")], "video": "empty"},
        Reason.UNREADABLE_VIDEO),
    "meta: dataset without root": (read_meta_without_root, {}, Reason.INVALID_RECORD),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_sft_reader_errors_carry_their_reason(tmp_path, case):
    read, record, reason = READER_CASES[case]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as raised:
        read(tmp_path, record)
    assert raised.value.reason is reason


# ----------------------------------------------------------------------------------------- SFT encoder
def sample(user, answer="red", **extra) -> Sample:
    return Sample([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra)


def save_image(path: Path) -> Path:
    PIL.Image.new("RGB", (56, 28), (200, 30, 30)).save(path)
    return path


ENCODER_CASES = {
    "missing image": (lambda d: sample("<image>\nColour?", images=[d / "missing.png"]), Reason.MISSING_IMAGE),
    "corrupt image": (
        lambda d: sample("<image>\nColour?", images=[d / "garbage.png"]), Reason.CORRUPT_IMAGE),
    "template: unknown role": (
        lambda d: Sample([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]),
        Reason.TEMPLATE_REJECTED),
    "template: unknown content": (
        lambda d: sample([{"type": "audio"}, {"type": "text", "text": "hi"}]), Reason.TEMPLATE_REJECTED),
    "content neither text nor items": (lambda d: sample(5), Reason.UNSUPPORTED_CONTENT),
    "empty answer": (lambda d: sample("Colour?", answer=""), Reason.EMPTY_CONVERSATION),
    "placeholder in the answer": (lambda d: sample("Colour?", answer="<image>"), Reason.PLACEHOLDER_MISMATCH),
    "more placeholders than images": (lambda d: sample("<image>\nColour?"), Reason.PLACEHOLDER_MISMATCH),
    "more images than placeholders": (
        lambda d: sample("Colour?", images=[save_image(d / "a.png")]), Reason.PLACEHOLDER_MISMATCH),
    "video placeholder mid-line": (
        lambda d: sample("Look: <video> here", videos=[[save_image(d / "f.png")]]), Reason.PLACEHOLDER_MISMATCH),
    "too long": (lambda d: sample("long " * 200), Reason.TOO_LONG),
    "nothing to learn": (lambda d: Sample([{"role": "user", "content": "hello"}]), Reason.NOTHING_TO_LEARN),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_sft_dataset_counts_encoder_errors_by_reason(tmp_path, processor, case):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG this is not an image at all" * 4)
    build, reason = ENCODER_CASES[case]
    good = sample("hello", origin="good")
    dataset = SFTDataset([good, build(tmp_path)], SupervisedEncoder(processor, max_length=160))
    assert dataset.dropped == Counter({reason.value: 1}) and dataset.samples == [good]


def test_an_image_gone_after_planning_counts_as_missing(tmp_path, processor):
    """Decoding during training (`open_image`) tells a vanished file from one that cannot be decoded."""
    image = save_image(tmp_path / "a.png")
    dataset = SFTDataset([sample("<image>\nColour?", images=[image]), sample("hello")], SupervisedEncoder(processor))
    image.unlink()
    dataset[0]
    (tmp_path / "a.png").write_bytes(b"\x89PNG this is not an image at all" * 4)
    dataset[0]
    assert dataset.dropped == Counter({"missing image": 1, "corrupt image": 1})


# ----------------------------------------------------------------------------------------- MPO pairs
GOOD_ROW = {"prompt": "What colour?", "chosen": "red", "rejected": "blue"}
PAIR_ROW_CASES = {
    "empty prompt": ({"prompt": " "}, Reason.EMPTY_CONVERSATION),
    "no prompt messages": ({"prompt": []}, Reason.EMPTY_CONVERSATION),
    "empty answer": ({"chosen": ""}, Reason.EMPTY_CONVERSATION),
    "unknown role": ({"prompt": [{"role": "bot", "content": "hi"}]}, Reason.UNKNOWN_ROLE),
    "prompt ends with an answer": (
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, Reason.NO_USER_TURN),
    "audio part": ({"prompt": [{"role": "user", "content": [{"type": "audio"}]}]}, Reason.UNSUPPORTED_CONTENT),
    "content neither text nor parts": ({"prompt": [{"role": "user", "content": 5}]}, Reason.UNSUPPORTED_CONTENT),
    "image in the answer": (
        {"rejected": [{"role": "assistant", "content": [{"type": "image"}]}]}, Reason.UNSUPPORTED_CONTENT),
    "placeholder in the answer": ({"chosen": "<image>"}, Reason.PLACEHOLDER_MISMATCH),
    "answer of two messages": (
        {"chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        Reason.INVALID_RECORD),
    "video not a directory": ({"video": "/nonexistent/clip.mp4"}, Reason.UNREADABLE_VIDEO),
}


def bad_row(case: str) -> dict:
    change, _ = PAIR_ROW_CASES[case]
    return {**GOOD_ROW, **change}


@pytest.mark.parametrize("case", list(PAIR_ROW_CASES))
def test_mpo_collator_counts_pair_errors_by_reason(processor, case):
    collator = MPODataCollator(processor)
    collator([GOOD_ROW, bad_row(case)])
    assert collator.dropped == Counter({PAIR_ROW_CASES[case][1].value: 1})


def test_mpo_row_without_prompt_or_question_is_an_invalid_record(processor):
    collator = MPODataCollator(processor)
    collator([GOOD_ROW, {"chosen": "red", "rejected": "blue"}])
    assert collator.dropped == Counter({"invalid record": 1})


def test_plan_pairs_counts_encoder_errors_by_reason(tmp_path, processor):
    pairs = [
        PreferencePair([{"role": "user", "content": "What colour?"}], "red", "blue", origin="good"),
        PreferencePair([{"role": "user", "content": "<image>\nColour?"}], "red", "blue",
                       images=[tmp_path / "missing.png"], origin="missing"),
        PreferencePair([{"role": "user", "content": "long " * 200}], "red", "blue", origin="long"),
    ]
    kept, dropped = plan_pairs(pairs, PreferenceEncoder(processor, max_length=160))
    assert [pair.origin for pair in kept] == ["good"]
    assert dropped == Counter({"missing image": 1, "too long": 1})
