"""`MPOTrainer`: InternVL3's Mixed Preference Optimization on TRL 1.16's `DPOTrainer`, with the reward shift δ.

`L = w_p·L_p + w_q·L_q + w_g·L_g` (MPO paper eqs. 9–13):

    r_c = β(log π(y_c|x) − log π_ref(y_c|x)),   r_r = β(log π(y_r|x) − log π_ref(y_r|x))   (sums over answer tokens)
    L_p = −log σ(r_c − r_r)                                                                  (sigmoid DPO)
    L_q = −log σ(r_c − δ) − log σ(−(r_r − δ))                                                (BCO with reward shift)
    L_g = −mean over the micro-batch's chosen answer tokens of log π(token)                  (generation)

each pair term averaged over the micro-batch. With δ = 0 this is TRL's `loss_type=["sigmoid", "bco_pair", "sft"]`.

What this subclass changes, through public hooks (`compute_loss`, `compute_ref_log_probs`, `train`, `evaluate`,
the collator, a callback):

- δ. The original TRL `RunningMoments` updated δ on every micro-batch (train and eval) and never checkpointed it.
  Here δ moves once per optimizer step, from the rewards of the whole step (every gradient-accumulation
  micro-batch, summed across data-parallel ranks with one all-reduce), only in training; every micro-batch of a
  step uses the δ of the previous steps. It is saved as `mpo_reward_shift.json` in each checkpoint and restored
  by `train(resume_from_checkpoint=...)`.
- The prompt runs once per pair (`MPOConfig.share_prompt`, the default): one row `[prompt | chosen | p | rejected]`
  per pair with a mask that hides the chosen answer from the rejected one, for the policy and the reference. With
  separate rows (the fallback, or `share_prompt=False`) the vision tower still runs once per pair: the forward
  receives `mm_encoder_outputs` whose features are computed on first use, inside the model's forward (so under
  DDP/ZeRO hooks, autocast, and, for the reference, `no_grad` and the disabled adapters), then repeated for the
  chosen and rejected rows. TRL's vision collator duplicates the images and runs the ViT on both copies.
- The reference model: an explicit frozen copy of the policy for full fine-tuning (TRL would reload it from
  `config._name_or_path`, which an in-memory model does not have), except under ZeRO-3, where TRL loads it from
  the checkpoint path; for PEFT, none: the reference is the policy with its adapters disabled. With
  `precompute_ref_log_probs=True`, one reference pass over the datasets runs when training starts (TRL refuses
  this option for vision datasets), no reference copy is kept for full fine-tuning, and the values are saved as
  `mpo_reference_logps.pt` in each checkpoint and reused on resume.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoProcessor, TrainerCallback
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from .._compat import make_fused_forward_copy_safe, trl_without_reference
from ..data.encoding import IGNORE_INDEX
from ..sft import is_peft_model
from .config import MPOConfig
from .data import CHOSEN_SEGMENT, REJECTED_SEGMENT, MPODataCollator, PreferencePair, preference_dataset

logger = logging.getLogger(__name__)

REWARD_SHIFT_FILE = "mpo_reward_shift.json"
REFERENCE_LOGPS_FILE = "mpo_reference_logps.pt"
# Attention backends that take the shared-prompt 4D mask (flash attention's varlen kernels do not).
SHARE_PROMPT_BACKENDS = ("eager", "sdpa", "flex_attention")
# Batch keys that are not forwarded to the model as they are.
_BATCH_ONLY_KEYS = {
    "completion_mask", "segment_ids", "pixel_values", "image_num_patches", "v2pe_strides", "ref_chosen_logps",
    "ref_rejected_logps",
}  # fmt: skip
TERM_METRICS = {"sigmoid": "mpo/preference_loss", "bco_pair": "mpo/quality_loss", "sft": "mpo/generation_loss"}


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


# --------------------------------------------------------------------------------------------------- shared prompt
def hide_chosen_from_rejected(segment_ids: torch.Tensor) -> Callable:
    """transformers mask function (index-based, so it also takes broadcast index tensors): a rejected-answer query
    never sees a chosen-answer key; together with the causal mask each answer sees the prompt and itself only."""

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        rejected_query = segment_ids[batch_idx, q_idx] == REJECTED_SEGMENT
        return ~(rejected_query & (segment_ids[batch_idx, kv_idx] == CHOSEN_SEGMENT))

    return mask_function


def shared_prompt_mask(text_config, inputs_embeds_like: torch.Tensor, attention_mask: torch.Tensor, segment_ids):
    """The attention mask of `[prompt | chosen | p | rejected]` rows in the format of `text_config`'s attention
    backend (a float mask for eager, a boolean one for sdpa, a `BlockMask` for flex_attention), built by
    transformers' own mask interface; the model passes a 4D mask through as it is.

    What `create_causal_mask(and_mask_function=...)` builds, without its `vmap` over every (query, key) pair, which it
    applies to any custom mask function (a few ms per build on a CPU): this one is index-based, so the interface's
    broadcast path applies.
    """
    batch_size, length = attention_mask.shape
    mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[text_config._attn_implementation]
    return mask_interface(
        batch_size=batch_size,
        q_length=length,
        kv_length=length,
        mask_function=and_masks(causal_mask_function, hide_chosen_from_rejected(segment_ids)),
        attention_mask=attention_mask.to(device=inputs_embeds_like.device, dtype=torch.bool),
        allow_is_causal_skip=False,
        dtype=inputs_embeds_like.dtype,
        config=text_config,
        use_vmap=False,
        device=inputs_embeds_like.device,
    )


@contextlib.contextmanager
def keep_answer_tail(backbone: torch.nn.Module, start: int):
    """While open, `backbone`'s `last_hidden_state` keeps positions `start:` only: the hidden states TRL's fused LM
    head then projects, with the labels from `start` on (a forward hook: the head calls the backbone inside the
    model's forward, under any DDP/DeepSpeed/PEFT wrapper)."""
    if start == 0:
        yield
        return

    def keep_tail(module, args, output):
        output.last_hidden_state = output.last_hidden_state[:, start:]

    handle = backbone.register_forward_hook(keep_tail)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------- trainer
class MPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with the MPO loss (reward shift δ included) for InternVL3.

    Takes the `DPOTrainer` arguments, with an [`MPOConfig`]. `train_dataset`/`eval_dataset` may be a
    `datasets.Dataset` in TRL's preference layout or the MMPR layout (see `mpo.data`), or a list of
    `PreferencePair`s. Without `data_collator`, an `MPODataCollator(processing_class, max_length)` is used.
    Logged on top of TRL's metrics: `mpo/preference_loss` (L_p), `mpo/quality_loss` (L_q), `mpo/generation_loss`
    (L_g) and `mpo/reward_shift` (δ).

    With `share_prompt` (the default) each pair is one row `[prompt | chosen | p | rejected]` (see
    `MPODataCollator`): the prompt, with its image tokens, runs through the language model once per pair, for the
    policy and for the reference. The rejected part sees the prompt but not the chosen part (a 4D mask built by
    transformers' mask interface for the model's attention backend: eager, sdpa or flex_attention), and its
    positions continue from the prompt's end exactly as in its own row (V2PE positions included, computed by the
    model's `v2pe_positions`). Every answer token gets the log-probability it gets in its own row. The flash
    attention backends take no such mask (their varlen kernels know only causal segments), nor can
    `v2pe_mode="auto"` share a prompt (δ depends on each row's length): there the trainer falls back to separate
    rows and says so once in the log.
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
        precompute = args.precompute_ref_log_probs
        if precompute and not isinstance(model, str) and getattr(model.config, "v2pe_mode", "none") == "random":
            raise ValueError(
                "precompute_ref_log_probs=True cannot be used with v2pe_mode='random': the reference must see the δ "
                "each training step draws. Use v2pe_mode='fixed' or compute the reference on the fly."
            )
        full_fine_tuning = ref_model is None and peft_config is None and not isinstance(model, str)
        full_fine_tuning = full_fine_tuning and not is_peft_model(model)
        zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
        # With precompute, the reference log-probs of full fine-tuning come from the policy before training: no
        # copy is kept (under DeepSpeed the copy or reload below serves the pass and is dropped after it).
        no_copy = precompute and full_fine_tuning and args.deepspeed_plugin is None
        if full_fine_tuning and not zero3 and not no_copy:  # ZeRO-3 shards at load time: TRL reloads the reference
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
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
        trl_context = contextlib.nullcontext()
        if precompute:  # TRL refuses it for vision datasets: this trainer runs the reference pass itself
            trl_context = trl_without_reference(args, model if no_copy else None)
        with trl_context as stand_in:
            super().__init__(
                model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                ref_model=stand_in if stand_in is not None else ref_model,
                peft_config=peft_config,
            )
        if stand_in is not None:
            self.ref_model = None
        # Under DeepSpeed the full fine-tuning reference (a copy, or TRL's reload under ZeRO-3) only serves the pass.
        self._reference_only_for_precompute = precompute and full_fine_tuning and stand_in is None
        make_fused_forward_copy_safe(self._internvl3(self.model))
        if self.ref_model is not None:
            make_fused_forward_copy_safe(self.ref_model)
        self.term_weights = args.term_weights
        self.reward_shift = RewardShift(args.reward_shift_update, args.reward_shift_momentum)
        self.reference_logps: dict[str, torch.Tensor] = {}
        self.share_prompt = self._share_prompt_supported()
        if isinstance(self.data_collator, MPODataCollator):
            self.data_collator.share_prompt = self.share_prompt
        self._num_train_tokens = 0
        self.add_callback(MPOCheckpointCallback(self))

    def _internvl3(self, model):
        """The `InternVL3ForConditionalGeneration` under any DDP/DeepSpeed/PEFT wrapper."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _share_prompt_supported(self) -> bool:
        if not self.args.share_prompt:
            return False
        config = self._internvl3(self.model).config
        backend = config.get_text_config()._attn_implementation
        reason = None
        if backend not in SHARE_PROMPT_BACKENDS:
            reason = f"the {backend!r} attention backend takes no custom mask (supported: {SHARE_PROMPT_BACKENDS})"
        elif getattr(config, "v2pe_mode", "none") == "auto":
            reason = "v2pe_mode='auto' picks δ from each row's own length"
        if reason is not None:
            logger.warning("MPOConfig.share_prompt: %s; the chosen and rejected answers run as separate rows.", reason)
            return False
        return True

    # ----------------------------------------------------------------------------------------------- resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, restoring δ (and the precomputed reference log-probs) from a checkpoint when resuming;
        with `precompute_ref_log_probs`, the reference pass over the datasets runs first."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            if self.reward_shift.load(checkpoint):
                logger.info("restored the MPO reward shift δ=%.6g from %s", self.reward_shift.value, checkpoint)
            elif self.args.reward_shift_update != "none":
                logger.warning("%s holds no %s: the reward shift δ starts again from 0.", checkpoint, REWARD_SHIFT_FILE)
        if self.args.precompute_ref_log_probs:
            saved = _load_reference_logps(checkpoint)
            self.train_dataset = self._with_reference_logps(self.train_dataset, "train", saved)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    name: self._with_reference_logps(dataset, f"eval_{name}", saved)
                    for name, dataset in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset, "eval", saved)
            if self._reference_only_for_precompute:
                self.ref_model = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`DPOTrainer.evaluate`; with `precompute_ref_log_probs`, a dataset given here gets its reference pass
        first."""
        if self.args.precompute_ref_log_probs and eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = _as_preference_dataset(eval_dataset)
            eval_dataset = self._with_reference_logps(eval_dataset, metric_key_prefix, {})
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ----------------------------------------------------------------------------------------------- reference
    def _with_reference_logps(self, dataset, name: str, saved: dict[str, torch.Tensor]):
        """`dataset` with `ref_chosen_logps`/`ref_rejected_logps` columns: from `saved` (a checkpoint) when they
        match its length, else from one reference pass in dataset order."""
        if dataset is None or "ref_chosen_logps" in (dataset.column_names or []):
            return dataset
        if not hasattr(dataset, "add_column"):
            raise ValueError("precompute_ref_log_probs=True needs map-style datasets (datasets.Dataset).")
        values = saved.get(name)
        if values is None or values.shape[0] != len(dataset):
            if self.ref_model is None and not is_peft_model(self.accelerator.unwrap_model(self.model)):
                if self.state.global_step > 0:
                    raise ValueError(
                        f"Cannot compute reference log-probs for the {name!r} dataset after training started: "
                        "with precompute_ref_log_probs=True and full fine-tuning no reference copy is kept. Give the "
                        "dataset as eval_dataset when building the trainer, or pass a ref_model."
                    )
            values = self.precompute_reference_logps(dataset)
        self.reference_logps[name] = values
        dataset = dataset.add_column("ref_chosen_logps", values[:, 0].tolist())
        return dataset.add_column("ref_rejected_logps", values[:, 1].tolist())

    @torch.no_grad()
    def precompute_reference_logps(self, dataset) -> torch.Tensor:
        """`(len(dataset), 2)` reference log-probs (chosen, rejected) of every pair, in dataset order, in one pass
        (batches of `precompute_ref_batch_size`, sharded over the ranks). The reference is the `ref_model`, the
        policy with its adapters disabled (PEFT) or, for full fine-tuning, the policy before training."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        loader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers,
        )  # fmt: skip
        loader = self.accelerator.prepare(loader)
        reference = self.ref_model if self.ref_model is not None else self.model
        was_training = reference.training
        reference.eval()
        values = []
        try:
            for batch in loader:
                chosen, rejected = self.compute_ref_log_probs(reference, batch)
                chosen, rejected = self.accelerator.gather_for_metrics((chosen, rejected))
                values.append(torch.stack([chosen, rejected], dim=1).float().cpu())
        finally:
            reference.train(was_training)
        return torch.cat(values)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs `(chosen, rejected)` of the batch's pairs in either layout: no grad, gradient
        checkpointing off, autocast, adapters disabled for a PEFT policy without `ref_model` (TRL's handling)."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
            peft_model = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            answers = self.answer_logps(model, inputs)
        return answers.chosen_logps, answers.rejected_logps

    # ----------------------------------------------------------------------------------------------- forward
    def _v2pe_strides(self, inputs: dict) -> torch.Tensor | None:
        """Per-image V2PE strides of the batch: `inputs["v2pe_strides"]` if given; under `v2pe_mode="random"` in
        training, one drawn per image of each pair, so that the chosen answer, the rejected one and the reference
        all see the same positions (the model would otherwise draw per call)."""
        if inputs.get("v2pe_strides") is not None:
            return inputs["v2pe_strides"]
        config = self._internvl3(self.model).config
        patches = inputs.get("image_num_patches")
        if getattr(config, "v2pe_mode", "none") != "random" or not self.model.training or patches is None:
            return None
        choices = torch.tensor(config.v2pe_strides, device=patches.device, dtype=torch.long)
        return choices[torch.randint(len(choices), (len(patches),), device=patches.device)]

    def model_inputs(self, model, inputs: dict, v2pe_strides: torch.Tensor | None = None) -> dict:
        """Forward kwargs for a batch in either layout (see `MPODataCollator`), each pair's tiles given once.

        Separate rows: `2B` rows, the ViT features computed once and repeated for the two halves (or, with
        `share_vision_forward=False`, the tiles duplicated). Shared prompt: `B` rows with their 4D mask and
        explicit positions.
        """
        v2pe_strides = v2pe_strides if v2pe_strides is not None else inputs.get("v2pe_strides")
        kwargs = {key: value for key, value in inputs.items() if key not in _BATCH_ONLY_KEYS}
        if "segment_ids" in inputs:
            return {**kwargs, **self._shared_prompt_inputs(model, inputs, v2pe_strides)}
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if self.args.share_vision_forward:
                features = SharedImageFeatures(self._internvl3(model).get_image_features, pixel_values)
                kwargs["mm_encoder_outputs"] = {"image": features}
            else:
                kwargs["pixel_values"] = torch.cat([pixel_values, pixel_values])
            if inputs.get("image_num_patches") is not None:
                kwargs["image_num_patches"] = torch.cat([inputs["image_num_patches"]] * 2)
        if v2pe_strides is not None:
            kwargs["v2pe_strides"] = torch.cat([v2pe_strides, v2pe_strides])
        return kwargs

    def _shared_prompt_inputs(self, model, inputs: dict, v2pe_strides: torch.Tensor | None) -> dict:
        """4D mask, positions, tiles (once per row, i.e. once per pair) for `[prompt | chosen | p | rejected]` rows."""
        internvl3 = self._internvl3(model)
        text_config = internvl3.config.get_text_config()
        input_ids, token_mask, segment_ids = inputs["input_ids"], inputs["attention_mask"], inputs["segment_ids"]
        embedding_dtype = internvl3.get_input_embeddings().weight.dtype
        shape_probe = torch.empty((*input_ids.shape, 0), dtype=embedding_dtype, device=input_ids.device)
        position_ids, rope_position_ids = self.shared_prompt_positions(internvl3, inputs, v2pe_strides)
        kwargs = {
            "attention_mask": shared_prompt_mask(text_config, shape_probe, token_mask, segment_ids),
            "position_ids": position_ids,
        }
        if rope_position_ids is not None:
            kwargs["rope_position_ids"] = rope_position_ids
        if inputs.get("pixel_values") is not None:
            kwargs["pixel_values"] = inputs["pixel_values"]
            if inputs.get("image_num_patches") is not None:
                kwargs["image_num_patches"] = inputs["image_num_patches"]
        return kwargs

    @staticmethod
    def shared_prompt_positions(
        internvl3, inputs: dict, v2pe_strides: torch.Tensor | None = None
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Integer and, under V2PE, rotary positions of `[prompt | chosen | p | rejected]` rows: those of
        `[prompt | chosen]` in its own row, then `p` and the rejected answer back at the prompt's last position and
        on, as in the rejected row's own layout.

        The rotary positions are the model's own V2PE positions (`v2pe_positions`) of the whole row; answers hold no
        image, so moving the rejected part back by the length of the chosen segment (the prompt's last token and the
        chosen answer) is exact. Without V2PE (mode "none", no strides) they are `None`: the integer positions are
        the rotary ones.
        """
        token_mask, segment_ids = inputs["attention_mask"], inputs["segment_ids"]
        chosen_length = (segment_ids == CHOSEN_SEGMENT).sum(1, keepdim=True)
        shift = chosen_length * (segment_ids == REJECTED_SEGMENT)
        position_ids = (token_mask.long().cumsum(1) - 1).clamp(min=0) - shift
        config = internvl3.config
        if getattr(config, "v2pe_mode", "none") == "none" and v2pe_strides is None:
            return position_ids, None
        image_token_mask = inputs["input_ids"] == config.image_token_id
        rope_position_ids, _ = internvl3.model.v2pe_positions(image_token_mask, token_mask, v2pe_strides=v2pe_strides)
        return position_ids, rope_position_ids - shift.to(rope_position_ids.dtype)

    def answer_logps(self, model, inputs: dict) -> AnswerLogps:
        """One fused-head forward of `model` over the batch, split into the chosen and rejected answers.

        The LM head sees the batch's answer tail only (from the first position that predicts an answer token): off
        Triton devices TRL's fused head projects every position it is given, and the prompt, most of each row, needs
        none. The backbone still runs every position (the answers attend to the prompt)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        start = self._answer_tail_start(model, inputs["completion_mask"])
        with keep_answer_tail(self._internvl3(model).model, start):
            outputs = model(
                **self.model_inputs(model, inputs), labels=labels[:, start:], use_cache=False, fused_lm_head=True
            )
        return AnswerLogps(outputs, inputs, start)

    def _answer_tail_start(self, model, completion_mask: torch.Tensor) -> int:
        """The first position whose next token is an answer token in any row; 0 without answers, or for
        prompt-learning PEFT (its virtual tokens lengthen the labels inside the forward)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            return 0
        answered = completion_mask[:, 1:].any(dim=0).nonzero()
        return int(answered[0]) if len(answered) else 0

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "v2pe_strides": self._v2pe_strides(inputs)}
        answers = self.answer_logps(model, inputs)
        chosen_logps, rejected_logps = answers.chosen_logps, answers.rejected_logps
        if inputs.get("ref_chosen_logps") is not None:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(reference, inputs)

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
                tokens, mask = answers.chosen(answers.per_token_logps)
                term = -tokens[mask].mean()
            terms[loss_type] = term.mean()
            loss += terms[loss_type] * weight

        if mode == "train":
            self.reward_shift.observe(torch.cat([chosen_rewards, rejected_rewards]))
        self._log_metrics(mode, inputs, answers, terms, delta, (chosen_rewards, rejected_rewards))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**self.model_inputs(model, inputs), use_cache=False)
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, answers: AnswerLogps, terms, delta, rewards):
        """TRL's metrics (same names and reductions), the three MPO terms and δ, into TRL's metric store (which
        `DPOTrainer.log` averages)."""
        chosen_rewards, rejected_rewards = (reward.detach() for reward in rewards)
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]

        def token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
            total, count = gather(values[mask].sum()).sum(), gather(mask.sum()).sum()
            return (total / count).item() if count > 0 else 0.0

        for loss_type, value in terms.items():
            metrics[TERM_METRICS[loss_type]].append(gather(value.detach()).mean().item())
        metrics["mpo/reward_shift"].append(float(delta))
        outputs = answers.outputs
        if outputs.entropy is not None:
            entropy = answers.align(outputs.entropy.detach())
            metrics["entropy"].append(token_mean(entropy, answers.completion_mask))
        if mode == "train":
            tp_size = getattr(self.accelerator.parallelism_config, "tp_size", None) or 1
            self._num_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // tp_size
        metrics["num_tokens"] = [self._num_train_tokens]
        if outputs.mean_logits is not None:
            mean_logits = answers.align(outputs.mean_logits.detach())
            metrics["logits/chosen"].append(token_mean(*answers.chosen(mean_logits)))
            metrics["logits/rejected"].append(token_mean(*answers.rejected(mean_logits)))
        if outputs.is_top1 is not None:
            metrics["mean_token_accuracy"].append(token_mean(*answers.chosen(answers.align(outputs.is_top1).float())))

        for name, value in (
            ("rewards/chosen", chosen_rewards),
            ("rewards/rejected", rejected_rewards),
            ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
            ("rewards/margins", chosen_rewards - rejected_rewards),
            ("logps/chosen", answers.chosen_logps.detach()),
            ("logps/rejected", answers.rejected_logps.detach()),
        ):
            metrics[name].append(self.accelerator.gather(value).mean().item())


class AnswerLogps:
    """The fused head's per-token outputs of a batch, split by answer, for either layout.

    `per_token_logps` `(rows, L-1-start)` are next-token log-probs of the labels from `start + 1` on (0 off the
    answers). Separate rows: chosen rows are the first half, rejected the second. Shared prompt: every row holds
    both, told apart by `segment_ids`.
    """

    def __init__(self, outputs, inputs: dict, start: int = 0):
        self.outputs = outputs
        completion_mask = inputs["completion_mask"][:, start + 1 :].bool()
        self.completion_mask = completion_mask
        self.per_token_logps = self.align(outputs.log_probs)
        if "segment_ids" in inputs:
            label_segments = inputs["segment_ids"][:, start + 1 :]
            self._chosen_mask = completion_mask & (label_segments == CHOSEN_SEGMENT)
            self._rejected_mask = completion_mask & (label_segments == REJECTED_SEGMENT)
            self._split = lambda values: (values, values)
        else:
            self._chosen_mask, self._rejected_mask = completion_mask.chunk(2, dim=0)
            self._split = lambda values: values.chunk(2, dim=0)
        self.chosen_logps = self._answer_sum(*self.chosen(self.per_token_logps))
        self.rejected_logps = self._answer_sum(*self.rejected(self.per_token_logps))

    def align(self, values: torch.Tensor) -> torch.Tensor:
        """The last `L-1-start` positions (prompt-learning PEFT prepends virtual tokens to the outputs)."""
        return values[:, -self.completion_mask.shape[1] :]

    def chosen(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(values)[0], self._chosen_mask

    def rejected(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(values)[1], self._rejected_mask

    @staticmethod
    def _answer_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (values * mask).sum(dim=1)


class MPOCheckpointCallback(TrainerCallback):
    """Moves δ at the end of each optimizer step; writes δ and the precomputed reference log-probs into each
    checkpoint."""

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
                if self.trainer.reference_logps:
                    torch.save(self.trainer.reference_logps, directory / REFERENCE_LOGPS_FILE)


def _load_reference_logps(checkpoint: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / REFERENCE_LOGPS_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return {}
    logger.info("reusing the reference log-probs saved in %s", path)
    return torch.load(path, weights_only=True)


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
