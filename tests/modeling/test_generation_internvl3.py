"""InternVL3ForConditionalGeneration.generate: parity with native InternVL, batching, cache, streaming, stopping."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer

MAX_NEW = 8


def native_kwargs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != "image_num_patches"}


def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    settings = dict(max_new_tokens=MAX_NEW, do_sample=False)
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(**inputs, **settings)


def new_tokens(output: torch.Tensor, inputs: dict) -> torch.Tensor:
    return output[:, inputs["input_ids"].shape[1] :]


def no_eos(model):
    """Generation settings that never stop early, so that every run emits exactly MAX_NEW tokens."""
    return dict(eos_token_id=None)


def slice_sample(inputs: dict, row: int, samples: list[list[int]]) -> dict:
    """Sample `row` of a left-padded batch, unpadded, with only its own tiles."""
    keep = inputs["attention_mask"][row].bool()
    single = {
        "input_ids": inputs["input_ids"][row : row + 1, keep],
        "attention_mask": inputs["attention_mask"][row : row + 1, keep],
    }
    tiles_before = sum(sum(sample) for sample in samples[:row])
    tiles = sum(samples[row])
    if tiles:
        single["pixel_values"] = inputs["pixel_values"][tiles_before : tiles_before + tiles]
        single["image_num_patches"] = torch.tensor(samples[row])
    return single


# --------------------------------------------------------------------------------------------------- native parity
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "samples", [[[3]], [[2], [1, 3]], [[], [2]]], ids=["single_image", "batch_padded", "batch_text_and_image"]
)
def test_greedy_matches_native(samples, attn_implementation, model, native_factory, make_batch):
    model.set_attn_implementation(attn_implementation)
    native = native_factory(model)
    inputs = make_batch(samples)
    ours = greedy(model, inputs, **no_eos(model))
    theirs = greedy(native, native_kwargs(inputs), **no_eos(model))
    assert ours.shape == (len(samples), inputs["input_ids"].shape[1] + MAX_NEW)
    assert torch.equal(ours[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(ours, theirs), (new_tokens(ours, inputs), new_tokens(theirs, inputs))
    # A real test only if decoding is not degenerate.
    assert len(set(new_tokens(ours, inputs).flatten().tolist())) > 2


def test_greedy_matches_native_with_default_stopping(model, native_factory, make_batch):
    """Both models read the same `generation_config` (eos = <|im_end|>) and stop identically."""
    native = native_factory(model)
    inputs = make_batch([[2], [1]])
    assert torch.equal(greedy(model, inputs), greedy(native, native_kwargs(inputs)))


# --------------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batched_left_padded_equals_one_by_one(attn_implementation, model, make_batch):
    model.set_attn_implementation(attn_implementation)
    samples = [[1, 2], [], [3]]
    inputs = make_batch(samples)
    assert (inputs["attention_mask"] == 0).any(dim=1).sum() == 2  # two rows padded
    batched = new_tokens(greedy(model, inputs, **no_eos(model)), inputs)
    for row in range(len(samples)):
        single = slice_sample(inputs, row, samples)
        alone = new_tokens(greedy(model, single, **no_eos(model)), single)
        assert torch.equal(batched[row], alone[0]), (row, batched[row], alone[0])


def test_batched_prefill_logits_equal_one_by_one_with_positions(model, make_batch):
    """Left padding is invisible when positions restart at the first real token (what `generate` does)."""
    samples = [[2], [1]]
    inputs = make_batch(samples)
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**inputs, position_ids=position_ids).logits
        for row in range(len(samples)):
            single = slice_sample(inputs, row, samples)
            alone = model(**single).logits[0]
            # Different matmul shapes → fp32 rounding differs slightly (~1e-5 on logits of magnitude ~10).
            torch.testing.assert_close(batched[row, mask[row].bool()], alone, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------- prefill only
def test_pixel_values_used_on_prefill_only(model, make_batch, monkeypatch):
    calls = []
    original = model.model.get_image_features

    def spy(pixel_values, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, **kwargs)

    monkeypatch.setattr(model.model, "get_image_features", spy)
    forwards = []
    original_forward = model.model.forward

    def forward_spy(*args, **kwargs):
        # generate pre-encodes the images (mm_encoder_outputs) and hands them to the prefill step only.
        forwards.append(kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs")))
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward_spy)

    inputs = make_batch([[2], [1, 1]])
    output = greedy(model, inputs, **no_eos(model))
    assert output.shape[1] == inputs["input_ids"].shape[1] + MAX_NEW
    assert calls == [4]  # one call, with all 4 tiles of the batch
    assert forwards == [True] + [False] * (MAX_NEW - 1)


def test_image_actually_conditions_generation(model, make_batch):
    inputs = make_batch([[2]])
    other = dict(inputs, pixel_values=-inputs["pixel_values"])
    assert not torch.equal(greedy(model, inputs, **no_eos(model)), greedy(model, other, **no_eos(model)))


def test_generate_refuses_mismatched_images_before_decoding(model, make_batch):
    inputs = make_batch([[1], [2]])
    inputs["pixel_values"] = inputs["pixel_values"][:2]
    inputs.pop("image_num_patches")
    with pytest.raises(ValueError, match=r"per sample: \[4, 8\].*Sample 1 is the first"):
        greedy(model, inputs)


# --------------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize(
    "samples", [[[]], [[], []], [[2]], [[1], [2, 1]]], ids=["text", "text_batch", "image", "image_batch"]
)
def test_cache_and_no_cache_give_same_tokens(samples, model, make_batch):
    inputs = make_batch(samples)
    cached = greedy(model, inputs, use_cache=True, **no_eos(model))
    uncached = greedy(model, inputs, use_cache=False, **no_eos(model))
    assert torch.equal(cached, uncached), (new_tokens(cached, inputs), new_tokens(uncached, inputs))


def test_cached_step_logits_equal_full_recompute(model, make_batch):
    """Prefill + one cached decode step gives the same logits as a full forward over prompt + token."""
    inputs = make_batch([[2]])
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step = model(
            input_ids=next_token,
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1),
            past_key_values=prefill.past_key_values,
            use_cache=True,
        )
        full = model(
            input_ids=torch.cat([inputs["input_ids"], next_token], dim=1),
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1),
            pixel_values=inputs["pixel_values"],
        )
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- streaming
def test_text_iterator_streamer_matches_decoded_output(model, tokenizer, make_batch):
    inputs = make_batch([[2]], question="What colour is the square?")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    result = {}

    def run():
        result["output"] = greedy(model, inputs, streamer=streamer, max_new_tokens=12, **no_eos(model))

    thread = threading.Thread(target=run)
    thread.start()
    chunks = list(streamer)
    thread.join(timeout=60)
    assert not thread.is_alive()

    generated = new_tokens(result["output"], inputs)[0]
    assert generated.numel() == 12
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    assert expected.strip()  # something visible was generated
    assert "".join(chunks) == expected
    assert len(chunks) > 1  # really streamed, not handed over at the end


# --------------------------------------------------------------------------------------------------- stopping
def test_default_eos_is_im_end(model, tokenizer, special_ids):
    im_end = special_ids["<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == im_end
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == im_end
    eos = model.generation_config.eos_token_id
    assert eos == im_end or (isinstance(eos, list) and im_end in eos), eos
    assert model.generation_config.pad_token_id is not None


def test_generation_stops_on_im_end(model, make_batch, special_ids):
    """Swap the LM-head rows of <|im_end|> and the k-th greedy token: generation must stop exactly there."""
    im_end = special_ids["<|im_end|>"]
    inputs = make_batch([[1]])
    prompt_length = inputs["input_ids"].shape[1]
    free_run = new_tokens(greedy(model, inputs, **no_eos(model)), inputs)[0].tolist()
    assert im_end not in free_run
    # k: the first step whose token did not appear before (so earlier steps keep their argmax after the swap).
    k = next(i for i in range(2, MAX_NEW) if free_run[i] not in free_run[:i])
    swapped = free_run[k]
    with torch.no_grad():
        head = model.lm_head.weight
        head[[im_end, swapped]] = head[[swapped, im_end]].clone()

    stopped = greedy(model, inputs)  # default generation_config
    assert stopped.shape[1] == prompt_length + k + 1
    assert stopped[0, prompt_length:].tolist() == free_run[:k] + [im_end]

    # Without the eos it keeps going past <|im_end|>.
    continued = greedy(model, inputs, **no_eos(model))
    assert continued.shape[1] == prompt_length + MAX_NEW
    assert continued[0, prompt_length + k] == im_end


def test_batched_generation_pads_finished_rows(model, make_batch, special_ids):
    """A row that hits <|im_end|> early is padded while the others continue."""
    im_end = special_ids["<|im_end|>"]
    pad = model.generation_config.pad_token_id
    inputs = make_batch([[1], [2]])
    free = new_tokens(greedy(model, inputs, **no_eos(model)), inputs)
    assert im_end not in free.flatten().tolist()
    # Force row 0 to stop after its first token by swapping that token's head row with <|im_end|>, provided the
    # token does not appear in row 1's first steps (else pick another sample set).
    first = int(free[0, 0])
    row1 = free[1].tolist()
    cutoff = row1.index(first) if first in row1 else MAX_NEW
    with torch.no_grad():
        head = model.lm_head.weight
        head[[im_end, first]] = head[[first, im_end]].clone()
    output = new_tokens(greedy(model, inputs), inputs)
    assert output[0, 0] == im_end
    assert (output[0, 1:] == pad).all()
    assert output[1, :cutoff].tolist() == row1[:cutoff]
