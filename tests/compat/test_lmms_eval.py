"""lmms-eval's `internvl3` model on a plugin checkpoint, replayed call by call in a process without the package.

Source: lmms-eval 0.7.2, EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/models/simple/internvl3.py`: `AutoModel.from_pretrained(..., torch_dtype=bf16, low_cpu_mem_usage=True,
use_flash_attn=True, trust_remote_code=True, device_map=...)` (L279-286), `AutoTokenizer(..., use_fast=False)`
(L288), then per request `model.chat(tokenizer, pixel_values, contexts, gen_kwargs, num_patches_list=...,
history=None, return_history=True)` (L439-447, L463-471 for video). The adapter pins CUDA devices, so the replay
makes its calls rather than instantiating the class; the device is the CPU here.
"""

from __future__ import annotations

import pytest
import torch
from client_code import lmms_eval_gen_kwargs, lmms_eval_image_inputs, lmms_eval_load_image, lmms_eval_video_inputs
from native_reference import native_batch_chat, native_chat
from PIL import Image

# Task gen_kwargs as lmms-eval tasks give them (`until` and unknown keys are dropped by the adapter).
SHORT = {"max_new_tokens": 24, "temperature": 0, "top_p": 1.0, "until": ["\n\n"]}


def cases(images: list[str]) -> list[dict]:
    landscape, portrait, *frames = images
    return [
        {"kind": "image", "images": [landscape], "contexts": "What colour is the square?", "gen_kwargs": SHORT},
        {"kind": "image", "images": [landscape, portrait], "contexts": "Compare the two images.", "gen_kwargs": {}},
        {"kind": "image", "images": [portrait, landscape], "contexts": "A: <image> B: <image> Which is taller?",
         "gen_kwargs": SHORT},  # fmt: skip
        {"kind": "text", "images": [], "contexts": "How many sides has a square?", "gen_kwargs": SHORT},
        {"kind": "video", "images": frames, "contexts": "What happens in the video?", "gen_kwargs": SHORT},
    ]


@pytest.fixture
def replayed(compat, run_replay):
    if "lmms_eval" not in compat:
        images = compat["images"]
        spec = {
            "client": "lmms_eval",
            "checkpoint": compat["dirs"]["chat"],
            "device": "cpu",
            "dtypes": ["float32", "bfloat16"],
            "cases": cases(images),
            "batch": {"images": images[:2], "questions": ["Describe the image.", "What is it?"],
                      "gen_kwargs": SHORT},  # fmt: skip
        }
        compat["lmms_eval"] = (spec, run_replay(spec))
    return compat["lmms_eval"]


def expected_answer(compat, case: dict) -> str:
    native, tokenizer = compat["natives"]["chat"], compat["tokenizer"]
    visuals = [Image.open(path) for path in case["images"]]
    if case["kind"] == "video":
        pixel_values, num_patches_list, question = lmms_eval_video_inputs(visuals, case["contexts"])
    elif visuals:
        pixel_values, num_patches_list, question = lmms_eval_image_inputs(visuals, case["contexts"])
    else:
        pixel_values, num_patches_list, question = None, None, case["contexts"]
    gen_kwargs = lmms_eval_gen_kwargs(case["gen_kwargs"])
    return native_chat(native, tokenizer, question, pixel_values, gen_kwargs, num_patches_list=num_patches_list)


def test_lmms_eval_loads_the_chat_model_without_the_package(replayed):
    _, result = replayed
    assert result["package_importable"] is False
    for dtype in ("float32", "bfloat16"):
        loaded = result[dtype]
        assert loaded["class"] == "InternVL3ForConditionalGeneration"
        assert loaded["module"].startswith("transformers_modules.")
        assert loaded["dtype"] == f"torch.{dtype}"
        assert loaded["tokenizer"] == "Qwen2Tokenizer"  # use_fast=False
        assert loaded["attn"] == "eager"  # use_flash_attn=True without FlashAttention: the official fallback


def test_lmms_eval_answers_as_native_internvl_in_fp32(compat, replayed):
    spec, result = replayed
    answers = result["float32"]["answers"]
    expected = [expected_answer(compat, case) for case in spec["cases"]]
    assert answers == expected
    assert sum(len(answer) > 0 for answer in answers) >= 3  # random weights, but mostly non-empty answers


def test_lmms_eval_batch_chat_answers_as_native_internvl_in_fp32(compat, replayed):
    spec, result = replayed
    batch = spec["batch"]
    pixels = [lmms_eval_load_image(Image.open(path), max_num=6) for path in batch["images"]]
    expected = native_batch_chat(
        compat["natives"]["chat"], compat["tokenizer"], batch["questions"], torch.cat(pixels).to(torch.bfloat16),
        [p.shape[0] for p in pixels], lmms_eval_gen_kwargs(batch["gen_kwargs"]),
    )  # fmt: skip
    assert result["float32"]["batch_answers"] == expected


def test_lmms_eval_loads_and_answers_in_bf16(replayed):
    spec, result = replayed
    answers = result["bfloat16"]["answers"]
    assert len(answers) == len(spec["cases"]) and all(isinstance(answer, str) for answer in answers)
    assert len(result["bfloat16"]["batch_answers"]) == len(spec["batch"]["questions"])
