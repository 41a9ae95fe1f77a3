"""The MPO loss: TRL's own multi-loss with δ = 0, eqs. 9–13 by hand with δ ≠ 0, and the vision tower once per pair."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from internvl3_hf.mpo import MPOConfig, MPODataCollator, MPOTrainer, PreferencePair, preference_dataset  # noqa: E402
from internvl3_hf.mpo.data import synthetic_preference_pairs  # noqa: E402
from internvl3_hf.modeling.processing_internvl3 import processor_for_config  # noqa: E402
from mpo_helpers import CPU, perturbed  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(model_factory, tokenizer):
    """(policy, reference, processor, pairs, batch): three pairs with 5 tiles, no image, and 1 + 5 tiles."""
    reference = model_factory(seed=0)
    policy = perturbed(reference, 0.1, seed=1)
    processor = processor_for_config(tokenizer, reference.config)
    square, small = synthetic_preference_pairs(2, seed=0)[0], synthetic_preference_pairs(2, seed=0, image_size=28)[1]
    pairs = [
        square,
        PreferencePair([{"role": "user", "content": "Say hello."}], "hello", "Goodbye to you.", origin="text"),
        PreferencePair(
            [{"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nSame colour?"}],
            "No.",
            "Yes, the same.",
            images=[small.images[0], square.images[0]],
            origin="two images",
        ),
    ]
    batch = MPODataCollator(processor)(pairs)
    assert batch["image_num_patches"].tolist() == [5, 1, 5]
    return policy, reference, processor, pairs, batch


def mpo_trainer(policy, reference, processor, pairs, output_dir, **kwargs):
    args = MPOConfig(str(output_dir), **CPU, **kwargs)
    return MPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=preference_dataset(pairs),
        processing_class=processor,
    )


def duplicated(batch):
    """The batch as TRL's vision collator lays it out: every pair's tiles twice (chosen rows, rejected rows)."""
    batch = dict(batch)
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    batch["image_num_patches"] = torch.cat([batch["image_num_patches"]] * 2)
    return batch


def logps_by_hand(model, batch):
    """(sequence log-prob of every row, per-token log-probs, next-token completion mask) from plain logits."""
    inputs = duplicated(batch)
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            image_num_patches=inputs["image_num_patches"],
        ).logits
    per_token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    mask = inputs["completion_mask"][:, 1:].bool()
    return (per_token * mask).sum(1), per_token, mask


@pytest.mark.parametrize("weights, beta", [((0.8, 0.2, 1.0), 0.1), ((0.3, 1.5, 0.7), 0.5)])
def test_delta_zero_equals_trl_multi_loss(setup, tmp_path, weights, beta):
    """δ forced to 0: TRL's own `loss_type=["sigmoid", "bco_pair", "sft"]` loss on the same batch, to 1e-6.

    TRL's forward runs the ViT on duplicated tiles; so does the MPO trainer here (`share_vision_forward=False`),
    so that both losses come from bit-identical backbone forwards (the MPO head projects the answer tail only, TRL's
    every position on a CPU: the log-probs differ by float rounding). The ViT-once path is compared in the next tests.
    """
    policy, reference, processor, pairs, batch = setup
    w_p, w_q, w_g = weights
    mpo = mpo_trainer(policy, reference, processor, pairs, tmp_path / "mpo", w_p=w_p, w_q=w_q, w_g=w_g, beta=beta,
                      reward_shift_update="none", share_vision_forward=False)
    trl_args = DPOConfig(str(tmp_path / "trl"), loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=list(weights),
                         beta=beta, **CPU)
    trl = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
                     train_dataset=preference_dataset(pairs), processing_class=processor)
    loss = mpo.compute_loss(mpo.model, batch)
    trl_loss = trl.compute_loss(trl.model, duplicated(batch))
    assert abs(loss.item() - trl_loss.item()) < 1e-6, (loss.item(), trl_loss.item())
    metrics = mpo._metrics["eval"]
    assert abs(metrics["rewards/margins"][0]) > 0.1  # the policy is far enough from the reference to matter
    # Summed log-probs are ~-100 (one float32 ulp ~1e-5): compare the margins relatively too.
    assert metrics["rewards/margins"][0] == pytest.approx(
        trl._metrics["eval"]["rewards/margins"][0], abs=1e-6, rel=1e-6
    )
    # The default (ViT once per pair) differs only by float rounding of the batched ViT matmuls.
    shared = mpo_trainer(policy, reference, processor, pairs, tmp_path / "shared", w_p=w_p, w_q=w_q, w_g=w_g,
                         beta=beta, reward_shift_update="none")
    assert shared.compute_loss(shared.model, batch).item() == pytest.approx(trl_loss.item(), rel=1e-6)


def test_delta_on_equals_equations_9_to_13(setup, tmp_path):
    policy, reference, processor, pairs, batch = setup
    beta, delta, (w_p, w_q, w_g) = 0.1, 0.37, (0.8, 0.2, 1.0)
    trainer = mpo_trainer(policy, reference, processor, pairs, tmp_path)
    trainer.reward_shift.value = delta
    loss = trainer.compute_loss(trainer.model, batch)

    policy_logps, per_token, mask = logps_by_hand(policy, batch)
    reference_logps, _, _ = logps_by_hand(reference, batch)
    (pi_c, pi_r), (ref_c, ref_r) = policy_logps.chunk(2), reference_logps.chunk(2)
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    l_p = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
    l_q = (-F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))).mean()
    half = len(pairs)
    l_g = -per_token[:half][mask[:half]].mean()
    expected = w_p * l_p + w_q * l_q + w_g * l_g
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    metrics = trainer._metrics["eval"]
    assert metrics["mpo/preference_loss"][0] == pytest.approx(l_p.item(), abs=1e-5)
    assert metrics["mpo/quality_loss"][0] == pytest.approx(l_q.item(), abs=1e-5)
    assert metrics["mpo/generation_loss"][0] == pytest.approx(l_g.item(), abs=1e-5)
    assert metrics["mpo/reward_shift"] == [delta]
    # δ really enters the loss.
    trainer.reward_shift.value = 0.0
    l_q0 = (-F.logsigmoid(r_c) - F.logsigmoid(-r_r)).mean()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx((expected + w_q * (l_q0 - l_q)).item(), abs=1e-5)
    assert abs((l_q0 - l_q).item()) > 1e-3


def test_vision_tower_runs_once_per_pair_with_the_same_loss_and_gradients(setup, tmp_path):
    policy, reference, processor, pairs, batch = setup
    unique_tiles = batch["pixel_values"].shape[0]
    results = {}
    for shared in (True, False):
        trainer = mpo_trainer(policy, reference, processor, pairs, tmp_path / str(shared), share_vision_forward=shared)
        trainer.reward_shift.value = 0.2
        calls = {"policy": [], "reference": []}
        for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
            model.model.vision_tower.register_forward_hook(
                lambda module, args, kwargs, output, name=name: calls[name].append(kwargs["pixel_values"].shape[0]),
                with_kwargs=True,
            )
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if "vision_tower" in n}
        results[shared] = (loss.item(), grads, calls)
    (shared_loss, shared_grads, shared_calls), (twice_loss, twice_grads, twice_calls) = results[True], results[False]
    # One ViT call per step and model, on one copy of the tiles: each pair's images are encoded once.
    assert shared_calls == {"policy": [unique_tiles], "reference": [unique_tiles]}
    assert twice_calls == {"policy": [2 * unique_tiles], "reference": [2 * unique_tiles]}
    assert shared_loss == pytest.approx(twice_loss, rel=1e-6)
    for name, grad in shared_grads.items():
        assert torch.allclose(grad, twice_grads[name], atol=1e-6, rtol=1e-5), name
    assert any(grad.abs().sum() > 0 for grad in shared_grads.values())


def test_random_v2pe_strides_are_shared_by_chosen_rejected_and_reference(tokenizer, tmp_path):
    """Under `v2pe_mode="random"` a policy equal to its reference must get rewards of exactly 0."""
    from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
    from internvl3_hf.tiny import tiny_config

    torch.manual_seed(0)
    model = InternVL3ForConditionalGeneration(tiny_config(tokenizer, v2pe_mode="random"))
    processor = processor_for_config(tokenizer, model.config)
    pairs = synthetic_preference_pairs(3)
    batch = MPODataCollator(processor)(pairs)
    trainer = mpo_trainer(model, model, processor, pairs, tmp_path)
    trainer.model.train()
    seen = []
    trainer.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("v2pe_strides")), with_kwargs=True
    )
    trainer.compute_loss(trainer.model, batch)
    assert seen[0] is not None and seen[0].shape[0] == 2 * len(pairs)
    assert torch.equal(seen[0][: len(pairs)], seen[0][len(pairs):])
    assert trainer._metrics["train"]["rewards/chosen"] == [0.0]
    assert trainer._metrics["train"]["rewards/rejected"] == [0.0]


def trl_row(pair: PreferencePair) -> dict:
    """A one-image pair in TRL's conversational vision layout (typed image part, one assistant message each)."""
    question = pair.prompt[-1]["content"].removeprefix("<image>\n")
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair.rejected}]}],
        "images": list(pair.images),
    }


def test_trl_own_collator_and_loss_equal_the_shared_prompt_loss_but_for_the_newline_after_im_end(
    model_factory, tokenizer, tmp_path
):
    """TRL's `DPOTrainer` end to end (its own vision collator over TRL-layout rows, the plugin processor, its own
    `["sigmoid", "bco_pair", "sft"]` loss) against `MPOTrainer` as shipped (shared prompt, δ off).

    The one difference: TRL renders the answer with the chat template's whole assistant turn, so its completion
    mask also covers the "\\n" after `<|im_end|>` (one token per row), which the model never has to predict at
    inference (generation stops at `<|im_end|>`); the plugin labels the answer and `<|im_end|>` only, as the
    official InternVL code does. With that token taken out of TRL's mask the two losses agree to 1e-5.
    """
    reference = model_factory(seed=0)
    policy = perturbed(reference, 0.1, seed=1)
    processor = processor_for_config(tokenizer, reference.config)
    pairs = synthetic_preference_pairs(3, seed=0)
    trl = DPOTrainer(
        copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=processor,
        args=DPOConfig(str(tmp_path / "trl"), loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                       max_length=None, **CPU),
        train_dataset=preference_dataset(pairs),
    )  # fmt: skip
    mpo = mpo_trainer(policy, reference, processor, pairs, tmp_path / "mpo", reward_shift_update="none")
    assert mpo.share_prompt

    trl_batch = trl.data_collator([trl_row(pair) for pair in pairs])
    separate = MPODataCollator(processor)(pairs)
    real = trl_batch["attention_mask"].bool()
    assert torch.equal(trl_batch["input_ids"][real], separate["input_ids"][separate["attention_mask"].bool()])
    assert torch.equal(trl_batch["pixel_values"], torch.cat([separate["pixel_values"]] * 2))
    extra = (trl_batch["completion_mask"] - separate["completion_mask"][:, : real.shape[1]]).bool()
    assert extra.sum(1).tolist() == [1] * 2 * len(pairs)  # one token per row, nothing missing
    newline, im_end = tokenizer.convert_tokens_to_ids(["Ċ", "<|im_end|>"])
    assert (trl_batch["input_ids"][extra] == newline).all()
    assert (trl_batch["input_ids"][:, :-1][extra[:, 1:]] == im_end).all()

    trl_loss = trl.compute_loss(trl.model, trl_batch).item()
    without_newline = {**trl_batch, "completion_mask": trl_batch["completion_mask"].masked_fill(extra, 0)}
    trl_loss_answer_only = trl.compute_loss(trl.model, without_newline).item()
    loss = mpo.compute_loss(mpo.model, mpo.data_collator(list(preference_dataset(pairs)))).item()
    assert loss == pytest.approx(trl_loss_answer_only, abs=1e-5)
    assert abs(trl_loss - trl_loss_answer_only) > 1e-3  # the newline is a real difference, accounted for above
