"""`MPOTrainer` in training: the reward shift δ (running mean, per optimizer step, checkpointed), PEFT without a
reference copy, the tiny recipe learning its preference set, and the `mpo` CLI."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from internvl3_hf.mpo import (  # noqa: E402
    REWARD_SHIFT_FILE,
    MPOConfig,
    MPODataCollator,
    MPOTrainer,
    RewardShift,
    preference_dataset,
)
from internvl3_hf.recipes import lora_config  # noqa: E402
from internvl3_hf.train import run_mpo  # noqa: E402
from internvl3_hf.mpo.data import synthetic_preference_pairs  # noqa: E402
from internvl3_hf.sft import add_fused_lm_head_once  # noqa: E402
from internvl3_hf.train import build_model_and_processor, load_recipe  # noqa: E402

RECIPE = "recipes/tiny_cpu_mpo.yaml"
BETA = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def small_pairs(count: int = 4):
    """Short rows: a one-tile square and a short system prompt."""
    pairs = synthetic_preference_pairs(count, seed=0, image_size=28)
    for pair in pairs:
        pair.prompt.insert(0, {"role": "system", "content": "Be brief."})
    return pairs


def make_trainer(output_dir, callbacks=None, peft_config=None, distinct_reference=True, model=None, **kwargs):
    """A trainer on 4 pairs; by default with a reference a little away from the policy, so that the rewards (and
    δ) are not 0 from the first step on."""
    built, processor = build_model_and_processor({"name_or_path": "tiny"})
    model = model if model is not None else built
    reference = None
    if distinct_reference:
        reference = copy.deepcopy(model).requires_grad_(False)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in reference.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    settings = dict(
        use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False, disable_tqdm=True,
        per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", seed=0, data_seed=0, beta=BETA,
    )
    settings.update(kwargs)
    return MPOTrainer(
        model,
        ref_model=reference,
        args=MPOConfig(str(output_dir), **settings),
        train_dataset=preference_dataset(small_pairs()),
        processing_class=processor,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def separate_rows(trainer, rows):
    """The rows collated as separate chosen/rejected rows (what `sequence_logps` reads), whatever the trainer uses."""
    return MPODataCollator(trainer.processing_class, share_prompt=False)(rows)


def sequence_logps(model, batch):
    """Summed answer log-probs of every row of a separate-rows batch, from the plain logits (the tiles duplicated
    for the two halves)."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=torch.cat([batch["pixel_values"]] * 2),
        ).logits
    per_token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


class HandRewards(TrainerCallback):
    """At each step start, the mean reward β(log π − log π_ref) of every row of the (one-batch) dataset, by hand."""

    def __init__(self):
        self.trainer, self.step_means, self.shifts_used = None, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        batch = separate_rows(trainer, [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        rewards = BETA * (sequence_logps(trainer.model, batch) - sequence_logps(trainer.ref_model, batch))
        self.step_means.append(rewards.mean().item())

    def on_step_end(self, args, state, control, **kwargs):
        # Before the trainer's own callback moves δ and before `log` clears the metrics: the δ of each micro-batch.
        self.shifts_used.append(list(self.trainer._metrics["train"]["mpo/reward_shift"]))


@pytest.mark.parametrize("rule", ["cumulative", "ema"])
def test_reward_shift_is_the_running_mean_of_the_rewards(tmp_path, rule):
    hand = HandRewards()
    trainer = make_trainer(tmp_path, callbacks=[hand], reward_shift_update=rule, reward_shift_momentum=0.5)
    hand.trainer = trainer
    trainer.train()
    means = hand.step_means
    assert len(means) == 3 and len(set(round(m, 4) for m in means)) == 3  # the rewards move from step to step
    expected, shifts = 0.0, []
    for step, mean in enumerate(means, start=1):
        shifts.append(expected)  # the δ every micro-batch of this step used
        expected = sum(means[:step]) / step if rule == "cumulative" else (mean if step == 1 else 0.5 * expected + 0.5 * mean)
    assert trainer.reward_shift.value == pytest.approx(expected, abs=1e-5)
    assert [used[0] for used in hand.shifts_used] == pytest.approx(shifts, abs=1e-5)
    logged = [entry["mpo/reward_shift"] for entry in trainer.state.log_history if "mpo/reward_shift" in entry]
    assert logged == pytest.approx(shifts, abs=1e-5)
    # Only training moves δ.
    metrics = trainer.evaluate(trainer.train_dataset)
    assert trainer.reward_shift.value == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_mpo/reward_shift"] == trainer.reward_shift.value


def test_reward_shift_moves_once_per_optimizer_step_whatever_the_accumulation(tmp_path):
    # One step of 4 pairs: one micro-batch of 4, or 4 micro-batches of 1 accumulated.
    whole = make_trainer(tmp_path / "whole", max_steps=1)
    whole.train()
    hand = HandRewards()
    accumulated = make_trainer(
        tmp_path / "ga4", callbacks=[hand], max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=4
    )
    hand.trainer = accumulated
    accumulated.train()
    # Every micro-batch of a step uses the δ of the previous steps: 0 in step 1, then δ after step 1.
    assert hand.shifts_used[0] == [0.0] * 4
    # (A batch of 4 padded rows and 4 single rows round differently: ~1e-6 on δ ≈ 0.1.)
    assert hand.shifts_used[1] == pytest.approx([whole.reward_shift.value] * 4, abs=1e-5)
    assert abs(whole.reward_shift.value) > 0.01 and whole.reward_shift.count == 8
    assert whole.reward_shift.value == pytest.approx(hand.step_means[0], abs=1e-5)
    # With a frozen model (lr 0): 4 steps of 1 pair (GA=1) or 1 step of 4 micro-batches (GA=4), the same δ.
    steps = make_trainer(tmp_path / "ga1x4", learning_rate=0.0, max_steps=4, per_device_train_batch_size=1)
    steps.train()
    window = make_trainer(tmp_path / "ga4x1", learning_rate=0.0, max_steps=1, per_device_train_batch_size=1,
                          gradient_accumulation_steps=4)
    window.train()
    assert steps.reward_shift.steps == 4 and window.reward_shift.steps == 1
    assert steps.reward_shift.value == pytest.approx(window.reward_shift.value, abs=1e-7)


def test_reward_shift_survives_save_and_resume(tmp_path):
    straight = make_trainer(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    saved = json.loads((tmp_path / "a/checkpoint-2" / REWARD_SHIFT_FILE).read_text())
    assert saved["rule"] == "cumulative" and saved["steps"] == 2 and saved["value"] != 0.0

    resumed = make_trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed.reward_shift.value == pytest.approx(straight.reward_shift.value, abs=1e-6)
    assert resumed.reward_shift.count == straight.reward_shift.count
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e][-2:] for t in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)

    # Without the file, δ would restart from 0 and end elsewhere.
    (tmp_path / "a/checkpoint-2" / REWARD_SHIFT_FILE).unlink()
    restarted = make_trainer(tmp_path / "c", max_steps=4)
    restarted.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-2"))
    assert abs(restarted.reward_shift.value - straight.reward_shift.value) > 1e-3


def test_peft_lora_uses_the_adapter_disabled_base_as_reference(tmp_path):
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    base = copy.deepcopy(model)  # before TRL patches the forward (a later deepcopy would still call the original)
    trainer = make_trainer(
        tmp_path, peft_config=lora_config({"target": "both", "r": 4}), distinct_reference=False, model=model,
        max_steps=2,
    )
    assert trainer.ref_model is None
    with torch.no_grad():  # a non-zero adapter on the LLM and the ViT, so that policy and base differ
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora_vit = [n for n, p in trainer.model.named_parameters() if "vision_tower" in n and "lora_B" in n]
    assert lora_vit and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert trainer.share_prompt  # the reference pass below runs on shared-prompt rows
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(rows))
    expected = sequence_logps(base, separate_rows(trainer, rows)).float()
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-4)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert len(logs) == 2 and all(abs(entry["rewards/chosen"]) > 1e-3 for entry in logs)
    assert torch.isfinite(torch.tensor([entry["loss"] for entry in logs])).all()
    assert trainer.reward_shift.steps == 2


@pytest.mark.parametrize("after_sft", [False, True])
def test_a_copy_of_the_trained_model_trains_its_own_weights(tmp_path, after_sft):
    """TRL leaves a fused-forward patch on the model; a deep copy of the trained model (a critic, the reference of
    a next round) must still run its own weights, through the plain forward and through a second trainer; also
    when the SFT trainer patched the model first (the patches then chain)."""
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    if after_sft:
        assert add_fused_lm_head_once(model)
    trainer = make_trainer(tmp_path, model=model, max_steps=1)
    trainer.train()
    trained = trainer.model
    copied = copy.deepcopy(trained)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids = batch["input_ids"][:1]
    copied(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in trained.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in copied.parameters())
    copied.zero_grad(set_to_none=True)
    before = {name: p.detach().clone() for name, p in trained.named_parameters()}
    make_trainer(tmp_path / "again", model=copied, max_steps=1).train()
    assert all(torch.equal(p, before[name]) for name, p in trained.named_parameters())
    assert any(not torch.equal(p, before[name]) for name, p in copied.named_parameters())


def test_tiny_recipe_learns_the_preference_set(tmp_path):
    """The tiny recipe (synthetic coloured squares) reaches 100 % reward accuracy and its margins grow."""
    trainer = run_mpo(load_recipe(RECIPE, [f"training.output_dir={tmp_path}"]))
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    margins = [entry["rewards/margins"] for entry in logs]
    assert margins[-1] > margins[0] + 5.0 and max(margins[-3:]) > 1.0
    assert logs[0]["rewards/accuracies"] < 0.75 and logs[-1]["rewards/accuracies"] == 1.0
    metrics = trainer.evaluate(trainer.train_dataset)
    assert metrics["eval_rewards/accuracies"] == 1.0 and metrics["eval_rewards/margins"] > margins[0] + 5.0
    assert (tmp_path / "model.safetensors").exists()


def test_cli_mpo_command(tmp_path, capsys):
    from internvl3_hf.cli import main

    assert main(["mpo", "--config", RECIPE, "--set", f"training.output_dir={tmp_path}", "--set", "training.max_steps=2",
                 "--set", "training.logging_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "reward shift" in out and f"saved to {tmp_path}" in out
    assert (tmp_path / "config.json").exists()


def test_reward_shift_all_reduces_over_ranks():
    """Two ranks observing different rewards end the step with the same δ: the mean of all their rewards."""
    ranks = [RewardShift("cumulative"), RewardShift("cumulative")]
    observed = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])]
    for shift, rewards in zip(ranks, observed):
        shift.observe(rewards)
    pending = [torch.stack([s._pending_sum, torch.tensor(float(s._pending_count), dtype=torch.float64)]) for s in ranks]
    for shift in ranks:
        shift.step(lambda tensor: sum(pending), torch.device("cpu"))  # what the all-reduce (sum) returns
    assert [shift.value for shift in ranks] == [4.0, 4.0] and [shift.count for shift in ranks] == [4, 4]


def test_two_process_ddp_reward_shift_is_the_mean_over_all_ranks(tmp_path):
    """2 CPU processes (gloo), 1 pair per micro-batch, 2 accumulated: after one step both ranks hold the same δ,
    the mean reward of all 4 pairs computed by hand in this process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    shifts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert shifts[0] == shifts[1] and shifts[0]["count"] == 8 and shifts[0]["steps"] == 1

    trainer = make_trainer(tmp_path / "hand")
    batch = separate_rows(trainer, [trainer.train_dataset[i] for i in range(4)])
    rewards = BETA * (sequence_logps(trainer.model, batch) - sequence_logps(trainer.ref_model, batch))
    assert shifts[0]["value"] == pytest.approx(rewards.mean().item(), abs=1e-5)


def _ddp_worker(output_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(
        Path(output_dir) / "run", max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        ddp_backend="gloo",
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(trainer.reward_shift.state_dict()))
    # Leave without any gloo teardown once all ranks have written their file (see tests/test_sft_ddp.py `_worker`).
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_precomputed_reference_trains_like_the_on_the_fly_one_without_a_copy(tmp_path):
    """Full fine-tuning with `precompute_ref_log_probs`: no reference model is held, the logged losses and rewards
    equal those of the on-the-fly reference copy, and the values are the policy's log-probs before training."""
    on_the_fly = make_trainer(tmp_path / "fly", distinct_reference=False)
    assert on_the_fly.ref_model is not None
    on_the_fly.train()
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    rows = [on_the_fly.train_dataset[i] for i in range(4)]
    expected = sequence_logps(model, separate_rows(on_the_fly, rows)).float()
    precomputed = make_trainer(tmp_path / "pre", distinct_reference=False, model=model, precompute_ref_log_probs=True)
    assert precomputed.ref_model is None
    precomputed.train()
    assert precomputed.ref_model is None
    assert torch.allclose(precomputed.reference_logps["train"].T.flatten(), expected, atol=1e-4)
    assert precomputed.train_dataset["ref_chosen_logps"] == pytest.approx(expected[:4].tolist(), abs=1e-4)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        logged = [[entry[key] for entry in t.state.log_history if key in entry] for t in (on_the_fly, precomputed)]
        assert len(logged[0]) == 3 and logged[1] == pytest.approx(logged[0], abs=1e-4, rel=1e-5), key


def test_precomputed_reference_is_saved_and_reused_on_resume(tmp_path, monkeypatch):
    straight = make_trainer(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2, distinct_reference=False,
                            precompute_ref_log_probs=True)  # fmt: skip
    straight.train()
    saved = torch.load(tmp_path / "a/checkpoint-2/mpo_reference_logps.pt")
    assert torch.equal(saved["train"], straight.reference_logps["train"])

    resumed = make_trainer(tmp_path / "b", max_steps=4, distinct_reference=False, precompute_ref_log_probs=True)

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran again on resume")

    monkeypatch.setattr(resumed, "precompute_reference_logps", no_reference_pass)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-2"))
    assert torch.equal(resumed.reference_logps["train"], saved["train"])
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e][-2:] for t in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_precomputed_reference_with_lora_is_the_adapter_disabled_base(tmp_path):
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    base = copy.deepcopy(model)
    trainer = make_trainer(
        tmp_path, peft_config=lora_config({"target": "both", "r": 4}), distinct_reference=False, model=model,
        max_steps=1, precompute_ref_log_probs=True,
    )  # fmt: skip
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(4)]
    expected = sequence_logps(base, separate_rows(trainer, rows)).float()
    assert torch.allclose(trainer.reference_logps["train"].T.flatten(), expected, atol=1e-4)


def test_precompute_refuses_random_v2pe(tmp_path):
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    model.config.v2pe_mode = "random"
    with pytest.raises(ValueError, match="v2pe_mode='random'"):
        make_trainer(tmp_path, model=model, distinct_reference=False, precompute_ref_log_probs=True)


def test_precomputed_reference_for_eval_datasets(tmp_path):
    """An eval dataset given at construction gets its reference pass with the training one; one given to
    `evaluate` after full fine-tuning started cannot (no reference is kept) and says so."""
    trainer = make_trainer(tmp_path, distinct_reference=False, precompute_ref_log_probs=True, max_steps=1,
                           per_device_eval_batch_size=2)  # fmt: skip
    trainer.eval_dataset = preference_dataset(small_pairs(2))  # as if given to the constructor
    trainer.train()
    assert set(trainer.reference_logps) == {"train", "eval"} and trainer.reference_logps["eval"].shape == (2, 2)
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/margins"] != 0.0 and "eval_logps/chosen" in metrics
    with pytest.raises(ValueError, match="after training started"):
        trainer.evaluate(preference_dataset(small_pairs(3)))
