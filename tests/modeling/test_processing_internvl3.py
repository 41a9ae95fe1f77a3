"""InternVL3Processor: prompt expansion, pixel order, padding, errors, save/load and remote-code loading.

`tokenizer` is the tiny InternVL3 tokenizer from tests/conftest.py.
"""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from internvl3_hf.modeling.chat_template import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_MESSAGE,
    build_chat_template,
    image_prompt,
    video_prompt,
)
from internvl3_hf.modeling.image_processing_internvl3 import InternVL3ImageProcessor
from internvl3_hf.modeling.configuration_internvl3 import InternVL3Config
from internvl3_hf.modeling.processing_internvl3 import InternVL3Processor, processor_for_config
from internvl3_hf.tiny import tiny_config

SEQ = 4  # <IMG_CONTEXT> tokens per 28 px tile in the tiny setup


@pytest.fixture
def processor(tokenizer) -> InternVL3Processor:
    return InternVL3Processor(InternVL3ImageProcessor(size=28), tokenizer, image_seq_length=SEQ)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def count(ids, token_id) -> int:
    return int((torch.as_tensor(ids) == token_id).sum())


def test_image_expansion_counts(processor):
    out = processor(images=[image(84, 56)], text="<image>\nDescribe.", return_tensors="pt")
    tiles = 7  # 3x2 grid + thumbnail
    assert out["image_num_patches"].tolist() == [tiles]
    assert out["pixel_values"].shape == (tiles, 3, 28, 28)
    assert count(out["input_ids"], processor.image_token_id) == SEQ * tiles
    assert count(out["input_ids"], processor.start_image_token_id) == 1
    assert count(out["input_ids"], processor.end_image_token_id) == 1
    expected_text = "<img>" + "<IMG_CONTEXT>" * (SEQ * tiles) + "</img>\nDescribe."
    assert processor.decode(out["input_ids"][0]) == expected_text
    assert processor.batch_decode(out["input_ids"]) == [expected_text]


def test_flat_and_nested_images_agree_and_keep_text_order(processor):
    a, b, c = image(28, 28, 1), image(56, 28, 2), image(28, 84, 3)
    texts = ["<image> one", "<image> then <image> two"]
    flat = processor(images=[a, b, c], text=texts, padding=True, return_tensors="pt")
    nested = processor(images=[[a], [b, c]], text=texts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_num_patches"):
        torch.testing.assert_close(flat[key], nested[key])
    separate = [processor.image_processor(x, return_tensors="pt")["pixel_values"] for x in (a, b, c)]
    torch.testing.assert_close(flat["pixel_values"], torch.cat(separate))
    assert flat["image_num_patches"].tolist() == [1, 3, 4]
    assert [count(ids, processor.image_token_id) for ids in flat["input_ids"]] == [SEQ * 1, SEQ * (3 + 4)]


def test_multi_image_samples_share_the_tile_budget_when_asked(processor):
    wide = image(112, 28)  # w/h = 4: a 4x1 grid + thumbnail alone
    alone = processor(images=[wide], text="<image>", max_patches=4)
    shared = processor(images=[wide, wide], text="<image><image>", max_patches=4, share_tile_budget=True)
    full = processor(images=[wide, wide], text="<image><image>", max_patches=4)  # official chat() inference
    assert alone["image_num_patches"].tolist() == [5]
    assert shared["image_num_patches"].tolist() == [3, 3]  # max(1, 4 // 2) = 2 tiles each: 2x1 + thumbnail
    assert full["image_num_patches"].tolist() == [5, 5]
    # The budget is per sample: a single-image sample next to a two-image one keeps the full budget.
    batch = processor(
        images=[[wide], [wide, wide]], text=["<image>", "<image><image>"], max_patches=4, padding=True,
        share_tile_budget=True,
    )
    assert batch["image_num_patches"].tolist() == [5, 3, 3]


def test_video_expansion_and_pixel_order(processor):
    frames = [image(60, 40, seed=i) for i in range(3)]
    picture = image(56, 28, seed=9)
    out = processor(
        images=[picture], videos=[frames], text="<video>\n<image>\nWhat changed?", return_tensors="pt"
    )
    span = "<img>" + "<IMG_CONTEXT>" * SEQ + "</img>"
    picture_span = "<img>" + "<IMG_CONTEXT>" * (SEQ * 3) + "</img>"
    assert processor.decode(out["input_ids"][0]) == (
        f"Frame1: {span}\nFrame2: {span}\nFrame3: {span}\n{picture_span}\nWhat changed?"
    )
    assert out["image_num_patches"].tolist() == [1, 1, 1, 3]
    frame_tiles = processor.image_processor.preprocess_frames(frames, return_tensors="pt")["pixel_values"]
    picture_tiles = processor.image_processor(picture, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], torch.cat([frame_tiles, picture_tiles]))


@pytest.mark.parametrize(
    ("frame_format", "expected"),
    [
        # official chat() / README video prompt: "Frame{i}: <image>\n" per frame, then the question
        ("chat", "Frame1: {s}\nFrame2: {s}\nWhat changed?"),
        # internvl_chat_finetune.py: "<video>\n" -> "\n".join("Frame-{i}: <image>") + "\n"
        ("sft", "Frame-1: {s}\nFrame-2: {s}\nWhat changed?"),
        # internvl_chat_mpo.py: "<video>\n" -> "\n".join("Frame{i}: <image>"), no newline after the last frame
        ("mpo", "Frame1: {s}\nFrame2: {s}What changed?"),
    ],
)
def test_video_frame_formats_follow_the_official_path(processor, frame_format, expected):
    frames = [image(28, 28, seed=i) for i in range(2)]
    out = processor(videos=[frames], text="<video>\nWhat changed?", video_frame_format=frame_format)
    span = "<img>" + "<IMG_CONTEXT>" * SEQ + "</img>"
    assert processor.decode(out["input_ids"][0]) == expected.format(s=span)
    assert processor.video_span(2, frame_format) == expected.format(s=span).split("What changed?")[0].rstrip("\n")


def test_unknown_video_frame_format_is_refused(processor):
    with pytest.raises(ValueError, match="video_frame_format must be one of"):
        processor(videos=[[image(28, 28)]], text="<video>\nHi", video_frame_format="Frame")


def test_planning_from_image_sizes_gives_the_same_tokens(processor):
    pictures = [image(84, 56, seed=1), image(28, 56, seed=2)]
    frames = [image(28, 28, seed=i) for i in range(3)]
    text = "<video>\nImage-1: <image>\nImage-2: <image>\nSame?"
    kwargs = {"share_tile_budget": True, "max_patches": 4, "video_frame_format": "sft"}
    full = processor(images=pictures, videos=[frames], text=text, **kwargs)
    sizes = [(picture.height, picture.width) for picture in pictures]
    planned = processor(image_sizes=sizes, video_num_frames=[3], text=text, **kwargs)
    assert planned["input_ids"] == full["input_ids"]
    assert planned["image_num_patches"].tolist() == full["image_num_patches"].tolist() == [1, 1, 1, 3, 3]
    assert "pixel_values" not in planned
    with pytest.raises(ValueError, match="not both"):
        processor(images=pictures, image_sizes=sizes, text=text)


def test_jpeg_seed_draws_a_quality_per_tile_reproducibly(processor):
    """Processor kwargs are deep-copied, so the augmentation takes a seed: one generator per call, one draw per tile
    (each image's tiles and thumbnail, then each video frame)."""
    picture, frames = image(56, 28, seed=1), [image(28, 28, seed=i) for i in range(2)]
    text = "<image>\n<video>\nHi"

    def pixels(seed):
        return processor(images=[picture], videos=[frames], text=text, jpeg_seed=seed)["pixel_values"]

    clean = processor(images=[picture], videos=[frames], text=text)["pixel_values"]
    first, again, other = pixels(0), pixels(0), pixels(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert all(not np.array_equal(a, b) for a, b in zip(first, clean))  # every tile (3 + 2 frames) re-encoded
    qualities = random.Random(0)
    expected = processor.image_processor(picture, jpeg_rng=qualities)["pixel_values"]
    frame_tiles = processor.image_processor.preprocess_frames(frames, jpeg_rng=qualities)["pixel_values"]
    np.testing.assert_array_equal(first, np.concatenate([expected, frame_tiles]))


def test_chat_template_renders_images_like_image_prompt(processor):
    """`image_prompt` / `video_prompt` (used by data sources writing plain text) equal the template's rendering."""
    for num_images in (1, 3):
        content = [{"type": "image"}] * num_images + [{"type": "video"}, {"type": "text", "text": "Hi"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}])
        expected = "".join(image_prompt(k, num_images) for k in range(1, num_images + 1)) + video_prompt() + "Hi"
        assert f"<|im_start|>user\n{expected}<|im_end|>\n" in text


def test_assistant_mask_covers_each_answer_and_its_end_of_turn(processor, tokenizer):
    """`{% generation %}` marks each answer and its `<|im_end|>`, never the header, the newline after the answer,
    the system or user turns; the mask stays aligned after image and video expansion shift the text."""
    clip = [image(28, 28), image(28, 28, 1)]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image(56, 28)}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red, mostly."},
        {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It moves."}]},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert current == []
    assert [processor.decode(run) for run in runs] == ["Red, mostly.<|im_end|>", "It moves.<|im_end|>"]
    assert count(ids, processor.image_token_id) == SEQ * (3 + 2)
    # Each marked run sits right after an `<|im_start|>assistant\n` header and is followed by "\n".
    text = processor.decode(ids)
    assert text.count("<|im_start|>assistant\nRed, mostly.<|im_end|>\n<|im_start|>user") == 1
    assert text.endswith("<|im_start|>assistant\nIt moves.<|im_end|>\n")


def test_padding_is_left_by_default_and_right_on_request(processor):
    texts = ["<image> short", "<image> a much longer prompt than the first"]
    images = [image(28, 28), image(28, 28)]
    left = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    right = processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert left["attention_mask"].sum() == right["attention_mask"].sum()


def test_left_padding_default_beats_a_saved_tokenizer_setting(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    processor = InternVL3Processor(tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    out = processor(text=["a", "a b c d"], padding=True, return_tensors="pt")
    assert out["attention_mask"][0].tolist()[0] == 0


def test_mm_token_type_ids_and_replacement_offsets(processor):
    text = "Look: <image> now"
    out = processor(
        images=[image(56, 28)], text=text, return_mm_token_type_ids=True, return_text_replacement_offsets=True
    )
    spans = len(processor.image_span(3))
    assert sum(out["mm_token_type_ids"][0]) == SEQ * 3 + 2
    [offset] = out["text_replacement_offsets"][0]
    assert offset["span"] == (6, 13) and offset["new_span"] == (6, 6 + spans)
    assert offset["replacement"] == processor.image_span(3) and offset["type"] == "image"


def test_num_multimodal_tokens(processor):
    data = processor._get_num_multimodal_tokens(image_sizes=[[56, 84], [28, 28]])
    assert data.num_image_patches == [7, 1]
    assert data.num_image_tokens == [SEQ * 7 + 2, SEQ + 2]


def test_image_count_mismatch_names_counts_and_samples(processor):
    with pytest.raises(ValueError, match=r"3 <image> placeholder\(s\) \(sample 0: 1, sample 1: 2\) but 2 images"):
        processor(images=[image(28, 28)] * 2, text=["<image>", "<image><image>"])
    with pytest.raises(ValueError, match=r"Sample 1 has 2 <image> placeholder\(s\) but 1 images were given"):
        processor(images=[[image(28, 28)], [image(28, 28)]], text=["<image>", "<image><image>"])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) \(sample 0: 1\) but 0 images"):
        processor(text="<image> no image given")
    with pytest.raises(ValueError, match=r"1 <video> placeholder\(s\) \(sample 0: 1\) but 2 videos"):
        processor(videos=[[image(28, 28)], [image(28, 28)]], text="<video>")


def test_truncation_inside_an_image_span_raises(processor):
    text = "<image>\nDescribe the picture."
    full = processor(images=[image(84, 56)], text=text)
    length = len(full["input_ids"][0])
    with pytest.raises(ValueError, match=rf"Sample 0 is {length} tokens long .* max_length=10 would cut"):
        processor(images=[image(84, 56)], text=text, truncation=True, max_length=10)
    # Cutting only text after the image is fine.
    kept = processor(images=[image(84, 56)], text=text, truncation=True, max_length=length - 2)
    assert len(kept["input_ids"][0]) == length - 2


def test_pre_expanded_text_is_refused(processor):
    with pytest.raises(ValueError, match="Sample 0 already contains <IMG_CONTEXT>"):
        processor(text="<IMG_CONTEXT> hi")


def test_corrupt_image_file_raises_with_its_path(processor, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"Could not decode the image file .*broken\.png.*UnidentifiedImageError"):
        processor(images=[str(corrupt)], text="<image>")


def test_text_only_and_model_input_names(processor):
    out = processor(text=["hello", "hello world"], padding=True, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    assert set(processor.model_input_names) == {"input_ids", "attention_mask", "pixel_values", "image_num_patches"}


def test_apply_chat_template_tokenizes_images(processor):
    content = [{"type": "image", "image": image(56, 28)}, {"type": "text", "text": "Hi"}]
    messages = [{"role": "user", "content": content}]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["image_num_patches"].tolist() == [3]
    assert count(out["input_ids"], processor.image_token_id) == SEQ * 3
    assert processor.decode(out["input_ids"][0]).endswith("</img>\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_save_and_load_round_trip(processor, tmp_path):
    processor.image_processor.max_patches = 6
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path)
    )
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_seq_length"] == SEQ and saved["image_processor"]["max_patches"] == 6
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    loaded = InternVL3Processor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == SEQ and loaded.chat_template == CHAT_TEMPLATE
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    inputs = dict(images=[image(100, 30)], text="<image>\nHi", return_tensors="pt")
    expected, actual = processor(**inputs), loaded(**inputs)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def official_config(system_message=None) -> dict:
    """An OpenGVLab-style config.json (model_type internvl_chat), scaled down to 28 px tiles."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 28,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "system_message": system_message,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        "vision_config": {"architectures": ["InternVisionModel"], "image_size": 28, "patch_size": 7},
    }


@pytest.mark.parametrize("system_message", [None, "You are a careful assistant."])
def test_official_directory_without_processor_files(tokenizer, tmp_path, system_message):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(official_config(system_message)))
    loaded = InternVL3Processor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == (28 // 7) ** 2 // 4
    settings = loaded.image_processor
    assert (settings.size.height, settings.min_patches, settings.max_patches) == (28, 1, 6)
    assert settings.use_thumbnail and settings.dynamic_image_size
    assert loaded.chat_template == (build_chat_template(system_message) if system_message else CHAT_TEMPLATE)
    prompt = loaded.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith(f"<|im_start|>system\n{system_message or DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n")
    out = loaded(images=[image(84, 84)], text="<image>", return_tensors="pt")
    assert out["image_num_patches"].tolist() == [5]  # 2x2 (max 6) + thumbnail


def test_plugin_model_directory_without_processor_files(tokenizer, tmp_path):
    tiny_config(tokenizer, max_dynamic_patch=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = InternVL3Processor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == SEQ
    assert (loaded.image_processor.size.height, loaded.image_processor.max_patches) == (28, 3)
    assert loaded.chat_template == CHAT_TEMPLATE


def test_processor_for_config_follows_a_config_that_agrees_with_the_tokenizer(tokenizer):
    config = tiny_config(tokenizer, max_dynamic_patch=3, system_message="Be brief.")
    built = processor_for_config(tokenizer, config)
    assert built.image_token_id == config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (built.start_image_token_id, built.end_image_token_id) == (
        config.image_start_token_id,
        config.image_end_token_id,
    )
    assert (built.image_seq_length, built.image_processor.max_patches) == (SEQ, 3)
    assert built.chat_template == build_chat_template("Be brief.")


def test_processor_for_config_refuses_a_tokenizer_with_other_ids(tokenizer):
    """The tiny tokenizer puts the image tokens at small ids; the default config expects the released ones."""
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    expected = InternVL3Config.image_token_id
    with pytest.raises(
        ValueError,
        match=rf"<IMG_CONTEXT> is id {context_id} in the tokenizer given to processor_for_config but "
        rf"image_token_id={expected}",
    ) as error:
        processor_for_config(tokenizer, InternVL3Config())
    assert "<img> is id" in str(error.value) and "<|im_end|> is id" in str(error.value)


def test_unknown_model_type_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type='llava'"):
        InternVL3Processor.from_pretrained(tmp_path)


REMOTE_CODE_CHECK = """
import importlib.abc, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "internvl3_hf":
            raise ImportError(f"{name} must not be needed to load a saved processor")

sys.meta_path.insert(0, BlockPackage())
import torch
from PIL import Image
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
assert type(processor.image_processor).__name__ == "InternVL3ImageProcessor"
out = processor(images=[Image.new("RGB", (84, 56), (9, 99, 199))], text="<image>\\nHi", return_tensors="pt")
torch.save(dict(out), sys.argv[2])
assert not [name for name in sys.modules if name.split(".")[0] == "internvl3_hf"]
"""


def test_trust_remote_code_load_without_the_package(processor, tmp_path, monkeypatch):
    monkeypatch.setattr(InternVL3Processor, "_auto_class", None)
    monkeypatch.setattr(InternVL3ImageProcessor, "_auto_class", None)
    InternVL3Processor.register_for_auto_class()
    InternVL3ImageProcessor.register_for_auto_class()
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    config = json.loads((saved / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_internvl3.InternVL3Processor"}
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_internvl3.InternVL3ImageProcessor"
    )
    assert {"processing_internvl3.py", "image_processing_internvl3.py", "chat_template.py"} <= set(os.listdir(saved))

    result = tmp_path / "out.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    script = textwrap.dedent(REMOTE_CODE_CHECK)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", script, str(saved), str(result)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(result)
    local = processor(images=[Image.new("RGB", (84, 56), (9, 99, 199))], text="<image>\nHi", return_tensors="pt")
    for key in local:
        torch.testing.assert_close(remote[key], local[key])
