"""`internvl3_hf._compat`: each test shows the upstream behaviour a workaround exists for, and fails once the
library changes it (then the workaround, and its test, can go); plus the workaround itself and its version guard."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from internvl3_hf._compat import (
    TRL_FUSED_LM_HEAD,
    add_fused_lm_head,
    check_tested_version,
    drop_fused_forward,
    has_fused_lm_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_IDS = torch.tensor([[5, 6, 7, 8]])


def own_logits(model) -> torch.Tensor:
    """Logits of `model`'s own weights, computed without its `forward`."""
    return model.lm_head(model.model(input_ids=INPUT_IDS).last_hidden_state)


def doubled_head_copy(model):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    return clone


def test_installed_trl_is_the_tested_one():
    """Fails on another TRL: rerun this file, then widen `TRL_FUSED_LM_HEAD` or drop the workaround."""
    assert check_tested_version(*TRL_FUSED_LM_HEAD)


def test_version_guard_warns_outside_the_tested_range():
    with pytest.warns(UserWarning, match=r"trl<1\.0.*may be unneeded or wrong"):
        assert not check_tested_version("trl", "<1.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tested_version("trl", ">=1.0")


@torch.no_grad()
def test_trl_fused_head_of_a_deep_copy_runs_the_original(model_factory):
    """Upstream: TRL's fused head captures the bound forward, so a deep copy runs (and trains) the original."""
    from trl.trainer import add_fused_lm_head as trl_add_fused_lm_head

    model = model_factory()
    trl_add_fused_lm_head(model)
    clone = doubled_head_copy(model)
    assert not torch.allclose(own_logits(clone), own_logits(model))
    torch.testing.assert_close(clone(input_ids=INPUT_IDS).logits, own_logits(model), rtol=0, atol=0)


@torch.no_grad()
def test_copy_safe_fused_head_of_a_deep_copy_runs_the_copy(model_factory):
    """The workaround: after `_compat.add_fused_lm_head` a deep copy runs its own weights, fused or not."""
    model = model_factory()
    add_fused_lm_head(model)
    clone = doubled_head_copy(model)
    assert has_fused_lm_head(clone)
    torch.testing.assert_close(clone(input_ids=INPUT_IDS).logits, own_logits(clone), rtol=0, atol=0)
    labels = torch.tensor([[-100, 6, 7, 8]])
    fused = clone(input_ids=INPUT_IDS, labels=labels, fused_lm_head=True).log_probs[0, :]
    expected = own_logits(clone)[0, :-1].log_softmax(-1).gather(-1, INPUT_IDS[0, 1:, None])[:, 0]
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_copy_of_a_trl_patched_model_is_repaired(model_factory):
    """A deep copy of a model TRL patched directly: `drop_fused_forward` restores the class forward, and
    `add_fused_lm_head` patches the copy itself."""
    from trl.trainer import add_fused_lm_head as trl_add_fused_lm_head

    model = model_factory()
    trl_add_fused_lm_head(model)
    clone = doubled_head_copy(model)
    assert not has_fused_lm_head(clone)  # its patch runs the original
    add_fused_lm_head(clone)
    assert has_fused_lm_head(clone)
    torch.testing.assert_close(clone(input_ids=INPUT_IDS).logits, own_logits(clone), rtol=0, atol=0)
    other = doubled_head_copy(model)
    drop_fused_forward(other)
    assert not has_fused_lm_head(other) and "forward" not in vars(other)
    torch.testing.assert_close(other(input_ids=INPUT_IDS).logits, own_logits(other), rtol=0, atol=0)
