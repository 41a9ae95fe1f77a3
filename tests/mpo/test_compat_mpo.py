"""The TRL behaviour `internvl3_hf._compat.trl_without_reference` works around, shown on the pinned TRL: this test
fails once TRL accepts `precompute_ref_log_probs` for vision datasets (then the workaround can go)."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from internvl3_hf._compat import trl_without_reference  # noqa: E402
from internvl3_hf.mpo import preference_dataset  # noqa: E402
from internvl3_hf.mpo.data import synthetic_preference_pairs  # noqa: E402
from internvl3_hf.modeling.processing_internvl3 import processor_for_config  # noqa: E402

from mpo_helpers import CPU  # noqa: E402


def test_trl_refuses_precomputed_reference_for_vision_datasets(model_factory, tokenizer, tmp_path):
    model = model_factory(seed=0)
    processor = processor_for_config(tokenizer, model.config)
    args = DPOConfig(str(tmp_path), precompute_ref_log_probs=True, **CPU)
    with pytest.raises(ValueError, match="not supported for vision datasets"):
        DPOTrainer(model, ref_model=copy.deepcopy(model), args=args, processing_class=processor,
                   train_dataset=preference_dataset(synthetic_preference_pairs(2)))  # fmt: skip


def test_trl_without_reference_hides_the_flag_and_shares_every_tensor(model_factory):
    model = model_factory(seed=0)
    args = DPOConfig("unused", precompute_ref_log_probs=True, **CPU)
    with trl_without_reference(args, model) as stand_in:
        assert args.precompute_ref_log_probs is False
        assert stand_in is not model
        pairs = zip(model.state_dict(keep_vars=True).values(), stand_in.state_dict(keep_vars=True).values())
        assert all(ours is theirs for ours, theirs in pairs)
        assert all(a is b for a, b in zip(model.buffers(), stand_in.buffers()))
    assert args.precompute_ref_log_probs is True
    with trl_without_reference(args) as nothing:
        assert nothing is None and args.precompute_ref_log_probs is False
    assert args.precompute_ref_log_probs is True
    assert torch.is_tensor(next(stand_in.parameters()))
