"""V2PE (variable visual position encoding): positions, numerics against an independent dense decoder, generation,
dtypes, training through `transformers.Trainer`, auto mode, config and attention back ends.

The rule under test (InternVL3 paper, eqs. 2-4): text tokens (`<img>` included) advance the position by 1; the m-th
`<IMG_CONTEXT>` token of an image whose `<img>` sits at p0 gets p0 + m·δ; `</img>` and the text after it resume at
ceil(last image position) + 1. Packed samples restart at 0, left padding does not shift positions.

Expected positions come from hand-written tables or from `reference_positions`, a plain python loop over exact
`Fraction`s that shares no code with `modeling/v2pe.py`. Expected logits come from `reference_logits`, a test-local
float64 Qwen2 decoder (hand-built RoPE, GQA, masks). Sequences are written in a tiny layout language:
`t` = one text token, `t5` = five text tokens, `c8` = eight `<IMG_CONTEXT>` tokens (4 per tile), `<img>`, `</img>`.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Model, Trainer, TrainingArguments

from internvl3_hf.modeling.configuration_internvl3 import InternVL3Config
from internvl3_hf.modeling.v2pe import (
    DEFAULT_DELTAS,
    delta_to_stride,
    units_to_positions,
    v2pe_position_units,
)
from internvl3_hf.tiny import tiny_config

ATOL = 1e-5
TOKENS_PER_TILE = 4
NEW_TOKENS = 20

# The documented two-image sequence of the hand tables (20 tokens; first line: token indices):
#   0 1 2      3 .. 10  11     12 13     14 .. 17  18     19
#   t t <img>  c × 8    </img> t  <img>  c × 4     </img> t
TWO_IMAGES = "t t <img> c8 </img> t <img> c4 </img> t"

F_ = Fraction
HAND_TABLES = {
    # δ = 1: ordinary positions.
    "delta_1": ([256, 256], list(range(20))),
    # δ = 1/2: image 1 spans 2.5..6 (integer end), image 2 spans 9.5..11.
    "delta_1/2": (
        [128, 128],
        [0, 1, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9, 9.5, 10, 10.5, 11, 12, 13],
    ),
    # δ = 1/4: image 1 spans 2.25..4, image 2 spans 7.25..8.
    "delta_1/4": (
        [64, 64],
        [0, 1, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 5, 6, 7, 7.25, 7.5, 7.75, 8, 9, 10],
    ),
    # δ = 1/16: image 1 ends at 2.5 → </img> at ceil(2.5) + 1 = 4; image 2 ends at 6.25 → </img> at 8.
    "delta_1/16": (
        [16, 16],
        [0, 1, 2, *[2 + F_(m, 16) for m in range(1, 9)], 4, 5, 6, *[6 + F_(m, 16) for m in range(1, 5)], 8, 9],
    ),
    # Mixed: image 1 δ = 1/2 (ends at 6), image 2 δ = 1/8 (ends at 9.5 → </img> at 11).
    "mixed_1/2_1/8": (
        [128, 32],
        [0, 1, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9, 9.125, 9.25, 9.375, 9.5, 11, 12],
    ),
}


# --------------------------------------------------------------------------------------------------- helpers
def build_ids(layout: str, special_ids: dict, seed: int = 0) -> list[int]:
    """Token ids of a layout string (see module docstring); text ids vary with position and `seed`."""
    ids, counter = [], seed * 37
    for item in layout.split():
        if item == "<img>":
            ids.append(special_ids["<img>"])
        elif item == "</img>":
            ids.append(special_ids["</img>"])
        elif item[0] == "c":
            ids += [special_ids["<IMG_CONTEXT>"]] * int(item[1:])
        elif item[0] == "t":
            for _ in range(int(item[1:] or 1)):
                ids.append(20 + (counter * 53 + 11) % 360)  # plain BPE ids, never special tokens
                counter += 1
        else:
            raise ValueError(item)
    return ids


def tiles_of(ids: list[int], context_id: int) -> list[int]:
    """Tile count of each image (maximal run of `<IMG_CONTEXT>`) of a row, in order."""
    tiles, run = [], 0
    for token in [*ids, None]:
        if token == context_id:
            run += 1
        elif run:
            assert run % TOKENS_PER_TILE == 0
            tiles.append(run // TOKENS_PER_TILE)
            run = 0
    return tiles


def pixel_values_for(num_tiles: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(500 + seed)
    return torch.randn((num_tiles, 3, 28, 28), generator=generator)


def batch_from_layouts(layouts: list[str], special_ids: dict, pad_side: str = "left", seed: int = 0) -> dict:
    """Padded `input_ids`/`attention_mask` (+ `pixel_values` of all images, row-major) for layout strings."""
    rows = [build_ids(layout, special_ids, seed + index) for index, layout in enumerate(layouts)]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), special_ids["<|endoftext|>"], dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if pad_side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    tiles = [t for row in rows for t in tiles_of(row, special_ids["<IMG_CONTEXT>"])]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if tiles:
        batch["pixel_values"] = pixel_values_for(sum(tiles), seed)
        batch["image_num_patches"] = torch.tensor(tiles)
    return batch


def reference_positions(ids, strides, context_id, token_mask=None, sample_starts=None) -> list[Fraction]:
    """The V2PE rule as an independent python loop over exact fractions (padding gets 0).

    A text token sits at ceil(previous position) + 1 (0 at a sample start); the m-th context token of an image sits at
    p0 + m·δ with p0 the position of the token before the image. `strides` are the images' δ·256 in order.
    """
    strides = iter(strides)
    positions, previous, in_image = [], None, False
    for index, token in enumerate(ids):
        if token_mask is not None and not token_mask[index]:
            positions.append(Fraction(0))
            continue
        if sample_starts is not None and sample_starts[index]:
            previous, in_image = None, False
        if token == context_id:
            if not in_image:
                in_image, m = True, 0
                delta = Fraction(next(strides), 256)
                p0 = previous if previous is not None else -1
            m += 1
            position = p0 + m * delta
        else:
            in_image = False
            position = math.ceil(previous) + 1 if previous is not None else Fraction(0)
        positions.append(Fraction(position))
        previous = position
    assert next(strides, None) is None, "more strides than images"
    return positions


def reference_positions_batch(input_ids, strides, context_id, attention_mask=None, position_ids=None) -> torch.Tensor:
    """`reference_positions` for every row, strides consumed row-major; float64 `(batch, seq)`."""
    strides = list(strides)
    rows = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row].tolist()
        count = len(tiles_of(ids, context_id))
        row_strides, strides = strides[:count], strides[count:]
        mask = attention_mask[row].tolist() if attention_mask is not None else None
        starts = (position_ids[row] == 0).tolist() if position_ids is not None else None
        rows.append([float(p) for p in reference_positions(ids, row_strides, context_id, mask, starts)])
    assert not strides
    return torch.tensor(rows, dtype=torch.float64)


def as_fractions(values) -> list[Fraction]:
    return [Fraction(v) for v in values]


def make_config(tokenizer, **v2pe) -> InternVL3Config:
    return tiny_config(tokenizer, **v2pe)


@pytest.fixture
def ctx(special_ids):
    return special_ids["<IMG_CONTEXT>"]


# --------------------------------------------------------------------------------------------------- dense reference
def merged_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with image features written over `<IMG_CONTEXT>` in row-major order (float64)."""
    embeds = model.model.language_model.embed_tokens.weight.detach().to(torch.float64)[input_ids].clone()
    if pixel_values is not None:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values)
        features = getattr(features, "pooler_output", features).to(torch.float64)  # output object or tensor
        mask = input_ids == model.config.image_token_id
        embeds[mask] = features.reshape(-1, features.shape[-1])
    return embeds


def reference_allowed(token_mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """`(batch, q, k)` bool: causal, key not padding, same packed sample. Padding queries see themselves (no NaN)."""
    length = token_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & token_mask.bool()[:, None, :] & (segments[:, :, None] == segments[:, None, :])
    return allowed | torch.eye(length, dtype=torch.bool)[None]


def reference_logits(model, embeds: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Eager float64 Qwen2 decoder + LM head written from scratch: RMSNorm, q/k/v (+bias), hand-built RoPE on the
    fractional `positions`, GQA, masked softmax, o_proj, SiLU-gated MLP, final norm."""
    dd = torch.float64
    text = model.model.language_model
    config = text.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    eps = config.rms_norm_eps

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dd) / head_dim)
    freqs = positions.to(dd)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (batch, 1, seq, head_dim)

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def rms_norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    bias = torch.zeros(allowed.shape, dtype=dd).masked_fill(~allowed, float("-inf"))[:, None]
    batch, length, _ = embeds.shape
    hidden = embeds.to(dd)
    for layer in text.layers:
        p = {name: value.detach().to(dd) for name, value in layer.state_dict().items()}
        x = rms_norm(hidden, p["input_layernorm.weight"])
        q = (x @ p["self_attn.q_proj.weight"].T + p["self_attn.q_proj.bias"]).view(batch, length, heads, head_dim)
        k = (x @ p["self_attn.k_proj.weight"].T + p["self_attn.k_proj.bias"]).view(batch, length, kv_heads, head_dim)
        v = (x @ p["self_attn.v_proj.weight"].T + p["self_attn.v_proj.bias"]).view(batch, length, kv_heads, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + rotate(q) * sin
        k = k * cos + rotate(k) * sin
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        attention = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        hidden = hidden + attention @ p["self_attn.o_proj.weight"].T
        x = rms_norm(hidden, p["post_attention_layernorm.weight"])
        gate = F.silu(x @ p["mlp.gate_proj.weight"].T) * (x @ p["mlp.up_proj.weight"].T)
        hidden = hidden + gate @ p["mlp.down_proj.weight"].T
    hidden = rms_norm(hidden, text.norm.weight.detach().to(dd))
    return hidden @ model.lm_head.weight.detach().to(dd).T


# ======================================================================================== 1. positions
@pytest.mark.parametrize("case", list(HAND_TABLES), ids=list(HAND_TABLES))
def test_positions_match_hand_table(case, tokenizer, special_ids, ctx, model_factory):
    strides, table = HAND_TABLES[case]
    batch = batch_from_layouts([TWO_IMAGES], special_ids)
    assert batch["input_ids"].shape == (1, 20)
    # The independent loop reproduces the hand table (validates the reference used elsewhere).
    assert reference_positions(batch["input_ids"][0].tolist(), strides, ctx) == as_fractions(table)

    if strides[0] == strides[1]:  # uniform δ: through config.v2pe_mode="fixed"
        model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=strides[0] / 256))
        kwargs = {}
    else:  # per-image δ: through v2pe_strides=
        model = model_factory(make_config(tokenizer))
        kwargs = {"v2pe_strides": torch.tensor(strides)}
    with torch.no_grad():
        out = model(**batch, **kwargs)
    assert out.rope_position_ids.dtype == torch.float32
    assert as_fractions(out.rope_position_ids[0].tolist()) == as_fractions(table)
    assert out.v2pe_strides.tolist() == strides


def test_random_strides_are_seeded_reproducible_and_follow_the_rule(tokenizer, special_ids, ctx, model_factory):
    config = make_config(tokenizer, v2pe_mode="random", v2pe_delta=0.25)
    model = model_factory(config).train()
    layouts = [TWO_IMAGES, "t3 <img> c4 </img> t <img> c4 </img> t2 <img> c8 </img> t"]
    batch = batch_from_layouts(layouts, special_ids)

    def draw(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(**batch)
        return out.v2pe_strides.tolist(), out.rope_position_ids

    strides, positions = draw(1234)
    assert len(strides) == 5 and set(strides) <= set(config.v2pe_strides)
    assert draw(1234)[0] == strides  # same seed, same draw
    assert len({tuple(draw(seed)[0]) for seed in range(6)}) > 1  # really random across seeds
    expected = reference_positions_batch(batch["input_ids"], strides, ctx, batch["attention_mask"])
    assert torch.equal(positions.to(torch.float64), expected)

    # Outside training, random mode uses v2pe_delta for every image.
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.v2pe_strides.tolist() == [64] * 5


def test_left_padding_does_not_shift_positions(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25))
    layouts = [TWO_IMAGES, "t <img> c4 </img> t2"]
    batch = batch_from_layouts(layouts, special_ids, pad_side="left")
    with torch.no_grad():
        padded = model(**batch)
        pad = int((batch["attention_mask"][1] == 0).sum())
        # Row 1 alone: its own ids and its own (last) tile.
        single = model(input_ids=batch["input_ids"][1:, pad:], pixel_values=batch["pixel_values"][3:])
    assert pad == 11
    # Row 0 is unpadded: hand table. Row 1: <img> at 1, 1.25..2, </img> 3, t 4, t 5; padding is 0.
    assert as_fractions(padded.rope_position_ids[0].tolist()) == as_fractions(HAND_TABLES["delta_1/4"][1])
    assert padded.rope_position_ids[1].tolist() == [0] * pad + [0, 1, 1.25, 1.5, 1.75, 2, 3, 4, 5]
    assert torch.equal(padded.rope_position_ids[1, pad:], single.rope_position_ids[0])
    # ... and the padded row's logits equal the row alone.
    torch.testing.assert_close(padded.logits[1, pad:], single.logits[0], atol=ATOL, rtol=0)


def test_right_padding_positions(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.5))
    batch = batch_from_layouts([TWO_IMAGES, "t <img> c4 </img>"], special_ids, pad_side="right")
    with torch.no_grad():
        out = model(**batch)
    assert out.rope_position_ids[1].tolist() == [0, 1, 1.5, 2, 2.5, 3, 4] + [0] * 13


def test_packed_rows_restart_at_zero(tokenizer, special_ids, ctx, model_factory):
    """Three samples packed into one row (integer position_ids restarting at 0): V2PE restarts with each sample."""
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25))
    samples = ["t2 <img> c4 </img> t", "<img> c8 </img> t3", "t4"]
    rows = [build_ids(layout, special_ids, seed) for seed, layout in enumerate(samples)]
    input_ids = torch.tensor([sum(rows, [])])
    position_ids = torch.tensor([sum([list(range(len(row))) for row in rows], [])])
    tiles = [1, 2]
    with torch.no_grad():
        out = model(
            input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values_for(sum(tiles)), use_cache=False
        )
    expected = (
        [0, 1, 2, 2.25, 2.5, 2.75, 3, 4, 5]  # t t <img> c×4 </img> t
        + [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 3, 4, 5, 6]  # <img> c×8 </img> t t t
        + [0, 1, 2, 3]  # t t t t
    )
    assert out.rope_position_ids[0].tolist() == expected
    # Each packed sample alone gives the same positions.
    for index, row in enumerate(rows):
        start = sum(len(r) for r in rows[:index])
        alone = reference_positions(row, [64] * len(tiles_of(row, ctx)), ctx)
        assert as_fractions(out.rope_position_ids[0, start : start + len(row)].tolist()) == alone


def test_two_packed_rows_with_padding_and_mixed_strides(tokenizer, special_ids, ctx, model_factory):
    model = model_factory(make_config(tokenizer))
    a = build_ids("t <img> c4 </img>", special_ids, 0)  # 7 tokens
    b = build_ids("<img> c4 </img> t2", special_ids, 1)  # 8 tokens
    c = build_ids("t2 <img> c8 </img> t", special_ids, 2)  # 13 tokens, then 2 right-padding tokens
    input_ids = torch.tensor([a + b, c + [0, 0]])
    position_ids = torch.tensor([list(range(7)) + list(range(8)), list(range(13)) + [0, 0]])
    strides = [32, 128, 16]
    with torch.no_grad():
        out = model(
            input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values_for(4),
            v2pe_strides=torch.tensor(strides),
        )
    expected = reference_positions_batch(input_ids, strides, ctx, position_ids=position_ids)
    assert torch.equal(out.rope_position_ids.to(torch.float64), expected)
    assert out.rope_position_ids[0].tolist() == [0, 1, 1.125, 1.25, 1.375, 1.5, 3, 0, 0.5, 1, 1.5, 2, 3, 4, 5]


def test_packed_sample_ending_inside_an_image_does_not_shift_the_next_sample(tokenizer, special_ids, model_factory):
    """A packed sample cut right after its last `<IMG_CONTEXT>` (no `</img>`): the next sample still starts at 0.

    The image's tile count is intact, so the forward accepts it; the ceil(·) + 1 catch-up after that image belongs
    to the sample that ended, not to the first token of the next one.
    """
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.125))
    first = build_ids("t <img> c4", special_ids, 0)  # the image ends at 1.5: a ceil(·) + 1 catch-up would follow
    second = build_ids("t3", special_ids, 1)
    input_ids = torch.tensor([first + second])
    position_ids = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    with torch.no_grad():
        out = model(input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values_for(1), use_cache=False)
    assert out.rope_position_ids[0].tolist() == [0, 1, 1.125, 1.25, 1.375, 1.5] + [0, 1, 2]


def test_image_at_sequence_start_and_end(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer))
    batch = batch_from_layouts(["<img> c4 </img> t2 <img> c8 </img>"], special_ids)
    with torch.no_grad():
        out = model(**batch, v2pe_strides=torch.tensor([32, 128]))
    # <img> 0, 0.125..0.5, </img> ceil(0.5)+1 = 2, t 3, t 4, <img> 5, 5.5..9, </img> 10.
    assert out.rope_position_ids[0].tolist() == [0, 0.125, 0.25, 0.375, 0.5, 2, 3, 4, 5] + [
        5.5, 6, 6.5, 7, 7.5, 8, 8.5, 9, 10
    ]


def test_row_without_images(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.125))
    batch = batch_from_layouts(["t6", "t <img> c4 </img> t"], special_ids)
    with torch.no_grad():
        out = model(**batch)
    assert out.rope_position_ids[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]  # two left-padding tokens
    assert out.rope_position_ids[1].tolist() == [0, 1, 1.125, 1.25, 1.375, 1.5, 3, 4]
    assert out.v2pe_strides.tolist() == [32]
    # Text only, no images at all.
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"][:1, 2:])
    assert out.rope_position_ids[0].tolist() == [0, 1, 2, 3, 4, 5] and out.v2pe_strides.numel() == 0


def test_position_units_function_directly():
    """`v2pe_position_units` on raw masks: integer 1/256 units, image at the very end without `</img>`."""
    mask = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    units = v2pe_position_units(mask, torch.tensor([64, 128]))
    assert units.dtype == torch.int64
    assert units.tolist() == [[0, 256, 320, 384, 448], [0, 128, 256, 512, 768]]
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    image_mask = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]).bool()
    units = v2pe_position_units(image_mask, torch.tensor([8, 8]), token_mask)
    assert units.tolist() == [[0, 256, 512, 520, 1024], [0, 0, 0, 8, 512]]
    assert delta_to_stride(1.0) == 256 and delta_to_stride(1 / 256) == 1 and delta_to_stride(0.375) == 96


# ======================================================================================== 2. δ = 1 is the identity
def test_delta_one_is_bit_identical_to_none_on_image_and_text(tokenizer, special_ids, model_factory):
    plain = model_factory(make_config(tokenizer, v2pe_mode="none"))
    v2pe = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=1.0))
    batch = batch_from_layouts([TWO_IMAGES + " t3 <img> c12 </img> t2"], special_ids)
    with torch.no_grad():
        expected, actual = plain(**batch), v2pe(**batch)
    assert expected.rope_position_ids is None
    assert actual.rope_position_ids[0].tolist() == list(range(batch["input_ids"].shape[1]))
    assert torch.equal(actual.logits, expected.logits)


def test_delta_one_is_bit_identical_to_none_on_left_padded_batch(tokenizer, make_batch, model_factory):
    plain = model_factory(make_config(tokenizer, v2pe_mode="none"))
    v2pe = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=1.0))
    batch = make_batch([[2, 1], [], [3]])
    # Ordinary positions of a left-padded batch are counted from the first real token (what `generate` passes).
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = plain(**batch, position_ids=position_ids)
        actual = v2pe(**batch)
        actual_with_ids = v2pe(**batch, position_ids=position_ids)
    assert torch.equal(actual.rope_position_ids, position_ids.float())
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual_with_ids.logits, expected.logits)
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(v2pe.generate(**batch, **settings), plain.generate(**batch, **settings))


# ======================================================================================== 3. dense reference
# fp32 model against a float64 reference; logits are O(5), so allow fp32 rounding relative to their size.
REFERENCE_TOLERANCE = dict(atol=ATOL, rtol=1e-6)
REFERENCE_CASES = ("single", "left_padded", "packed_three", "image_at_start_and_end")


def reference_case(name: str, special_ids: dict, ctx: int) -> dict:
    """Model kwargs plus what the reference needs (positions, mask) for one case; δ mixed per image."""
    if name == "single":
        batch = batch_from_layouts([TWO_IMAGES], special_ids)
        strides = [64, 16]
    elif name == "left_padded":
        batch = batch_from_layouts([TWO_IMAGES, "t2 <img> c8 </img> t3", "t5"], special_ids)
        strides = [128, 32, 8]
    elif name == "image_at_start_and_end":
        batch = batch_from_layouts(["<img> c4 </img> t3 <img> c8 </img>"], special_ids)
        strides = [32, 64]
    elif name == "packed_three":
        rows = [build_ids(layout, special_ids, seed) for seed, layout in
                enumerate(["t2 <img> c4 </img> t", "<img> c8 </img> t3", "t3 <img> c4 </img>"])]
        input_ids = torch.tensor([sum(rows, [])])
        position_ids = torch.tensor([sum([list(range(len(row))) for row in rows], [])])
        strides = [64, 16, 128]
        positions = reference_positions_batch(input_ids, strides, ctx, position_ids=position_ids)
        segments = (position_ids == 0).long().cumsum(-1)
        return {
            # No attention_mask and no cache: transformers then reads the packed samples off position_ids (with a
            # cache, even a fresh one, it does not; that is upstream behaviour, also for plain Qwen2).
            "model": {"input_ids": input_ids, "position_ids": position_ids, "pixel_values": pixel_values_for(4),
                      "use_cache": False},
            "strides": strides, "positions": positions,
            "allowed": reference_allowed(torch.ones_like(input_ids), segments),
            "token_mask": torch.ones_like(input_ids),
        }
    else:
        raise KeyError(name)
    positions = reference_positions_batch(batch["input_ids"], strides, ctx, batch["attention_mask"])
    mask = batch["attention_mask"]
    model_kwargs = {k: v for k, v in batch.items() if k != "image_num_patches"}
    if bool(mask.all()):
        model_kwargs.pop("attention_mask")
    return {
        "model": model_kwargs, "strides": strides, "positions": positions,
        "allowed": reference_allowed(mask, torch.zeros_like(mask)), "token_mask": mask,
    }


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_logits_match_independent_dense_reference(case, attn_implementation, tokenizer, special_ids, ctx,
                                                  model_factory):
    model = model_factory(make_config(tokenizer), attn_implementation=attn_implementation)
    data = reference_case(case, special_ids, ctx)
    inputs = data["model"]
    embeds = merged_embeddings(model, inputs["input_ids"], inputs.get("pixel_values"))
    expected = reference_logits(model, embeds, data["positions"], data["allowed"]).float()
    with torch.no_grad():
        out = model(**inputs, v2pe_strides=torch.tensor(data["strides"]))
    assert torch.equal(out.rope_position_ids.to(torch.float64), data["positions"])
    real = data["token_mask"].bool()
    assert expected.std() > 1.0  # informative logits
    torch.testing.assert_close(out.logits[real], expected[real], **REFERENCE_TOLERANCE)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_naive_fractional_position_ids_are_wrong_but_plugin_float_positions_are_right(
    attn_implementation, tokenizer, special_ids, ctx, model_factory
):
    """Negative control: plain Qwen2Model reads fractional `position_ids` as packed-sequence boundaries (every image
    token becomes its own segment) and silently gives wrong logits; the plugin's `rope_position_ids` only feed the
    rotary embedding and match the reference."""
    model = model_factory(make_config(tokenizer), attn_implementation=attn_implementation)
    data = reference_case("single", special_ids, ctx)
    input_ids, pixel_values = data["model"]["input_ids"], data["model"]["pixel_values"]
    embeds = merged_embeddings(model, input_ids, pixel_values)
    expected = reference_logits(model, embeds, data["positions"], data["allowed"]).float()
    positions = data["positions"].float()

    qwen = Qwen2Model(copy.deepcopy(model.model.language_model.config))
    qwen.load_state_dict(model.model.language_model.state_dict())
    qwen.set_attn_implementation(attn_implementation)
    qwen.eval()
    with torch.no_grad():
        hidden = qwen(inputs_embeds=embeds.float(), position_ids=positions, use_cache=False).last_hidden_state
        naive = model.lm_head(hidden)
        ours = model(input_ids=input_ids, pixel_values=pixel_values, rope_position_ids=positions).logits
    first_image_token = 3  # position 2.25 follows 2: transformers starts a new "sample" there
    torch.testing.assert_close(naive[:, :first_image_token], expected[:, :first_image_token], **REFERENCE_TOLERANCE)
    assert (naive[:, first_image_token:] - expected[:, first_image_token:]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(ours, expected, **REFERENCE_TOLERANCE)


# ======================================================================================== 4. generation
def greedy(model, inputs: dict, max_new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(**inputs, **settings)


def recompute_greedy(model, inputs: dict, max_new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    """Greedy decoding by full forward passes over the growing sequence, without any cache or positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra, **kwargs).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids


def manual_cached_greedy(model, inputs: dict, max_new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    """Prefill once (with `kwargs`, e.g. v2pe_strides), then decode token by token on the cache, each step at the
    previous output's last rotary position + 1 (the caller carries the positions; the cache holds none)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True, **kwargs)
    cache, ids, mask = out.past_key_values, inputs["input_ids"], inputs["attention_mask"]
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        if step == max_new_tokens - 1:
            break
        with torch.no_grad():
            out = model(input_ids=next_token, attention_mask=mask, past_key_values=cache, use_cache=True,
                        rope_position_ids=out.rope_position_ids[:, -1:] + 1)  # fmt: skip
    return ids


GENERATION_SETUPS = {
    "fixed_delta_1/4": (dict(v2pe_mode="fixed", v2pe_delta=0.25), None),
    "mixed_strides_argument": (dict(v2pe_mode="none"), [64, 8, 128]),
    "mixed_strides_argument_fixed_mode": (dict(v2pe_mode="fixed", v2pe_delta=0.5), [64, 8, 128]),
}


def generation_setup(name, tokenizer, model_factory, make_batch):
    v2pe, strides = GENERATION_SETUPS[name]
    model = model_factory(make_config(tokenizer, **v2pe))
    inputs = make_batch([[2], [1, 3]])  # left-padded, three images
    assert (inputs["attention_mask"] == 0).any()
    kwargs = {"v2pe_strides": torch.tensor(strides)} if strides is not None else {}
    return model, inputs, kwargs


@pytest.mark.parametrize("setup", ["fixed_delta_1/4", "mixed_strides_argument"])
def test_cached_generate_equals_full_recomputation(setup, tokenizer, model_factory, make_batch):
    model, inputs, kwargs = generation_setup(setup, tokenizer, model_factory, make_batch)
    cached = greedy(model, inputs, **kwargs)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    recomputed = recompute_greedy(model, inputs, **kwargs)
    assert torch.equal(cached, recomputed)
    uncached = greedy(model, inputs, use_cache=False, **kwargs)
    assert torch.equal(uncached, recomputed)
    assert len(set(cached[:, -NEW_TOKENS:].flatten().tolist())) > 3  # non-degenerate decoding
    # V2PE really changed the outcome versus ordinary positions (otherwise this test proves nothing).
    plain = model_factory(make_config(tokenizer))
    assert not torch.equal(greedy(plain, inputs), cached)


@pytest.mark.parametrize("setup", list(GENERATION_SETUPS))
def test_manual_decode_on_cache_with_rope_positions_equals_generate(setup, tokenizer, model_factory, make_batch):
    model, inputs, kwargs = generation_setup(setup, tokenizer, model_factory, make_batch)
    assert torch.equal(manual_cached_greedy(model, inputs, **kwargs), greedy(model, inputs, **kwargs))


@pytest.mark.parametrize(
    "v2pe, strides",
    [(dict(v2pe_mode="fixed", v2pe_delta=0.25), None), (dict(v2pe_mode="none"), [64, 64, 32])],
    ids=["fixed_mode", "none_mode_with_strides_argument"],
)
def test_decode_step_on_v2pe_cache_needs_its_positions(v2pe, strides, tokenizer, special_ids, model_factory):
    """The cache holds no V2PE state: a step on it without positions is refused with a pointer to
    `rope_position_ids` (it would otherwise silently sit at the cache length), and a step given them sits there."""
    model = model_factory(make_config(tokenizer, **v2pe))
    batch = batch_from_layouts([TWO_IMAGES, "t <img> c4 </img> t2"], special_ids)
    kwargs = {"v2pe_strides": torch.tensor(strides)} if strides else {}
    with torch.no_grad():
        out = model(**batch, use_cache=True, **kwargs)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=-1)
        step = {"input_ids": torch.tensor([[30], [31]]), "attention_mask": mask, "past_key_values": out.past_key_values}
        with pytest.raises(ValueError, match=r"rope_position_ids\[:, -1:\] \+ 1"):
            model(**step, **kwargs)
        continued = model(**step, rope_position_ids=out.rope_position_ids[:, -1:] + 1)
    # Row 0 ends at 10 (δ = 1/4, hand table), row 1 "t <img> c4 </img> t2" at 1 + ceil(4δ) + 3.
    assert out.rope_position_ids[:, -1].tolist() == [10, 5]
    assert continued.rope_position_ids[:, 0].tolist() == [11, 6]


@pytest.mark.parametrize("strides", [None, [16, 128]], ids=["fixed_delta_1/4", "mixed_strides_argument"])
def test_multi_turn_cache_reuse_equals_generation_from_scratch(strides, tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25))
    turn1 = batch_from_layouts(["t3 <img> c8 </img> t4"], special_ids)
    kwargs1 = {"v2pe_strides": torch.tensor(strides[:1])} if strides else {}
    kwargs2 = {"v2pe_strides": torch.tensor(strides)} if strides else {}
    with torch.no_grad():
        first = model.generate(
            **turn1, max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True, **kwargs1
        )
    follow_up = build_ids("t2 <img> c4 </img> t3", special_ids, seed=7)
    ids = torch.cat([first.sequences, torch.tensor([follow_up])], dim=-1)
    new_image = pixel_values_for(1, seed=9)
    turn2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cached = greedy(model, {**turn2, "pixel_values": new_image}, max_new_tokens=10,
                    past_key_values=first.past_key_values, **kwargs2)
    scratch = greedy(
        model, {**turn2, "pixel_values": torch.cat([turn1["pixel_values"], new_image])}, max_new_tokens=10, **kwargs2
    )
    assert torch.equal(cached, scratch)
    assert len(set(scratch[0, -10:].tolist())) > 2


def test_beam_search_batch_equals_rows_alone(tokenizer, model_factory, make_batch):
    """generate expands rows for beams after computing the V2PE positions: batched beams equal each row alone."""
    model = model_factory(make_config(tokenizer))
    inputs = make_batch([[2], [1, 3]])
    strides = torch.tensor([64, 8, 128])
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    both = greedy(model, inputs, v2pe_strides=strides, **settings)[:, -6:]
    rows = []
    for row, (tiles, images) in enumerate([(slice(0, 2), slice(0, 1)), (slice(2, 6), slice(1, 3))]):
        keep = inputs["attention_mask"][row].bool()
        alone = {"input_ids": inputs["input_ids"][row : row + 1, keep], "pixel_values": inputs["pixel_values"][tiles]}
        rows.append(greedy(model, alone, v2pe_strides=strides[images], **settings)[:, -6:])
    assert torch.equal(both, torch.cat(rows))


@pytest.mark.parametrize("setup", ["fixed_delta_1/4", "mixed_strides_argument"])
def test_assisted_decoding_equals_greedy(setup, tokenizer, model_factory, make_batch):
    """Assisted decoding runs the tokens it proposes ahead of the kept ones: their rotary positions continue too."""
    model, inputs, kwargs = generation_setup(setup, tokenizer, model_factory, make_batch)
    # The second row alone (assisted decoding takes batch size 1): its images are the second and third.
    inputs = {"input_ids": inputs["input_ids"][1:], "attention_mask": inputs["attention_mask"][1:],
              "pixel_values": inputs["pixel_values"][2:], "image_num_patches": inputs["image_num_patches"][1:]}
    kwargs = {key: value[1:] for key, value in kwargs.items()}
    expected = greedy(model, inputs, max_new_tokens=10, **kwargs)
    assisted = greedy(model, inputs, max_new_tokens=10, assistant_model=copy.deepcopy(model), **kwargs)
    assert torch.equal(assisted, expected)


@pytest.mark.parametrize("tiles", [[2], []], ids=["image", "text_only"])
def test_chunked_prefill_equals_one_prefill(tiles, tokenizer, model_factory, make_batch):
    """`prefill_chunk_size` feeds the prompt chunk by chunk (images pre-encoded): each chunk gets its own positions."""
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25))
    inputs = make_batch([tiles])
    inputs.pop("image_num_patches", None)
    pixel_values = inputs.pop("pixel_values", None)
    if pixel_values is not None:
        with torch.no_grad():
            inputs["mm_encoder_outputs"] = {"image": model.get_image_features(pixel_values)}
    expected = greedy(model, inputs, max_new_tokens=8)
    assert torch.equal(greedy(model, inputs, max_new_tokens=8, prefill_chunk_size=8), expected)


def test_inputs_embeds_path_equals_input_ids_path(tokenizer, model_factory, make_batch):
    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.125))
    inputs = make_batch([[2], [1, 3]])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with_embeds = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    with torch.no_grad():
        expected, actual = model(**inputs), model(**with_embeds)
    assert torch.equal(actual.rope_position_ids, expected.rope_position_ids)
    torch.testing.assert_close(actual.logits, expected.logits, atol=ATOL, rtol=0)
    new = greedy(model, with_embeds, max_new_tokens=8)
    assert torch.equal(new, greedy(model, inputs, max_new_tokens=8)[:, -8:])


# ======================================================================================== 5. dtypes
def test_bf16_model_keeps_exact_float32_fractional_positions(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer)).to(torch.bfloat16)
    # A long row: 300 text tokens push the third image (δ = 1/256) beyond 256, where bf16 could not hold 1/256 steps.
    batch = batch_from_layouts([TWO_IMAGES + " t300 <img> c8 </img> t"], special_ids)
    strides = [64, 64, 1]
    with torch.no_grad():
        out = model(**batch, v2pe_strides=torch.tensor(strides))
    positions = out.rope_position_ids
    assert positions.dtype == torch.float32
    values = set(positions[0].tolist())
    assert {2.25, 2.5, 2.75} <= values
    # <img> of image 3 at 10 + 300 + 1 = 311: its tokens at 311 + m/256, m = 1..8, then </img> 313.
    assert positions[0, 320].item() == 311
    assert positions[0, 321:329].tolist() == [311 + m / 256 for m in range(1, 9)]
    assert positions[0, 329:].tolist() == [313, 314]
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rope_positions_are_refused(dtype, model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="float32"):
        model(input_ids=ids, rope_position_ids=torch.tensor([[0.0, 1.0, 2.0]], dtype=dtype))


def test_positions_beyond_2_16_are_float64_and_exact():
    length = 2**16 + 10
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, -6:-2] = True  # one image of 4 tokens near the end
    units = v2pe_position_units(mask, torch.tensor([1]))
    positions = units_to_positions(units)
    assert positions.dtype == torch.float64
    p0 = length - 7  # <img>
    assert positions[0, -6:].tolist() == [p0 + 1 / 256, p0 + 2 / 256, p0 + 3 / 256, p0 + 4 / 256, p0 + 2, p0 + 3]
    assert positions[0, -5].item() - positions[0, -6].item() == 1 / 256
    # Just below the limit float32 is exact.
    small = units_to_positions(torch.tensor([[(2**16 - 1) * 256 + 1]]))
    assert small.dtype == torch.float32 and small.item() == 2**16 - 1 + 1 / 256


def test_rotary_in_float64_beyond_2_16(model_factory, config):
    model = model_factory(config)
    text = model.model.language_model
    positions = torch.tensor([[70000 + 1 / 256, 70000 + 2 / 256, 131072.5]], dtype=torch.float64)
    hidden = torch.zeros(1, 3, text.config.hidden_size)
    cos, sin = text.rotary_embeddings(hidden, positions)
    head_dim = text.config.hidden_size // text.config.num_attention_heads
    # Qwen2's frequencies as its float32 buffer holds them (the model's frequencies), products in float64.
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    emb = torch.cat([positions[..., None] * inv_freq.to(torch.float64)] * 2, dim=-1)
    torch.testing.assert_close(cos, emb.cos().float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, emb.sin().float(), atol=1e-6, rtol=0)
    assert not torch.equal(cos[0, 0], cos[0, 1])  # 1/256 apart still differs


# ======================================================================================== 6. training
TRAIN_LAYOUTS = [
    "t2 <img> c4 </img> t3 <img> c8 </img> t4",
    "<img> c8 </img> t2 <img> c4 </img> t <img> c4 </img> t3",
    "t5 <img> c4 </img> t2 <img> c4 </img> t",
]


def training_dataset(special_ids):
    samples = []
    for seed, layout in enumerate(TRAIN_LAYOUTS):
        ids = torch.tensor(build_ids(layout, special_ids, seed))
        labels = ids.clone()
        labels[ids == special_ids["<IMG_CONTEXT>"]] = -100
        samples.append({
            "input_ids": ids, "labels": labels,
            "pixel_values": pixel_values_for(sum(tiles_of(ids.tolist(), special_ids["<IMG_CONTEXT>"])), seed),
        })
    return samples


def collate(features):
    (feature,) = features  # per_device_train_batch_size=1
    return {
        "input_ids": feature["input_ids"][None],
        "attention_mask": torch.ones_like(feature["input_ids"])[None],
        "labels": feature["labels"][None],
        "pixel_values": feature["pixel_values"],
    }


def train_with_random_v2pe(tokenizer, special_ids, model_factory, output_dir, seed=7):
    deltas = [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]
    config = make_config(tokenizer, v2pe_mode="random", v2pe_delta=0.25, v2pe_delta_set=deltas)
    model = model_factory(config)
    drawn = []

    def record(module, args, kwargs, output):
        if module.training:
            drawn.append((output.v2pe_strides.tolist(), output.rope_position_ids.detach().clone(), kwargs["input_ids"]))

    handle = model.model.register_forward_hook(record, with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=1, report_to=[], use_cpu=True,
        save_strategy="no", remove_unused_columns=False, seed=seed, learning_rate=1e-3, logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=training_dataset(special_ids), data_collator=collate)
    result = trainer.train()
    handle.remove()
    return model, drawn, result, trainer


def test_trainer_with_random_delta(tokenizer, special_ids, ctx, model_factory, tmp_path):
    model, drawn, result, trainer = train_with_random_v2pe(tokenizer, special_ids, model_factory, tmp_path / "a")
    assert math.isfinite(result.training_loss)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert len(drawn) == 2
    allowed = {256, 128, 64, 32, 16}
    all_strides = [stride for strides, _, _ in drawn for stride in strides]
    assert len(all_strides) >= 4 and set(all_strides) <= allowed
    assert len(set(all_strides)) > 1  # drawn per image, not one δ for everything
    # The drawn strides are the ones the positions were built from.
    for strides, positions, input_ids in drawn:
        assert len(strides) == len(tiles_of(input_ids[0].tolist(), ctx))
        expected = reference_positions_batch(input_ids, strides, ctx)
        assert torch.equal(positions.to(torch.float64), expected)
    # Same seed, same draws (RNG is torch's, seeded by TrainingArguments.seed).
    _, again, _, _ = train_with_random_v2pe(tokenizer, special_ids, model_factory, tmp_path / "b")
    assert [d[0] for d in again] == [d[0] for d in drawn]
    # Eval uses v2pe_delta for every image.
    model.eval()
    batch = collate([training_dataset(special_ids)[1]])
    with torch.no_grad():
        out = model(**batch)
    assert out.v2pe_strides.tolist() == [64, 64, 64]


# ======================================================================================== 7. auto mode
def test_auto_mode_picks_largest_fitting_delta_per_row(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="auto", v2pe_max_position=12))
    layouts = [
        "t t <img> c8 </img> t",  # δ=1 ends at 12 (too far); δ=1/2: </img> 7, t 8            → stride 128
        "<img> c4 </img> t",  # δ=1 ends at 6                                                    → stride 256
        "t10 <img> c4 </img> t",  # </img> ≥ 12 for every δ: nothing fits                        → smallest, 1
        "t5 <img> c8 </img> t t",  # δ=1/2: ends at 12; δ=1/4: c to 7, </img> 8, t 9, t 10       → stride 64
        "t <img> c4 </img> t <img> c4 </img>",  # δ=1 ends at 13; δ=1/2: ..., </img> 9 (shared)  → 128, 128
    ]
    batch = batch_from_layouts(layouts, special_ids)
    with torch.no_grad():
        out = model(**batch)
    assert out.v2pe_strides.tolist() == [128, 256, 1, 64, 128, 128]
    last = out.rope_position_ids.max(dim=-1).values.tolist()
    assert last == [8, 6, 13, 10, 9]
    # With the default limit (max_position_embeddings = 4096) everything fits at δ = 1.
    model = model_factory(make_config(tokenizer, v2pe_mode="auto"))
    with torch.no_grad():
        out = model(**batch)
    assert out.v2pe_strides.tolist() == [256] * 6


def test_auto_mode_judges_each_packed_sample_on_its_own(tokenizer, special_ids, model_factory):
    """Packed samples restart at 0, so auto mode must check each sample's own last position, not the row's total."""
    model = model_factory(make_config(tokenizer, v2pe_mode="auto", v2pe_max_position=12))
    short = [build_ids("<img> c4 </img> t", special_ids, seed) for seed in range(2)]  # alone: δ = 1 ends at 6
    long = build_ids("t t <img> c8 </img> t", special_ids, 2)  # alone: δ = 1/2 (see the table above)
    rows = [short[0], short[1], long]
    input_ids = torch.tensor([sum(rows, [])])
    position_ids = torch.tensor([sum([list(range(len(row))) for row in rows], [])])
    with torch.no_grad():
        out = model(input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values_for(4), use_cache=False)
    assert out.v2pe_strides.tolist() == [256, 256, 128]
    assert out.rope_position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6] * 2 + HAND_TABLES["delta_1/2"][1][:11] + [7, 8]


def test_auto_mode_respects_delta_set(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer, v2pe_mode="auto", v2pe_max_position=12, v2pe_delta_set=[1, 1 / 8]))
    batch = batch_from_layouts(["t t <img> c8 </img> t", "<img> c4 </img> t"], special_ids)
    with torch.no_grad():
        out = model(**batch)
    assert out.v2pe_strides.tolist() == [32, 256]  # 1/2 is not a candidate any more
    assert out.rope_position_ids[0, -3:].tolist() == [3, 4, 5]


# ======================================================================================== 8. config
def test_config_round_trip_keeps_v2pe_fields(tokenizer, tmp_path):
    config = make_config(tokenizer, v2pe_mode="random", v2pe_delta=0.25, v2pe_delta_set=[1, 0.5, 0.125],
                         v2pe_max_position=1000)
    config.save_pretrained(tmp_path)
    loaded = InternVL3Config.from_pretrained(tmp_path)
    assert loaded.v2pe_mode == "random"
    assert loaded.v2pe_delta == 0.25 and loaded.v2pe_stride == 64
    assert loaded.v2pe_delta_set == [1, 0.5, 0.125] and loaded.v2pe_strides == [256, 128, 32]
    assert loaded.v2pe_max_position == 1000
    default = make_config(tokenizer)
    assert default.v2pe_mode == "none" and default.v2pe_delta == 1.0 and default.v2pe_max_position is None
    assert default.v2pe_delta_set == list(DEFAULT_DELTAS) and default.v2pe_strides == [256 >> k for k in range(9)]
    default.save_pretrained(tmp_path / "default")
    assert InternVL3Config.from_pretrained(tmp_path / "default").v2pe_strides == default.v2pe_strides


def test_model_round_trip_keeps_v2pe_behaviour(tokenizer, special_ids, model_factory, tmp_path):
    from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration

    model = model_factory(make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.125))
    model.save_pretrained(tmp_path)
    loaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = batch_from_layouts([TWO_IMAGES], special_ids)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert loaded.config.v2pe_stride == 32
    assert torch.equal(a.rope_position_ids, b.rope_position_ids)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("field, value", [
    ("v2pe_delta", 0.3), ("v2pe_delta", 0), ("v2pe_delta", 2), ("v2pe_delta", -0.5),
    ("v2pe_delta_set", [1, 0.3]), ("v2pe_delta_set", [0.5, 0]), ("v2pe_delta_set", [2]),
])
def test_invalid_delta_raises(field, value, tokenizer):
    with pytest.raises(ValueError, match=r"multiples of 1/256 in \(0, 1\]; got "):
        make_config(tokenizer, **{field: value})


def test_empty_delta_set_and_unknown_mode_raise(tokenizer):
    with pytest.raises(ValueError, match="v2pe_delta_set must hold at least one"):
        make_config(tokenizer, v2pe_delta_set=[])
    modes = r"\('none', 'fixed', 'random', 'auto'\)"
    with pytest.raises(ValueError, match=rf"v2pe_mode must be one of {modes}, got 'linear'"):
        make_config(tokenizer, v2pe_mode="linear")


def test_delta_to_stride_rejects_off_grid():
    for bad in (0.3, 0.0, 2.0, -1.0, 1 / 512, 1 + 1 / 256):
        with pytest.raises(ValueError, match="multiples of 1/256"):
            delta_to_stride(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta_raises_the_clear_value_error(bad, tokenizer):
    with pytest.raises(ValueError, match="multiples of 1/256"):
        delta_to_stride(bad)
    with pytest.raises(ValueError, match="multiples of 1/256"):
        make_config(tokenizer, v2pe_delta=bad)


def test_wrong_number_of_strides_names_both_counts(tokenizer, special_ids, model_factory):
    model = model_factory(make_config(tokenizer))
    batch = batch_from_layouts([TWO_IMAGES], special_ids)
    for strides in ([64], [64, 64, 64]):
        with pytest.raises(ValueError, match=rf"holds {len(strides)} strides but input_ids hold 2 images"):
            model(**batch, v2pe_strides=torch.tensor(strides))


# ======================================================================================== 9. flex_attention
def test_flex_attention_matches_sdpa(tokenizer, special_ids, model_factory):
    config = make_config(tokenizer, v2pe_mode="fixed", v2pe_delta=0.25)
    sdpa = model_factory(config, attn_implementation="sdpa")
    flex = model_factory(config, attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    batch = batch_from_layouts([TWO_IMAGES, "t2 <img> c8 </img> t3", "t <img> c4 </img>"], special_ids)
    strides = torch.tensor([64, 16, 128, 8])
    with torch.no_grad():
        expected = sdpa(**batch, v2pe_strides=strides)
        actual = flex(**batch, v2pe_strides=strides)
    assert torch.equal(actual.rope_position_ids, expected.rope_position_ids)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(actual.logits[real], expected.logits[real], atol=ATOL, rtol=0)
