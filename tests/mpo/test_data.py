"""Preference data: MMPR JSONL/meta and TRL-layout sources, pair encoding, and the one-copy-of-tiles collator."""

import json

import PIL.Image
import pytest
import torch
from datasets import Dataset

from internvl3_hf.data import DataError, SupervisedEncoder
from internvl3_hf.data.sources import Sample
from internvl3_hf.mpo import (
    MPODataCollator,
    PreferenceEncoder,
    pair_from_row,
    pairs_from_hf_dataset,
    plan_pairs,
    preference_dataset,
    read_preference_jsonl,
    read_preference_meta,
    synthetic_preference_pairs,
)
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import tiny_config

SYSTEM = "<|im_start|>system\n你是书生·万象"
TOKENS_PER_TILE = 4


@pytest.fixture(scope="module")
def processor(tokenizer):
    return processor_for_config(tokenizer, tiny_config(tokenizer))


def save_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path)
    return path


def write_mmpr(directory, records):
    """An MMPR-style annotation file with raw lines or records, and a meta JSON naming it (relative paths)."""
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"mmpr_part": {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory / "meta.json"


def decode_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run where `mask` is 1."""
    runs, current = [], []
    for token, flag in zip(ids.tolist(), mask.tolist()):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_mmpr_meta_and_jsonl(tmp_path):
    save_image(tmp_path / "images/a.png", (56, 56), (255, 0, 0))
    save_image(tmp_path / "images/b.png", (28, 28), (0, 0, 255))
    frames = tmp_path / "images/clip"
    for index in range(3):
        save_image(frames / f"{index:03d}.jpg", (28, 28), (0, 255, 0))
    meta = write_mmpr(
        tmp_path,
        [
            {"image": "a.png", "question": "What colour?", "chosen": "red", "rejected": "blue"},
            {"image": ["a.png", "b.png"], "question": "Compare.", "chosen": "different", "rejected": "same"},
            {"image": "a.png", "question": "Look: <image>\nColour?", "chosen": "red", "rejected": "green"},
            {"video": "clip", "question": "What happens?", "chosen": "green", "rejected": "red"},
            {"question": "Say hi.", "chosen": "hi", "rejected": "no"},
            "{not json",
            {"image": "a.png", "question": "Q?", "chosen": "yes"},
            {"image": "a.png", "question": "Q?", "chosen": "<image> yes", "rejected": "no"},
        ],
    )
    (source,), errors = read_preference_meta(meta)
    pairs = source.samples
    assert len(pairs) == 5 and source.repeat_time == 1.0
    assert pairs[0].prompt == [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert pairs[0].images == [tmp_path / "images/a.png"] and pairs[0].origin.endswith("pairs.jsonl:1")
    assert pairs[1].prompt[0]["content"] == "Image-1: <image>\nImage-2: <image>\nCompare."
    assert pairs[2].prompt[0]["content"] == "Look: <image>\nColour?"  # placeholder present: left alone
    assert pairs[3].prompt[0]["content"] == "<video>\nWhat happens?" and len(pairs[3].videos[0]) == 3
    assert pairs[4].images == [] and (pairs[4].chosen, pairs[4].rejected) == ("hi", "no")
    assert len(errors) == 3
    assert "pairs.jsonl:6: invalid JSON" in errors[0]
    assert "pairs.jsonl:7: empty or missing 'rejected'" in errors[1]
    assert "pairs.jsonl:8" in errors[2] and "placeholder" in errors[2]
    same, _ = read_preference_jsonl(tmp_path / "pairs.jsonl", tmp_path / "images")
    assert [pair.prompt for pair in same] == [pair.prompt for pair in pairs]


def test_trl_layout_rows():
    image = PIL.Image.new("RGB", (28, 28), "red")
    rows = [
        {"prompt": "What colour?", "chosen": "red", "rejected": "blue", "images": [image]},
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            ],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
            "rejected": [{"role": "assistant", "content": "yes"}],
            "images": [image, image],
        },
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "hello", "rejected": "bye", "images": []},
        {"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b", "images": []},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": [{"type": "image"}]}], "rejected": "b"},
        {"prompt": "Hi", "chosen": "a", "rejected": "", "images": []},
    ]
    pairs, errors = pairs_from_hf_dataset(rows, "prefs")
    assert len(pairs) == 3 and len(errors) == 3
    assert pairs[0].prompt == [{"role": "user", "content": "<image>\nWhat colour?"}] and pairs[0].images == [image]
    assert pairs[1].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nSame?"},
    ]
    assert (pairs[1].chosen, pairs[1].rejected) == ("no", "yes")
    assert "prefs[3]: the prompt must end with a user turn" in errors[0]
    assert "prefs[4]: the 'chosen' answer may hold text only" in errors[1]
    assert "prefs[5]: empty or missing 'rejected'" in errors[2]
    # A Hugging Face dataset with the `Image` feature gives the same pairs.
    dataset = Dataset.from_list(rows[:1])
    (pair,), _ = pairs_from_hf_dataset(dataset)
    assert pair.prompt == pairs[0].prompt and isinstance(pair.images[0], PIL.Image.Image)


def test_collator_rows_masks_and_one_copy_of_tiles(tmp_path, tokenizer, processor):
    save_image(tmp_path / "images/a.png", (56, 56), (255, 0, 0))  # 4 tiles + thumbnail
    save_image(tmp_path / "images/b.png", (28, 28), (0, 0, 255))  # 1 tile
    meta = write_mmpr(
        tmp_path,
        [
            {"image": "a.png", "question": "What colour?", "chosen": "It is red.", "rejected": "Blue"},
            {"question": "Say hi.", "chosen": "hi", "rejected": "Hello there, friend."},
            {"image": ["b.png", "a.png"], "question": "Compare.", "chosen": "different", "rejected": "same"},
        ],
    )
    (source,), _ = read_preference_meta(meta)
    dataset = preference_dataset(source.samples)
    assert isinstance(dataset[0]["images"][0], str)  # paths stay paths
    collator = MPODataCollator(processor)
    batch = collator([dataset[index] for index in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "pixel_values", "image_num_patches"}
    assert batch["input_ids"].shape[0] == 6
    # One copy of each pair's tiles, pair order: a (5), then b (1) and a (5).
    assert batch["image_num_patches"].tolist() == [5, 1, 5] and batch["pixel_values"].shape[0] == 11
    encoder = SupervisedEncoder(processor)
    chosen_sample = source.samples[2].samples()[0]
    assert torch.equal(batch["pixel_values"][5:], encoder.encode(chosen_sample).pixel_values)
    answers = [("It is red.", "Blue"), ("hi", "Hello there, friend."), ("different", "same")]
    for index, (chosen, rejected) in enumerate(answers):
        for row, answer in ((index, chosen), (index + 3, rejected)):
            ids, mask = batch["input_ids"][row], batch["completion_mask"][row]
            length = int(batch["attention_mask"][row].sum())
            assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
            assert decode_runs(tokenizer, ids, mask) == [answer + "<|im_end|>"]
            text = tokenizer.decode(ids[:length])
            assert text.startswith(SYSTEM) and text.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")
        # The chosen and rejected rows share their prompt tokens exactly.
        start = int(batch["completion_mask"][index].nonzero()[0])
        assert int(batch["completion_mask"][index + 3].nonzero()[0]) == start
        assert torch.equal(batch["input_ids"][index, :start], batch["input_ids"][index + 3, :start])
    image_tokens = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum(1)
    assert image_tokens.tolist() == [5 * TOKENS_PER_TILE, 0, 6 * TOKENS_PER_TILE] * 2


def test_too_long_pairs_are_dropped_never_truncated(tmp_path, processor):
    pairs = synthetic_preference_pairs(2, image_size=28)
    pairs[1].chosen = "a very long answer " * 40
    encoder = PreferenceEncoder(processor, max_length=200)
    kept, dropped = plan_pairs(pairs, encoder)
    assert kept == [pairs[0]] and dropped == {"too long": 1}
    with pytest.raises(DataError, match="exceed max_length=200"):
        plan_pairs(pairs, encoder, on_error="raise")
    # At collation time (a dataset passed to the trainer unplanned) a failing pair is replaced by the previous one.
    collator = MPODataCollator(processor, max_length=200)
    batch = collator(pairs)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1]) and collator.dropped == {"too long": 1}
    with pytest.raises(DataError, match="exceed max_length"):
        MPODataCollator(processor, max_length=200)(pairs[::-1])


def test_image_that_fails_to_load_in_training_is_replaced(tmp_path, processor):
    path = save_image(tmp_path / "a.png", (28, 28), (255, 0, 0))
    row = {"prompt": "What colour?", "chosen": "red", "rejected": "blue", "images": [str(path)]}
    good = pair_from_row(row)
    broken = pair_from_row({**row, "images": [str(tmp_path / "gone.png")]}, "prefs[1]")
    collator = MPODataCollator(processor)
    batch = collator([good, broken])
    assert batch["pixel_values"].shape[0] == 2 and collator.dropped == {"missing image": 1}


def test_synthetic_pairs_prefer_the_right_colour():
    pairs = synthetic_preference_pairs(8, seed=3)
    colours = {(220, 30, 30): "red", (30, 170, 60): "green", (40, 70, 220): "blue", (240, 210, 30): "yellow"}
    for pair in pairs:
        colour = colours[pair.images[0].getpixel((28, 28))]
        assert pair.chosen == f"The square is {colour}." and pair.rejected != pair.chosen
        assert pair.rejected.startswith("The square is ")
    assert {pair.chosen for pair in pairs[:4]} == {f"The square is {c}." for c in colours.values()}


def test_pairs_render_like_the_sft_samples(processor):
    """The chosen row is exactly the SFT encoding of prompt + chosen answer (system prompt included)."""
    pair = synthetic_preference_pairs(1)[0]
    encoded = PreferenceEncoder(processor).encode(pair)
    sample = Sample(
        messages=pair.prompt + [{"role": "assistant", "content": pair.chosen}], images=pair.images, origin="x"
    )
    reference = SupervisedEncoder(processor).encode(sample)
    assert encoded.chosen.input_ids == reference.input_ids and encoded.chosen.labels == reference.labels
    assert torch.equal(encoded.pixel_values, reference.pixel_values) and encoded.rejected.pixel_values is None


def test_preference_video_frames_follow_the_official_mpo_prompt(tmp_path, tokenizer, processor):
    """Official `internvl_chat_mpo.py` replaces `<video>\\n` by `Frame{i}: <image>` lines joined by newlines, with
    no newline before the question (SFT data writes `Frame-{i}: ` and keeps it)."""
    for index in range(2):
        save_image(tmp_path / "images/clip" / f"{index:03d}.jpg", (28, 28), (0, 255, 0))
    (source,), _ = read_preference_meta(
        write_mmpr(tmp_path, [{"video": "clip", "question": "What happens?", "chosen": "green", "rejected": "red"}])
    )
    encoded = PreferenceEncoder(processor).encode(source.samples[0])
    span = "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_TILE + "</img>"
    for row in (encoded.chosen, encoded.rejected):
        assert f"user\nFrame1: {span}\nFrame2: {span}What happens?<|im_end|>" in tokenizer.decode(row.input_ids)
