"""Best-of-N throughput: batched generation + batched critic vs a naive loop, side by side in one run.

    python benchmarks/best_of_n.py                       # CPU, tiny policy and critic, 2 questions x N=8
    python benchmarks/best_of_n.py --questions 8 --n 16 --max-new-tokens 64

All pipelines answer the same questions about the same image-heavy prompts (by default one 13-tile image per
question, 12 tiles + thumbnail; `--tiles`) with the same tiny random InternVL3 policy and VisualPRM critic (built
locally, no download):

- naive loop: per candidate, one `generate` (one sample) and one critic call (tiling and ViT included each time);
- batched, prefill x N: one `generate` for all questions with `num_return_sequences=N` (the vision tower once per
  batch, but every prompt prefilled N times), then one `VisualPRM.score_many` call (per question: images tiled and
  encoded once, the conversation prefix shared by the candidates encoded once, its system prompt once per call,
  each critic batch of candidates packed into one row after it);
- batched, shared prefill (what `best_of_n` runs): each prompt prefilled once, its KV cache repeated N times, then
  the same sampling; the critic in its single-forward and per-step scoring modes.

Every candidate is forced to `--max-new-tokens` tokens (`min_new_tokens`), so all pipelines generate the same
number of tokens. The pipelines are interleaved repeat by repeat so that machine noise hits them alike; the
table shows the median wall times, and the median CPU time (`time.process_time`, steadier than wall time on a busy
machine) with the speed-up it gives.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import transformers
from PIL import Image

from internvl3_hf.best_of_n import VisualPRM, generate_candidates
from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config

QUESTIONS = [
    "How many shapes are in the image? Answer the question step by step.",
    "What colour is the square? Describe the image in detail.",
    "Count the red shapes, then the blue shapes, and add them.",
    "Which shape sits left of the blue square?",
]


def build_models(seed: int = 0, tile_size: int = 28):
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, image_size=tile_size)
    torch.manual_seed(seed)
    policy = InternVL3ForConditionalGeneration(config).eval()
    critic = InternVL3ForConditionalGeneration(config).eval()
    return policy, critic, processor_for_config(tokenizer, config)


def build_images(count: int, tiles: int, tile_size: int = 28) -> list[Image.Image]:
    """Noise strips of `tiles` tiles side by side: the tiler keeps that `tiles` x 1 grid (up to its 12-tile maximum)
    and adds the thumbnail; (tile_size / 14)² image tokens per tile in the tiny config (patch 7, pixel unshuffle)."""
    generator = np.random.default_rng(0)
    shape = (tile_size, tile_size * tiles, 3)
    return [Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def naive_loop(policy, processor, critic, questions, images, n, generation) -> tuple[float, float, float]:
    """One generate and one critic call per candidate; returns (generate seconds, critic seconds, CPU seconds)."""
    generate_time = critic_time = 0.0
    cpu_start = time.process_time()
    for question, image in zip(questions, images):
        for _ in range(n):
            start = time.perf_counter()
            candidate = generate_candidates(policy, processor, [question], [[image]], 1, **generation)[0][0]
            middle = time.perf_counter()
            critic.score(question, [candidate.text], [image])
            generate_time, critic_time = generate_time + middle - start, critic_time + time.perf_counter() - middle
    return generate_time, critic_time, time.process_time() - cpu_start


def batched(
    policy, processor, critic, questions, images, n, generation, mode, shared_prefill
) -> tuple[float, float, float]:
    """One generate for everything (each prompt prefilled once, or N times), one critic call for every candidate."""
    cpu_start, start = time.process_time(), time.perf_counter()
    groups = generate_candidates(
        policy, processor, questions, [[image] for image in images], n, shared_prefill=shared_prefill, **generation
    )
    middle = time.perf_counter()
    responses = [[candidate.text for candidate in group] for group in groups]
    critic.score_many(questions, responses, [[image] for image in images], mode=mode)
    return middle - start, time.perf_counter() - middle, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--n", type=int, default=8, help="candidates per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--critic-batch-size", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=12, help="tiles per image (plus the thumbnail)")
    parser.add_argument("--tile-size", type=int, default=28, help="tile side in pixels: (side / 14)² image tokens per "
                        "tile (28: 4 tokens; 56: 16 tokens, 208 per 13-tile image)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: tiny models gain nothing from more, and one "
        "thread keeps the timings steady on a shared machine)"
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy, critic_model, processor = build_models(tile_size=args.tile_size)
    critic = VisualPRM(critic_model, processor, batch_size=args.critic_batch_size)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    images = build_images(args.questions, args.tiles, args.tile_size)
    generation = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=True)
    pipelines = {
        "naive loop (1 generate + 1 critic call per candidate)": lambda q, i, n: naive_loop(
            policy, processor, critic, q, i, n, generation
        ),
        "batched, prefill x N + critic single_forward": lambda q, i, n: batched(
            policy, processor, critic, q, i, n, generation, "single_forward", shared_prefill=False
        ),
        "batched, shared prefill + critic single_forward": lambda q, i, n: batched(
            policy, processor, critic, q, i, n, generation, "single_forward", shared_prefill=True
        ),
        "batched, shared prefill + critic per_step": lambda q, i, n: batched(
            policy, processor, critic, q, i, n, generation, "per_step", shared_prefill=True
        ),
    }

    torch.manual_seed(0)
    for run in pipelines.values():  # warm-up on one question, two candidates
        run(questions[:1], images[:1], 2)
    timings = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, run in pipelines.items():
            timings[name].append(run(questions, images, args.n))

    candidates = args.questions * args.n
    print(
        f"Best-of-N, tiny InternVL3 policy and critic (random weights), {args.questions} questions x N={args.n}, "
        f"{args.max_new_tokens} new tokens per candidate, {args.tiles} tiles + thumbnail of {args.tile_size} px per "
        f"image ({(args.tiles + 1) * (args.tile_size // 14) ** 2} image tokens), critic batch "
        f"{args.critic_batch_size}"
    )
    machine = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {machine}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved repeats\n"
    )
    header = (
        f"{'pipeline':<56} {'generate s':>10} {'critic s':>9} {'total s':>8} {'cand/s':>8} {'speed-up':>9} "
        f"{'CPU s':>7} {'CPU speed-up':>12}"
    )
    print(header)
    print("-" * len(header))
    naive_total = naive_cpu = None
    for name, runs in timings.items():
        generate_time = statistics.median(run[0] for run in runs)
        critic_time = statistics.median(run[1] for run in runs)
        total = statistics.median(run[0] + run[1] for run in runs)
        cpu = statistics.median(run[2] for run in runs)
        naive_total, naive_cpu = naive_total or total, naive_cpu or cpu
        print(
            f"{name:<56} {generate_time:>10.3f} {critic_time:>9.3f} {total:>8.3f} {candidates / total:>8.1f} "
            f"{naive_total / total:>8.1f}x {cpu:>7.3f} {naive_cpu / cpu:>11.1f}x"
        )


if __name__ == "__main__":
    main()
