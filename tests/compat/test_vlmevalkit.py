"""VLMEvalKit's InternVL adapter on plugin checkpoints, replayed call by call in a process without the package.

Source: VLMEvalKit 0.2rc1, open-compass/VLMEvalKit@e8e78f05f3080fe28154f2130321f17951c3be94,
`vlmeval/vlm/internvl/internvl_chat.py` class `InternVLChat` with `version="V2.0"` (the InternVL3 entries of
`vlmeval/config.py`): the slow tokenizer (L147), `AutoModel.from_pretrained(..., torch_dtype=bf16,
trust_remote_code=True, low_cpu_mem_usage=True, device_map="auto")` (L181-186), Best-of-N candidates through
`chat(..., num_patches_list=..., verbose=...)` with `model.system_message` set for the R1 prompt (L412-438), the
critic's `select_best_response(tokenizer=..., question=..., response_list=..., pixel_values=...,
num_patches_list=...)` (L440-447; the critic loaded as at L193-200, with the `load_in_8bit=False` that releases
before open-compass/VLMEvalKit@dfc9b3a still passed), and multi-turn `chat(..., history=..., return_history=True)`
(L507-572). Tiling: `vlmeval/vlm/internvl/utils.py` (see `client_code.py`).
"""

from __future__ import annotations

import pytest
import torch
from client_code import (
    VLMEVALKIT_CHAT_KWARGS,
    vlmevalkit_candidate_kwargs,
    vlmevalkit_chat_inputs,
    vlmevalkit_image_inputs,
    vlmevalkit_kwargs,
)
from native_reference import native_chat, official_critic_scores

from internvl3_hf.best_of_n import PRM_SYSTEM_PROMPT

KWARGS = {"max_new_tokens": 48}  # `InternVLChat(**kwargs)` generation settings (the config may set them)
SYSTEM_PROMPT = "You are an AI assistant that thinks step by step before answering."


def text(value: str) -> dict:
    return {"type": "text", "value": value}


def image(path: str) -> dict:
    return {"type": "image", "value": path}


def spec_for(compat) -> dict:
    landscape, portrait, *_ = compat["images"]
    return {
        "client": "vlmevalkit",
        "checkpoint": compat["dirs"]["chat"],
        "critic": compat["dirs"]["critic"],
        "dtypes": ["float32", "bfloat16"],
        "kwargs": KWARGS,
        # `build_prompt` messages: the text first, then the images (internvl_chat.py L309-310).
        "generate": [
            {"message": [text("How many shapes are there?"), image(landscape)], "best_of_n": 3},
            {"message": [text("Which image is brighter?"), image(landscape), image(portrait)], "best_of_n": 1},
            {"message": [text("Describe the image."), image(portrait)], "best_of_n": 1,
             "system_prompt": SYSTEM_PROMPT},  # fmt: skip
        ],
        # Two user turns, each with an image (a single image only in earlier turns takes a client path that
        # passes a list to `load_image`, L539-542, and fails there).
        "conversation": [[image(landscape), text("What is in the image?")], [image(portrait), text("And here?")]],
    }


@pytest.fixture
def replayed(compat, run_replay):
    if "vlmevalkit" not in compat:
        spec = spec_for(compat)
        compat["vlmevalkit"] = (spec, run_replay(spec))
    return compat["vlmevalkit"]


def test_vlmevalkit_loads_chat_model_and_critic_without_the_package(replayed):
    _, result = replayed
    assert result["package_importable"] is False
    for dtype in ("float32", "bfloat16"):
        for loaded in (result[dtype], result[dtype]["critic"]):
            assert loaded["class"] == "InternVL3ForConditionalGeneration"
            assert loaded["module"].startswith("transformers_modules.")
            assert loaded["dtype"] == f"torch.{dtype}"
            assert loaded["tokenizer"] == "Qwen2Tokenizer"  # use_fast=False


def test_vlmevalkit_greedy_answers_match_native_internvl_in_fp32(compat, replayed):
    spec, result = replayed
    native, tokenizer = compat["natives"]["chat"], compat["tokenizer"]
    kwargs = vlmevalkit_kwargs(**spec["kwargs"])
    for case, generated in zip(spec["generate"], result["float32"]["generated"]):
        pixel_values, num_patches_list, prompt = vlmevalkit_image_inputs(case["message"])
        system = {"system": case["system_prompt"]} if "system_prompt" in case else {}
        expected = native_chat(native, tokenizer, prompt, pixel_values, vlmevalkit_candidate_kwargs(kwargs, 0),
                               num_patches_list=num_patches_list, **system)  # fmt: skip
        assert generated["candidates"][0] == expected  # candidate 0 is greedy; the others are sampled


def test_vlmevalkit_multi_turn_matches_native_internvl_in_fp32(compat, replayed):
    spec, result = replayed
    native, tokenizer = compat["natives"]["chat"], compat["tokenizer"]
    message, answers = [], []
    for user_content, turn in zip(spec["conversation"], result["float32"]["turns"]):
        message.append({"role": "user", "content": user_content})
        pixel_values, num_patches_list, question, history = vlmevalkit_chat_inputs(message)
        # The system message the last `generate` case set stays on the model, as in the client.
        expected = native_chat(native, tokenizer, question, pixel_values, VLMEVALKIT_CHAT_KWARGS,
                               num_patches_list=num_patches_list, history=history, system=SYSTEM_PROMPT)  # fmt: skip
        assert turn["response"] == expected
        expected_history = [list(pair) for pair in history or []] + [[question, expected]]
        assert [list(pair) for pair in turn["history"]] == expected_history
        answers.append(expected)
        message.append({"role": "assistant", "content": [text(expected)]})
    assert any(answers)


def test_vlmevalkit_best_of_n_ranks_with_the_official_critic_scores(compat, replayed):
    spec, result = replayed
    case, generated = spec["generate"][0], result["float32"]["generated"][0]
    candidates = generated["candidates"]
    assert len(set(candidates)) > 1, "sampled candidates should differ"
    pixel_values, num_patches_list, prompt = vlmevalkit_image_inputs(case["message"])
    scores = official_critic_scores(compat["natives"]["critic"], compat["tokenizer"], PRM_SYSTEM_PROMPT, prompt,
                                    candidates, pixel_values, num_patches_list)  # fmt: skip
    order = sorted(range(len(candidates)), key=lambda index: -scores[index])
    assert generated["ranked"] == [candidates[index] for index in order]  # best first
    assert [response for response, _ in generated["scored"]] == generated["ranked"]
    torch.testing.assert_close(
        torch.tensor([score for _, score in generated["scored"]]), torch.tensor(sorted(scores, reverse=True)),
        atol=1e-4, rtol=0,
    )  # fmt: skip
    assert max(scores) - min(scores) > 1e-2  # the critic tells the candidates apart


def test_vlmevalkit_loads_and_answers_in_bf16(replayed):
    spec, result = replayed
    loaded = result["bfloat16"]
    assert [len(case["candidates"]) for case in loaded["generated"]] == [c["best_of_n"] for c in spec["generate"]]
    ranked = loaded["generated"][0]["ranked"]
    assert sorted(ranked) == sorted(loaded["generated"][0]["candidates"])
    assert all(0.0 <= score <= 1.0 for _, score in loaded["generated"][0]["scored"])
    assert len(loaded["turns"]) == len(spec["conversation"])
