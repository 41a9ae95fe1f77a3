"""Per-decode-step work of `generate`: this plugin vs transformers' native InternVL, counted rather than timed.

    python benchmarks/decode_ops.py                        # sdpa, batch 1, V2PE off / δ = 1 / δ = 1/2 (~1 minute)
    python benchmarks/decode_ops.py --attn eager --batch 8 --v2pe none

Decode steps of ~6 ms on the small CPU config make per-step Python overhead visible in tokens/s, and wall-clock
differences of 1-2 % drown in machine noise; counts do not. One decode step's work = that of `generate(N=LONG)` minus
that of `generate(N=SHORT)`, divided by LONG - SHORT (prefill and set-up cancel out):

- aten ops per step (`torch.profiler`, CPU), and which op counts differ from native's;
- Python function calls per step (`cProfile`), and the plugin's calls native does not make;
- decode CPU time per step (`time.thread_time`, median of `--repeats`, plugin and native alternating), which a
  descheduled thread does not inflate.

Same model builders as `benchmarks/inference.py` (small config: 2-layer ViT, 4-layer Qwen2 of width 256, one
448-px image). Native never runs V2PE: with δ < 1 its tokens differ (expected), with δ = 1 they must be equal.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inference import build_inputs, build_model  # noqa: E402

from internvl3_hf.formats.hf import to_native_model  # noqa: E402
from internvl3_hf.modeling.processing_internvl3 import processor_for_config  # noqa: E402
from internvl3_hf.tiny import build_tiny_tokenizer  # noqa: E402

V2PE = {"none": dict(v2pe_mode="none"), "delta_1": dict(v2pe_mode="fixed", v2pe_delta=1.0),
        "delta_1/2": dict(v2pe_mode="fixed", v2pe_delta=0.5)}


def generate(model, inputs: dict, new_tokens: int, **kwargs):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def per_step(counts_long: Counter, counts_short: Counter, steps: int) -> dict[str, float]:
    keys = counts_long.keys() | counts_short.keys()
    return {k: (counts_long[k] - counts_short[k]) / steps for k in keys if counts_long[k] != counts_short[k]}


def aten_ops(model, inputs: dict, short: int, long: int) -> dict[str, float]:
    counts = []
    for new_tokens in (short, long):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, inputs, new_tokens)
        counts.append(Counter(e.name for e in prof.events() if e.name.startswith("aten::")))
    return per_step(counts[1], counts[0], long - short)


def python_calls(model, inputs: dict, short: int, long: int) -> dict[str, float]:
    counts = []
    for new_tokens in (short, long):
        profiler = cProfile.Profile()
        profiler.enable()
        generate(model, inputs, new_tokens)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        counts.append(Counter({f"{os.path.basename(f)}:{line}({name})": calls
                               for (f, line, name), (_, calls, *_) in stats.items()}))
    return per_step(counts[1], counts[0], long - short)


class ThreadClock(LogitsProcessor):
    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.thread_time())
        return scores


def step_cpu_us(models: dict, inputs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    times = {name: [] for name in models}
    for repeat in range(repeats):
        for name in (list(models) if repeat % 2 == 0 else list(models)[::-1]):
            clock = ThreadClock()
            generate(models[name], inputs[name], new_tokens, logits_processor=LogitsProcessorList([clock]))
            times[name].append((clock.stamps[-1] - clock.stamps[0]) / (new_tokens - 1) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--v2pe", nargs="+", default=list(V2PE), choices=list(V2PE))
    parser.add_argument("--repeats", type=int, default=9, help="timed generate calls per model (0: no timing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    plugin = build_model("small", tokenizer)
    native = to_native_model(plugin)
    processor = processor_for_config(tokenizer, plugin.config)
    plugin_inputs = build_inputs(processor, args.batch, 1)
    native_inputs = {k: v for k, v in plugin_inputs.items() if k != "image_num_patches"}
    models = {"plugin": plugin, "native": native}
    inputs = {"plugin": plugin_inputs, "native": native_inputs}
    for model in models.values():
        model.set_attn_implementation(args.attn)
    short, long = 2, 12
    print(f"torch {torch.__version__}, attention {args.attn}, batch {args.batch}; per decode step "
          f"(generate N={long} minus N={short})")
    with torch.inference_mode():
        for setting in args.v2pe:
            for key, value in {"v2pe_mode": "none", "v2pe_delta": 1.0, **V2PE[setting]}.items():
                setattr(plugin.config, key, value)
            for name in models:  # warm-up
                generate(models[name], inputs[name], 3)
            same = torch.equal(generate(plugin, plugin_inputs, 8), generate(native, native_inputs, 8))
            ops = {name: aten_ops(models[name], inputs[name], short, long) for name in models}
            calls = {name: python_calls(models[name], inputs[name], short, long) for name in models}
            print(f"\n== V2PE {setting}: same greedy tokens as native: {same}")
            for name in models:
                print(f"  {name:6s} aten ops {sum(ops[name].values()):7.1f}   python calls {sum(calls[name].values()):7.1f}")
            differing = sorted(k for k in ops["plugin"].keys() | ops["native"].keys()
                               if ops["plugin"].get(k, 0) != ops["native"].get(k, 0))
            print("  aten ops differing (plugin / native): "
                  + (", ".join(f"{k} {ops['plugin'].get(k, 0):g}/{ops['native'].get(k, 0):g}" for k in differing)
                     or "none"))
            own = sorted(k for k in calls["plugin"] if "internvl3" in k)
            print("  plugin's own functions called per step: " + (", ".join(own) or "none"))
            if args.repeats:
                cpu = step_cpu_us(models, inputs, 33, args.repeats)
                print(f"  decode CPU time per step (median of {args.repeats}): plugin {cpu['plugin']:.0f} µs, "
                      f"native {cpu['native']:.0f} µs, difference {cpu['plugin'] - cpu['native']:+.0f} µs")


if __name__ == "__main__":
    main()
