"""Prefill and decode tokens/s: this plugin vs transformers' native InternVL, same weights, side by side in one run.

    python benchmarks/inference.py                                   # CPU, small config, ~1-2 minutes
    python benchmarks/inference.py --tiles 2 --repeats 9             # 2 tiles + thumbnail per image
    python benchmarks/inference.py --size 1b --device cuda --dtype bfloat16 --threads 8   # GPU (not run here)

`InternVL3ForConditionalGeneration` is built with random weights; `internvl3_hf.formats.hf.to_native_model` gives a
`transformers.InternVLForConditionalGeneration` sharing the very same tensors (in-memory parameter names are
identical). Both get the same image+text prompts from the plugin processor (default system prompt, one `<image>`, a
question): the image is `--tiles` 448-px tiles wide (default 1; a thumbnail tile is added when > 1), 256 image
tokens per tile; batches of 1 and 8 identical-length rows (no padding).

Prefill and decode are timed inside one greedy `generate(max_new_tokens=N, min_new_tokens=N)` call, i.e. `generate`'s
own loop (input preparation, cache, `prepare_inputs_for_generation`, stopping criteria), because that is what users
run: a logits processor stamps the time whenever new logits exist.

- prefill = time to first logits (call start → first stamp: ViT, projector and LLM over the whole prompt, plus
  `generate`'s set-up); tokens/s = batch × prompt length / time.
- decode = last stamp - first stamp, the N - 1 one-token steps after prefill; tokens/s = batch × (N - 1) / time.

Attention: eager and sdpa always; flash_attention_2 only on CUDA with the `flash-attn` package installed (a note is
printed otherwise). Plugin and native alternate call by call (the order swaps every repeat) so that machine noise
hits them alike; each cell is the median of `--repeats`. The greedy tokens of both models are compared once per row
("same tokens"), a check that both really run the same weights. One torch thread by default: this machine is a
2-vCPU VM shared with other jobs, where 2-thread timings of identical calls swung by several-fold (a descheduled
thread stalls the other at every barrier) while 1-thread timings repeat closely; `--threads` sets another count.

Sizes: `small` (default, CPU) is a 2-layer ViT of width 64 and a 4-layer Qwen2 of width 256 (vocabulary of the tiny
tokenizer, 411) on the real 448-px / patch-14 geometry; `1b` is the InternVL3-1B architecture (InternViT-300M +
Qwen2.5-0.5B dimensions, vocabulary 151 674) with random weights, meant for a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import InternVLVisionConfig, LogitsProcessor, LogitsProcessorList, Qwen2Config
from transformers.utils import is_flash_attn_2_available

from internvl3_hf import InternVL3Config, InternVL3ForConditionalGeneration
from internvl3_hf.formats.hf import to_native_model
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import build_tiny_tokenizer

SIZES = {
    "small": dict(
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=None),  # None: the tiny tokenizer's vocabulary
    ),
    # InternVL3-1B: InternViT-300M + Qwen2.5-0.5B (random weights).
    "1b": dict(
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151674),
    ),
}
QUESTIONS = [
    "Describe the image in detail.",
    "How many shapes are in the image? Answer the question step by step.",
    "What colour is the square?",
    "Which shape sits left of the blue square?",
]


def build_model(size: str, tokenizer) -> InternVL3ForConditionalGeneration:
    sizes = SIZES[size]
    vision = InternVLVisionConfig(
        image_size=448, patch_size=14, attention_bias=True, layer_scale_init_value=0.1, **sizes["vision"]
    )
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = Qwen2Config(
        **{**sizes["text"], "vocab_size": sizes["text"]["vocab_size"] or len(tokenizer)},
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
    )
    config = InternVL3Config(
        vision_config=vision,
        text_config=text,
        force_image_size=448,
        image_seq_length=256,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_start_token_id=tokenizer.convert_tokens_to_ids("<img>"),
        image_end_token_id=tokenizer.convert_tokens_to_ids("</img>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    return InternVL3ForConditionalGeneration(config).eval()


def build_inputs(processor, batch: int, tiles: int) -> dict[str, torch.Tensor]:
    """`batch` prompts, each one noise image (`tiles` 448-px tiles side by side, + thumbnail) and the same question,
    so that all rows have the same length and no padding enters the timing."""
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (448, 448 * tiles, 3), dtype=np.uint8)) for _ in range(batch)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[prompt] * batch, images=[[image] for image in images], return_tensors="pt"))


class StepClock(LogitsProcessor):
    """Records `time.perf_counter()` each time `generate` has new logits (after prefill, then after each step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, inputs: dict, device: torch.device, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """One greedy `generate`: (prefill seconds, decode seconds of the new_tokens - 1 later steps, new ids)."""
    clock = StepClock(device)
    sync(device)
    start = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    assert len(clock.stamps) == new_tokens, (len(clock.stamps), new_tokens)
    return clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0], output[:, -new_tokens:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tiles", type=int, default=1, help="tiles per image (a thumbnail is added when > 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared VM)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    plugin = build_model(args.size, tokenizer).to(device, dtype)
    native = to_native_model(plugin)  # shares every tensor with `plugin`
    processor = processor_for_config(tokenizer, plugin.config)
    notes = []
    attentions = []
    for attn in args.attn:
        if attn == "flash_attention_2" and not (device.type == "cuda" and is_flash_attn_2_available()):
            notes.append("flash_attention_2 skipped: needs CUDA and the flash-attn package "
                         f"(device {device.type}, flash-attn installed: {is_flash_attn_2_available()}).")
            continue
        attentions.append(attn)

    rows = [(attn, batch) for attn in attentions for batch in args.batches]
    inputs = {}
    for batch in args.batches:
        plugin_inputs = {k: v.to(device) for k, v in build_inputs(processor, batch, args.tiles).items()}
        plugin_inputs["pixel_values"] = plugin_inputs["pixel_values"].to(dtype)
        native_inputs = {k: v for k, v in plugin_inputs.items() if k != "image_num_patches"}
        inputs[batch] = {"plugin": plugin_inputs, "native": native_inputs}
    models = {"plugin": plugin, "native": native}

    def set_attn(attn: str) -> None:
        for model in models.values():
            model.set_attn_implementation(attn)

    prefill = {(row, name): [] for row in rows for name in models}
    decode_times = {(row, name): [] for row in rows for name in models}
    same_tokens = {}
    with torch.inference_mode():
        for row in rows:  # warm-up, and the token check
            set_attn(row[0])
            tokens = {name: measure(model, inputs[row[1]][name], device, args.new_tokens)[2] for name, model in models.items()}
            same_tokens[row] = bool(torch.equal(tokens["plugin"], tokens["native"]))
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(models)[::-1]
            for row in rows:
                set_attn(row[0])
                for name in order:
                    seconds = measure(models[name], inputs[row[1]][name], device, args.new_tokens)
                    prefill[row, name].append(seconds[0])
                    decode_times[row, name].append(seconds[1])

    prompt_length = {batch: inputs[batch]["plugin"]["input_ids"].shape[1] for batch in args.batches}
    num_tiles = inputs[args.batches[0]]["plugin"]["pixel_values"].shape[0] // args.batches[0]
    cpu = _cpu_model()
    print(f"# Inference: plugin vs transformers-native InternVL (same weights) — {args.size} config, {args.dtype}, {device}")
    print(f"# prompt: 1 image = {num_tiles} tiles x 256 tokens + question = {prompt_length[args.batches[0]]} tokens; "
          f"decode {args.new_tokens} new tokens (greedy); median of {args.repeats} interleaved repeats")
    print(f"# {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, Python {platform.python_version()}; "
          f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; load average at the end "
          f"{', '.join(f'{value:.1f}' for value in os.getloadavg())}")
    for note in notes:
        print(f"# note: {note}")
    print()
    print("| attention | batch | prefill tok/s plugin | prefill tok/s native | prefill ratio | "
          "decode tok/s plugin | decode tok/s native | decode ratio | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        attn, batch = row
        steps = batch * (args.new_tokens - 1)
        pre = {name: batch * prompt_length[batch] / statistics.median(prefill[row, name]) for name in models}
        dec = {name: steps / statistics.median(decode_times[row, name]) for name in models}
        print(f"| {attn} | {batch} | {pre['plugin']:,.0f} | {pre['native']:,.0f} | {pre['plugin'] / pre['native']:.3f} | "
              f"{dec['plugin']:,.1f} | {dec['native']:,.1f} | {dec['plugin'] / dec['native']:.3f} | "
              f"{'yes' if same_tokens[row] else 'NO'} |")
    print("\nratio = plugin / native tokens/s (> 1: plugin faster; goal ≥ 0.95).")


def _cpu_model() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
