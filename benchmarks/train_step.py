"""SFT tokens/s and peak memory: this plugin (packed, `InternVL3Trainer`) vs native InternVL + TRL `SFTTrainer`.

    python benchmarks/train_step.py                      # CPU, small config, ~2 minutes
    python benchmarks/train_step.py --repeats 4 --samples 64 --threads 2
    python benchmarks/train_step.py --size 1b --dtype bfloat16 --attn flash_attention_2 --threads 8 \
        --max-packed-tokens 8192 --samples 256 --long-words 2000          # GPU (not run here: no GPU lent)

Both variants train on the same skewed-length synthetic data (`skewed_samples`: 1/8 long samples, a 3-tile image
with a ~200-word answer, ~740 tokens; the rest short, a one-tile image with a one-line answer, ~117 tokens), from
the same random weights:

- **plugin, packed**: `InternVL3Trainer` (square loss weighting) over `SFTDataset(max_packed_tokens=...)` with
  `SFTCollator(padding_free=True)`: samples best-fit packed into one row per step, positions restarting per sample,
  no padding; attention isolated per sample by transformers (a block-diagonal mask under sdpa/eager, varlen kernels
  under FlashAttention).
- **native + TRL SFTTrainer, padded**: `transformers.InternVLForConditionalGeneration` holding the same weights
  (`internvl3_hf.formats.hf.to_native_model`), trained by `trl.SFTTrainer` on a `datasets.Dataset` in the
  conversational `messages` + `images` layout, so TRL's own `DataCollatorForVisionLanguageModeling` renders,
  tokenises and tiles every batch with transformers' `InternVLProcessor` and right-pads it. TRL refuses
  `packing=True` and `padding_free=True` for vision datasets: padding is what a TRL user gets.

  TRL's SFTTrainer does drive the native model on CPU offline, with one adaptation: transformers'
  `InternVLProcessor` cannot be constructed without torchvision (not in this venv): `ProcessorMixin.__init__` checks
  its `video_processor` slot against a class that exists only with torchvision, even for `video_processor=None`.
  The baseline uses a subclass, `NativeProcessor`, declaring only the image processor (`GotOcr2ImageProcessorPil`,
  which `-hf` checkpoints ship) and the tokenizer, built from the files `save_hf_processor` writes; every text and
  image path is transformers' and TRL's own code. TRL's collator puts the loss on every non-pad token (its default
  for vision data), the plugin on assistant answers only: the compute per token is the same.

Common settings: AdamW, fp32 on CPU, sdpa attention in both, no gradient checkpointing in either (TRL turns it on by
default; `--gradient-checkpointing` turns it on in both), `dataloader_num_workers=0`, no logging or saving. Per step:
TRL `--batch-size` padded rows (8); plugin one packed row of at most `--max-packed-tokens` (1024, the longest sample
rounded up to a power of two). On CPU under sdpa, transformers computes a packed row's attention densely under a
block-diagonal mask, so a packed row pays attention for all of its (length)² pairs: rows much longer than the
longest sample waste attention work (measured with this data: rows of 1536 tokens gave ~1.6x over padding instead
of ~1.9x). FlashAttention's varlen kernels on GPU do not have that cost.

Timing: one worker process per variant. Each builds its model and data, runs 1 warm-up step (a few short samples),
then trains `--repeats` epochs, each with a fresh trainer on the same model, interleaved with the other variants
*step by step*: a `TrainerCallback` holds every optimizer step until the driver says go, and the driver runs one
step of one variant at a time, round robin (order swapped every epoch), waiting until that worker has also loaded
its next batch. A variant's time is the sum of its own steps (forward, loss, backward, optimizer step) and its own
data loading/collation (TRL tokenises and tiles there, the plugin encodes there), measured only while no other
variant computes; tokens/s = real (non-pad) tokens / that time, over all epochs; both see the same samples. The
default is 1 torch thread per worker: this machine is a 2-vCPU VM shared with other jobs, where 2-thread timings
swung by 2-4x between identical runs (a descheduled thread stalls the other at every barrier) while 1-thread
timings repeated within a few percent; `--threads 2` is there for a quiet machine.

Memory: the workers are separate processes, so one variant's allocations cannot raise another's figure. On CPU,
"peak RSS" is the process's `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the high-water mark of its resident memory
(everything: Python, torch, data, model, optimizer state, activations, allocator caches), and "training Δ" is that
peak minus the RSS just before warm-up (model and data built), i.e. what training added. tracemalloc would miss
it: torch does not allocate tensors through Python's allocator. On CUDA the figure is
`torch.cuda.max_memory_allocated()` (tensors only) and the workers run one after the other.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image

SIZES = {
    # 224-px tiles, patch 14 -> 64 image tokens per tile; a 4-layer Qwen2 of width 256.
    "small": dict(
        image_size=224,
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=None),  # None: the tiny tokenizer's vocabulary
    ),
    # InternVL3-1B: InternViT-300M on 448-px tiles (256 tokens per tile) + Qwen2.5-0.5B, random weights.
    "1b": dict(
        image_size=448,
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151674),
    ),
}
VARIANTS = {
    "plugin-packed": "plugin InternVL3Trainer, packed (padding-free)",
    "plugin-padded": "plugin InternVL3Trainer, padded (no packing)",
    "trl-native-padded": "native InternVL + TRL SFTTrainer, padded",
}
WORDS = (
    "the quick brown fox jumps over lazy dog red circle sits left of blue square how many shapes are in image there "
    "three two triangles and one describe picture shows green triangle on white background what colour is yellow "
    "answer question step by count add them frame please thanks hello world"
).split()


# ------------------------------------------------------------------------------------------------------------ data
def skewed_samples(count: int, image_size: int, long_share: float = 0.125, long_words: int = 200, seed: int = 0):
    """`count` samples, deterministic: round(`count` × `long_share`) long ones (a 2x1-tile image + thumbnail and an
    answer of `long_words` words) at random places, the rest short (a one-tile image, a one-line answer).

    Every sample has a short system turn: the default InternVL system prompt is Chinese, which the tiny byte-level
    tokenizer spells in ~180 tokens (the real Qwen2 tokenizer in ~35), and would make every short sample long."""
    from internvl3_hf.data import Sample

    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    long_ones = set(rng.sample(range(count), round(count * long_share)))
    samples = []
    for index in range(count):
        long = index in long_ones
        width = 2 * image_size if long else image_size
        image = PIL.Image.fromarray(pixels.integers(0, 256, (image_size, width, 3), dtype=np.uint8))
        if long:
            question = "Describe the image in detail."
            answer = " ".join(rng.choice(WORDS) for _ in range(long_words)) + "."
        else:
            question = "What colour is the square?"
            answer = f"The square is {rng.choice(['red', 'green', 'blue', 'yellow'])}."
        samples.append(
            Sample(
                messages=[
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "<image>\n" + question},
                    {"role": "assistant", "content": answer},
                ],
                images=[image],
                origin=f"skewed[{index}]",
            )
        )
    return samples


def build_config(size: str, tokenizer):
    from transformers import InternVLVisionConfig, Qwen2Config

    from internvl3_hf import InternVL3Config

    sizes = SIZES[size]
    image_size, patch = sizes["image_size"], 14
    vision = InternVLVisionConfig(
        image_size=image_size, patch_size=patch, attention_bias=True, layer_scale_init_value=0.1, **sizes["vision"]
    )
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = Qwen2Config(
        **{**sizes["text"], "vocab_size": sizes["text"]["vocab_size"] or len(tokenizer)},
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
    )
    return InternVL3Config(
        vision_config=vision,
        text_config=text,
        force_image_size=image_size,
        image_seq_length=(image_size // patch) ** 2 // 4,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_start_token_id=tokenizer.convert_tokens_to_ids("<img>"),
        image_end_token_id=tokenizer.convert_tokens_to_ids("</img>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )


def native_processor(processor, config):
    """transformers' `InternVLProcessor` for `config`, without its video processor (needs torchvision)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor

    from internvl3_hf.formats.hf import save_hf_processor

    class NativeProcessor(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    directory = pathlib.Path(tempfile.mkdtemp(prefix="native-processor-"))
    save_hf_processor(processor, config, directory)  # exactly the files an `-hf` checkpoint ships
    return NativeProcessor(
        GotOcr2ImageProcessorPil.from_pretrained(directory),
        AutoTokenizer.from_pretrained(directory),
        chat_template=(directory / "chat_template.jinja").read_text(),
        image_seq_length=config.image_seq_length,
    )


# ---------------------------------------------------------------------------------------------------------- worker
def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class TokenCounter:
    """Wraps a collator: counts real (non-pad) tokens and row slots of every batch it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0
        self.slots = 0

    def __call__(self, items):
        batch = self.collator(items)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.slots += batch["input_ids"].numel()
        return batch


def build_trainer(variant: str, model, processor, samples, args, output_dir: str, max_steps: int = -1):
    from transformers import TrainingArguments

    common = dict(
        output_dir=output_dir,
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=1e-5,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.dtype == "bfloat16",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    if variant.startswith("plugin"):
        from internvl3_hf.data import SFTCollator, SFTDataset, SupervisedEncoder
        from internvl3_hf.sft import InternVL3Trainer

        packed = variant == "plugin-packed"
        dataset = SFTDataset(
            samples,
            SupervisedEncoder(processor, max_length=None, seed=0),
            max_packed_tokens=args.max_packed_tokens if packed else None,
        )
        collator = TokenCounter(SFTCollator(processor.tokenizer.pad_token_id, padding_free=packed))
        training_args = TrainingArguments(per_device_train_batch_size=1 if packed else args.batch_size, **common)
        trainer = InternVL3Trainer(
            model=model, args=training_args, train_dataset=dataset, data_collator=collator, loss_weighting="square"
        )
        return trainer, collator
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            # TRL inserts the image block itself (before the first user text), as `<image>` did.
            "messages": [
                {"role": message["role"], "content": message["content"].replace("<image>\n", "")}
                for message in sample.messages
            ],
            "images": list(sample.images),
        }
        for sample in samples
    ]
    dataset = datasets.Dataset.from_list(rows)
    config = SFTConfig(per_device_train_batch_size=args.batch_size, max_length=None, **common)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    trainer.data_collator = TokenCounter(trainer.data_collator)
    return trainer, trainer.data_collator


def worker(args) -> None:
    """One variant in this process: set up, warm up, then one epoch per `epoch` line on stdin, one JSON line each on
    the protocol stream; `quit` answers with the process's memory figures."""
    protocol = os.fdopen(os.dup(1), "w")  # fd 1 itself goes to stderr: Trainer and TRL print to stdout
    os.dup2(2, 1)
    import torch
    import transformers
    from transformers import TrainerCallback

    from internvl3_hf import InternVL3ForConditionalGeneration
    from internvl3_hf.formats.hf import to_native_model
    from internvl3_hf.modeling.processing_internvl3 import processor_for_config
    from internvl3_hf.tiny import build_tiny_tokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    variant = args.worker
    tokenizer = build_tiny_tokenizer()
    config = build_config(args.size, tokenizer)
    torch.manual_seed(0)
    model = InternVL3ForConditionalGeneration(config).to(getattr(torch, args.dtype))
    processor = processor_for_config(tokenizer, config)
    if variant == "trl-native-padded":
        model = to_native_model(model)
        processor = native_processor(processor, config)
    model.set_attn_implementation(args.attn)
    model.train()
    samples = skewed_samples(args.samples, SIZES[args.size]["image_size"], long_share=args.long_share,
                             long_words=args.long_words)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
    setup_rss = rss_mib()
    output_dir = tempfile.mkdtemp(prefix=f"bench-{variant}-")

    # Warm-up (lazy initialisation, allocator, optimizer code paths) on a few short samples: one cheap step.
    short = [sample for sample in samples if len(sample.messages[-1]["content"]) < 100][: args.batch_size]
    warmup, _ = build_trainer(variant, model, processor, short, args, output_dir, max_steps=1)
    warmup.train()
    del warmup
    gc.collect()

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Gate(TrainerCallback):
        """Holds every optimizer step until the driver says `go`, and times what runs in between: `fetch` (data
        loading and collation, Trainer bookkeeping) from the previous step's end, and `compute` (forward, loss,
        backward, optimizer step) from `go` to `on_step_end`."""

        def on_train_begin(self, *unused, **kwargs):
            self.fetch = self.compute = self.cpu = 0.0
            self.mark, self.cpu_mark = now(), time.process_time()

        def on_step_begin(self, *unused, **kwargs):
            self.fetch += now() - self.mark
            self.cpu += time.process_time() - self.cpu_mark
            send({"event": "waiting"})
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("driver went away")
            self.mark, self.cpu_mark = now(), time.process_time()

        def on_step_end(self, *unused, **kwargs):
            moment = now()
            self.compute += moment - self.mark
            self.mark = moment

        def on_train_end(self, *unused, **kwargs):
            self.fetch += now() - self.mark
            self.cpu += time.process_time() - self.cpu_mark

    send({"event": "ready"})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        trainer, counter = build_trainer(variant, model, processor, samples, args, output_dir)
        gate = Gate()
        trainer.add_callback(gate)
        trainer.train()
        send({"event": "epoch", "seconds": gate.fetch + gate.compute, "fetch_seconds": gate.fetch, "cpu_seconds": gate.cpu,
              "steps": trainer.state.global_step, "tokens": counter.tokens, "slots": counter.slots})
        del trainer, counter
        gc.collect()
    send({
        "samples": len(samples),
        "setup_rss_mib": setup_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": torch.get_num_threads(),
    })


# ------------------------------------------------------------------------------------------------------------ main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--samples", type=int, default=32, help="samples in the epoch")
    parser.add_argument("--long-share", type=float, default=0.125, help="share of long samples")
    parser.add_argument("--long-words", type=int, default=200, help="answer words of a long sample")
    parser.add_argument("--batch-size", type=int, default=8, help="padded rows per step (padded variants)")
    parser.add_argument("--max-packed-tokens", type=int, default=1024, help="tokens per packed row (plugin)")
    parser.add_argument("--repeats", type=int, default=2, help="epochs per variant (interleaved across variants)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (1: stable timings on a shared 2-vCPU machine, see docstring)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)


class Worker:
    """A `--worker` process for one variant, driven line by line."""

    def __init__(self, variant: str, argv: list[str]):
        self.variant = variant
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, "--worker", variant]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            sys.stderr.write(self.log.read()[-8000:])
            raise SystemExit(f"variant {self.variant} failed (exit {self.process.returncode})")
        return json.loads(line)

    def close(self) -> dict:
        final = self.ask("quit")
        self.process.wait()
        return final


def run_variants(variants: list[str], args, argv: list[str]) -> dict[str, dict]:
    """One worker process per variant (set up side by side, so none waits on another's imports), then `args.repeats`
    epochs per variant, interleaved step by step: one optimizer step of one variant at a time, round robin, the
    order swapping every epoch, each worker having finished loading its next batch before the next one computes.

    On CUDA the workers run one after the other instead (several models on one GPU would skew memory figures)."""
    import torch

    results = {variant: {"epochs": []} for variant in variants}

    def run(workers: dict[str, Worker]) -> None:
        for worker_ in workers.values():
            assert worker_.ask()["event"] == "ready"
        for repeat in range(args.repeats):
            order = [v for v in (variants if repeat % 2 == 0 else variants[::-1]) if v in workers]
            for variant in order:  # one at a time: trainer set-up and first batch
                assert workers[variant].ask("epoch")["event"] == "waiting"
            active = list(order)
            while active:
                for variant in list(active):
                    message = workers[variant].ask("go")
                    if message["event"] == "epoch":
                        results[variant]["epochs"].append(message)
                        active.remove(variant)
                        print(f"  {variant}: epoch {repeat + 1} {message['seconds']:.1f} s", file=sys.stderr, flush=True)
        for variant, worker_ in workers.items():
            results[variant].update(worker_.close())

    if torch.cuda.is_available():
        for variant in variants:
            run({variant: Worker(variant, argv)})
    else:
        run({variant: Worker(variant, argv) for variant in variants})
    return results


def machine_lines(args) -> list[str]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} CPUs"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return [
        f"# {device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"Python {platform.python_version()}; {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
        f"load average at the end {load}",
    ]


def print_table(results: dict[str, dict], args, title: str, baseline: str) -> dict[str, float]:
    """Print the markdown table; returns each variant's tokens/s over all its epochs."""
    first = next(iter(results.values()))
    print(f"# {title} — {args.size} config, {args.dtype}, {args.attn}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {first['threads']} torch thread(s) "
          f"per worker")
    long = round(first["samples"] * args.long_share)
    print(f"# data: {first['samples']} samples, {long} long (3-tile image, {args.long_words}-word answer), "
          f"{first['samples'] - long} short (1-tile image, one-line answer); padded: {args.batch_size} rows per step; "
          f"packed: rows of ≤ {args.max_packed_tokens} tokens; {args.repeats} epoch(s) per variant, interleaved step "
          f"by step; tokens/s over all epochs (per-epoch min-max)")
    for line in machine_lines(args):
        print(line)
    print()
    cuda = first["cuda_peak_mib"] is not None
    memory = "peak CUDA MiB |" if cuda else "peak RSS MiB | training Δ RSS MiB |"
    print(f"| variant | steps/epoch | real tokens/epoch | pad share | epoch s | tokens/s | vs {baseline} | {memory}")
    print(f"|---|---|---|---|---|---|---|---|{'' if cuda else '---|'}")
    speed = {
        variant: sum(e["tokens"] for e in result["epochs"]) / sum(e["seconds"] for e in result["epochs"])
        for variant, result in results.items()
    }
    for variant, result in results.items():
        epochs = result["epochs"]
        epoch = epochs[0]
        seconds = [e["seconds"] for e in epochs]
        rates = [e["tokens"] / e["seconds"] for e in epochs]
        spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
        cells = [VARIANTS[variant], str(epoch["steps"]), f"{epoch['tokens']:,}", f"{1 - epoch['tokens'] / epoch['slots']:.0%}",
                 f"{statistics.median(seconds):.1f}", f"{speed[variant]:,.0f}{spread}",
                 f"{speed[variant] / speed[baseline]:.2f}x"]
        if cuda:
            cells.append(f"{result['cuda_peak_mib']:,.0f}")
        else:
            cells += [f"{result['peak_rss_mib']:,.0f}", f"{result['peak_rss_mib'] - result['setup_rss_mib']:,.0f}"]
        print("| " + " | ".join(cells) + " |")
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    argv = sys.argv[1:]
    results = run_variants(["plugin-packed", "trl-native-padded"], args, argv)
    print_table(results, args, "SFT train step: plugin (packed) vs native InternVL + TRL SFTTrainer (padded)",
                "trl-native-padded")
    print("\ntokens/s = real (non-pad) tokens of the epoch / epoch seconds; pad share = pad slots / all slots.")


if __name__ == "__main__":
    main()
