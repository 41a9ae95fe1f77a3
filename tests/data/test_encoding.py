"""SupervisedEncoder: exactly which tokens carry loss, image/video span expansion, pixel order, JPEG augmentation.

Every case spells out the expected conversation by hand as (text, supervised) pieces, with image spans written out
(`<img>` + 4·tiles `<IMG_CONTEXT>` + `</img>`): the encoded `input_ids` must equal the tokenisation of that text
and the labels must be exactly the supervised pieces (assistant answers + their `<|im_end|>`).
"""

from __future__ import annotations

import datasets
import PIL.Image
import pytest
import torch
from sft_data_helpers import (  # noqa: F401  (fixtures)
    IGNORE,
    encoder,
    normalized_colour,
    processor,
    save_image,
    span,
    supervised_runs,
    tile_colours,
    write_official,
)

from internvl3_hf.data import (
    DataError,
    Sample,
    SFTDataset,
    SupervisedEncoder,
    read_official_meta,
    samples_from_hf_dataset,
)
from internvl3_hf.modeling.chat_template import DEFAULT_SYSTEM_MESSAGE

PALETTE = {
    "red": (200, 30, 30),
    "blue": (30, 30, 200),
    "yellow": (220, 200, 20),
    "frame1": (30, 200, 30),
    "frame2": (30, 150, 150),
    "frame3": (150, 150, 30),
}


def system(text: str = DEFAULT_SYSTEM_MESSAGE) -> tuple[str, bool]:
    return (f"<|im_start|>system\n{text}<|im_end|>\n", False)


def user(text: str, first: bool = True) -> tuple[str, bool]:
    return (("" if first else "\n") + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", False)


def answer(text: str) -> tuple[str, bool]:
    return (f"{text}<|im_end|>", True)


END = ("\n", False)


# --------------------------------------------------------------------------------------------------- cases
# Each builder returns (sample, expected pieces, expected tile colours in pixel_values order, image_num_patches).
def case_system_given(tmp_path):
    sample = Sample(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How many shapes?"},
            {"role": "assistant", "content": "There are three shapes."},
        ]
    )
    pieces = [system("You are a helpful assistant."), user("How many shapes?"), answer("There are three shapes."), END]
    return sample, pieces, [], []


def case_default_system(tmp_path):
    sample = Sample([{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "thanks"}])
    return sample, [system(), user("hello world"), answer("thanks"), END], [], []


def case_multi_turn(tmp_path):
    sample = Sample(
        [
            {"role": "user", "content": "Step 1: count the red shapes."},
            {"role": "assistant", "content": "The answer is 5."},
            {"role": "user", "content": "What colour is the square?"},
            {"role": "assistant", "content": "The square is yellow."},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "hello"},
        ]
    )
    pieces = [
        system(),
        user("Step 1: count the red shapes."),
        answer("The answer is 5."),
        user("What colour is the square?", first=False),
        answer("The square is yellow."),
        user("thanks", first=False),
        answer("hello"),
        END,
    ]
    return sample, pieces, [], []


def _official(tmp_path, record):
    sources, errors = read_official_meta(write_official(tmp_path, [record]))
    assert errors == []
    (sample,) = sources[0].samples
    return sample


def case_official_multi_image_prepended(tmp_path):
    """Two images, no placeholder: `Image-1: <image>\\nImage-2: <image>\\n` is prepended; 12 tiles shared → 6 each."""
    save_image(tmp_path / "img" / "red.png", (56, 28), PALETTE["red"])  # 2x1 grid + thumbnail = 3 tiles
    save_image(tmp_path / "img" / "blue.png", (28, 28), PALETTE["blue"])  # 1 tile, no thumbnail
    record = {
        "image": ["img/red.png", "img/blue.png"],
        "conversations": [
            {"from": "human", "value": "Describe the image."},
            {"from": "gpt", "value": "A red circle sits left of a blue square."},
        ],
    }
    pieces = [
        system(),
        user(f"Image-1: {span(3)}\nImage-2: {span(1)}\nDescribe the image."),
        answer("A red circle sits left of a blue square."),
        END,
    ]
    return _official(tmp_path, record), pieces, ["red"] * 3 + ["blue"], [3, 1]


def case_official_video_before_image(tmp_path):
    """A directory of frames: `<video>` → `Frame-{i}: <img>…</img>` lines (official SFT); the video comes first."""
    for index, name in enumerate(("frame1", "frame2", "frame3")):
        save_image(tmp_path / "clip" / f"{index:03d}.png", (40, 30), PALETTE[name])
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    save_image(tmp_path / "red.png", (56, 28), PALETTE["red"])
    record = {
        "image": "red.png",
        "video": "clip",
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "<video>\nWhat happens before <image>?"},
            {"from": "gpt", "value": "The square turns red."},
        ],
    }
    frames = "\n".join(f"Frame-{i}: {span(1)}" for i in (1, 2, 3))
    pieces = [
        system("You are a helpful assistant."),
        user(f"{frames}\nWhat happens before {span(3)}?"),
        answer("The square turns red."),
        END,
    ]
    return _official(tmp_path, record), pieces, ["frame1", "frame2", "frame3", "red", "red", "red"], [1, 1, 1, 3]


def case_official_text_only(tmp_path):
    record = {"conversations": [{"from": "human", "value": "2 + 3 = ?"}, {"from": "gpt", "value": "5"}]}
    return _official(tmp_path, record), [system(), user("2 + 3 = ?"), answer("5"), END], [], []


def case_official_image_placeholder_missing(tmp_path):
    save_image(tmp_path / "tall.png", (28, 56), PALETTE["yellow"])  # 1x2 grid + thumbnail = 3 tiles
    record = {
        "image": "tall.png",
        "conversations": [
            {"from": "human", "value": "What colour is the square?"},
            {"from": "gpt", "value": "The square is yellow."},
            {"from": "human", "value": "Answer the question step by step."},
            {"from": "gpt", "value": "Step 1: it is yellow."},
        ],
    }
    pieces = [
        system(),
        user(f"{span(3)}\nWhat colour is the square?"),
        answer("The square is yellow."),
        user("Answer the question step by step.", first=False),
        answer("Step 1: it is yellow."),
        END,
    ]
    return _official(tmp_path, record), pieces, ["yellow"] * 3, [3]


def case_official_image_in_second_turn(tmp_path):
    save_image(tmp_path / "blue.png", (28, 28), PALETTE["blue"])
    record = {
        "image": "blue.png",
        "conversations": [
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "hello world"},
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "blue"},
        ],
    }
    pieces = [
        system(),
        user("hello"),
        answer("hello world"),
        user(f"{span(1)}\nWhat colour?", first=False),
        answer("blue"),
        END,
    ]
    return _official(tmp_path, record), pieces, ["blue"], [1]


def _hf(rows):
    samples, errors = samples_from_hf_dataset(datasets.Dataset.from_list(rows), "hf")
    assert errors == []
    return samples[0]


def case_hf_content_list_two_images(tmp_path):
    """HF conversational layout; two images in one turn render as `Image-k:` lines (the chat template's rule)."""
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The left one is red."}]},
        ],
        "images": [PIL.Image.new("RGB", (56, 28), PALETTE["red"]), PIL.Image.new("RGB", (28, 56), PALETTE["yellow"])],
    }
    pieces = [system(), user(f"Image-1: {span(3)}\nImage-2: {span(3)}\nCompare."), answer("The left one is red."), END]
    return _hf([row]), pieces, ["red"] * 3 + ["yellow"] * 3, [3, 3]


CASES = {
    "system-given": case_system_given,
    "default-system": case_default_system,
    "multi-turn": case_multi_turn,
    "multi-image-prepended": case_official_multi_image_prepended,
    "video-before-image": case_official_video_before_image,
    "text-only": case_official_text_only,
    "image-placeholder-missing": case_official_image_placeholder_missing,
    "image-in-second-turn": case_official_image_in_second_turn,
    "hf-content-list-two-images": case_hf_content_list_two_images,
}


@pytest.mark.parametrize("name", list(CASES))
def test_labels_cover_exactly_the_answers(name, tmp_path, tokenizer, processor, encoder):
    sample, pieces, tiles, num_patches = CASES[name](tmp_path)
    encoded = encoder.encode(sample)

    expected_ids, expected_labels = [], []
    for text, supervised in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if supervised else [IGNORE] * len(ids)
    whole = "".join(text for text, _ in pieces)
    # Cutting the text at the answers does not change its tokens: training sees what inference sees.
    assert tokenizer(whole, add_special_tokens=False)["input_ids"] == expected_ids
    assert tokenizer.decode(encoded.input_ids) == whole
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    assert supervised_runs(tokenizer, encoded) == [text for text, supervised in pieces if supervised]

    # Never an image, system, user or header token.
    never = {tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>")}
    assert not never & {label for label in encoded.labels if label != IGNORE}

    assert encoded.image_num_patches == num_patches
    # Each <img>…</img> span, in text order, holds 4 tokens per tile of its entry in image_num_patches.
    start, end, context = (tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
    spans, current = [], None
    for token in encoded.input_ids:
        if token == start:
            current = 0
        elif token == context:
            current += 1
        elif token == end:
            spans.append(current)
            current = None
    assert spans == [4 * tiles for tiles in num_patches]
    if tiles:
        assert encoded.pixel_values.shape == (len(tiles), 3, 28, 28)
        assert tile_colours(processor, encoded.pixel_values, PALETTE) == tiles
    else:
        assert encoded.pixel_values is None

    # Planning (no pixels) gives the same tokens.
    planned = encoder.encode(sample, with_pixels=False)
    assert (planned.input_ids, planned.labels, planned.image_num_patches) == (
        encoded.input_ids, encoded.labels, encoded.image_num_patches,
    )
    assert planned.pixel_values is None


def test_video_frames_follow_the_official_path_of_the_data(tmp_path, tokenizer, processor):
    """SFT data: `Frame-1: ` lines (official fine-tuning); preference data: `Frame1: ` and no newline after the
    last frame (official MPO); inference: `Frame1: ` (official chat())."""
    for index in range(2):
        save_image(tmp_path / "clip" / f"{index:03d}.png", (28, 28), PALETTE["frame1"])
    turns = [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "5"}]
    sample = _official(tmp_path, {"video": "clip", "conversations": turns})
    expected = {
        "sft": f"Frame-1: {span(1)}\nFrame-2: {span(1)}\nWhat happens?",
        "mpo": f"Frame1: {span(1)}\nFrame2: {span(1)}What happens?",
        "chat": f"Frame1: {span(1)}\nFrame2: {span(1)}\nWhat happens?",
    }
    for frame_format, prompt in expected.items():
        encoded = SupervisedEncoder(processor, video_frame_format=frame_format).encode(sample)
        assert f"<|im_start|>user\n{prompt}<|im_end|>" in tokenizer.decode(encoded.input_ids), frame_format
    assert SupervisedEncoder(processor).video_frame_format == "sft"


def test_video_placeholder_inside_a_line_is_refused(tmp_path, encoder):
    sample = Sample(
        [{"role": "user", "content": "Watch <video> now."}, {"role": "assistant", "content": "ok"}],
        videos=[[PIL.Image.new("RGB", (28, 28))]],
        origin="v.jsonl:2",
    )
    with pytest.raises(DataError, match=r"v\.jsonl:2: a <video> placeholder must end its line"):
        encoder.encode(sample)


def test_video_with_many_frames_samples_eight_in_order(tmp_path, tokenizer, encoder):
    for index in range(20):
        save_image(tmp_path / "clip" / f"{index:03d}.png", (28, 28), (10 * index, 0, 0))
    turns = [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "5"}]
    record = {"video": "clip", "conversations": turns}
    sample = _official(tmp_path, record)
    frames = [int(path.stem) for path in sample.videos[0]]
    assert len(frames) == 8 and frames == sorted(set(frames)) and frames[-1] >= 16, frames
    encoded = encoder.encode(sample)
    text = tokenizer.decode(encoded.input_ids)
    assert "Frame-8: <img>" in text and "Frame-9" not in text
    assert text.index("Frame-1: <img>") < text.index("What happens?")
    assert encoded.image_num_patches == [1] * 8 and encoded.pixel_values.shape[0] == 8


# --------------------------------------------------------------------------------------------------- edge cases
def test_images_in_different_turns_of_the_content_list_layout(tokenizer, encoder):
    """Images of two turns number as Image-1/Image-2 over the whole conversation; the answer spans must not move
    (a prefix of the conversation alone would render its one image without `Image-1: `)."""
    image = PIL.Image.new("RGB", (28, 28), PALETTE["blue"])
    sample = Sample(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": "blue"},
        ],
        images=[image, image],
    )
    encoded = encoder.encode(sample)
    assert supervised_runs(tokenizer, encoded) == ["blue<|im_end|>", "blue<|im_end|>"]


@pytest.mark.parametrize("final", [False, True], ids=["empty-answer-mid-conversation", "empty-last-answer"])
def test_empty_assistant_turn_is_never_a_user_turn_or_a_crash(final, tokenizer, processor, encoder):
    """The template renders an empty answer as its header only (no `<|im_end|>`): no label may then fall on the
    following user turn, and the error must be a `DataError` that `SFTDataset` drops (a long run never crashes)."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]
    if not final:
        messages += [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "blue"}]
    sample = Sample(messages, origin="data.jsonl:7")
    try:
        encoded = encoder.encode(sample)
    except DataError as error:
        assert "data.jsonl:7" in str(error)
    else:
        assert supervised_runs(tokenizer, encoded) == ([] if final else ["blue<|im_end|>"])
    good = Sample([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}])
    dataset = SFTDataset([good, sample], SupervisedEncoder(processor))  # drop mode never raises on a bad sample
    assert len(dataset) >= 1


def test_assistant_placeholder_is_rejected(tmp_path, encoder):
    sample = Sample(
        [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "see <image>"}],
        images=[PIL.Image.new("RGB", (28, 28)), PIL.Image.new("RGB", (28, 28))],
        origin="x.jsonl:3",
    )
    with pytest.raises(DataError, match=r"x\.jsonl:3: an assistant answer holds"):
        encoder.encode(sample)


# --------------------------------------------------------------------------------------------------- augmentation
def _photo(width: int = 56, height: int = 28) -> PIL.Image.Image:
    """A smooth colour gradient with a little texture (what JPEG compresses well)."""
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, 1 - x * y], -1) * 200 + 20
    rgb = rgb + 10 * torch.sin(torch.arange(width * height).view(height, width, 1) * 0.7)
    return PIL.Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).numpy())


def test_jpeg_augmentation_is_small_random_and_reproducible(processor):
    image = _photo()

    def pixels(augment: bool, seed: int, times: int = 1):
        sample = Sample(
            [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "A picture."},
            ],
            images=[image],
            data_augment=augment,
        )
        encoder = SupervisedEncoder(processor, seed=seed)
        return [encoder.encode(sample).pixel_values for _ in range(times)]

    (clean,) = pixels(False, 0)
    augmented = pixels(True, 0, times=6)
    assert clean.shape == augmented[0].shape == (3, 3, 28, 28)  # 2x1 grid + thumbnail
    for tiles in augmented:
        difference = (tiles - clean).abs()
        assert difference.mean() > 1e-3  # re-encoded...
        assert difference.mean() < 0.1 * clean.abs().mean()  # ...but close to the original
    # A fresh draw per access (qualities 75–100), the same draws for the same encoder seed.
    assert len({tuple(tiles.flatten()[:500].tolist()) for tiles in augmented}) >= 2
    for first, second in zip(augmented, pixels(True, 0, times=6)):
        assert torch.equal(first, second)
    assert any(not torch.equal(a, b) for a, b in zip(augmented, pixels(True, 1, times=6)))
    # Without data_augment the seed changes nothing.
    assert torch.equal(pixels(False, 1)[0], clean)


def test_jpeg_augmentation_follows_the_meta_flag(tmp_path, processor):
    save_image(tmp_path / "red.png", (28, 28), PALETTE["red"])
    _photo(28, 28).save(tmp_path / "photo.png")
    record = {"image": "photo.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "5"}]}
    write_official(tmp_path, [record], name="plain")
    meta = write_official(tmp_path, [record], name="augmented", data_augment=True, max_dynamic_patch=1)
    sources, _ = read_official_meta(meta)
    by_name = {source.name: source.samples[0] for source in sources}
    assert by_name["augmented"].data_augment and not by_name["plain"].data_augment
    assert by_name["augmented"].max_dynamic_patch == 1
    encoder = SupervisedEncoder(processor, seed=0)
    plain, augmented = (encoder.encode(by_name[name]).pixel_values for name in ("plain", "augmented"))
    assert plain.shape == augmented.shape == (1, 3, 28, 28)
    assert not torch.equal(plain, augmented)
    assert (plain - augmented).abs().mean() < 0.1 * plain.abs().mean()


def test_normalized_colour_helper_matches_the_processor(processor):
    """Sanity check of the colour oracle the label table relies on."""
    image = PIL.Image.new("RGB", (28, 28), PALETTE["red"])
    tile = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    expected = torch.tensor(normalized_colour(processor, PALETTE["red"]))
    assert torch.allclose(tile.flatten(1).mean(1), expected, atol=1e-3)
