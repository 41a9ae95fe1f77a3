"""MPO (Mixed Preference Optimization, InternVL3's post-training) on TRL's `DPOTrainer`.

`MPOConfig` (weights w_p / w_q / w_g, β, the reward-shift rule), `MPOTrainer` (the MPO loss with the reward shift δ,
the vision tower once per pair), preference data (`MPODataCollator`, MMPR / TRL-layout / synthetic sources) and the
recipe entry points `build_mpo_trainer` / `run_mpo` (`internvl3-hf mpo --config recipes/...yaml`).

Names are imported on first use, so that `internvl3-hf --help` does not pay for importing TRL.
"""

from __future__ import annotations

import importlib

# Name → the module defining it, relative to this package (the recipe builders live in `internvl3_hf.train`).
_EXPORTS = {
    "MPOConfig": ".config",
    "EncodedPair": ".data",
    "MPODataCollator": ".data",
    "PreferenceEncoder": ".data",
    "PreferencePair": ".data",
    "pair_from_row": ".data",
    "pairs_from_hf_dataset": ".data",
    "plan_pairs": ".data",
    "preference_dataset": ".data",
    "read_preference_jsonl": ".data",
    "read_preference_meta": ".data",
    "synthetic_preference_pairs": ".data",
    "REWARD_SHIFT_FILE": ".trainer",
    "MPOTrainer": ".trainer",
    "RewardShift": ".trainer",
    "build_mpo_trainer": "..train",
    "run_mpo": "..train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
