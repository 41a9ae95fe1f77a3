"""`generate`'s decode steps add no per-step work over transformers' native InternVL (issue #8, inference speed).

A decode step's work is read off `torch.profiler` op counts: the ops of `generate(N=LONG)` minus those of
`generate(N=SHORT)` are exactly LONG - SHORT decode steps (the prefill and set-up cancel out). Without V2PE, and with
V2PE where every image gets δ = 1 (ordinary positions), the plugin must run exactly native's ops; with a fractional δ
it may only carry the rotary positions one token on, and never re-derive V2PE positions or sync with the host.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from internvl3_hf.tiny import tiny_config

SHORT, LONG = 2, 6
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")


def native_kwargs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != "image_num_patches"}


def greedy(model, inputs: dict, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **kwargs)


def decode_ops(model, inputs: dict, **kwargs) -> Counter:
    """aten op counts of LONG - SHORT decode steps of `generate`."""
    counts = []
    for new_tokens in (SHORT, LONG):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            greedy(model, inputs, new_tokens, **kwargs)
        counts.append(Counter(event.name for event in prof.events() if event.name.startswith("aten::")))
    short, long = counts
    return Counter({name: long[name] - short[name] for name in long.keys() | short.keys() if long[name] != short[name]})


def extra_ops(ours: Counter, theirs: Counter) -> dict[str, int]:
    return {name: ours[name] - theirs[name] for name in ours.keys() | theirs.keys() if ours[name] != theirs[name]}


ORDINARY_SETUPS = {
    "none": (dict(v2pe_mode="none"), None),
    "fixed_delta_1": (dict(v2pe_mode="fixed", v2pe_delta=1.0), None),
    "auto_fits_at_delta_1": (dict(v2pe_mode="auto"), None),
    "strides_argument_all_1": (dict(v2pe_mode="none"), [256, 256, 256]),
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("setup", list(ORDINARY_SETUPS))
def test_ordinary_positions_decode_exactly_like_native(
    setup, attn_implementation, tokenizer, model_factory, native_factory, make_batch
):
    v2pe, strides = ORDINARY_SETUPS[setup]
    model = model_factory(tiny_config(tokenizer, **v2pe), attn_implementation=attn_implementation)
    native = native_factory(model)
    inputs = make_batch([[2], [1, 3]])  # left-padded, three images
    kwargs = {"v2pe_strides": torch.tensor(strides)} if strides is not None else {}
    assert torch.equal(greedy(model, inputs, LONG, **kwargs), greedy(native, native_kwargs(inputs), LONG))
    assert extra_ops(decode_ops(model, inputs, **kwargs), decode_ops(native, native_kwargs(inputs))) == {}


def test_ordinary_positions_reach_the_decoder_as_integers(tokenizer, model_factory, make_batch):
    """δ = 1 under V2PE: every forward of `generate` gets transformers' integer positions (the prompt's rotary
    positions are those same integers, decode steps carry none), and no forward derives V2PE."""
    model = model_factory(tiny_config(tokenizer, v2pe_mode="fixed", v2pe_delta=1.0))
    seen = []

    def record(module, args, kwargs, output):
        rope = kwargs.get("rope_position_ids")
        seen.append((kwargs["position_ids"].dtype, None if rope is None else rope.dtype, output.v2pe_strides))

    model.model.register_forward_hook(record, with_kwargs=True)
    greedy(model, make_batch([[2], [1, 3]]), 4)
    assert seen == [(torch.long, torch.long, None)] + [(torch.long, None, None)] * 3


@pytest.mark.parametrize(
    "v2pe, strides", [(dict(v2pe_mode="fixed", v2pe_delta=0.25), None), (dict(v2pe_mode="none"), [64, 8, 128]),
                      (dict(v2pe_mode="auto", v2pe_max_position=20), None)],
    ids=["fixed_delta_1/4", "strides_argument", "auto_fractional"],
)
def test_fractional_v2pe_decode_step_only_continues_the_position(
    v2pe, strides, tokenizer, model_factory, native_factory, make_batch, monkeypatch
):
    model = model_factory(tiny_config(tokenizer, **v2pe))
    native = native_factory(model)
    inputs = make_batch([[2], [1, 3]])
    kwargs = {"v2pe_strides": torch.tensor(strides)} if strides is not None else {}
    # V2PE positions are derived once per generate (set-up), never per step.
    calls = Counter()
    for name in ("v2pe_positions", "get_placeholder_mask"):
        original = getattr(model.model, name)
        monkeypatch.setattr(model.model, name, lambda *a, _f=original, _n=name, **k: calls.update([_n]) or _f(*a, **k))
    greedy(model, inputs, SHORT, **kwargs)
    per_call = Counter(calls)
    calls.clear()
    output = greedy(model, inputs, LONG, **kwargs)
    assert calls == per_call
    assert not torch.equal(output, greedy(native, native_kwargs(inputs), LONG))  # V2PE really is active
    extra = extra_ops(decode_ops(model, inputs, **kwargs), decode_ops(native, native_kwargs(inputs)))
    assert all(extra.get(name, 0) <= 0 for name in HOST_SYNC_OPS), extra
    # Per step only the rotary positions carried one token on (append last + 1, take the new one: ~9 small ops
    # today); re-deriving the V2PE positions of even one token costs ~135 ops and 2 host syncs.
    assert sum(count for count in extra.values() if count > 0) <= 12 * (LONG - SHORT), extra


def test_manual_step_on_a_delta_one_generate_cache_with_integer_positions(tokenizer, model_factory, make_batch):
    """A step on the cache `generate` left (δ = 1) given the row's integer position (left padding not counted)
    gives the logits of one full forward over the whole sequence."""
    model = model_factory(tiny_config(tokenizer, v2pe_mode="fixed", v2pe_delta=1.0))
    inputs = make_batch([[2], [1, 3]])
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             return_dict_in_generate=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=-1)
        step = model(input_ids=out.sequences[:, -1:], attention_mask=mask, past_key_values=out.past_key_values,
                     position_ids=mask.sum(-1, keepdim=True) - 1)
        full = model(input_ids=out.sequences, attention_mask=mask, pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)
