"""The plugin against outputs of OpenGVLab's own code (tests/fixtures/official_tiny, made as docs/official_fixture.md
describes): a tiny official-layout checkpoint whose tokenizer puts every special token at ids other than Qwen2.5's,
with the logits, prompts, tiles, chat answers and V2PE positions the official code produced for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import internvl3_hf  # noqa: F401  (registers the official internvl_chat format)
from internvl3_hf.formats.convert import convert, load_checkpoint, load_processor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny"
CHECKPOINT = FIXTURE / "checkpoint"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
TENSORS = load_file(FIXTURE / "expected_tensors.safetensors")
LOGITS_ATOL = 1e-4
PIXEL_ATOL = 1e-6
GENERATION = {"max_new_tokens": 8, "do_sample": False}
PROMPTS = ("single", "two_images", "text")
# δ → the plugin's V2PE stride, in 1/256 position units.
V2PE_STRIDES = {"1/4": 64, "1/2": 128, "1": 256}
# The released InternVL3 (Qwen2.5) ids of the same tokens: the fixture must not share any of them.
QWEN25_IDS = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667}


def official_image_inputs(names: list[str]) -> torch.Tensor | None:
    """The tiles the official `load_image` produced for these fixture images, in order."""
    if not names:
        return None
    return torch.cat([TENSORS[f"pixel_values.{name}"] for name in names])


def model_inputs(prompt: dict) -> dict:
    inputs = {"input_ids": torch.tensor([prompt["input_ids"]])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if prompt["images"]:
        inputs["pixel_values"] = official_image_inputs(prompt["images"])
        inputs["image_num_patches"] = torch.tensor(prompt["num_patches_list"])
    return inputs


def logits_of(model, inputs: dict) -> torch.Tensor:
    """The model's logits; for a base model (transformers' `AutoModel`), the official lm_head on its last state."""
    with torch.no_grad():
        outputs = model(**inputs)
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    lm_head = load_file(CHECKPOINT / "model.safetensors")["language_model.lm_head.weight"].float()
    return outputs.last_hidden_state @ lm_head.T


def without_bos_placeholder(official_output: list[int]) -> list[int]:
    """The official generate (from inputs_embeds, transformers 4.37) prepends the LLM's bos id as a placeholder; the
    official chat() drops it by decoding with skip_special_tokens."""
    bos = json.loads((CHECKPOINT / "config.json").read_text())["llm_config"]["bos_token_id"]
    assert official_output[0] == bos
    return official_output[1:]


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(CHECKPOINT, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "slow"])
def tokenizer(request):
    """The checkpoint's tokenizer as evaluation harnesses load it (the official model card uses use_fast=False)."""
    return AutoTokenizer.from_pretrained(CHECKPOINT, use_fast=request.param)


def test_fixture_tokens_sit_away_from_the_qwen25_ids():
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN25_IDS}
    assert ids == {token: EXPECTED["special_token_ids"][token] for token in QWEN25_IDS}
    assert not set(ids.values()) & set(QWEN25_IDS.values())
    assert max(ids.values()) < len(tokenizer) < min(QWEN25_IDS.values())


def test_loading_takes_the_token_ids_from_the_tokenizer(model):
    ids = EXPECTED["special_token_ids"]
    config = model.config
    assert (config.image_token_id, config.image_start_token_id, config.image_end_token_id) == (
        ids["<IMG_CONTEXT>"],
        ids["<img>"],
        ids["</img>"],
    )
    assert config.eos_token_id == ids["<|im_end|>"]


@pytest.mark.parametrize("prompt_name", PROMPTS)
@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda: load_checkpoint(CHECKPOINT, dtype=torch.float32), id="load_checkpoint"),
        pytest.param(
            lambda: AutoModelForImageTextToText.from_pretrained(CHECKPOINT, dtype=torch.float32),
            id="AutoModelForImageTextToText",
        ),
        pytest.param(lambda: AutoModel.from_pretrained(CHECKPOINT, dtype=torch.float32), id="AutoModel"),
    ],
)
def test_logits_match_the_official_code(load, prompt_name):
    prompt = EXPECTED["prompts"][prompt_name]
    logits = logits_of(load().eval(), model_inputs(prompt))[0, prompt["logits_from"] :]
    torch.testing.assert_close(logits, TENSORS[f"logits.{prompt_name}"], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_greedy_tokens_match_the_official_code(model, prompt_name):
    prompt = EXPECTED["prompts"][prompt_name]
    inputs = model_inputs(prompt)
    eos = EXPECTED["special_token_ids"]["<|im_end|>"]
    output = model.generate(**inputs, **GENERATION, eos_token_id=eos)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == without_bos_placeholder(prompt["generate_output"])


@pytest.mark.parametrize("prompt_name", PROMPTS)
@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda: AutoProcessor.from_pretrained(CHECKPOINT), id="AutoProcessor"),
        pytest.param(lambda: load_processor(CHECKPOINT, load_checkpoint(CHECKPOINT).config), id="load_processor"),
    ],
)
def test_processor_gives_the_official_prompt_ids_and_pixel_values(load, prompt_name):
    processor = load()
    prompt = EXPECTED["prompts"][prompt_name]
    question = prompt["question"].replace("Image-1: <image>\nImage-2: <image>\n", "")
    content = [{"type": "image"} for _ in prompt["images"]] + [{"type": "text", "text": question}]
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == prompt["prompt"]

    images = [Image.open(FIXTURE / name) for name in prompt["images"]] or None
    inputs = processor(text=prompt["prompt"], images=images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt["input_ids"]
    if images:
        torch.testing.assert_close(
            inputs["pixel_values"], official_image_inputs(prompt["images"]), atol=PIXEL_ATOL, rtol=0
        )
        assert inputs["image_num_patches"].tolist() == prompt["num_patches_list"]


@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_chat_answer_and_history_match_the_official_code(model, tokenizer, prompt_name):
    prompt = EXPECTED["prompts"][prompt_name]
    pixel_values = official_image_inputs(prompt["images"])
    answer, history = model.chat(
        tokenizer,
        pixel_values,
        prompt["question"],
        dict(GENERATION),
        history=None,
        return_history=True,
        num_patches_list=prompt["num_patches_list"] if pixel_values is not None else None,
    )
    assert answer == prompt["answer"]
    assert [list(turn) for turn in history] == prompt["history"]


def test_multi_turn_chat_matches_the_official_code(model, tokenizer):
    turn = EXPECTED["multi_turn"]
    answer, history = model.chat(
        tokenizer,
        official_image_inputs(turn["images"]),
        turn["question"],
        dict(GENERATION),
        history=[tuple(pair) for pair in turn["history_in"]],
        return_history=True,
    )
    assert answer == turn["answer"]
    assert [list(pair) for pair in history] == turn["history"]


def test_batch_chat_matches_the_official_code(model, tokenizer):
    batch = EXPECTED["batch_chat"]
    answers = model.batch_chat(
        tokenizer,
        official_image_inputs(batch["images"]),
        batch["questions"],
        dict(GENERATION),
        num_patches_list=batch["num_patches_list"],
    )
    assert answers == batch["answers"]


@pytest.mark.parametrize("delta", list(V2PE_STRIDES))
@pytest.mark.parametrize("source", ["v2pe_repo", "pr1000"])
def test_v2pe_positions_match_the_official_get_rope_pos_id(model, source, delta):
    """`v2pe_repo`: OpenGVLab/V2PE's function on the two-image prompt at 256 tokens per tile; `pr1000`: the
    InternVL PR's variant on the same prompt at this model's 4 tokens per tile (δ is per token in both)."""
    input_ids = TENSORS[f"v2pe.{source}.input_ids"].long()[None]
    image_token_mask = input_ids == model.config.image_token_id
    strides = torch.tensor([V2PE_STRIDES[delta]] * len(EXPECTED["v2pe"]["num_tiles"]))
    positions, _ = model.model.v2pe_positions(image_token_mask, torch.ones_like(input_ids), v2pe_strides=strides)
    expected = TENSORS[f"v2pe.{source}.positions.{delta}"]
    assert torch.equal(positions[0].to(expected.dtype), expected)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> Path:
    """The fixture converted official → plugin → official with the `convert` entry point."""
    folder = tmp_path_factory.mktemp("round_trip")
    convert(CHECKPOINT, folder / "plugin", to="plugin")
    return convert(folder / "plugin", folder / "official", to="official")


def test_convert_round_trip_is_bit_exact(round_trip):
    original = load_file(CHECKPOINT / "model.safetensors")
    tensors = {}
    for shard in sorted(round_trip.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert tensors.keys() == original.keys()
    for key, tensor in original.items():
        assert tensors[key].dtype == tensor.dtype, key
        assert torch.equal(tensors[key], tensor), key


def _keys_missing_from(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """Keys of `ours` (recursing into nested configs) that `theirs` does not have."""
    missing = []
    for key, value in ours.items():
        if key not in theirs:
            missing.append(prefix + key)
        elif isinstance(value, dict) and isinstance(theirs[key], dict) and key.endswith("_config"):
            missing += _keys_missing_from(value, theirs[key], f"{prefix}{key}.")
    return missing


def test_convert_round_trip_config_has_no_key_the_official_one_lacks(round_trip):
    official = json.loads((CHECKPOINT / "config.json").read_text())
    exported = json.loads((round_trip / "config.json").read_text())
    assert _keys_missing_from(exported, official) == []


def test_convert_round_trip_keeps_the_slow_tokenizer_files(round_trip):
    """The official stack (transformers 4.37, tokenizers 0.15) loads with use_fast=False from vocab.json and
    merges.txt; it cannot read a tokenizer.json written by a newer `tokenizers`."""
    for name in ("vocab.json", "merges.txt"):
        assert (round_trip / name).is_file(), f"the exported official checkpoint has no {name}"
    assert json.loads((round_trip / "vocab.json").read_text()) == json.loads((CHECKPOINT / "vocab.json").read_text())
    merges = [line for line in (round_trip / "merges.txt").read_text().splitlines() if not line.startswith("#")]
    official_merges = [line for line in (CHECKPOINT / "merges.txt").read_text().splitlines() if not line.startswith("#")]
    assert merges == official_merges


def _additional_special_tokens(folder: Path) -> list[str]:
    """The special tokens beyond bos/eos/pad/unk as transformers 4.37 reads them: `additional_special_tokens` of
    tokenizer_config.json or special_tokens_map.json (it does not know transformers 5's `extra_special_tokens`)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        tokens = json.loads(path.read_text()).get("additional_special_tokens") if path.is_file() else None
        if tokens:
            return [token["content"] if isinstance(token, dict) else token for token in tokens]
    return []


def test_convert_round_trip_keeps_the_special_tokens_the_official_stack_skips(round_trip):
    """The official chat() decodes with skip_special_tokens: tokens not declared special there (e.g. `</quad>`)
    would end up in its answers."""
    assert _additional_special_tokens(round_trip) == _additional_special_tokens(CHECKPOINT)


def test_convert_round_trip_reloads_with_the_same_tokens_and_logits(round_trip, model):
    reloaded = load_checkpoint(round_trip, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(round_trip)(EXPECTED["prompts"]["text"]["prompt"])["input_ids"] == (
        EXPECTED["prompts"]["text"]["input_ids"]
    )
    prompt = EXPECTED["prompts"]["two_images"]
    logits = logits_of(reloaded, model_inputs(prompt))[0, prompt["logits_from"] :]
    torch.testing.assert_close(logits, TENSORS["logits.two_images"], atol=LOGITS_ATOL, rtol=0)
