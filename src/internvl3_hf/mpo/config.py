"""`MPOConfig`: TRL's `DPOConfig` plus the MPO weights and the reward shift δ rule, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

# loss_type name (TRL spelling) -> the MPO term and its weight field.
MPO_LOSSES = {"sigmoid": "w_p", "bco_pair": "w_q", "sft": "w_g"}
REWARD_SHIFT_RULES = ("cumulative", "ema", "none")


@dataclass
class MPOConfig(DPOConfig):
    r"""
    Configuration of [`MPOTrainer`]: Mixed Preference Optimization, `L = w_p·L_p + w_q·L_q + w_g·L_g`.

    - `L_p`, preference: sigmoid DPO, `−log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)])`.
    - `L_q`, quality (BCO): `−log σ(r_c − δ) − log σ(−(r_r − δ))` with rewards `r = β(log π − log π_ref)` and the
      reward shift δ, a running mean of the rewards (TRL's own `bco_pair` has no δ).
    - `L_g`, generation: the token-mean NLL of the chosen answers of the micro-batch.

    The terms are spelled as TRL spells them in `loss_type` (`sigmoid`, `bco_pair`, `sft`); by default all three
    with the weights `w_p`, `w_q`, `w_g` (0.8 / 0.2 / 1.0, InternVL3's MPO). `loss_weights`, when given, sets the
    weights of the listed terms and overrides `w_p`/`w_q`/`w_g`; an unlisted term gets weight 0.

    Parameters:
        w_p (`float`, defaults to 0.8): weight of the preference loss (`sigmoid`).
        w_q (`float`, defaults to 0.2): weight of the quality loss (`bco_pair` with δ).
        w_g (`float`, defaults to 1.0): weight of the generation loss (`sft`).
        reward_shift_update (`str`, defaults to `"cumulative"`): how δ follows the rewards, once per optimizer
            step, from the rewards of that whole step (all gradient-accumulation micro-batches, all ranks):
            `"cumulative"`, the mean of every reward seen in training so far (the original `RunningMoments`);
            `"ema"`, `δ ← m·δ + (1 − m)·(step mean)` starting from the first step's mean; `"none"`, δ = 0 (TRL's
            `bco_pair`).
        reward_shift_momentum (`float`, defaults to 0.99): `m` of the EMA rule.
        share_prompt (`bool`, defaults to `True`): one row per pair, `[prompt | chosen | rejected]`, so that the
            prompt and its image tokens run through the language model once per pair (policy and reference); a mask
            hides the chosen answer from the rejected one and the rejected answer's positions (V2PE included)
            continue from the prompt, so every answer token gets the log-probability of its own row. Needs an
            attention backend that takes a 4D mask: eager, sdpa or flex_attention. With flash_attention_2/3, or
            `v2pe_mode="auto"` (δ depends on each row's length), the trainer falls back to separate rows and logs it
            once.
        share_vision_forward (`bool`, defaults to `True`): with separate rows, run the vision tower once per pair
            and feed its features to both the chosen and the rejected rows. `False` runs it on duplicated tiles, as
            TRL's vision collator does (same loss, twice the ViT work; kept for comparisons). A shared-prompt row
            holds each image once anyway.
        precompute_ref_log_probs (`bool`, defaults to `False`): compute the reference log-probs of every pair in
            one pass when training starts (batches of `precompute_ref_batch_size`) instead of at every step: full
            fine-tuning then keeps no reference copy in memory. The values are saved in each checkpoint and reused
            on resume. Not with `v2pe_mode="random"` (the reference must see each step's δ draw).

    Defaults that differ from `DPOConfig`: `remove_unused_columns=False` (the collator reads `origin`, `videos`,
    `data_augment` and `max_dynamic_patch` columns). Not supported, refused here: `ld_alpha`, `use_weighting`, a
    non-default `f_divergence_type`, `padding_free`.
    """

    w_p: float = field(default=0.8, metadata={"help": "Weight of the preference (sigmoid DPO) loss."})
    w_q: float = field(default=0.2, metadata={"help": "Weight of the quality (BCO with reward shift) loss."})
    w_g: float = field(default=1.0, metadata={"help": "Weight of the generation (SFT) loss on the chosen answer."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid", "bco_pair", "sft"],
        metadata={"help": "MPO terms to use, among 'sigmoid', 'bco_pair' and 'sft'."},
    )
    reward_shift_update: str = field(
        default="cumulative",
        metadata={"help": "δ rule: 'cumulative' (running mean), 'ema' (with reward_shift_momentum) or 'none' (δ=0)."},
    )
    reward_shift_momentum: float = field(default=0.99, metadata={"help": "EMA momentum m of the reward shift."})
    share_prompt: bool = field(
        default=True,
        metadata={"help": "One row per pair [prompt | chosen | rejected]: the prompt runs once (eager/sdpa/flex)."},
    )
    share_vision_forward: bool = field(
        default=True, metadata={"help": "Run the vision tower once per preference pair (False: on duplicated tiles)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: the MPO collator reads more than TRL's."}
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        unknown = [name for name in self.loss_type if name not in MPO_LOSSES]
        if unknown:
            raise ValueError(
                f"MPOConfig.loss_type holds {unknown}; MPO combines only {list(MPO_LOSSES)} (preference, quality, "
                "generation). Use trl.DPOConfig/DPOTrainer for the other TRL losses."
            )
        if not self.loss_type or len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(f"MPOConfig.loss_type must list each term once and at least one, got {self.loss_type}.")
        if self.loss_weights is not None:
            self.loss_weights = [float(weight) for weight in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    f"MPOConfig.loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} terms "
                    f"{self.loss_type}; give one weight per term (or leave it unset and use w_p/w_q/w_g)."
                )
            weights = dict(zip(self.loss_type, self.loss_weights))
            for name, attribute in MPO_LOSSES.items():
                setattr(self, attribute, weights.get(name, 0.0))
        for attribute in MPO_LOSSES.values():
            value = getattr(self, attribute)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"MPOConfig.{attribute} must be a non-negative number, got {value!r}.")
        self.loss_weights = [float(getattr(self, MPO_LOSSES[name])) for name in self.loss_type]
        if not any(self.loss_weights):
            raise ValueError(f"Every MPO loss weight is 0 ({dict(zip(self.loss_type, self.loss_weights))}).")
        if not self.beta > 0:
            raise ValueError(f"MPOConfig.beta must be > 0, got {self.beta!r}.")
        if self.reward_shift_update not in REWARD_SHIFT_RULES:
            raise ValueError(
                f"MPOConfig.reward_shift_update must be one of {REWARD_SHIFT_RULES}, got {self.reward_shift_update!r}."
            )
        if not 0.0 <= self.reward_shift_momentum < 1.0:
            raise ValueError(f"MPOConfig.reward_shift_momentum must lie in [0, 1), got {self.reward_shift_momentum!r}.")
        refused = {
            "ld_alpha": (self.ld_alpha is not None, "MPO sums the log-probs of the whole answer"),
            "use_weighting": (self.use_weighting, "WPO weights are not part of MPO"),
            "f_divergence_type": (self.f_divergence_type != "reverse_kl", "the quality loss needs reverse KL rewards"),
            "padding_free": (self.padding_free, "TRL's DPO has no padding-free path either"),
            "sync_ref_model": (
                self.sync_ref_model and self.precompute_ref_log_probs,
                "precomputed reference log-probs assume a fixed reference",
            ),
        }
        for name, (is_set, reason) in refused.items():
            if is_set:
                raise ValueError(f"MPOConfig does not support {name}={getattr(self, name)!r}: {reason}.")
        super().__post_init__()

    @property
    def term_weights(self) -> dict[str, float]:
        """`{"sigmoid": w_p, "bco_pair": w_q, "sft": w_g}` for the terms in `loss_type`."""
        return dict(zip(self.loss_type, self.loss_weights))
