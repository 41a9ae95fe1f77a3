"""SFT tokens/s of `InternVL3Trainer` with packing vs without, and vs native InternVL + TRL `SFTTrainer`, one run.

    python benchmarks/sft_packing.py                    # CPU, small config, ~3 minutes
    python benchmarks/sft_packing.py --repeats 3

Three variants on the same skewed-length synthetic data (mostly short one-tile image questions, a minority of long
samples with a 3-tile image and a long answer), from the same random weights, one epoch each:

- `InternVL3Trainer`, packed: `SFTDataset(max_packed_tokens=...)` + `SFTCollator(padding_free=True)`;
- `InternVL3Trainer`, padded: the same trainer, dataset without packing, `SFTCollator(padding_free=False)`,
  `--batch-size` right-padded rows per step;
- transformers-native `InternVLForConditionalGeneration` + TRL `SFTTrainer` (padded, TRL's vision collator; TRL
  refuses packing and padding-free for vision datasets).

The data, model sizes, per-step budgets, warm-up, timing (real non-pad tokens of the epoch / epoch wall time) and
the fresh-process-per-run memory measurement are those of `benchmarks/train_step.py`, whose worker this script
runs (see its docstring, including how the TRL baseline gets transformers' `InternVLProcessor` without
torchvision). Variants alternate run by run, the order swapping every repeat; medians are printed.
"""

from __future__ import annotations

import argparse
import sys

import train_step  # benchmarks/train_step.py, next to this file (python puts the script's folder on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_step.add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        raise SystemExit("--worker is train_step.py's")
    variants = ["plugin-packed", "plugin-padded", "trl-native-padded"]
    results = train_step.run_variants(variants, args, sys.argv[1:])
    speed = train_step.print_table(
        results, args, "SFT packing: InternVL3Trainer packed vs padded vs native + TRL SFTTrainer", "plugin-padded"
    )
    print(f"\npacked / padded (InternVL3Trainer): {speed['plugin-packed'] / speed['plugin-padded']:.2f}x; "
          f"packed / native + TRL: {speed['plugin-packed'] / speed['trl-native-padded']:.2f}x; "
          f"InternVL3Trainer padded / native + TRL: {speed['plugin-padded'] / speed['trl-native-padded']:.2f}x")
    print("tokens/s = real (non-pad) tokens of the epoch / epoch seconds; pad share = pad slots / all slots.")


if __name__ == "__main__":
    main()
