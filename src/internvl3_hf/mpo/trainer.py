"""`MPOTrainer`: InternVL3's Mixed Preference Optimization on TRL 1.16's `DPOTrainer`, with the reward shift δ.

`L = w_p·L_p + w_q·L_q + w_g·L_g` (MPO paper eqs. 9–13):

    r_c = β(log π(y_c|x) − log π_ref(y_c|x)),   r_r = β(log π(y_r|x) − log π_ref(y_r|x))   (sums over answer tokens)
    L_p = −log σ(r_c − r_r)                                                                  (sigmoid DPO)
    L_q = −log σ(r_c − δ) − log σ(−(r_r − δ))                                                (BCO with reward shift)
    L_g = −mean over the micro-batch's chosen answer tokens of log π(token)                  (generation)

each pair term averaged over the micro-batch. With δ = 0 this is TRL's `loss_type=["sigmoid", "bco_pair", "sft"]`.

What this subclass changes, through public hooks only (`compute_loss`, `compute_ref_log_probs` reuse, `train`, the
collator, a callback):

- δ. The original TRL `RunningMoments` updated δ on every micro-batch (train and eval) and never checkpointed it.
  Here δ moves once per optimizer step, from the rewards of the whole step (every gradient-accumulation
  micro-batch, summed across data-parallel ranks with one all-reduce), only in training; every micro-batch of a
  step uses the δ of the previous steps. It is saved as `mpo_reward_shift.json` in each checkpoint and restored
  by `train(resume_from_checkpoint=...)`.
- The vision tower runs once per preference pair: the collator keeps one copy of each pair's tiles and the forward
  receives `mm_encoder_outputs` whose features are computed on first use, inside the model's forward (so under
  DDP/ZeRO hooks, autocast, and, for the reference, `no_grad` and the disabled adapters), then repeated for the
  chosen and rejected rows. TRL's vision collator duplicates the images and runs the ViT on both copies.
- The reference model: an explicit frozen copy of the policy for full fine-tuning (TRL would reload it from
  `config._name_or_path`, which an in-memory model does not have), except under ZeRO-3, where TRL loads it from
  the checkpoint path; for PEFT, none: TRL computes the reference with the adapters disabled.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..sft import make_fused_forward_copy_safe
from .config import MPOConfig
from .data import MPODataCollator, PreferencePair, preference_dataset

logger = logging.getLogger(__name__)

REWARD_SHIFT_FILE = "mpo_reward_shift.json"
# Batch keys that are not forwarded to the model as they are.
_BATCH_ONLY_KEYS = {"completion_mask", "pixel_values", "image_num_patches", "ref_chosen_logps", "ref_rejected_logps"}


# --------------------------------------------------------------------------------------------------- reward shift
class RewardShift:
    """The MPO reward shift δ: observed per micro-batch, updated once per optimizer step.

    `observe(rewards)` accumulates the rewards (chosen and rejected) of a training micro-batch; `step(reduce)`
    all-reduces `[sum, count]` over the data-parallel ranks and moves δ:

    - `"cumulative"`: δ = mean of every reward observed in the finished steps (the original `RunningMoments`
      mean; with equal micro-batch sizes identical to its mean of micro-batch means), independent of how a step
      is split into micro-batches and ranks;
    - `"ema"`: δ = step mean on the first step, then `m·δ + (1 − m)·step mean`;
    - `"none"`: δ stays 0.
    """

    def __init__(self, rule: str = "cumulative", momentum: float = 0.99):
        self.rule = rule
        self.momentum = momentum
        self.value = 0.0
        self.count = 0  # rewards observed in finished steps
        self.steps = 0  # optimizer steps that moved δ
        self._pending_sum: torch.Tensor | None = None
        self._pending_count = 0

    def observe(self, rewards: torch.Tensor) -> None:
        if self.rule == "none":
            return
        total = rewards.detach().double().sum()
        self._pending_sum = total if self._pending_sum is None else self._pending_sum + total
        self._pending_count += rewards.numel()

    def step(self, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        """End of an optimizer step: must be called on every rank (it all-reduces)."""
        if self.rule == "none":
            return
        pending = torch.zeros(2, dtype=torch.float64, device=device)
        if self._pending_sum is not None:
            pending[0] = self._pending_sum.to(device)
        pending[1] = self._pending_count
        total, count = reduce(pending).tolist()
        self._pending_sum, self._pending_count = None, 0
        if count == 0:
            return
        mean = total / count
        if self.rule == "cumulative":
            self.value += (mean - self.value) * count / (self.count + count)
        elif self.steps == 0:
            self.value = mean
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * mean
        self.count += int(count)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"rule": self.rule, "momentum": self.momentum, "value": self.value, "count": self.count, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule") != self.rule:
            logger.warning("resuming the reward shift of rule %r under rule %r", state.get("rule"), self.rule)
        self.value, self.count, self.steps = float(state["value"]), int(state["count"]), int(state["steps"])
        self._pending_sum, self._pending_count = None, 0

    def save(self, directory: str | os.PathLike) -> None:
        (Path(directory) / REWARD_SHIFT_FILE).write_text(json.dumps(self.state_dict(), indent=2))

    def load(self, directory: str | os.PathLike) -> bool:
        path = Path(directory) / REWARD_SHIFT_FILE
        if not path.is_file():
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True


class RewardShiftCallback(TrainerCallback):
    """Moves δ at the end of each optimizer step and writes it into each checkpoint."""

    def __init__(self, trainer: MPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.reward_shift.step(lambda tensor: trainer.accelerator.reduce(tensor, "sum"), trainer.accelerator.device)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if directory.is_dir():
                self.trainer.reward_shift.save(directory)


# --------------------------------------------------------------------------------------------------- ViT once
class SharedImageFeatures:
    """Stands in for the `BaseModelOutputWithPooling` of `mm_encoder_outputs["image"]`.

    The first read of `pooler_output`, which happens inside the model's forward, runs `encode` (the vision tower
    and projector) once on the pairs' tiles and returns the features twice, for the chosen rows then the rejected
    rows. A plain object, so that DDP's input handling passes it through untouched.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor):
        self._encode = encode
        self._pixel_values = pixel_values
        self._features: torch.Tensor | None = None

    @property
    def pooler_output(self) -> torch.Tensor:
        if self._features is None:
            features = self._encode(self._pixel_values).pooler_output
            self._features = torch.cat([features, features])
        return self._features


# --------------------------------------------------------------------------------------------------- trainer
class MPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with the MPO loss (reward shift δ included) for InternVL3.

    Takes the `DPOTrainer` arguments, with an [`MPOConfig`]. `train_dataset`/`eval_dataset` may be a
    `datasets.Dataset` in TRL's preference layout or the MMPR layout (see `mpo.data`), or a list of
    `PreferencePair`s. Without `data_collator`, an `MPODataCollator(processing_class, max_length)` is used.
    Logged on top of TRL's metrics: `mpo/preference_loss` (L_p), `mpo/quality_loss` (L_q), `mpo/generation_loss`
    (L_g) and `mpo/reward_shift` (δ).
    """

    _tag_names = ["trl", "dpo", "mpo", "internvl3"]
    _name = "MPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: MPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MPOConfig(f"{str(name).split('/')[-1]}-MPO")
        if not isinstance(args, MPOConfig):
            kind = "a DPOConfig" if isinstance(args, DPOConfig) else type(args).__name__
            raise TypeError(f"MPOTrainer needs an MPOConfig (w_p, w_q, w_g, reward shift), got {kind}.")
        if ref_model is None and peft_config is None and not isinstance(model, str) and not _is_peft(model):
            zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
            if not zero3:  # ZeRO-3 shards at load time: TRL reloads the reference from the checkpoint instead
                ref_model = copy.deepcopy(model).eval().requires_grad_(False)
                # A model that already went through a TRL trainer carries a patched instance `forward` whose
                # closure still calls the ORIGINAL model: drop it so that the copy runs its own weights.
                ref_model.__dict__.pop("forward", None)
        if data_collator is None:
            if processing_class is None:
                name = model if isinstance(model, str) else get_config_model_id(model.config)
                processing_class = AutoProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
            seed = args.data_seed if args.data_seed is not None else args.seed
            data_collator = MPODataCollator(processing_class, max_length=args.max_length, seed=seed)
        train_dataset = _as_preference_dataset(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: _as_preference_dataset(dataset) for name, dataset in eval_dataset.items()}
        else:
            eval_dataset = _as_preference_dataset(eval_dataset)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        for patched in (self.model.get_base_model() if _is_peft(self.model) else self.model, self.ref_model):
            if patched is not None:
                make_fused_forward_copy_safe(patched)
        self.term_weights = args.term_weights
        self.reward_shift = RewardShift(args.reward_shift_update, args.reward_shift_momentum)
        self.add_callback(RewardShiftCallback(self))

    # ----------------------------------------------------------------------------------------------- resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, restoring δ from `mpo_reward_shift.json` when resuming."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            if self.reward_shift.load(checkpoint):
                logger.info("restored the MPO reward shift δ=%.6g from %s", self.reward_shift.value, checkpoint)
            elif self.args.reward_shift_update != "none":
                logger.warning("%s holds no %s: the reward shift δ starts again from 0.", checkpoint, REWARD_SHIFT_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- forward
    def _image_encoder(self, model) -> Callable[[torch.Tensor], torch.Tensor]:
        """`get_image_features` of the InternVL3 model under any DDP/DeepSpeed/PEFT wrapper."""
        unwrapped = self.accelerator.unwrap_model(model)
        if _is_peft(unwrapped):
            unwrapped = unwrapped.get_base_model()
        return unwrapped.get_image_features

    def _v2pe_strides(self, inputs: dict) -> torch.Tensor | None:
        """Under `v2pe_mode="random"`, one stride per image drawn once per pair: the chosen row, the rejected row
        and the reference then all see the same positions (the model would otherwise draw per call)."""
        config = self.accelerator.unwrap_model(self.model).config
        if getattr(config, "v2pe_mode", "none") != "random" or not self.model.training:
            return None
        patches = inputs.get("image_num_patches")
        if patches is None or "v2pe_strides" in inputs:
            return None
        choices = torch.tensor(config.v2pe_strides, device=patches.device, dtype=torch.long)
        return choices[torch.randint(len(choices), (len(patches),), device=patches.device)]

    def model_inputs(self, model, inputs: dict, v2pe_strides: torch.Tensor | None = None) -> dict:
        """Forward kwargs for the `2B` chosen+rejected rows from a batch holding each pair's tiles once."""
        kwargs = {key: value for key, value in inputs.items() if key not in _BATCH_ONLY_KEYS}
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if self.args.share_vision_forward:
                features = SharedImageFeatures(self._image_encoder(model), pixel_values)
                kwargs["mm_encoder_outputs"] = {"image": features}
            else:
                kwargs["pixel_values"] = torch.cat([pixel_values, pixel_values])
            if inputs.get("image_num_patches") is not None:
                kwargs["image_num_patches"] = torch.cat([inputs["image_num_patches"]] * 2)
        if v2pe_strides is not None:
            kwargs["v2pe_strides"] = torch.cat([v2pe_strides, v2pe_strides])
        return kwargs

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        seq_len = shift_completion_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        strides = self._v2pe_strides(inputs)

        forward_kwargs = self.model_inputs(model, inputs, strides)
        outputs = model(**forward_kwargs, labels=labels, use_cache=False, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)

        reference = self.ref_model if self.ref_model is not None else self.model
        ref_inputs = {**self.model_inputs(reference, inputs, strides), "completion_mask": completion_mask}
        ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(reference, ref_inputs)

        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        chosen_rewards = self.beta * chosen_logratios
        rejected_rewards = self.beta * rejected_logratios
        delta = self.reward_shift.value

        terms = {}
        loss = 0.0
        for loss_type, weight in self.term_weights.items():
            if loss_type == "sigmoid":
                term = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))
            elif loss_type == "bco_pair":
                term = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
            else:  # "sft"
                chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
                chosen_per_token_logps, _ = per_token_logps.chunk(2, dim=0)
                term = -chosen_per_token_logps[chosen_mask.bool()].mean()
            terms[loss_type] = term.mean()
            loss += terms[loss_type] * weight

        if mode == "train":
            self.reward_shift.observe(torch.cat([chosen_rewards, rejected_rewards]))
        logps, rewards = (chosen_logps, rejected_logps), (chosen_rewards, rejected_rewards)
        self._log_metrics(mode, inputs, outputs, terms, delta, logps, rewards)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**self.model_inputs(model, inputs, strides), use_cache=False)
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, outputs, terms, delta, logps, rewards):
        """TRL's metrics (same names and reductions) plus the three MPO terms and δ."""
        (chosen_logps, rejected_logps), (chosen_rewards, rejected_rewards) = logps, rewards
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        seq_len = shift_completion_mask.size(1)
        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)

        names = {"sigmoid": "mpo/preference_loss", "bco_pair": "mpo/quality_loss", "sft": "mpo/generation_loss"}
        for loss_type, value in terms.items():
            metrics[names[loss_type]].append(gather(value.detach()).mean().item())
        metrics["mpo/reward_shift"].append(float(delta))

        if outputs.entropy is not None:
            entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_completion_mask).sum()).sum()
            total = gather(shift_completion_mask.sum()).sum()
            metrics["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if outputs.mean_logits is not None:
            chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
            for name, logits, mask in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
                total_logits = gather(logits[mask.bool()].sum()).sum().item()
                total_tokens = gather(mask.sum()).sum().item()
                metrics[f"logits/{name}"].append(total_logits / total_tokens if total_tokens > 0 else 0.0)
        if outputs.is_top1 is not None:
            chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            correct = gather((chosen_top1 & chosen_mask.bool()).sum()).sum()
            total = gather(chosen_mask.sum()).sum()
            metrics["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)

        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _as_preference_dataset(dataset):
    """A list of `PreferencePair`s becomes a `datasets.Dataset`; a dataset without images gets an empty `images`
    column, which is how TRL tells a vision dataset (collated on the fly) from one it tokenizes up front."""
    if dataset is None:
        return None
    if isinstance(dataset, list) and all(isinstance(pair, PreferencePair) for pair in dataset):
        return preference_dataset(dataset)
    names = getattr(dataset, "column_names", None) or []
    if names and "images" not in names and "image" not in names:
        from datasets import Dataset, List, Value

        if isinstance(dataset, Dataset):
            return dataset.add_column("images", [[] for _ in range(len(dataset))], feature=List(Value("string")))
        return dataset.map(lambda row: {"images": []})
    return dataset
