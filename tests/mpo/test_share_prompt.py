"""`share_prompt`: one `[prompt | chosen | p | rejected]` row per pair gives the loss, gradients, rewards and
log-probs of separate chosen/rejected rows (fp32), for the policy and the reference, under every V2PE mode,
gradient checkpointing and LoRA; the attention backends that cannot take the mask fall back to separate rows."""

import copy
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from internvl3_hf.mpo import MPOConfig, MPODataCollator, MPOTrainer, PreferencePair, preference_dataset  # noqa: E402
from internvl3_hf.mpo.data import CHOSEN_SEGMENT, REJECTED_SEGMENT, synthetic_preference_pairs  # noqa: E402
from internvl3_hf.modeling.processing_internvl3 import processor_for_config  # noqa: E402
from mpo_helpers import CPU, perturbed  # noqa: E402

COMPARED_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs_with_images():
    """1, 3 and 0 images (1 to 5 tiles each), a system prompt, answers of different lengths."""
    square, small = synthetic_preference_pairs(2, seed=0)[0], synthetic_preference_pairs(2, seed=0, image_size=28)[1]
    system = {"role": "system", "content": "Answer in one short sentence."}
    return [
        PreferencePair(
            [system, *square.prompt], square.chosen, "It is a colour, I think, maybe.", images=square.images
        ),
        PreferencePair(
            [{"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nSame colours?"}],
            "No.",
            "Yes, all three are the same.",
            images=[small.images[0], square.images[0], small.images[0]],
        ),
        PreferencePair([system, {"role": "user", "content": "Say hello."}], "Hello there, friend.", "Bye."),
    ]


def build_trainer(policy, reference, processor, output_dir, peft_config=None, **kwargs):
    args = MPOConfig(str(output_dir), **{**CPU, **kwargs})
    return MPOTrainer(
        copy.deepcopy(policy),
        ref_model=None if peft_config is not None else copy.deepcopy(reference),
        args=args,
        train_dataset=preference_dataset(pairs_with_images()),
        processing_class=processor,
        peft_config=peft_config,
    )


def step(trainer, batch, seed: int = 0):
    """Loss, gradients and logged rewards/log-probs of one training micro-batch."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    torch.manual_seed(seed)  # the same V2PE draw (v2pe_mode="random") in both layouts
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {name: trainer._metrics["train"][name][-1] for name in COMPARED_METRICS}
    return loss.item(), grads, metrics


def assert_same_step(trainer, processor, pairs, **batch_extras):
    separate = {**MPODataCollator(processor, share_prompt=False)(pairs), **batch_extras}
    shared = {**MPODataCollator(processor, share_prompt=True)(pairs), **batch_extras}
    assert shared["input_ids"].shape[0] == len(pairs) and separate["input_ids"].shape[0] == 2 * len(pairs)
    loss, grads, metrics = step(trainer, separate)
    shared_loss, shared_grads, shared_metrics = step(trainer, shared)
    assert shared_loss == pytest.approx(loss, abs=1e-5)
    for name in COMPARED_METRICS:
        # Summed log-probs of this random model are ~-100, where one float32 ulp is ~1e-5: compare relatively there.
        assert shared_metrics[name] == pytest.approx(metrics[name], abs=1e-5, rel=1e-6), name
    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy is away from its reference
    assert grads.keys() == shared_grads.keys() and grads
    # Relative to each tensor's gradient, with a floor for gradients that are exactly 0 in exact arithmetic (the
    # ViT's key biases: softmax ignores them) and only hold float32 rounding noise.
    floor = 1e-6 * max(grad.norm() for grad in grads.values())
    for name, grad in grads.items():
        error = (shared_grads[name] - grad).norm()
        assert error <= 1e-5 * grad.norm() + floor, (name, error.item(), grad.norm().item())
    return shared


@pytest.fixture
def setup(model_factory, tokenizer, config):
    def factory(**config_overrides):
        for key, value in config_overrides.items():
            setattr(config, key, value)
        reference = model_factory(config, seed=0)
        policy = perturbed(reference, 0.05, seed=1)
        return policy, reference, processor_for_config(tokenizer, config)

    return factory


@pytest.mark.parametrize(
    "v2pe",
    [{}, {"v2pe_mode": "fixed", "v2pe_delta": 0.25}, {"v2pe_mode": "random"}],
    ids=["no_v2pe", "fixed", "random"],
)
def test_shared_prompt_equals_separate_rows(setup, tmp_path, v2pe):
    policy, reference, processor = setup(**v2pe)
    trainer = build_trainer(policy, reference, processor, tmp_path)
    assert trainer.share_prompt and trainer.data_collator.share_prompt
    pairs = pairs_with_images()
    shared = assert_same_step(trainer, processor, pairs)
    # One row per pair holds each answer once and the prompt (with its image tokens) once.
    segments = shared["segment_ids"]
    image_tokens = (shared["input_ids"] == policy.config.image_token_id).sum(1)
    separate = MPODataCollator(processor)(pairs)
    assert torch.equal(image_tokens, (separate["input_ids"] == policy.config.image_token_id).sum(1)[: len(pairs)])
    answers = shared["completion_mask"] == 1
    assert (answers & (segments == CHOSEN_SEGMENT)).sum() == separate["completion_mask"][:3].sum()
    assert (answers & (segments == REJECTED_SEGMENT)).sum() == separate["completion_mask"][3:].sum()


def test_explicit_v2pe_strides_are_used_by_both_layouts(setup, tmp_path):
    policy, reference, processor = setup(v2pe_mode="random")
    trainer = build_trainer(policy, reference, processor, tmp_path)
    pairs = pairs_with_images()
    strides = torch.tensor([128, 64, 256, 32])  # one per image, pair order
    assert_same_step(trainer, processor, pairs, v2pe_strides=strides)
    seen = []
    hook = trainer.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("rope_position_ids")), with_kwargs=True
    )
    shared = MPODataCollator(processor, share_prompt=True)(pairs)
    try:
        trainer.compute_loss(trainer.model, {**shared, "v2pe_strides": strides})
    finally:
        hook.remove()
    # The first pair's image gets δ = 1/2: its image tokens advance by 0.5 each.
    positions = seen[0][0]
    image_positions = positions[shared["input_ids"][0] == policy.config.image_token_id]
    assert positions.is_floating_point() and len(image_positions) > 4
    assert torch.allclose(image_positions.diff(), torch.full_like(image_positions[1:], 0.5))


def test_shared_prompt_with_gradient_checkpointing(setup, tmp_path):
    policy, reference, processor = setup(v2pe_mode="fixed", v2pe_delta=0.5)
    trainer = build_trainer(policy, reference, processor, tmp_path)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert trainer.model.is_gradient_checkpointing
    assert_same_step(trainer, processor, pairs_with_images())


def test_shared_prompt_with_lora_and_the_adapter_disabled_reference(setup, tmp_path):
    from internvl3_hf.recipes import lora_config

    policy, reference, processor = setup()
    trainer = build_trainer(reference, None, processor, tmp_path, peft_config=lora_config({"target": "both", "r": 4}))
    assert trainer.ref_model is None
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    assert_same_step(trainer, processor, pairs_with_images())


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_backends_take_the_mask(setup, model_factory, tokenizer, config, tmp_path, backend):
    config._attn_implementation = backend
    policy, reference, processor = setup()
    policy.set_attn_implementation(backend)
    reference.set_attn_implementation(backend)
    trainer = build_trainer(policy, reference, processor, tmp_path)
    assert trainer.share_prompt
    assert_same_step(trainer, processor, pairs_with_images())


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_shared_prompt_mask_equals_create_causal_mask(setup, backend):
    """The mask built through the interface's broadcast path equals `create_causal_mask`'s (which vmaps a custom
    mask function) on padded rows, and hides exactly the chosen answer from the rejected one."""
    from transformers.masking_utils import create_causal_mask

    from internvl3_hf.mpo.trainer import hide_chosen_from_rejected, shared_prompt_mask

    policy, _, processor = setup()
    text_config = copy.deepcopy(policy.config.get_text_config())
    text_config._attn_implementation = backend
    batch = MPODataCollator(processor, share_prompt=True)(pairs_with_images())
    token_mask, segments = batch["attention_mask"], batch["segment_ids"]
    assert not token_mask.all()  # rows of different lengths: the padding is part of the mask
    probe = torch.empty((*token_mask.shape, 0))
    mask = shared_prompt_mask(text_config, probe, token_mask, segments)
    expected = create_causal_mask(
        config=text_config, inputs_embeds=probe, attention_mask=token_mask, past_key_values=None,
        and_mask_function=hide_chosen_from_rejected(segments),
    )  # fmt: skip
    assert mask.dtype == expected.dtype and torch.equal(mask, expected)
    allowed = mask[:, 0] == 0 if backend == "eager" else mask[:, 0]
    rejected_query = (segments == REJECTED_SEGMENT)[:, :, None]
    chosen_key = (segments == CHOSEN_SEGMENT)[:, None, :]
    assert not (allowed & rejected_query & chosen_key).any()
    assert (allowed & rejected_query & ~chosen_key & token_mask.bool()[:, None, :]).sum() > 0


@pytest.mark.parametrize("share", [False, True], ids=["separate", "shared"])
def test_lm_head_projects_the_answer_tail_only(setup, tmp_path, share):
    """The fused head gets the batch's answer tail only, and its answer log-probs equal the log-softmax of the
    model's own full logits (the forward without the fused head) at every answer token."""
    policy, reference, processor = setup(v2pe_mode="fixed", v2pe_delta=0.5)
    trainer = build_trainer(policy, reference, processor, tmp_path)
    pairs = pairs_with_images()[:2]  # image prompts only: the tail starts after the first image
    batch = MPODataCollator(processor, share_prompt=share)(pairs)
    model = trainer.model.eval()
    with torch.no_grad():
        answers = trainer.answer_logps(model, batch)
        logits = model(**trainer.model_inputs(model, batch), use_cache=False).logits
    length = batch["input_ids"].shape[1]
    first_answer = int(batch["completion_mask"].any(0).nonzero()[0])
    assert first_answer > 50 and answers.per_token_logps.shape[1] == length - first_answer
    expected = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = expected[:, first_answer - 1 :]
    answer_tokens = answers.completion_mask
    assert answer_tokens.sum() == batch["completion_mask"].sum()
    assert torch.allclose(answers.per_token_logps[answer_tokens], expected[answer_tokens], atol=1e-5)
    assert (answers.per_token_logps[~answer_tokens] == 0).all()


def test_flash_attention_falls_back_to_separate_rows(setup, tmp_path, caplog, monkeypatch):
    policy, reference, processor = setup()
    # Only the name matters here: the trainer reads the backend before any forward.
    text_config_class = type(policy.config.get_text_config())
    monkeypatch.setattr(text_config_class, "_attn_implementation", "flash_attention_2", raising=False)
    with caplog.at_level(logging.WARNING, logger="internvl3_hf.mpo.trainer"):
        trainer = build_trainer(policy, reference, processor, tmp_path)
    assert not trainer.share_prompt and not trainer.data_collator.share_prompt
    assert "flash_attention_2" in caplog.text and "separate rows" in caplog.text
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert "segment_ids" not in batch and batch["input_ids"].shape[0] == 6


def test_share_prompt_off_gives_separate_rows(setup, tmp_path):
    policy, reference, processor = setup()
    trainer = build_trainer(policy, reference, processor, tmp_path, share_prompt=False)
    assert not trainer.share_prompt
    assert trainer.data_collator([trainer.train_dataset[0]])["input_ids"].shape[0] == 2


@pytest.mark.slow  # torch compiles flex attention on first use (about a minute on a CPU)
def test_flex_attention_takes_the_mask_as_a_block_mask(setup, tmp_path):
    """flex_attention gets a `BlockMask` from transformers' mask interface; torch runs flex attention's backward on GPUs
    only, so this CPU test compares the no-grad loss and metrics (the GPU check runs the gradient tests)."""
    policy, reference, processor = setup(v2pe_mode="fixed", v2pe_delta=0.5)
    for model in (policy, reference):
        model.set_attn_implementation("flex_attention")
    trainer = build_trainer(policy, reference, processor, tmp_path)
    assert trainer.share_prompt
    pairs = pairs_with_images()
    results = []
    for share in (False, True):
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model.eval(), MPODataCollator(processor, share_prompt=share)(pairs))
        results.append((loss.item(), {name: trainer._metrics["eval"][name][-1] for name in COMPARED_METRICS}))
    (loss, metrics), (shared_loss, shared_metrics) = results
    assert shared_loss == pytest.approx(loss, abs=1e-5)
    for name in COMPARED_METRICS:
        assert shared_metrics[name] == pytest.approx(metrics[name], abs=1e-5, rel=1e-6), name
