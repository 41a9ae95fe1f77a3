"""SFT / native multimodal pre-training through `transformers.Trainer`."""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import Trainer, TrainingArguments

from ._compat import add_fused_lm_head
from .losses import WEIGHTINGS, shifted_targets, target_weights, weighted_lm_loss, weighted_nll

logger = logging.getLogger(__name__)


class InternVL3Trainer(Trainer):
    """`Trainer` with InternVL's per-sample loss weights and, by default, a fused LM head.

    The loss is Σ w·CE over the supervised targets divided by the weight total of the whole optimizer step (every
    gradient-accumulation micro-batch, and every data-parallel rank with `average_tokens_across_devices`), so the
    step does not depend on how it is split. `get_batch_samples` computes that total in place of `Trainer`'s token
    count and hands it to `compute_loss` as `num_items_in_batch`; the model itself computes no loss
    (`model_accepts_loss_kwargs` is False).

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
        self.loss_only_prediction = False  # set by `prediction_step` for `compute_loss`
        if self.fused_lm_head and model is not None:
            self.fused_lm_head = add_fused_lm_head_once(model)
        if args is not None and args.ddp_find_unused_parameters is None:
            # A text-only micro-batch leaves the ViT and projector unused: DDP must not wait for their gradients
            # (read when the accelerator is created, inside Trainer.__init__).
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *rest, **kwargs)
        # `compute_loss` computes the loss, not the model: Trainer then counts no tokens and passes none to it.
        self.model_accepts_loss_kwargs = False

    def call_model_init(self, trial=None):
        """A model from `model_init` gets the fused head too."""
        model = super().call_model_init(trial)
        if self.fused_lm_head:
            self.fused_lm_head = add_fused_lm_head_once(model)
        return model

    def loss_normalizer(self, batches: list[dict], device: torch.device) -> torch.Tensor | None:
        """The total loss weight of `batches` (an optimizer step's micro-batches), summed over all ranks with
        `average_tokens_across_devices`; None without labels."""
        if not batches or "labels" not in batches[0]:
            return None
        total = sum(
            target_weights(batch["labels"], batch.get("position_ids"), self.loss_weighting).sum() for batch in batches
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def get_batch_samples(
        self, epoch_iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """The step's micro-batches and their `loss_normalizer` (in place of `Trainer`'s token count)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, self.loss_normalizer(batches, device)

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """Σ w·CE / `num_items_in_batch`; without one (evaluation), this batch's `loss_normalizer`."""
        if num_items_in_batch is None and not model.training:
            num_items_in_batch = self.loss_normalizer([inputs], self.args.device)
        labels = inputs.pop("labels")
        position_ids = inputs.get("position_ids")
        # No KV cache: with one, transformers would not isolate the samples of a packed row (eval included).
        if self.fused_lm_head and (not return_outputs or self.loss_only_prediction):
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
        """Loss-only evaluation through the fused head (`Trainer` asks `compute_loss` for its outputs)."""
        self.loss_only_prediction = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self.loss_only_prediction = False


# --------------------------------------------------------------------------------------------------- fused LM head
def add_fused_lm_head_once(model) -> bool:
    """Patch `model` (the base model of a `PeftModel`) with TRL's fused LM head unless it already has one.

    Returns whether the fused path can be used: False (with a warning) without TRL, or when the LM head itself is a
    LoRA layer (TRL reads `lm_head.weight` directly and would silently drop the adapter).
    """
    if importlib.util.find_spec("trl") is None:
        logger.warning("fused_lm_head needs trl (pip install 'internvl3-hf[train]'): training on full logits.")
        return False
    target = model.get_base_model() if is_peft_model(model) else model
    if _is_peft_tuner_layer(target.get_output_embeddings()):
        logger.warning("The LM head carries a PEFT adapter: fused_lm_head is off, training on full logits.")
        return False
    add_fused_lm_head(target)
    return True


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT-wrapped model (False where peft is not installed)."""
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
