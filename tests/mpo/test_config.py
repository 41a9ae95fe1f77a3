"""`MPOConfig`: MPO defaults, the loss_type/loss_weights/w_* mapping, and clear errors at construction."""

import pytest

from internvl3_hf.mpo import MPOConfig


def make(tmp_path, **kwargs):
    return MPOConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], **kwargs)


def test_defaults_are_internvl3_mpo(tmp_path):
    args = make(tmp_path)
    assert (args.w_p, args.w_q, args.w_g, args.beta) == (0.8, 0.2, 1.0, 0.1)
    assert args.loss_type == ["sigmoid", "bco_pair", "sft"] and args.loss_weights == [0.8, 0.2, 1.0]
    assert args.term_weights == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
    assert args.reward_shift_update == "cumulative" and args.share_vision_forward
    assert args.remove_unused_columns is False


def test_weights_follow_w_fields_or_loss_weights(tmp_path):
    args = make(tmp_path, w_p=0.5, w_q=0.0, w_g=2.0)
    assert args.loss_weights == [0.5, 0.0, 2.0]
    args = make(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    assert (args.w_p, args.w_q, args.w_g) == (1.0, 0.0, 0.3)
    assert args.term_weights == {"sigmoid": 1.0, "sft": 0.3}
    assert make(tmp_path, loss_type="bco_pair").loss_weights == [0.2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": ["sigmoid", "ipo"]}, r"holds \['ipo'\]; MPO combines only"),
        ({"loss_type": ["sigmoid", "bco_pair", "sftt"]}, r"holds \['sftt'\]"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, "each term once"),
        ({"loss_weights": [0.8, 0.2]}, "2 weights for 3 terms"),
        ({"w_q": -0.1}, r"w_q must be a non-negative number, got -0.1"),
        ({"loss_weights": [0.8, -0.2, 1.0]}, "w_q must be a non-negative number"),
        ({"w_p": 0.0, "w_q": 0.0, "w_g": 0.0}, "Every MPO loss weight is 0"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"reward_shift_update": "mean"}, "reward_shift_update must be one of"),
        ({"reward_shift_update": "ema", "reward_shift_momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ({"ld_alpha": 0.5}, "does not support ld_alpha"),
        ({"precompute_ref_log_probs": True, "sync_ref_model": True}, "does not support sync_ref_model"),
        ({"use_weighting": True}, "does not support use_weighting"),
    ],
)
def test_invalid_settings_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


def test_trainer_refuses_a_plain_dpo_config(tmp_path):
    from trl import DPOConfig

    from internvl3_hf.mpo import MPOTrainer
    from internvl3_hf.train import build_model_and_processor

    model, processor = build_model_and_processor({"name_or_path": "tiny"})
    args = DPOConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match="needs an MPOConfig"):
        MPOTrainer(model, args=args, train_dataset=[], processing_class=processor)


def test_official_8b_recipe_settings():
    from internvl3_hf.train import load_recipe

    recipe = load_recipe("recipes/internvl3_8b_mpo.yaml")
    training = dict(recipe["training"])
    assert training.pop("deepspeed") == "recipes/deepspeed/zero3.json"
    args = MPOConfig(**{**training, "bf16": False, "use_cpu": True, "report_to": []})
    assert args.term_weights == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0} and args.beta == 0.1
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.num_train_epochs) == (2e-7, 0.03, 0.05, 1)
    assert args.lr_scheduler_type == "cosine" and args.max_length == 12288
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 256  # 8 GPUs
    assert recipe["model"]["name_or_path"].endswith("InternVL3-8B-Instruct") and "lora" not in recipe
