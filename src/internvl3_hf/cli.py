"""`internvl3-hf` command line: a thin face over the package's public functions.

Bad input (a missing or corrupt image, a missing recipe, an unknown recipe key, a checkpoint path that does not
exist, an unusable sample) is reported on one line, `internvl3-hf: error: ...`, with exit status 2; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import UserError

DEBUG_HELP = "on an input error, show the traceback instead of one line"


def _convert(args: argparse.Namespace) -> None:
    from .errors import require_checkpoint
    from .formats.convert import convert, detect_format

    require_checkpoint(args.source, "source")
    source_format = detect_format(args.source)
    destination = convert(args.source, args.destination, args.to)
    print(f"converted {args.source} ({source_format}) -> {destination} ({args.to})")


def _chat(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .chat import ChatSession
    from .errors import open_image, require_checkpoint

    require_checkpoint(args.model, "--model")
    images = [open_image(path, "--image: ") for path in args.image]  # a bad file fails before the model loads
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    session = ChatSession(model, processor, system=args.system)
    settings = {"stream": True, "max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.question:
        session.ask(args.question, images, **settings)
    if not args.interactive:
        return
    images = [] if args.question else images
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
    from .recipes import load_recipe
    from .train import run_training

    trainer = run_training(load_recipe(args.config, args.set), resume_from_checkpoint=args.resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        print(f"trained {trainer.state.global_step} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"saved to {trainer.args.output_dir}")


def _demo(args: argparse.Namespace) -> None:
    if args.chat_only:
        from .demo.chat import run_demo

        run_demo(args.output, max_new_tokens=args.max_new_tokens)
        return
    from .demo import run_recipe

    run_recipe(args.output, fast=args.fast, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl3-hf", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    for command in commands.choices.values():  # `--debug` after the command as well as before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; an expected error (bad input: `UserError`, `DataError`) is reported on one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as error:
        if args.debug or not is_expected_error(error):
            raise
        print(f"internvl3-hf: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def is_expected_error(error: BaseException) -> bool:
    """Bad input the user can fix, as opposed to a bug: its message is the whole report."""
    from .data import DataError  # only on the error path: the data package imports torch

    return isinstance(error, (UserError, DataError))


if __name__ == "__main__":
    sys.exit(main())
