"""`internvl3-hf` command line: a thin face over the package's public functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> None:
    from .formats.convert import convert, detect_format

    source_format = detect_format(args.source)
    destination = convert(args.source, args.destination, args.to)
    print(f"converted {args.source} ({source_format}) -> {destination} ({args.to})")


def _chat(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .chat import ChatSession

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    session = ChatSession(model, processor, system=args.system)
    settings = {"stream": True, "max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.question:
        session.ask(args.question, args.image, **settings)
    if not args.interactive:
        return
    images = [] if args.question else args.image
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if question in ("", "exit", "quit"):
            break
        session.ask(question, images, **settings)
        images = []


def _merge_lora(args: argparse.Namespace) -> None:
    from .hub import merge_lora

    print(f"merged into {merge_lora(args.adapter, args.output, args.base)}")


def _train(args: argparse.Namespace) -> None:
    from .train import load_recipe, run_training

    trainer = run_training(load_recipe(args.config, args.set), resume_from_checkpoint=args.resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        print(f"trained {trainer.state.global_step} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"saved to {trainer.args.output_dir}")


def _demo(args: argparse.Namespace) -> None:
    if args.chat_only:
        from .demo_chat import run_demo

        run_demo(args.output, max_new_tokens=args.max_new_tokens)
        return
    from .demo import run_recipe

    run_recipe(args.output, fast=args.fast, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl3-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a checkpoint between plugin, official and -hf formats")
    convert.add_argument("source", help="checkpoint directory in any supported format")
    convert.add_argument("destination", help="output directory")
    convert.add_argument("--to", choices=("plugin", "official", "hf"), default="plugin")
    convert.set_defaults(func=_convert)

    chat = commands.add_parser("chat", help="ask a question about images with a local checkpoint")
    chat.add_argument("--model", required=True, help="checkpoint directory (plugin or official format)")
    chat.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--system", help="system message (default: the template's)")
    chat.add_argument("--interactive", action="store_true", help="keep asking follow-up questions (multi-turn)")
    chat.add_argument("question", nargs="?", help="first question (optional with --interactive)")
    chat.set_defaults(func=_chat)

    merge = commands.add_parser("merge-lora", help="merge a LoRA adapter into its base and save a full checkpoint")
    merge.add_argument("adapter", help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("output", help="output directory")
    merge.add_argument("--base", help="base checkpoint (default: the adapter config's base_model_name_or_path)")
    merge.set_defaults(func=_merge_lora)

    train = commands.add_parser("train", help="SFT / native pre-training from a YAML recipe (see recipes/)")
    train.add_argument("--config", required=True, help="recipe YAML")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    train.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the last (or a given) checkpoint")
    train.set_defaults(func=_train)

    demo = commands.add_parser(
        "demo", help="the InternVL3 recipe end to end on a tiny model: pre-training, SFT, MPO, Best-of-N (CPU, minutes)"
    )
    demo.add_argument("--output", default="demo_out", help="where the checkpoints, the table and the PNG are written")
    demo.add_argument("--fast", action="store_true", help="a smaller run (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--chat-only", action="store_true",
                      help="only build a random tiny checkpoint and chat with it about an image (seconds)")
    demo.add_argument("--max-new-tokens", type=int, default=12, help="with --chat-only: tokens to generate")
    demo.set_defaults(func=_demo)

    from .best_of_n.cli import add_bon_parser

    add_bon_parser(commands)

    from .mpo.cli import add_mpo_parser

    add_mpo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
