"""GPU checks (marker `gpu`; skipped without CUDA): flash attention against SDPA in bf16, packed == unpacked, V2PE
under flash attention, a short bf16 SFT run, and the fused LM head's CUDA path.

The flash path is FlashAttention-2 (`attn_implementation="flash_attention_2"`) when `flash_attn` is installed, else
SDPA restricted to its flash kernel (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, which raises rather than falling
back). SDPA's flash kernel takes no attention mask, so the flash-vs-SDPA comparisons run unpadded single rows.
Flash kernels need a head dimension that is a multiple of 8: the tiny config here has 3 query heads and 1
key/value head of width 16 (the ViT's heads are 8 wide).

bf16 tolerance: logits agree to `BF16_TOLERANCE` times the largest |logit| of the batch (a few bf16 ulps at that
scale); the CPU equivalents (tests/test_sft.py, tests/modeling/test_v2pe.py) check the same things in float32 to 1e-5.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from internvl3_hf.data import IGNORE_INDEX, SFTCollator
from internvl3_hf.losses import shifted_targets
from internvl3_hf.sft import InternVL3Trainer
from internvl3_hf.tiny import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
BF16_TOLERANCE = 3e-2


# --------------------------------------------------------------------------------------------------- helpers
def gpu_config(tokenizer, **overrides):
    """The tiny config with flash-compatible heads: 3 query heads and 1 key/value head of width 16."""
    config = tiny_config(tokenizer, **overrides)
    text = config.text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 3, 1, 16
    return config


def flash_path():
    """`(attn_implementation, context factory)` of the flash path."""
    if HAS_FLASH_ATTN:
        return "flash_attention_2", contextlib.nullcontext
    return "sdpa", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def bf16_model(model_factory, config, attn_implementation: str):
    return model_factory(config, attn_implementation=attn_implementation).to(DEVICE, torch.bfloat16).eval()


def sft_items(tokenizer, config) -> list:
    import test_sft

    dataset = test_sft.sft_dataset(tokenizer, config)
    return [dataset[index] for index in range(len(dataset))]


def single_row(sample) -> dict:
    """One sample alone on an unpadded row (no attention mask, no position_ids)."""
    inputs = {"input_ids": torch.tensor([sample.input_ids], device=DEVICE)}
    if sample.pixel_values is not None:
        inputs["pixel_values"] = sample.pixel_values.to(DEVICE, torch.bfloat16)
        inputs["image_num_patches"] = torch.tensor(sample.image_num_patches, device=DEVICE)
    return inputs


def on_device(batch: dict) -> dict:
    moved = {key: value.to(DEVICE) for key, value in batch.items() if key != "labels"}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(torch.bfloat16)
    return moved


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    worst = (actual - expected).abs().max().item()
    assert worst <= BF16_TOLERANCE * scale, f"largest difference {worst:.3g} (max |logit| {scale:.3g})"


# --------------------------------------------------------------------------------------------------- attention
def test_flash_attention_matches_sdpa_in_bf16(tokenizer, model_factory):
    """Every SFT sample (text-only and multi-tile image rows): flash-path logits equal SDPA's to bf16 tolerance."""
    config = gpu_config(tokenizer)
    attn, flash_context = flash_path()
    sdpa, flash = bf16_model(model_factory, config, "sdpa"), bf16_model(model_factory, config, attn)
    assert flash.config._attn_implementation == attn
    for (sample,) in sft_items(tokenizer, config):
        inputs = single_row(sample)
        with torch.no_grad():
            expected = sdpa(**inputs, use_cache=False).logits
            with flash_context():
                actual = flash(**inputs, use_cache=False).logits
        assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
        assert_bf16_close(actual, expected)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_row_equals_samples_alone_in_bf16(attn, tokenizer, model_factory):
    """One padding-free packed row (position_ids restarting at 0): each sample's logits equal those it gets alone."""
    if attn == "flash_attention_2" and not HAS_FLASH_ATTN:
        pytest.skip("flash_attn is not installed (SDPA's flash kernel takes no block-diagonal mask)")
    config = gpu_config(tokenizer)
    model = bf16_model(model_factory, config, attn)
    items = sft_items(tokenizer, config)
    packed = on_device(SFTCollator(tokenizer.pad_token_id, padding_free=True)(items))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits
        cursor = 0
        for (sample,) in items:
            length = len(sample.input_ids)
            alone = model(**single_row(sample), use_cache=False).logits
            assert_bf16_close(logits[0, cursor : cursor + length], alone[0])
            cursor += length
    assert cursor == packed["input_ids"].shape[1]


def test_v2pe_under_flash_attention_matches_sdpa(tokenizer, model_factory):
    """V2PE (`fixed`, δ = 1/4): the fractional rotary positions are the same and the flash path's logits equal
    SDPA's to bf16 tolerance (the integer per-sample positions go to the attention kernel)."""
    config = gpu_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25)
    attn, flash_context = flash_path()
    sdpa, flash = bf16_model(model_factory, config, "sdpa"), bf16_model(model_factory, config, attn)
    images = 0
    for (sample,) in sft_items(tokenizer, config):
        inputs = single_row(sample)
        with torch.no_grad():
            expected = sdpa(**inputs, use_cache=False)
            with flash_context():
                actual = flash(**inputs, use_cache=False)
        assert torch.equal(actual.rope_position_ids, expected.rope_position_ids)
        if sample.pixel_values is not None:
            images += 1
            positions = expected.rope_position_ids
            assert (positions != positions.round()).any()  # V2PE is on: fractional image positions
            assert actual.v2pe_strides.tolist() == [64] * len(sample.image_num_patches)
        assert_bf16_close(actual.logits, expected.logits)
    assert images == 2


# --------------------------------------------------------------------------------------------------- training
def test_short_bf16_sft_run(tmp_path, tokenizer, model_factory):
    """10 bf16 (autocast) SFT steps through `InternVL3Trainer` on the flash path with the fused LM head: every loss
    finite, and the loss falls. FlashAttention-2 trains packed padding-free rows; SDPA's flash kernel, which takes
    no mask, trains one unpadded sample per micro-batch (4 accumulated)."""
    import test_sft

    config = gpu_config(tokenizer)
    attn, flash_context = flash_path()
    torch.manual_seed(0)
    model = model_factory(config, attn_implementation=attn).train()
    dataset = test_sft.sft_dataset(tokenizer, config)
    packed = attn == "flash_attention_2"
    args = test_sft.sgd_args(
        tmp_path,
        4 if packed else 1,
        1 if packed else 4,
        max_steps=10,
        optim="adamw_torch",
        learning_rate=1e-2,
        max_grad_norm=1.0,
        use_cpu=False,
        bf16=True,
    )
    trainer = test_sft.SequentialTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss_weighting="square",
        data_collator=SFTCollator(tokenizer.pad_token_id, padding_free=packed),
    )
    assert trainer.fused_lm_head
    with flash_context():
        trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_fused_lm_head_scores_only_supervised_rows_on_cuda(tmp_path, tokenizer, model_factory, monkeypatch):
    """On CUDA, TRL projects only the supervised rows through the LM head (no `lm_head` call, no full logits);
    loss and gradients equal the full-logits path (float32 weights)."""
    import test_sft
    import trl.trainer.utils as trl_utils

    if not trl_utils._use_triton(DEVICE):
        pytest.skip("Triton is not available: TRL scores every row")
    scored = []
    chunked = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    config = gpu_config(tokenizer)
    model = model_factory(config, attn_implementation="sdpa").to(DEVICE).train()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    batch = SFTCollator(tokenizer.pad_token_id, padding_free=True)(sft_items(tokenizer, config))
    batch = {key: value.to(DEVICE) for key, value in batch.items()}
    targets = int((shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).sum())
    results = {}
    for fused in (True, False):
        trainer = InternVL3Trainer(
            model=model, args=test_sft.sgd_args(tmp_path / f"{fused}", 1, 1, use_cpu=False), fused_lm_head=fused
        )
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results[fused] = (float(loss), {name: param.grad.clone() for name, param in model.named_parameters()})
        if fused:
            assert scored == [targets] and head_calls == []
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-4)
    test_sft.assert_params_close(results[True][1], results[False][1], atol=1e-4)
