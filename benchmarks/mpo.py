"""MPO training step: `MPOTrainer` (shared prompt, ViT once per pair) vs TRL's own `DPOTrainer` with the MPO loss list.

    python benchmarks/mpo.py                            # CPU (1 thread), both profiles, 2 pairs x 13 tiles, 1 round
    python benchmarks/mpo.py --profiles 8b-like --rounds 3
    python benchmarks/mpo.py --device cuda --rounds 3   # on a GPU (bf16, sdpa)

All variants train the same random InternVL3 (built locally, no download) on the same `datasets.Dataset` of
image-heavy preference pairs in TRL's conversational layout (one 448x336 image per pair: 12 tiles + thumbnail;
112-px tiles keep CPU runs short), full fine-tuning, the same optimizer and batch:

- `trl.DPOTrainer`: TRL 1.16 as is, `loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`,
  with an explicit reference copy. It runs this model directly: its `DataCollatorForVisionPreference` calls the
  plugin processor (which tiles and expands the images) and TRL's fused LM head reaches the backbone through
  `base_model_prefix`. Its collator processes every image twice (prompt x2), the vision tower encodes the
  duplicated tiles and the language model reads every prompt twice, in the policy and in the reference forward.
  Differences that are not the point: TRL has no reward shift (delta = 0), and its completion mask also covers
  the newline after each answer's `<|im_end|>`.
- `MPOTrainer, separate rows, ViT twice`: `share_prompt=False, share_vision_forward=False` (TRL's layout), which
  isolates the cost of the second vision pass and of the second prompt from everything else.
- `MPOTrainer, separate rows, ViT once`: `share_prompt=False`: one vision pass per pair, the prompt twice.
- `MPOTrainer`: as shipped (`share_prompt=True`): one `[prompt | chosen | rejected]` row per pair, so the vision
  tower and the language model see each prompt once, in the policy and in the reference.
- `MPOTrainer, precomputed reference`: as shipped plus `precompute_ref_log_probs=True`: one reference pass over
  the data when training starts ("start s"), then no reference forward and no reference copy.

Each variant runs in its own process (so that peak memory is its own): `--warmup` steps, then `--steps` timed
steps; with `--rounds k` the variants run k times, interleaved, and the table shows medians. "step" is the
median wall time of on_step_begin -> on_step_end (forward, backward, optimizer; the batch is already collated),
"step CPU" the process CPU time of the same span (steadier than wall time on a busy machine; with `--threads 1`
it is the compute itself), "step+data" the median wall time between consecutive step ends (collation included),
"start s" the time from `train()` to the first step (the reference pass, where there is one). Memory: on CPU the
peak resident set size minus the size once the policy is built (so a reference copy counts), on CUDA
`max_memory_allocated` from the policy's move to the GPU on.

Profiles set the vision tower : language model proportions of a real model (per tile, the ViT sees 4x the tokens
the LLM sees): "1b-like" has a ViT about 0.6x the LLM's parameters (InternVL3-1B: 0.3B ViT, 0.5B LLM), where the
saved vision pass is a large share of the step; "8b-like" about 0.05x (InternVL3-8B: 0.3B ViT, 7B LLM), where the
language model's prompt reading dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROFILES = {
    # ViT params ~1.8M, LLM params ~3.1M: ratio ~0.6, like InternVL3-1B.
    "1b-like": {"vision": (192, 4, 3, 768), "text": (320, 2, 5, 1, 1280)},
    # ViT params ~1.8M, LLM params ~36M: ratio ~0.05, like InternVL3-8B.
    "8b-like": {"vision": (192, 4, 3, 768), "text": (1024, 3, 8, 2, 3072)},
}
VARIANTS = {
    "trl": "trl.DPOTrainer (TRL's loss list)",
    "twice": "MPOTrainer, separate rows, ViT twice",
    "once": "MPOTrainer, separate rows, ViT once",
    "mpo": "MPOTrainer (shared prompt)",
    "precompute": "MPOTrainer, precomputed reference",
}
MPO_SETTINGS = {
    "twice": {"share_prompt": False, "share_vision_forward": False},
    "once": {"share_prompt": False},
    "mpo": {},
    "precompute": {"precompute_ref_log_probs": True},
}


def build(profile: str, seed: int = 0):
    import torch
    from transformers import InternVLVisionConfig, Qwen2Config

    from internvl3_hf.modeling.configuration_internvl3 import InternVL3Config
    from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
    from internvl3_hf.modeling.processing_internvl3 import processor_for_config
    from internvl3_hf.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    (v_hidden, v_layers, v_heads, v_inter) = PROFILES[profile]["vision"]
    (t_hidden, t_layers, t_heads, t_kv, t_inter) = PROFILES[profile]["text"]
    image_size, patch = 112, 14  # 8x8 patches (+ CLS) in the ViT -> 16 image tokens per tile in the LLM
    vision = InternVLVisionConfig(
        hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads, intermediate_size=v_inter,
        attention_bias=True, image_size=image_size, patch_size=patch, layer_scale_init_value=0.1,
    )
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t_hidden, intermediate_size=t_inter, num_hidden_layers=t_layers,
        num_attention_heads=t_heads, num_key_value_heads=t_kv, max_position_embeddings=8192,
        bos_token_id=pad, eos_token_id=pad, pad_token_id=pad, tie_word_embeddings=False,
    )
    config = InternVL3Config(
        vision_config=vision, text_config=text, force_image_size=image_size,
        image_seq_length=(image_size // patch) ** 2 // 4,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_start_token_id=tokenizer.convert_tokens_to_ids("<img>"),
        image_end_token_id=tokenizer.convert_tokens_to_ids("</img>"),
    )
    torch.manual_seed(seed)
    model = InternVL3ForConditionalGeneration(config)
    return model, processor_for_config(tokenizer, config)


def preference_rows(count: int):
    """TRL conversational preference rows, one 448x336 noise image each (12 tiles of 112 px + thumbnail)."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    def text(value: str) -> dict:
        return {"type": "text", "text": value}

    generator = np.random.default_rng(0)
    rows = []
    for index in range(count):
        image = Image.fromarray(generator.integers(0, 256, (336, 448, 3), dtype=np.uint8))
        rows.append(
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, text("Describe the image.")]}],
                "chosen": [{"role": "assistant", "content": [text("A red circle sits left of a blue square.")]}],
                "rejected": [{"role": "assistant", "content": [text("There are three shapes.")]}],
                "images": [image],
            }
        )
    return Dataset.from_list(rows)


def run_variant(variant: str, profile: str, pairs: int, warmup: int, steps: int, device: str) -> dict:
    import copy

    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from internvl3_hf.mpo import MPOConfig, MPOTrainer

    model, processor = build(profile)
    dataset = preference_rows(pairs * (warmup + steps))
    common = dict(
        output_dir=f"/tmp/mpo_bench_{variant}", per_device_train_batch_size=pairs, max_steps=warmup + steps,
        learning_rate=1e-6, report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True,
        gradient_checkpointing=False, max_length=None, seed=0, data_seed=0,
        use_cpu=device == "cpu", bf16=device != "cpu",
    )
    if variant == "trl":
        args = DPOConfig(**common, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
        trainer_class = DPOTrainer
    else:
        args = MPOConfig(**common, w_p=0.8, w_q=0.2, w_g=1.0, **MPO_SETTINGS[variant])
        trainer_class = MPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.train_start, self.first_step = None, None
            self.begin, self.begin_cpu, self.steps, self.cpu, self.ends = None, None, [], [], []

        def _sync(self):
            if device != "cpu":
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.begin, self.begin_cpu = time.perf_counter(), time.process_time()
            self.first_step = self.first_step or self.begin

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now = time.perf_counter()
            self.steps.append(now - self.begin)
            self.cpu.append(time.process_time() - self.begin_cpu)
            self.ends.append(now)

    timer = Timer()
    if device != "cpu":
        model.to(device)
        torch.cuda.reset_peak_memory_stats()
    rss_model = _current_rss_mib()
    # The precomputed variant keeps no reference: the policy before training is the reference.
    reference = None if variant == "precompute" else copy.deepcopy(model).eval().requires_grad_(False)
    trainer = trainer_class(
        model, ref_model=reference, args=args, train_dataset=dataset, processing_class=processor, callbacks=[timer]
    )
    del reference
    batch = trainer.data_collator([dataset[i] for i in range(pairs)])
    tiles = int(batch["pixel_values"].shape[0])
    timer.train_start = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else _peak_rss_mib() - rss_model
    timed = timer.steps[warmup:]
    with_data = [b - a for a, b in zip(timer.ends[warmup - 1 :], timer.ends[warmup:])] if warmup else timed
    return {
        "variant": variant,
        "step_s": statistics.median(timed),
        "step_cpu_s": statistics.median(timer.cpu[warmup:]),
        "step_data_s": statistics.median(with_data),
        "start_s": timer.first_step - timer.train_start,
        "peak_mib": peak,
        "tiles_per_batch": tiles,
        "llm_tokens": int(batch["attention_mask"].sum()),
    }


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=sorted(PROFILES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run (trl is always run: it is the baseline)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's own choice (default 1: "
                        "steadier timings, and process CPU time then measures the compute)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the variant processes
    if args.variant:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_variant(args.variant, args.profiles[0], args.pairs, args.warmup, args.steps, args.device)
        print("RESULT " + json.dumps(result))
        return

    import torch
    import transformers
    import trl

    variants = ["trl", *(variant for variant in args.variants if variant != "trl")]
    for profile in args.profiles:
        print(
            f"\nMPO step, profile {profile}, {args.pairs} pairs/step, {args.warmup} warmup + {args.steps} timed steps, "
            f"device {args.device}, {args.rounds} round(s); torch {torch.__version__} "
            f"({args.threads or torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}, trl {trl.__version__}, {_machine(args.device)}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        runs = {variant: [] for variant in variants}
        for _ in range(args.rounds):
            for variant in runs:
                runs[variant].append(_run_child(variant, profile, args))
        print_table(runs, args.device)


def _run_child(variant: str, profile: str, args) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--profiles", profile, "--pairs", str(args.pairs),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        print(completed.stdout[-2000:], completed.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"variant {variant} ({profile}) failed")
    return json.loads(lines[-1][len("RESULT ") :])


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def print_table(runs: dict[str, list[dict]], device: str) -> None:
    """Medians over the rounds, side by side with TRL; per-round ratios when there are several rounds."""
    results = {
        variant: {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "variant"}
        for variant, rounds in runs.items()
    }
    base = results["trl"]
    memory = "peak GPU MiB" if device == "cuda" else "peak RSS +MiB"
    print(f"\n| trainer | tiles/step | LLM tokens/step | step s | step CPU s | step+data s | start s | {memory} "
          "| speed-up vs TRL (step / CPU) | memory vs TRL |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, result in results.items():
        print(
            f"| {VARIANTS[variant]} | {result['tiles_per_batch']:.0f} | {result['llm_tokens']:.0f} "
            f"| {result['step_s']:.3f} | {result['step_cpu_s']:.3f} | {result['step_data_s']:.3f} "
            f"| {result['start_s']:.2f} | {result['peak_mib']:.0f} "
            f"| {base['step_s'] / result['step_s']:.2f}x / {base['step_cpu_s'] / result['step_cpu_s']:.2f}x "
            f"| {result['peak_mib'] / base['peak_mib']:.2f}x |"
        )
    if len(runs["trl"]) > 1:
        for variant in (variant for variant in runs if variant != "trl"):
            for key, label in (("step_s", "wall"), ("step_cpu_s", "CPU")):
                ratios = [t[key] / m[key] for t, m in zip(runs["trl"], runs[variant])]
                print(f"{VARIANTS[variant]} vs TRL per round ({label}): " + ", ".join(f"{r:.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
