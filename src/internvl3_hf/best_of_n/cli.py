"""`internvl3-hf bon`: Best-of-N answers with a VisualPRM critic, for one question or a JSONL file of them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError, open_image, require_checkpoint
from .prm import AGGREGATIONS, SCORING_MODES
from .search import STRATEGIES, BestOfNResult


def add_bon_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `bon` subcommand on the `internvl3-hf` command line."""
    bon = subparsers.add_parser(
        "bon",
        help="sample N answers and keep the one a VisualPRM critic scores best",
        description="Best-of-N with a process-reward critic. Give a question (with --image), or --input "
        "questions.jsonl with one {\"question\": ..., \"image\": path or [paths]} object per line (image paths "
        "relative to the file).",
    )
    bon.add_argument("--model", required=True, help="policy checkpoint directory (plugin or official format)")
    bon.add_argument("--critic", help="VisualPRM checkpoint directory (not needed for --strategy majority)")
    bon.add_argument("--image", action="append", default=[], help="image file for the question; repeat for several")
    bon.add_argument("question", nargs="?", help="the question (or use --input)")
    bon.add_argument("--input", type=Path, help="JSONL file of questions")
    bon.add_argument("--output", type=Path, help="JSONL file for the --input results (default: stdout)")
    bon.add_argument("-n", "--num-candidates", type=int, default=8, help="candidates per question (default 8)")
    bon.add_argument("--strategy", choices=STRATEGIES, default="prm")
    bon.add_argument("--aggregation", choices=sorted(AGGREGATIONS), default="mean", help="step scores -> answer score")
    bon.add_argument("--scoring", choices=SCORING_MODES, default="single_forward", help="critic forward passes")
    bon.add_argument(
        "--max-steps", type=int, default=0,
        help="merge each answer into at most this many steps; 0 (default): no merging, as the official scoring",
    )  # fmt: skip
    bon.add_argument("--max-new-tokens", type=int, default=1024)
    bon.add_argument("--temperature", type=float, default=1.0)
    bon.add_argument("--top-p", type=float, default=1.0)
    bon.add_argument("--batch-size", type=int, default=4, help="questions per generate call (--input)")
    bon.add_argument("--critic-batch-size", type=int, default=8, help="candidate conversations per critic pass")
    bon.add_argument("--seed", type=int, help="sampling seed")
    bon.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bon.set_defaults(func=run_bon)
    return bon


def _check_arguments(args: argparse.Namespace) -> None:
    if (args.question is None) == (args.input is None):
        raise UserError("bon: give either a question or --input FILE.jsonl, not both and not neither.")
    if args.input is not None and args.image:
        raise UserError("bon: with --input, images come from each line's \"image\" field, not --image.")
    if args.strategy != "majority" and not args.critic:
        raise UserError(f"bon: --strategy {args.strategy} needs --critic (a VisualPRM checkpoint).")
    for name in ("num_candidates", "batch_size", "critic_batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"bon: --{name.replace('_', '-')} must be at least 1.")
    if args.max_steps < 0:
        raise UserError("bon: --max-steps must be 0 (no merging) or positive.")
    require_checkpoint(args.model, "--model")
    if args.strategy != "majority":
        require_checkpoint(args.critic, "--critic")


def _load(path: str, device: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def _read_questions(path: Path) -> list[dict]:
    """JSONL records, each with a `question`; relative image paths are resolved against the file's folder, and
    every image must exist (it is decoded when its batch comes)."""
    if not path.is_file():
        raise UserError(f"bon: --input {str(path)!r} does not exist.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"bon: {path}:{number} is not valid JSON ({error}).") from error
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise UserError(f"bon: {path}:{number} is not a JSON object with a string \"question\".")
            images = record.get("image") or []
            images = [images] if isinstance(images, str) else images
            record["_images"] = [str(path.parent / image) for image in images]
            record["_origin"] = f"bon: {path}:{number}: "
            for image in record["_images"]:
                if not Path(image).is_file():
                    raise UserError(f"{record['_origin']}image file {image!r} does not exist.")
            records.append(record)
    return records


def format_result(result: BestOfNResult) -> str:
    """Human-readable candidates, their step scores and the choice."""
    lines = []
    for index, candidate in enumerate(result.candidates):
        flags = "".join(f" [{flag}]" for flag in ("truncated", "empty") if getattr(candidate, flag))
        score = "" if candidate.score is None else f"  score {candidate.score:.4f}"
        lines.append(f"candidate {index + 1}/{len(result.candidates)}{score}{flags}  answer: {candidate.answer}")
        for number, (step, step_score) in enumerate(zip(candidate.steps, candidate.step_scores), start=1):
            text = step.replace("\n", "\n" + " " * 16)
            lines.append(f"  step {number:>2} {step_score:.4f}  {text}")
        if not candidate.steps:
            lines.append("  " + candidate.text.replace("\n", "\n  "))
    lines.append(f"choice: candidate {result.best_index + 1} ({result.strategy})")
    lines.append(result.best.text)
    return "\n".join(lines)


def run_bon(args: argparse.Namespace) -> None:
    """Load the policy (and critic), answer the question(s) and print or write the results."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from .prm import VisualPRM
    from .search import best_of_n

    _check_arguments(args)
    # Fail on a bad file or image before loading a model.
    records = _read_questions(args.input) if args.input is not None else None
    images = [open_image(path, "bon: --image: ") for path in args.image]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.seed is not None:
        set_seed(args.seed)
    model, processor = _load(args.model, device)
    critic = None
    if args.strategy != "majority":
        critic_model, critic_processor = _load(args.critic, device)
        critic = VisualPRM(
            critic_model,
            critic_processor,
            max_steps=args.max_steps or None,
            aggregation=args.aggregation,
            batch_size=args.critic_batch_size,
            mode=args.scoring,
        )
    settings = dict(
        n=args.num_candidates,
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if records is None:
        print(format_result(best_of_n(model, processor, critic, images, args.question, **settings)))
        return

    output = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        with tqdm(total=len(records), desc="best-of-n", unit="question", file=sys.stderr) as progress:
            for start in range(0, len(records), args.batch_size):
                batch = records[start : start + args.batch_size]
                questions = [record["question"] for record in batch]
                images = [[open_image(image, record["_origin"]) for image in record["_images"]] for record in batch]
                results = best_of_n(model, processor, critic, images, questions, **settings)
                for record, result in zip(batch, results):
                    record.pop("_images")
                    record.pop("_origin")
                    output.write(json.dumps({**record, **result.to_dict()}, ensure_ascii=False) + "\n")
                output.flush()
                progress.update(len(batch))
    finally:
        if args.output:
            output.close()


__all__ = ["add_bon_parser", "format_result", "run_bon"]
