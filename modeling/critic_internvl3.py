# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""Process-reward scoring (VisualPRM) on the plugin model, and the official `select_best_response` API.

Self-contained (torch/transformers and sibling files only): copied into checkpoints for `trust_remote_code`, so a
critic checkpoint answers VLMEvalKit's Best-of-N call without the package. `internvl3_hf.best_of_n.VisualPRM`
builds its conversations and reads its scores with the functions here.

The critic reads the multi-turn conversation the VisualPRM data pipeline trains on
(`internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py`):

    system:    PRM_SYSTEM_PROMPT
    user:      ### Question:\\n{question, with its <image> placeholders}\\n\\n### Solution Process:\\n{step 1}
    assistant: +
    user:      {step 2}
    assistant: +
    ...

A step's score is P(`+`) renormalised over {`+`, `-`} where the assistant answers that step, every earlier answer
teacher-forced to `+`; a response's score is the mean of its step scores (VisualPRM's `InternVLRewardModel`).
"""

import math
from collections.abc import Callable, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .chat_internvl3 import check_num_patches_list, with_image_placeholder
from .chat_template import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_START_TOKEN,
)

# Verbatim `PRM_SYSTEM_PROMPT` of `internvl_chat/tools/reasoning_data_pipeline/utils/constants.py`.
PRM_SYSTEM_PROMPT = """\
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide a \
problem statement followed by the first step of the solution process. For each subsequent turn, I will give you a \
new step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process."""

STEP_SEPARATOR = "\n\n"
GOOD, BAD = "+", "-"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
# `select_best_response(version=...)`: the official soft versions. `soft` (one pass per step) and `soft_v2` (one
# pass for all steps) read the same logits; `orm_soft` scores the whole response as one step.
SOFT_VERSIONS = ("soft", "soft_v2", "orm_soft")

AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": lambda scores: sum(scores) / len(scores),  # VisualPRM's `generate_overall_score` for soft scores
    "min": min,
    "last": lambda scores: scores[-1],
    "product": math.prod,
}


# --------------------------------------------------------------------------------------------- steps
def check_max_steps(max_steps: int | None) -> None:
    if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None (no merging), got {max_steps!r}.")


def split_steps(response: str, max_steps: int | None = None, separator: str = STEP_SEPARATOR) -> list[str]:
    """Split a response into reasoning steps with the official VisualPRM rule (`split_response`).

    Steps are the pieces between `separator` (a blank line). `None` (the official scoring default) keeps every
    piece; with more than `max_steps` pieces, consecutive pieces are merged in groups of ceil(n / max_steps),
    re-joined with the separator (13 pieces and max_steps=12 give 7 steps of 2). Nothing is stripped: a trailing
    blank line leaves an empty last step, as in VisualPRM training.
    """
    check_max_steps(max_steps)
    if not separator:
        raise ValueError("The step separator must be a non-empty string.")
    pieces = response.split(separator)
    if max_steps is None:
        return pieces
    group = math.ceil(len(pieces) / max_steps)
    return [separator.join(pieces[start : start + group]) for start in range(0, len(pieces), group)]


# --------------------------------------------------------------------------------------------- prompt
def critic_messages(question: str | list[dict], steps: Sequence[str]) -> list[dict]:
    """The critic conversation: PRM system prompt, one user turn per step, each answered with `+`.

    `question` is text (its `<image>` placeholders stay where they are) or chat content items (images render
    where they stand); it follows `### Question:\\n` in the first user turn.
    """
    if len(steps) == 0:
        raise ValueError("A response needs at least one step.")
    items = [{"type": "text", "text": question}] if isinstance(question, str) else list(question)
    first = [{"type": "text", "text": "### Question:\n"}, *items]
    first.append({"type": "text", "text": f"\n\n### Solution Process:\n{steps[0]}"})
    messages = [{"role": "system", "content": PRM_SYSTEM_PROMPT}, {"role": "user", "content": first}]
    for index, step in enumerate(steps):
        if index > 0:
            messages.append({"role": "user", "content": step})
        messages.append({"role": "assistant", "content": GOOD})
    return messages


def render_critic_prompt(tokenizer, question: str | list[dict], steps: Sequence[str]) -> str:
    """The critic conversation rendered with the official `internvl2_5` template."""
    return tokenizer.apply_chat_template(critic_messages(question, steps), chat_template=CHAT_TEMPLATE, tokenize=False)


def expand_image_placeholders(text: str, tiles_per_image: Sequence[int], image_span: Callable[[int], str]) -> str:
    """Replace the first `<image>` placeholders, in order, by each image's `<img>…</img>` span (later ones, e.g.
    inside a response, stay text, as in the official `query.replace('<image>', span, 1)` loop)."""
    pieces = text.split(IMAGE_PLACEHOLDER, len(tiles_per_image))
    if len(pieces) != len(tiles_per_image) + 1:
        raise ValueError(
            f"The prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(tiles_per_image)} images."
        )
    spans = [image_span(int(tiles)) for tiles in tiles_per_image]
    return "".join(piece + span for piece, span in zip(pieces, spans)) + pieces[-1]


# --------------------------------------------------------------------------------------------- reading scores
def single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"The critic tokenizer splits {text!r} into {len(ids)} tokens; VisualPRM needs one token.")
    return ids[0]


class AnswerReader:
    """Where, in a tokenized critic conversation, each step's `+`/`-` answer is predicted, and its P(`+`).

    Each answer turn is `<|im_start|>assistant\\n` `+` `<|im_end|>`; the logits that predict `+` sit on the last
    header token (official `find_placeholder_idx`).
    """

    def __init__(self, tokenizer):
        self.good_id = single_token_id(tokenizer, GOOD)
        self.bad_id = single_token_id(tokenizer, BAD)
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.pattern = self.header + [self.good_id, single_token_id(tokenizer, END_OF_TURN)]
        if tokenizer.encode(ASSISTANT_HEADER + GOOD + END_OF_TURN, add_special_tokens=False) != self.pattern:
            raise ValueError("The critic tokenizer merges the assistant header with `+`: not an InternVL3 tokenizer.")

    def read_positions(self, input_ids: Sequence[int]) -> list[int]:
        """Positions whose logits predict each step's answer."""
        first, width = self.pattern[0], len(self.pattern)
        return [
            start + len(self.header) - 1
            for start, token in enumerate(input_ids)
            if token == first and list(input_ids[start : start + width]) == self.pattern
        ]

    def good_probability(self, hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        """P(`+`) renormalised over {`+`, `-`} from final hidden states `(n, hidden)` and the LM head. A plain linear
        head computes only its `+` and `-` rows: the rest of the vocabulary would be thrown away."""
        ids = [self.good_id, self.bad_id]
        if type(head) is torch.nn.Linear:  # subclasses (quantized layers) may store their weight otherwise
            logits = torch.nn.functional.linear(hidden, head.weight[ids], None if head.bias is None else head.bias[ids])
        else:
            logits = head(hidden)[:, ids]
        return logits.float().softmax(-1)[:, 0]


def aggregate_step_scores(step_scores: Sequence[float], method: str = "mean") -> float:
    """One response score from its step scores: `mean` (official), `min`, `last` or `product`."""
    if method not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {method!r}; choose one of {sorted(AGGREGATIONS)}.")
    if len(step_scores) == 0:
        raise ValueError("Cannot aggregate an empty list of step scores.")
    return float(AGGREGATIONS[method](list(step_scores)))


# --------------------------------------------------------------------------------------------- official API
class InternVLCriticMixin:
    """`select_best_response`: the Best-of-N API of OpenGVLab's VisualPRM (`InternVLRewardModel`), for a model
    with `get_image_features`, `model(..., mm_encoder_outputs=...)` and an LM head."""

    @torch.inference_mode()
    def select_best_response(
        self,
        tokenizer,
        question: str,
        response_list: Sequence[str],
        pixel_values: torch.Tensor | None,
        num_patches_list: list[int] | None = None,
        max_steps: int | None = None,
        return_scores: bool = False,
        version: str = "soft_v2",
        IMG_START_TOKEN: str = IMAGE_START_TOKEN,
        IMG_END_TOKEN: str = IMAGE_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMAGE_CONTEXT_TOKEN,
        verbose: bool = False,
    ) -> list[str] | list[tuple[str, float]]:
        """The responses sorted by critic score, best first (ties keep their order); `(response, score)` pairs
        with `return_scores`. `question` may hold `<image>` placeholders; with images and none, `<image>\\n` is
        prepended. Steps are split on blank lines (merged into at most `max_steps` when given); a response's
        score is the mean over its steps of P(`+`)."""
        if version not in SOFT_VERSIONS:
            raise ValueError(
                f"Unsupported version {version!r}: this critic scores with the soft versions {SOFT_VERSIONS} "
                "(P('+') per step, averaged); greedy 'hard' labels are not implemented."
            )
        if isinstance(response_list, str) or len(response_list) == 0:
            raise ValueError("response_list must be a non-empty list of response strings.")
        scores = self.critic_scores(
            tokenizer, question, response_list, pixel_values, num_patches_list,
            max_steps=max_steps, orm=version == "orm_soft",
            image_tokens=(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN), verbose=verbose,
        )  # fmt: skip
        ranked = sorted(zip(response_list, scores), key=lambda item: item[1], reverse=True)
        return ranked if return_scores else [response for response, _ in ranked]

    @torch.inference_mode()
    def critic_scores(
        self,
        tokenizer,
        question: str,
        response_list: Sequence[str],
        pixel_values: torch.Tensor | None,
        num_patches_list: list[int] | None = None,
        *,
        max_steps: int | None = None,
        orm: bool = False,
        image_tokens: tuple[str, str, str] = (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN),
        verbose: bool = False,
    ) -> list[float]:
        """The mean step score of each response, in `response_list` order (one forward pass per response, the
        images encoded once)."""
        if pixel_values is not None:
            question = with_image_placeholder(question)
        num_patches_list = check_num_patches_list(pixel_values, num_patches_list)
        if pixel_values is not None and question.count(IMAGE_PLACEHOLDER) != len(num_patches_list):
            raise ValueError(
                f"The question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders for "
                f"{len(num_patches_list)} images (num_patches_list): put one per image, or none for a single image."
            )
        start, end, context = image_tokens

        def span(tiles: int) -> str:
            return start + context * (self.config.image_seq_length * tiles) + end

        reader = AnswerReader(tokenizer)
        images = None
        if pixel_values is not None:
            features = self.get_image_features(pixel_values.to(self.device, self.dtype)).pooler_output
            images = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        scores = []
        for response in response_list:
            steps = [response] if orm else split_steps(response, max_steps)
            text = expand_image_placeholders(render_critic_prompt(tokenizer, question, steps), num_patches_list, span)
            if verbose:
                print(text.replace(context * self.config.image_seq_length, context + "×seq"))
            input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            positions = reader.read_positions(input_ids)
            if len(positions) != len(steps):
                raise ValueError(f"Found {len(positions)} answer turns for {len(steps)} steps in the critic prompt.")
            hidden = self.model(
                input_ids=torch.tensor([input_ids], device=self.device), mm_encoder_outputs=images
            ).last_hidden_state[0, positions]
            step_scores = reader.good_probability(hidden, self.get_output_embeddings()).tolist()
            scores.append(aggregate_step_scores(step_scores))
        return scores


__all__ = [
    "AGGREGATIONS",
    "AnswerReader",
    "InternVLCriticMixin",
    "PRM_SYSTEM_PROMPT",
    "STEP_SEPARATOR",
    "aggregate_step_scores",
    "critic_messages",
    "expand_image_placeholders",
    "render_critic_prompt",
    "split_steps",
]
