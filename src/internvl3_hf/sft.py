"""SFT / native multimodal pre-training through `transformers.Trainer`."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from .losses import WEIGHTINGS, target_weights, weighted_lm_loss


class InternVL3Trainer(Trainer):
    """`Trainer` with InternVL's per-sample loss weights.

    A subclass, not a `compute_loss_func`: the weights need the weight total of the whole optimizer step, which
    `Trainer` only computes as a token count (`_get_num_items_in_batch`), so both hooks are overridden together.
    """

    loss_is_scaled_for_ga = True  # normalised by the step's global weight total, not per micro-batch

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest, loss_weighting: str = "square", **kwargs):
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}.")
        self.loss_weighting = loss_weighting
        if args is not None and args.ddp_find_unused_parameters is None:
            # A text-only micro-batch leaves the ViT and projector unused: DDP must not wait for their gradients
            # (read when the accelerator is created, inside Trainer.__init__).
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *rest, **kwargs)

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
        # No KV cache: with one, transformers would not isolate the samples of a packed row (eval included).
        outputs = model(**inputs, use_cache=False)
        loss = weighted_lm_loss(outputs.logits, labels, inputs.get("position_ids"), self.loss_weighting, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over ranks; the normaliser is already global, so undo that mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
