"""Forward time with V2PE vs without, side by side in one run (issue: overhead < 3 % at 8k tokens).

    python benchmarks/v2pe.py                      # CPU, small config, 8192 tokens
    python benchmarks/v2pe.py --size 1b --device cuda --dtype bfloat16

The same weights and the same `input_ids` (text with image spans of `<IMG_CONTEXT>` tokens) go through
`InternVL3ForConditionalGeneration.forward` with `v2pe_mode` none / fixed / auto; the modes are interleaved
repeat by repeat so that machine noise hits them alike. Image features are left out (no `pixel_values`): they
cost the same in every mode, and V2PE only changes positions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import InternVLVisionConfig, Qwen2Config

from internvl3_hf import InternVL3Config, InternVL3ForConditionalGeneration

SIZES = {
    # A few-layer Qwen2 so that a CPU forward over 8k tokens takes well under a second.
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=2048),
    # InternVL3-1B's LLM (Qwen2.5-0.5B) dimensions, random weights.
    "1b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151674),
}
MODES = {"none": {}, "fixed 1/4": {"v2pe_mode": "fixed", "v2pe_delta": 0.25}, "auto": {"v2pe_mode": "auto"}}


def build_config(size: str) -> InternVL3Config:
    text = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, **SIZES[size])
    vision = InternVLVisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    vocab = text.vocab_size
    return InternVL3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab - 1,
        image_start_token_id=vocab - 3,
        image_end_token_id=vocab - 2,
        eos_token_id=vocab - 4,
    )


def build_input_ids(config: InternVL3Config, tokens: int, image_tokens: int = 2304) -> torch.Tensor:
    """Text with 448-px images (9 tiles × 256 tokens each) until `tokens` is reached."""
    generator = torch.Generator().manual_seed(0)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += torch.randint(0, config.image_start_token_id - 1, (300,), generator=generator).tolist()
        ids += [config.image_start_token_id] + [config.image_token_id] * image_tokens + [config.image_end_token_id]
    return torch.tensor([ids[:tokens]])


def time_forward(model, input_ids, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def time_positions(model, input_ids, device, repeats: int) -> list[float]:
    """The V2PE work alone (image mask + positions), free of the forward's run-to-run noise."""
    model.config.update({"v2pe_mode": "fixed", "v2pe_delta": 0.25})
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.model.v2pe_positions(model.model.get_placeholder_mask(input_ids, None))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa", "flex_attention"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = build_config(args.size)
    model = InternVL3ForConditionalGeneration(config).to(device, getattr(torch, args.dtype)).eval()
    model.set_attn_implementation(args.attn)
    input_ids = build_input_ids(config, args.tokens).to(device)

    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    with torch.inference_mode():
        for mode, settings in MODES.items():  # warm-up
            model.config.update({"v2pe_mode": "none", "v2pe_delta": 1.0, **settings})
            time_forward(model, input_ids, device, 1)
        for _ in range(args.repeats):
            for mode, settings in MODES.items():
                model.config.update({"v2pe_mode": "none", "v2pe_delta": 1.0, **settings})
                results[mode] += time_forward(model, input_ids, device, 1)

    position_times = time_positions(model, input_ids, device, args.repeats)
    baseline = statistics.median(results["none"])
    image_tokens = int((input_ids == config.image_token_id).sum())
    print(f"# V2PE forward overhead — {args.size} config, {args.tokens} tokens ({image_tokens} image tokens), "
          f"{args.dtype}, {args.attn}, {device}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| mode | median ms | min ms | overhead vs none |")
    print("|---|---|---|---|")
    for mode, times in results.items():
        median = statistics.median(times)
        print(f"| {mode} | {median * 1e3:.1f} | {min(times) * 1e3:.1f} | {100 * (median / baseline - 1):+.2f} % |")
    position_ms = statistics.median(position_times) * 1e3
    print(f"| V2PE position computation alone (fixed) | {position_ms:.2f} | {min(position_times) * 1e3:.2f} | "
          f"{100 * position_ms / (baseline * 1e3):+.2f} % |")


if __name__ == "__main__":
    main()
