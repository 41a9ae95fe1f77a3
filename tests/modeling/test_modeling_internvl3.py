"""InternVL3ForConditionalGeneration: numerical parity with transformers' native InternVL, input validation,
attention selection, weight tying and save/load.

The native `InternVLForConditionalGeneration` is an independent implementation of the same architecture (its own
pixel shuffle, placeholder merge and config plumbing); our in-memory parameter names are identical by design, so a
strict `load_state_dict` transfers the weights and every forward must agree to fp32 precision.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration, pixel_unshuffle

ATOL = 1e-5
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# name → tiles of each image of each sample
PARITY_CASES = {
    "image_text_multi_tile": [[3]],
    "multi_image_one_sample": [[2, 1, 3]],
    "batch_padded_different_image_counts": [[2], [1, 3]],
    "batch_padded_with_text_only_row": [[], [2]],
    "text_only": [[]],
    "text_only_batch_padded": [[], []],
}


def assert_close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def native_kwargs(inputs: dict) -> dict:
    """Native InternVL takes no `image_num_patches`."""
    return {key: value for key, value in inputs.items() if key != "image_num_patches"}


# --------------------------------------------------------------------------------------------------- pixel unshuffle
def reference_unshuffle(features: torch.Tensor) -> torch.Tensor:
    """Index definition of InternVL's ps_version='v2' for ratio 0.5.

    Token (i, j) = x[2i,2j] ‖ x[2i,2j+1] ‖ x[2i+1,2j] ‖ x[2i+1,2j+1], tokens row-major.
    """
    n, height, width, channels = features.shape
    out = torch.empty(n, height // 2, width // 2, 4 * channels)
    for i in range(height // 2):
        for j in range(width // 2):
            out[:, i, j] = torch.cat(
                [features[:, 2 * i, 2 * j], features[:, 2 * i, 2 * j + 1], features[:, 2 * i + 1, 2 * j],
                 features[:, 2 * i + 1, 2 * j + 1]],
                dim=-1,
            )
    return out


def test_pixel_unshuffle_v2_matches_index_definition():
    features = torch.randn(2, 6, 6, 5)
    torch.testing.assert_close(pixel_unshuffle(features, 0.5, "v2"), reference_unshuffle(features), atol=0, rtol=0)


def test_pixel_unshuffle_v1_is_transposed_grid():
    features = torch.randn(2, 4, 4, 3)
    v1 = pixel_unshuffle(features, 0.5, "v1")
    torch.testing.assert_close(v1, reference_unshuffle(features).transpose(1, 2), atol=0, rtol=0)


def test_pixel_unshuffle_rejects_odd_grid():
    with pytest.raises(ValueError, match=r"3x3 is not divisible"):
        pixel_unshuffle(torch.zeros(1, 3, 3, 8), 0.5)


# --------------------------------------------------------------------------------------------------- native parity
@pytest.mark.parametrize(
    "case, attn_implementation",
    [(case, implementation) for case in PARITY_CASES for implementation in ATTN_IMPLEMENTATIONS]
    # flex_attention compiles per shape on CPU (slow): one padded multi-image batch covers its mask path.
    + [("batch_padded_different_image_counts", "flex_attention")],
)
def test_logits_match_native(case, attn_implementation, model, native_factory, make_batch):
    model.set_attn_implementation(attn_implementation)
    native = native_factory(model)
    assert model.config.text_config._attn_implementation == attn_implementation
    assert native.config.text_config._attn_implementation == attn_implementation
    inputs = make_batch(PARITY_CASES[case])

    with torch.no_grad():
        ours = model(**inputs)
        theirs = native(**native_kwargs(inputs))

    valid = inputs["attention_mask"].bool()
    assert torch.isfinite(ours.logits[valid]).all()
    assert ours.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    # Logits must be informative (not the near-flat default init) for the 1e-5 comparison to mean something.
    assert ours.logits[valid].std() > 0.5
    assert_close(ours.logits[valid], theirs.logits[valid])
    if "pixel_values" in inputs:
        assert ours.image_hidden_states.shape == (inputs["pixel_values"].shape[0], 4, 48)
        assert_close(ours.image_hidden_states, theirs.image_hidden_states)
    else:
        assert ours.image_hidden_states is None


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_loss_matches_native_and_manual_cross_entropy(
    attn_implementation, model, native_factory, make_batch, special_ids
):
    model.set_attn_implementation(attn_implementation)
    native = native_factory(model)
    inputs = make_batch([[2], [1, 1]])
    answer = torch.tensor([[7, 8, 9, special_ids["<|im_end|>"]]] * 2)
    input_ids = torch.cat([inputs["input_ids"], answer], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    labels = input_ids.clone()
    labels[:, : inputs["input_ids"].shape[1]] = -100  # train on the answer only
    batch = dict(inputs, input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    with torch.no_grad():
        ours = model(**batch)
        theirs = native(**native_kwargs(batch))

    expected = F.cross_entropy(
        ours.logits[:, :-1].reshape(-1, ours.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert ours.loss.ndim == 0 and ours.loss > 0
    assert_close(ours.loss, theirs.loss)
    assert_close(ours.loss, expected)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_hidden_states_match_native(attn_implementation, model, native_factory, make_batch):
    model.set_attn_implementation(attn_implementation)
    native = native_factory(model)
    inputs = make_batch([[2], [1]])
    with torch.no_grad():
        ours = model(**inputs, output_hidden_states=True)
        theirs = native(**native_kwargs(inputs), output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.text_config.num_hidden_layers + 1
    valid = inputs["attention_mask"].bool()
    for mine, native_state in zip(ours.hidden_states, theirs.hidden_states):
        assert_close(mine[valid], native_state[valid])


def test_get_image_features_matches_native(model, native_factory, pixel_values_factory):
    native = native_factory(model)
    pixel_values = pixel_values_factory(5)
    with torch.no_grad():
        ours = model.get_image_features(pixel_values).pooler_output
        theirs = native.model.get_image_features(pixel_values).pooler_output
    assert ours.shape == (5, model.config.image_seq_length, model.config.text_config.hidden_size)
    assert_close(ours, theirs)


@pytest.mark.parametrize("layer", [-2, 1])
def test_vision_feature_layer_matches_native(layer, config, model_factory, native_factory, make_batch):
    """`vision_feature_layer` (official `select_layer`) picks a ViT hidden state; native does the same."""
    config.vision_feature_layer = layer
    model = model_factory(config)
    native = native_factory(model)
    assert native.config.vision_feature_layer == layer
    inputs = make_batch([[2]])
    with torch.no_grad():
        ours = model(**inputs)
        theirs = native(**native_kwargs(inputs))
        last_layer_config = copy.deepcopy(config)
        last_layer_config.vision_feature_layer = -1
        last_layer = model_factory(last_layer_config)(**inputs)  # same seed → same weights
    assert_close(ours.logits, theirs.logits)
    assert (ours.image_hidden_states - last_layer.image_hidden_states).abs().max() > 1e-3


def test_parity_detects_wrong_token_grid(config, model_factory, native_factory, make_batch):
    """Sanity check of the parity test itself: the transposed (v1) token grid must NOT match native (v2)."""
    config.ps_version = "v1"
    model = model_factory(config)
    native = native_factory(model)
    inputs = make_batch([[2]])
    with torch.no_grad():
        diff = (model(**inputs).logits - native(**native_kwargs(inputs)).logits).abs().max()
    assert diff > 1e-2


def test_eager_and_sdpa_agree(model, make_batch):
    inputs = make_batch([[2], [1, 1]])
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits
    assert_close(eager[valid], sdpa[valid], atol=1e-4)


def test_inputs_embeds_path_equals_input_ids_path(model, make_batch):
    """With `inputs_embeds` the `<IMG_CONTEXT>` slots are found by comparing against the image-token embedding."""
    inputs = make_batch([[1, 2]])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        kwargs = {key: value for key, value in inputs.items() if key != "input_ids"}
        from_embeds = model(inputs_embeds=embeds, **kwargs).logits
    assert_close(from_embeds, from_ids)


def test_logits_to_keep(model, make_batch):
    inputs = make_batch([[1]])
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert_close(last[:, -1], full[:, -1])


def test_image_changes_logits_only_after_image_tokens(model, make_batch, special_ids):
    """Causality: tokens before the image span do not see the image; the text after it does."""
    inputs = make_batch([[1]])
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    with torch.no_grad():
        a = model(**inputs).logits[0]
        b = model(**other).logits[0]
    first_image = int((inputs["input_ids"][0] == special_ids["<IMG_CONTEXT>"]).nonzero()[0])
    assert_close(a[:first_image], b[:first_image], atol=0)
    assert (a[-1] - b[-1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------- bad input
def test_image_token_count_mismatch_names_counts_and_sample(model, make_batch):
    inputs = make_batch([[1], [1]])
    inputs["pixel_values"] = inputs["pixel_values"][:1]  # sample 1's image has no tile
    inputs.pop("image_num_patches")
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(**inputs)
    message = str(error.value)
    assert re.search(r"input_ids hold 8 <IMG_CONTEXT> tokens", message), message
    assert re.search(r"per sample: \[4, 4\]", message), message
    assert re.search(r"1 tiles x 4 tokens = 4 image features", message), message
    assert re.search(r"Sample 1 is the first whose image tokens have no pixel_values left", message), message


def test_too_many_pixel_values_is_refused(model, make_batch):
    inputs = make_batch([[1]])
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    inputs.pop("image_num_patches")
    with pytest.raises(ValueError, match=r"per sample: \[4\].*2 tiles x 4 tokens = 8"), torch.no_grad():
        model(**inputs)


def test_truncated_image_span_is_reported(model, make_batch, special_ids):
    inputs = make_batch([[2]])
    ids = inputs["input_ids"]
    positions = (ids[0] == special_ids["<IMG_CONTEXT>"]).nonzero().flatten()
    # Simulate truncation inside the image span: keep only the first 6 of the 8 <IMG_CONTEXT> tokens.
    cut = int(positions[6])
    inputs["input_ids"] = ids[:, :cut]
    inputs["attention_mask"] = inputs["attention_mask"][:, :cut]
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(**inputs)
    message = str(error.value)
    assert "Sample 0 has 6 <IMG_CONTEXT> tokens, not a multiple of 4" in message, message
    assert "truncation" in message, message
    assert "image_num_patches (tiles per image) = [2]" in message, message


def test_image_num_patches_must_sum_to_tiles(model, make_batch):
    inputs = make_batch([[2, 1]])
    inputs["image_num_patches"] = torch.tensor([2, 2])
    with pytest.raises(ValueError, match=r"image_num_patches \[2, 2\] sums to 4 tiles but pixel_values holds 3 tiles"):
        with torch.no_grad():
            model(**inputs)


def test_exactly_one_of_input_ids_or_inputs_embeds(model, make_batch):
    inputs = make_batch([[]])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(attention_mask=inputs["attention_mask"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=inputs["input_ids"], inputs_embeds=embeds)


VALID_ATTN = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def assert_names_bad_attn_and_choices(message: str):
    assert "nonsense" in message, message
    for choice in VALID_ATTN:
        assert choice in message, f"{choice!r} missing from: {message}"


def test_unknown_attn_implementation_in_config(config):
    config._attn_implementation = "nonsense"
    with pytest.raises(ValueError) as error:
        InternVL3ForConditionalGeneration(config)
    assert_names_bad_attn_and_choices(str(error.value))


def test_unknown_attn_implementation_in_from_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        InternVL3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="nonsense")
    assert_names_bad_attn_and_choices(str(error.value))


def test_unknown_attn_implementation_in_set_attn_implementation(model):
    with pytest.raises(ValueError) as error:
        model.set_attn_implementation("nonsense")
    assert_names_bad_attn_and_choices(str(error.value))
    assert model.config._attn_implementation == "sdpa"  # unchanged


def test_unknown_attn_implementation_for_one_sub_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        InternVL3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation={"text_config": "nonsense"})
    assert_names_bad_attn_and_choices(str(error.value))


# --------------------------------------------------------------------------------------------------- attention dict
ATTN_DICT = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}


def assert_attn_dict_applied(model):
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    # The sub-modules read these very config objects.
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "eager"
    assert model.model.vision_tower.encoder.layer[0].attention.config._attn_implementation == "sdpa"


def test_attn_implementation_dict_in_from_pretrained(model, tmp_path, make_batch):
    model.save_pretrained(tmp_path)
    loaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=dict(ATTN_DICT)).eval()
    assert_attn_dict_applied(loaded)
    inputs = make_batch([[2], [1]])
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert_close(loaded(**inputs).logits[valid], model(**inputs).logits[valid], atol=1e-4)


def test_attn_implementation_dict_in_set_attn_implementation(model):
    model.set_attn_implementation(dict(ATTN_DICT))
    assert_attn_dict_applied(model)


def test_attn_implementation_dict_in_constructor(config, model_factory):
    config._attn_implementation = dict(ATTN_DICT)
    assert_attn_dict_applied(model_factory(config))


def test_default_attn_implementation_is_sdpa_everywhere(model):
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------- tying, save/load
def test_untied_by_default(model):
    assert model.config.tie_word_embeddings is False
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr()
    assert not torch.equal(head, embed)


def test_tie_word_embeddings_true_ties(config, model_factory):
    config.tie_word_embeddings = True
    model = model_factory(config)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    with torch.no_grad():
        embed[5].fill_(0.25)
    assert torch.equal(model.lm_head.weight[5], torch.full_like(model.lm_head.weight[5], 0.25))


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tie, config, model_factory, make_batch, tmp_path):
    config.tie_word_embeddings = tie
    model = model_factory(config)
    model.save_pretrained(tmp_path)
    loaded = InternVL3ForConditionalGeneration.from_pretrained(tmp_path).eval()

    assert type(loaded.config).__name__ == "InternVL3Config"
    assert loaded.config.tie_word_embeddings is tie
    assert loaded.config.image_token_id == model.config.image_token_id
    head, embed = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) is tie
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id

    inputs = make_batch([[2], [1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_saved_checkpoint_uses_in_memory_key_names(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    assert saved == set(model.state_dict()) - {
        name for name, _ in model.named_buffers()
    }, saved ^ set(model.state_dict())


# --------------------------------------------------------------------------------------------------- training, dtype
def test_backward_reaches_every_component(model, make_batch):
    model.train()
    inputs = make_batch([[2], [1]])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert sum(g.abs().sum() for g in grads) > 0, prefix


def test_bfloat16_matches_native(model, native_factory, make_batch):
    """fp32 pixel_values are cast to the vision tower dtype; both implementations round identically."""
    native = native_factory(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    inputs = make_batch([[2]])
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = native(**native_kwargs(inputs)).logits
    assert ours.dtype == torch.bfloat16
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2, rtol=1e-2)


def test_packed_row_isolates_samples_in_train_mode_without_use_cache_argument(model):
    """transformers skips packed-sequence detection when a cache exists; training must not create one."""
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    model.train()
    with torch.no_grad():
        logits = model(input_ids=packed, position_ids=positions).logits
        assert_close(logits[:, :4], model(input_ids=first).logits)
        assert_close(logits[:, 4:], model(input_ids=second).logits)


# --------------------------------------------------------------------------------------------------- shared-prompt rows
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool_mask", "float_mask"])
@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_shared_prompt_row_with_block_mask_and_rope_positions_equals_separate_rows(
    attn_implementation, mask_dtype, tokenizer, config, model_factory, make_batch
):
    """One row `[prompt | chosen | rejected]` with a 4-D block mask (the rejected answer cannot see the chosen one)
    and `rope_position_ids` continuing the rejected answer from the prompt's end gives, at every position, the
    logits of `[prompt | chosen]` and `[prompt | rejected]` run separately, under V2PE (δ = 1/4, an image)."""
    config.v2pe_mode, config.v2pe_delta = "fixed", 0.25
    model = model_factory(config, attn_implementation=attn_implementation)
    prompt = make_batch([[2]])
    prompt_ids, pixel_values = prompt["input_ids"], prompt["pixel_values"]
    chosen, rejected = torch.tensor([[40, 41, 42]]), torch.tensor([[50, 51, 52, 53]])
    prompt_length, chosen_length = prompt_ids.shape[1], chosen.shape[1]
    length = prompt_length + chosen_length + rejected.shape[1]
    with torch.no_grad():
        alone_chosen = model(input_ids=torch.cat([prompt_ids, chosen], 1), pixel_values=pixel_values)
        alone_rejected = model(input_ids=torch.cat([prompt_ids, rejected], 1), pixel_values=pixel_values)
        rope = torch.cat([alone_chosen.rope_position_ids, alone_rejected.rope_position_ids[:, prompt_length:]], 1)
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        allowed[prompt_length + chosen_length :, prompt_length : prompt_length + chosen_length] = False
        mask = allowed[None, None]
        if mask_dtype != torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        shared = model(
            input_ids=torch.cat([prompt_ids, chosen, rejected], 1),
            pixel_values=pixel_values,
            attention_mask=mask,
            rope_position_ids=rope,
        )
    assert rope[0, prompt_length + chosen_length] == rope[0, prompt_length] != prompt_length  # V2PE, continued
    assert_close(shared.logits[:, : prompt_length + chosen_length], alone_chosen.logits)
    assert_close(shared.logits[:, prompt_length + chosen_length :], alone_rejected.logits[:, prompt_length:])
    assert torch.equal(shared.rope_position_ids, rope)
