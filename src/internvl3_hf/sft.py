"""SFT / native multimodal pre-training through `transformers.Trainer`."""

from __future__ import annotations

import functools
import inspect
import logging
import types

import torch
from transformers import Trainer, TrainingArguments

from .losses import WEIGHTINGS, shifted_targets, target_weights, weighted_lm_loss, weighted_nll

logger = logging.getLogger(__name__)

# Set on the function of a forward patched here, so that the next trainer on the same model does not patch again.
_FUSED_MARK = "_internvl3_fused_lm_head"
_COPY_SAFE = "_internvl3_copy_safe_fused_forward"  # on a re-bound forward: the TRL fused function it calls


class InternVL3Trainer(Trainer):
    """`Trainer` with InternVL's per-sample loss weights and, by default, a fused LM head.

    A subclass, not a `compute_loss_func`: the weights need the weight total of the whole optimizer step, which
    `Trainer` only computes as a token count (`_get_num_items_in_batch`), so both hooks are overridden together.

    `fused_lm_head=True` (default) patches the model once with TRL's `add_fused_lm_head` (the base model of a
    `PeftModel`): the training loss then projects only the supervised positions through the LM head, in vocabulary
    tiles, and never materialises `(batch, seq, vocab)` logits. The patched forward runs inside the (DDP/FSDP-
    wrapped) model's own forward, so data parallelism sees the LM head's gradient as usual. Evaluation that only needs
    the loss (`prediction_loss_only`) is fused too; prediction that returns logits keeps the logits path.
    """

    loss_is_scaled_for_ga = True  # normalised by the step's global weight total, not per micro-batch

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        *rest,
        loss_weighting: str = "square",
        fused_lm_head: bool = True,
        **kwargs,
    ):
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}.")
        self.loss_weighting = loss_weighting
        self.fused_lm_head = bool(fused_lm_head)
        if self.fused_lm_head and model is not None:
            self.fused_lm_head = add_fused_lm_head_once(model)
        if args is not None and args.ddp_find_unused_parameters is None:
            # A text-only micro-batch leaves the ViT and projector unused: DDP must not wait for their gradients
            # (read when the accelerator is created, inside Trainer.__init__).
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *rest, **kwargs)

    def call_model_init(self, trial=None):
        """A model from `model_init` gets the fused head too."""
        model = super().call_model_init(trial)
        if self.fused_lm_head:
            self.fused_lm_head = add_fused_lm_head_once(model)
        return model

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The optimizer step's total loss weight, over its micro-batches and (when averaging) all ranks."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(
            target_weights(batch["labels"], batch.get("position_ids"), self.loss_weighting).sum()
            for batch in batch_samples
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        position_ids = inputs.get("position_ids")
        # No KV cache: with one, transformers would not isolate the samples of a packed row (eval included).
        if self.fused_lm_head and not return_outputs:
            # The first token of every packed sample is no target of the previous sample (as in `shifted_targets`).
            fused_labels = torch.cat([labels[:, :1], shifted_targets(labels, position_ids)], dim=1)
            outputs = model(**inputs, labels=fused_labels, use_cache=False, fused_lm_head=True)
            loss = weighted_nll(-outputs.log_probs, labels, position_ids, self.loss_weighting, num_items_in_batch)
        else:
            outputs = model(**inputs, use_cache=False)
            loss = weighted_lm_loss(outputs.logits, labels, position_ids, self.loss_weighting, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over ranks; the normaliser is already global, so undo that mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """Loss-only evaluation through the fused head (`Trainer` would ask `compute_loss` for logits)."""
        if not (self.fused_lm_head and prediction_loss_only and inputs.get("labels") is not None):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        return loss.detach().mean(), None, None


# --------------------------------------------------------------------------------------------------- fused LM head
def add_fused_lm_head_once(model) -> bool:
    """Patch `model` (the base model of a `PeftModel`) with TRL's fused LM head unless it already has one.

    Returns whether the fused path can be used: False (with a warning) without TRL, or when the LM head itself is a
    LoRA layer (TRL reads `lm_head.weight` directly and would silently drop the adapter).
    """
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        logger.warning("fused_lm_head needs trl (pip install 'internvl3-hf[train]'): training on full logits.")
        return False
    target = model.get_base_model() if _is_peft(model) else model
    if _is_peft_tuner_layer(target.get_output_embeddings()):
        logger.warning("The LM head carries a PEFT adapter: fused_lm_head is off, training on full logits.")
        return False
    if not has_fused_lm_head(target):
        closure = _fused_forward_closure(target)
        if closure is not None and getattr(closure.get("original_forward"), "__self__", None) is not target:
            # A deep copy of a patched model: its forward's closure still runs the ORIGINAL model when not fused.
            del target.__dict__["forward"]
        add_fused_lm_head(target)
        setattr(target.forward.__func__, _FUSED_MARK, True)
        make_fused_forward_copy_safe(target)
    return True


def make_fused_forward_copy_safe(model) -> None:
    """Re-bind TRL's fused-LM-head `forward` patch on `model` so that a deep copy runs, and trains, its own weights.

    TRL's instance `forward` keeps the model's ORIGINAL bound `forward` in its closure for the non-fused path, and
    the patch outlives training: `copy.deepcopy(trained_model)` (a critic, the reference of a next round) silently
    ran the original's weights whenever called without `fused_lm_head`. The re-bound forward calls the class
    `forward` on whatever `self` is. Left alone when the captured forward is neither the plain class method nor an
    already re-bound one (e.g. accelerate device-map hooks), which this could not reproduce.
    """
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
    """Whether `model.forward` is a fused-LM-head forward of `model` itself usable here (patched by this module, or
    by a TRL trainer with temperature 1). Read from the instance `forward`: a copy whose patch was dropped reads
    False, and so does a deep copy whose patched forward still calls the original model."""
    closure = _fused_forward_closure(model)
    if closure is None or getattr(closure.get("original_forward"), "__self__", None) is not model:
        return False
    return bool(closure.get(_FUSED_MARK)) or closure.get("temperature") == 1.0


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


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_peft_tuner_layer(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)
