"""Workarounds for what TRL and transformers offer through no public hook, kept in this one module.

Each workaround names the upstream behaviour it exists for in one line, checks the installed version of the library
it works around against the range it was tested with (`check_tested_version`: a warning outside it, where the
workaround may be unneeded or wrong), and has a test in tests/test_compat.py that shows the upstream behaviour and
fails once the library changes it (then the workaround can go).

Private attributes of TRL and transformers touched in `src/` and `modeling/`, with their guards:

- TRL's fused LM head (`trl.trainer.add_fused_lm_head`, public) sets an instance `forward` on the model whose
  function `_fused_forward` keeps the model's bound `forward` (`original_forward`) and `temperature` in its
  closure. `add_fused_lm_head`, `has_fused_lm_head`, `make_fused_forward_copy_safe` and `drop_fused_forward`
  below read that closure, and set, replace or delete the instance `forward` (`model.__dict__["forward"]`).
  Guard: `TRL_FUSED_LM_HEAD`; test: `test_trl_fused_head_of_a_deep_copy_runs_the_original`.
- Model-class declarations every transformers model makes (`_no_split_modules`, `_supports_flash_attn`,
  `_supports_sdpa`, `_supports_flex_attn`, `_supports_attention_backend`, `_can_compile_fullgraph`,
  `_skip_keys_device_placement`, `_tied_weights_keys`, `_tp_plan` in modeling/modeling_internvl3.py), and
  `config._attn_implementation` (modeling/modeling_internvl3.py, src/internvl3_hf/mpo/trainer.py): the library's
  documented way to write and configure a model. Guard: the exact pin `transformers==5.23.0` (pyproject.toml) and
  tests/modeling.
- transformers hooks with a leading underscore, overridden as transformers' own models override them:
  `GenerationMixin._prepare_position_ids_for_generation` and `_update_model_kwargs_for_generation`
  (modeling/modeling_internvl3.py, as Qwen2-VL does for its rope positions); `_validate_preprocess_kwargs` and
  `_preprocess`, calling `_standardize_kwargs` and reading `_valid_kwargs_names` (image processor base,
  modeling/image_processing_internvl3.py); `ProcessorMixin._get_num_multimodal_tokens` and
  `_get_arguments_from_pretrained`, calling `_merge_kwargs` and `_load_tokenizer_from_pretrained`
  (modeling/processing_internvl3.py). Guard: the exact pin `transformers==5.23.0` and the processing, image
  processing, generation and V2PE tests.
- `DPOTrainer._metrics` (TRL's metric store, averaged by `log`), `_tag_names` and `_name` (model-card tags and
  name), in src/internvl3_hf/mpo/trainer.py. Guard: the exact pin `trl==1.16.0` (pyproject.toml `train` extra) and
  tests/mpo.
- TRL's `DPOTrainer.__init__` refuses `precompute_ref_log_probs` for vision datasets and, when it is off, builds a
  reference model for full fine-tuning. `trl_without_reference` below hides the flag from it and hands it a
  tensor-sharing module tree, dropped after `__init__` (src/internvl3_hf/mpo/trainer.py, which runs its own
  reference pass). Guard: `TRL_VISION_PRECOMPUTE`; test: tests/mpo/test_compat_mpo.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import inspect
import types
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# (distribution, versions tested) of each workaround below.
TRL_FUSED_LM_HEAD = ("trl", ">=1.16.0,<1.17")
TRL_VISION_PRECOMPUTE = ("trl", ">=1.16.0,<1.17")

# Set on the function of a fused forward added here, so that the next trainer on the same model does not patch again.
_FUSED_MARK = "_internvl3_fused_lm_head"
_COPY_SAFE = "_internvl3_copy_safe_fused_forward"  # on a re-bound forward: the TRL fused function it calls


@functools.lru_cache(maxsize=None)
def check_tested_version(distribution: str, tested: str) -> bool:
    """Whether the installed `distribution` lies in `tested` (a PEP 440 range); warns once when it does not."""
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    if Version(installed) in SpecifierSet(tested):
        return True
    warnings.warn(
        f"internvl3_hf works around {distribution} behaviour tested with {distribution}{tested}, but {installed} is "
        f"installed: the workaround in internvl3_hf._compat may be unneeded or wrong. Install {distribution}{tested}, "
        "or run tests/test_compat.py to see whether the upstream behaviour changed.",
        stacklevel=2,
    )
    return False


# --------------------------------------------------------------------------------------------------- fused LM head
# Upstream: TRL's fused head captures the bound forward, so a deep copy runs, and trains, the original.
def add_fused_lm_head(model) -> None:
    """TRL's fused LM head on `model`, unless it already has a usable one; re-bound so that a deep copy of `model`
    runs its own weights off the fused path (`make_fused_forward_copy_safe`)."""
    from trl.trainer import add_fused_lm_head as trl_add_fused_lm_head

    check_tested_version(*TRL_FUSED_LM_HEAD)
    if has_fused_lm_head(model):
        return
    closure = _fused_forward_closure(model)
    if closure is not None and getattr(closure.get("original_forward"), "__self__", None) is not model:
        drop_fused_forward(model)  # a deep copy of a patched model: patching on top would still call the original
    trl_add_fused_lm_head(model)
    setattr(model.forward.__func__, _FUSED_MARK, True)
    make_fused_forward_copy_safe(model)


def make_fused_forward_copy_safe(model) -> None:
    """Re-bind TRL's fused-LM-head `forward` patch on `model` so that a deep copy runs, and trains, its own weights.

    TRL's instance `forward` keeps the model's ORIGINAL bound `forward` in its closure for the non-fused path, and
    the patch outlives training: `copy.deepcopy(trained_model)` (a critic, the reference of a next round) silently
    ran the original's weights whenever called without `fused_lm_head`. The re-bound forward calls the class
    `forward` on whatever `self` is. Left alone when the captured forward is neither the plain class method nor an
    already re-bound one (e.g. accelerate device-map hooks), which this could not reproduce.
    """
    check_tested_version(*TRL_FUSED_LM_HEAD)
    fused = getattr(model.__dict__.get("forward"), "__func__", None)
    if fused is None or hasattr(fused, _COPY_SAFE):
        return
    closure = _fused_forward_closure(model)
    if closure is None:
        return
    original = closure.get("original_forward")
    plain = type(model).forward
    if getattr(original, "__self__", None) is not model:
        return
    if original.__func__ is not plain and not hasattr(original.__func__, _COPY_SAFE):
        return

    @functools.wraps(fused)
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if fused_lm_head:
            return fused(self, *args, fused_lm_head=True, **kwargs)
        return plain(self, *args, **kwargs)

    setattr(forward, _COPY_SAFE, fused)
    model.forward = types.MethodType(forward, model)


def has_fused_lm_head(model) -> bool:
    """Whether `model.forward` is a fused-LM-head forward of `model` itself usable for a loss (added here, or by a
    TRL trainer with temperature 1). Read from the instance `forward`: a copy whose patch was dropped reads False,
    and so does a deep copy whose patched forward still calls the original model."""
    closure = _fused_forward_closure(model)
    if closure is None or getattr(closure.get("original_forward"), "__self__", None) is not model:
        return False
    return bool(closure.get(_FUSED_MARK)) or closure.get("temperature") == 1.0


def drop_fused_forward(model) -> None:
    """Remove the instance `forward` a fused LM head set on `model` (e.g. on a deep copy): the class's runs again."""
    if _fused_forward_closure(model) is not None:
        del model.__dict__["forward"]


def _fused_forward_closure(model) -> dict | None:
    """The closure variables of TRL's patched instance `forward` (plus our mark), or None when not patched."""
    bound = model.__dict__.get("forward")
    function = getattr(bound, "__func__", None)
    if function is not None and hasattr(function, _COPY_SAFE):  # re-bound: the non-fused path runs `self`
        fused = getattr(function, _COPY_SAFE)
        closure = {**inspect.getclosurevars(fused).nonlocals, "original_forward": bound}
        return {**closure, _FUSED_MARK: getattr(fused, _FUSED_MARK, False)}
    if function is None or function.__code__.co_name != "_fused_forward":
        return None
    return {**inspect.getclosurevars(function).nonlocals, _FUSED_MARK: getattr(function, _FUSED_MARK, False)}


# --------------------------------------------------------------------------------------------------- MPO reference
# Upstream: TRL's DPOTrainer refuses precompute_ref_log_probs for vision datasets, and builds a reference otherwise.
@contextlib.contextmanager
def trl_without_reference(args, model=None):
    """Around `DPOTrainer.__init__` of a trainer that precomputes the reference log-probs itself: TRL sees
    `precompute_ref_log_probs=False` (restored on exit). With `model`, yields a stand-in reference for TRL: the
    module tree of `model` whose parameters and buffers ARE the model's (no memory), to drop after `__init__`."""
    check_tested_version(*TRL_VISION_PRECOMPUTE)
    precompute = args.precompute_ref_log_probs
    args.precompute_ref_log_probs = False
    try:
        if model is None:
            yield None
        else:
            yield copy.deepcopy(model, {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())})
    finally:
        args.precompute_ref_log_probs = precompute
