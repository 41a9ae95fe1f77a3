"""Best-of-N test-time scaling: sample N answers in one batched `generate`, keep the one a critic likes best.

Strategies, all through the same call so they can be compared on the same data:

- `prm` (default): VisualPRM step scores, aggregated per answer (mean by default), arg-max.
- `orm`: the same critic scoring each whole answer as one step (outcome reward).
- `prm_vote`: weighted Best-of-N ("best-of-N weighted", Snell et al. 2024): the critic scores of the candidates
  that reach the same final answer are summed, the answer with the largest total wins, and its best-scored
  candidate is returned. It degrades to the majority vote when the critic cannot tell answers apart, where `prm`
  degrades to a pick among the distinct answers.
- `majority`: majority vote over the answers an extractor pulls out of the candidates (no critic needed).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from ..chat import build_messages
from .critic import Critic
from .prm import as_image_list, check_critic_text, row_positions

STRATEGIES = ("prm", "orm", "prm_vote", "majority")

_ANSWER_TRIGGERS = re.compile(r"(?:final answer|answer|答案)\s*[:：]", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- answers and votes
def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced (the official `extract_answer_from_box`)."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a reasoning response, or `None` when it states none.

    The last `\\boxed{...}` wins; otherwise the first line after the last `Final answer:` / `Answer:` / `答案:`
    (the formats of the official reasoning prompts).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    triggers = list(_ANSWER_TRIGGERS.finditer(text))
    if not triggers:
        return None
    lines = text[triggers[-1].end() :].strip().splitlines()
    if not lines:
        return None
    return lines[0].strip() or None


def normalize_answer(answer: str) -> str:
    """Answers that differ only in case, surrounding whitespace, `**` emphasis or a final period vote together."""
    return " ".join(answer.strip().strip("*").strip().rstrip(".").split()).casefold()


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the first candidate holding the most common (normalised) answer; ties go to the answer seen
    first; `None` when no candidate has an answer."""
    keys = [normalize_answer(answer) if answer else None for answer in answers]
    counts = Counter(key for key in keys if key)
    if not counts:
        return None
    top = max(counts.values())
    winner = next(key for key in keys if key and counts[key] == top)
    return keys.index(winner)


# --------------------------------------------------------------------------------------------- results
@dataclass
class Candidate:
    """One sampled answer: its text, how generation ended, and what the selection saw in it."""

    text: str
    num_tokens: int
    truncated: bool  # generation hit the token limit before the end-of-turn token
    answer: str | None = None
    steps: list[str] = field(default_factory=list)
    step_scores: list[float] = field(default_factory=list)
    score: float | None = None  # critic score; -inf for empty candidates; None under majority vote

    @property
    def empty(self) -> bool:
        return not self.text


@dataclass
class BestOfNResult:
    """All candidates of one question and the index of the chosen one."""

    question: str
    candidates: list[Candidate]
    best_index: int
    strategy: str

    @property
    def best(self) -> Candidate:
        return self.candidates[self.best_index]

    def to_dict(self) -> dict:
        """JSON-ready: `best_index`, `response`, `strategy` and every candidate (with `empty`; the -inf score of an
        empty candidate becomes `None`, as strict JSON has no infinity)."""
        candidates = [
            {**asdict(c), "score": c.score if c.score is None or math.isfinite(c.score) else None, "empty": c.empty}
            for c in self.candidates
        ]
        return {
            "question": self.question,
            "response": self.best.text,
            "best_index": self.best_index,
            "strategy": self.strategy,
            "candidates": candidates,
        }


def select_best(candidates: Sequence[Candidate], strategy: str) -> int:
    """Index of the chosen candidate: highest critic score (`prm`/`orm`), best candidate of the answer with the
    largest summed score (`prm_vote`) or the majority answer (`majority`).

    Ties go to the earlier candidate (for `prm_vote`: to the answer seen first). Empty candidates are only chosen when every candidate is empty; a majority
    vote with no extractable answer falls back to the first non-empty candidate.
    """
    if len(candidates) == 0:
        raise ValueError("Cannot select from an empty candidate list.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    first_non_empty = next((index for index, candidate in enumerate(candidates) if not candidate.empty), 0)
    if strategy == "majority":
        voted = majority_vote([candidate.answer for candidate in candidates])
        return first_non_empty if voted is None else voted
    scores = [candidate.score for candidate in candidates]
    if any(score is None for score in scores):
        raise ValueError(f"Strategy {strategy!r} needs a critic score on every candidate.")
    if strategy == "prm_vote":
        return _weighted_vote(candidates)
    return max(range(len(candidates)), key=lambda index: (scores[index], -index))


def _weighted_vote(candidates: Sequence[Candidate]) -> int:
    """`prm_vote`: sum the scores per normalised answer (a candidate without an answer stands alone), pick the
    answer with the largest total, return its best-scored candidate. Empty candidates (score -inf) take no part."""
    keys = {
        index: normalize_answer(candidate.answer) if candidate.answer else ("no answer", index)
        for index, candidate in enumerate(candidates)
        if not candidate.empty
    }
    if not keys:
        return 0
    totals: dict[object, float] = {}
    for index, key in keys.items():
        totals[key] = totals.get(key, 0.0) + candidates[index].score
    winner = max(totals, key=lambda key: totals[key])  # dicts keep first-seen order: ties go to the earlier answer
    members = [index for index, key in keys.items() if key == winner]
    return max(members, key=lambda index: (candidates[index].score, -index))


# --------------------------------------------------------------------------------------------- generation
def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")


def _eos_ids(model, generate_kwargs: dict) -> set[int]:
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    if eos is None:
        eos = model.config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


@torch.inference_mode()
def generate_candidates(
    model,
    processor,
    questions: Sequence[str],
    images: Sequence,
    n: int,
    *,
    system: str | None = None,
    do_sample: bool = True,
    shared_prefill: bool = True,
    **generate_kwargs,
) -> list[list[Candidate]]:
    """Sample `n` answers per question in one batched `generate` (`generate_with_shared_prefill`).

    Each question's images are tiled once and its prompt (image tokens included) is prefilled once; the `n`
    samples decode from copies of that cache. The policy's V2PE setting and attention backend apply as in any
    `generate` call. `shared_prefill=False` calls `generate(num_return_sequences=n)` instead, which prefills every
    prompt `n` times (same candidates; kept for comparisons).
    """
    _check_n(n)
    if len(questions) != len(images):
        raise ValueError(f"Got {len(questions)} questions but {len(images)} image entries; give one per question.")
    for question in questions:
        check_critic_text(question, "question")  # the critic reads the same question
    image_lists = [as_image_list(entry) for entry in images]
    prompts = [
        processor.apply_chat_template(build_messages(question, len(entry), system), add_generation_prompt=True)
        for question, entry in zip(questions, image_lists)
    ]
    inputs = processor(
        text=prompts, images=image_lists if any(image_lists) else None, padding=True, return_tensors="pt"
    ).to(model.device)
    if shared_prefill:
        output = generate_with_shared_prefill(model, inputs, n, do_sample=do_sample, **generate_kwargs)
    else:
        output = model.generate(**inputs, num_return_sequences=n, do_sample=do_sample, **generate_kwargs)
    eos_ids = _eos_ids(model, generate_kwargs)
    candidates = [
        _decode_candidate(processor, row, eos_ids) for row in output[:, inputs["input_ids"].shape[1] :].tolist()
    ]
    return [candidates[start : start + n] for start in range(0, len(candidates), n)]


def generate_with_shared_prefill(model, inputs: Mapping[str, torch.Tensor], n: int, **generate_kwargs):
    """`model.generate(**inputs, num_return_sequences=n, **generate_kwargs)`, with each prompt prefilled once.

    `generate` expands its inputs `n` times before the prefill, so every prompt, with its thousands of image tokens
    and its vision pass, would run `n` times. Here one forward fills a KV cache with all but the last token of each
    prompt (the vision tower runs once per question), the cache rows are repeated `n` times
    (`Cache.batch_repeat_interleave`), and `generate` continues from it: its first step runs the prompts' last
    token on each copy, then samples as usual (processors, stopping criteria, streamers and all). Positions are
    those `generate` gives the whole prompt (under V2PE the model's rotary positions, which the prefill takes
    from the same computation), so every step's logits equal those of the `num_return_sequences` path up to float
    rounding. Returns what `generate` returns, rows in the same order (each prompt's `n` samples together).
    """
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if n == 1 or input_ids.shape[1] < 2:
        return model.generate(**inputs, num_return_sequences=n, **generate_kwargs)
    prefix = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    position_ids, rope_position_ids = row_positions(model, input_ids, attention_mask)
    if model.config.v2pe_mode != "none":  # without V2PE the prefill keeps transformers' own rotary path
        prefix["rope_position_ids"] = rope_position_ids[:, :-1]
    cache = DynamicCache(config=model.config.get_text_config())
    model(
        input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
        past_key_values=cache, use_cache=True, logits_to_keep=1, **prefix,
    )  # fmt: skip
    cache.batch_repeat_interleave(n)
    return model.generate(
        input_ids=input_ids.repeat_interleave(n, dim=0),
        attention_mask=attention_mask.repeat_interleave(n, dim=0),
        past_key_values=cache,
        **generate_kwargs,
    )


def _decode_candidate(processor, tokens: list[int], eos_ids: set[int]) -> Candidate:
    """Text up to the first end-of-turn token; without one, generation hit its token limit."""
    end = next((index for index, token in enumerate(tokens) if token in eos_ids), None)
    kept = tokens if end is None else tokens[:end]
    text = processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Candidate(text=text, num_tokens=len(kept), truncated=end is None)


# --------------------------------------------------------------------------------------------- best of N
def _questions_and_images(question: str | Sequence[str], images) -> tuple[list[str], list[list]]:
    if isinstance(question, str):
        return [question], [as_image_list(images)]
    questions = list(question)
    per_question = [None] * len(questions) if images is None else list(images)
    if len(per_question) != len(questions):
        raise ValueError(
            f"Got {len(questions)} questions but {len(per_question)} image entries; with a list of questions give "
            "one entry per question (an image, a list of images, or None)."
        )
    return questions, [as_image_list(entry) for entry in per_question]


def best_of_n(
    model,
    processor,
    critic: Critic | None,
    images,
    question: str | Sequence[str],
    n: int = 8,
    *,
    strategy: str = "prm",
    answer_extractor: Callable[[str], str | None] = extract_answer,
    system: str | None = None,
    max_new_tokens: int = 1024,
    do_sample: bool = True,
    **generate_kwargs,
) -> BestOfNResult | list[BestOfNResult]:
    """Answer `question` about `images` N times with `model` and keep the best answer.

    Args:
        model: The policy, an `InternVL3ForConditionalGeneration`.
        processor: Its `InternVL3Processor`.
        critic: A `Critic` such as `VisualPRM` or `ImplicitPRM` (needed by `prm` and `orm`; may be `None` for
            `majority`).
        images: The question's image(s) (PIL images or paths; `None` for text only). With a list of questions,
            one entry per question.
        question: A question, or a list of questions answered in one batched `generate`.
        n: Candidates per question.
        strategy: `prm` (step scores, aggregated by the critic's `aggregation`), `orm` (whole-answer score),
            `prm_vote` (`prm` scores summed per extracted answer: weighted Best-of-N) or `majority` (majority vote
            over `answer_extractor`).
        answer_extractor: Pulls the final answer out of a candidate (stored on every candidate; votes use it).
        system: System message for the policy (the template default when `None`).
        max_new_tokens, do_sample, **generate_kwargs: Passed to `generate` (`temperature`, `top_p`, ...).

    Returns:
        A `BestOfNResult` (a list of them for a list of questions) with every candidate, its steps, step scores,
        score, extracted answer and `truncated` / `empty` flags. Empty candidates are not sent to the critic
        (score -inf).
    """
    _check_n(n)
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    if strategy != "majority" and critic is None:
        raise ValueError(f"Strategy {strategy!r} needs a critic (a VisualPRM); only 'majority' works without one.")
    questions, image_lists = _questions_and_images(question, images)
    if not questions:
        raise ValueError("No questions given.")
    candidates = generate_candidates(
        model, processor, questions, image_lists, n, system=system,
        max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs,
    )  # fmt: skip
    for candidate in (candidate for group in candidates for candidate in group):
        candidate.answer = answer_extractor(candidate.text)
    if strategy != "majority":
        _score_candidates(critic, questions, image_lists, candidates, orm=strategy == "orm")
    results = [
        BestOfNResult(text, group, select_best(group, strategy), strategy) for text, group in zip(questions, candidates)
    ]
    return results[0] if isinstance(question, str) else results


def _score_candidates(
    critic: Critic, questions: list[str], image_lists: list[list], candidates: list[list[Candidate]], orm: bool
) -> None:
    """Fill steps, step scores and scores in place; one critic call for every non-empty candidate of every question."""
    for group in candidates:
        for candidate in group:
            if candidate.empty:
                candidate.score = float("-inf")
    scored = [index for index, group in enumerate(candidates) if any(not candidate.empty for candidate in group)]
    if not scored:
        return
    responses = [[candidate.text for candidate in candidates[index] if not candidate.empty] for index in scored]
    scores = critic.score_many([questions[i] for i in scored], responses, [image_lists[i] for i in scored], orm=orm)
    for index, question_scores in zip(scored, scores):
        for candidate, score in zip((c for c in candidates[index] if not c.empty), question_scores):
            candidate.steps, candidate.step_scores, candidate.score = score.steps, score.step_scores, score.score


__all__ = [
    "BestOfNResult",
    "Candidate",
    "STRATEGIES",
    "best_of_n",
    "extract_answer",
    "generate_candidates",
    "generate_with_shared_prefill",
    "majority_vote",
    "normalize_answer",
    "select_best",
]
