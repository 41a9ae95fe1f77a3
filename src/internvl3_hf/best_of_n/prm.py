"""VisualPRM: an InternVL3 checkpoint used as a process-reward critic that rates every reasoning step.

The critic reads the official multi-turn conversation the VisualPRM data pipeline trains on
(`internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py`):

    system:    PRM_SYSTEM_PROMPT
    user:      ### Question:\\n<image>\\n{question}\\n\\n### Solution Process:\\n{step 1}
    assistant: +
    user:      {step 2}
    assistant: +
    ...

A step's score is P(`+`) renormalised over {`+`, `-`} at the position where the assistant answers that step,
with every earlier answer teacher-forced to `+` (VisualPRM's `InternVLRewardModel`). Two ways to get it:

- `single_forward` (official `soft_v2`): the whole conversation in one pass, logits read at every answer position.
- `per_step` (official `soft`): one pass per step, each continuing the previous ones through the KV cache, logits
  read at the end of the prefix. Same tokens and positions as `single_forward`, so both agree to float noise.

Per question, the images are tiled and encoded by the ViT once (the features reach the model as pre-computed
`mm_encoder_outputs`), and the conversation prefix all candidates share (system prompt, image tokens, question)
goes through the critic once: its KV cache serves every candidate row, which then feeds only its own steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

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
DEFAULT_MAX_STEPS = 12  # `--max-steps` default of the official VisualPRM data pipeline
GOOD, BAD = "+", "-"
IMAGE_PLACEHOLDER = "<image>"
# Text that would break the conversation or the image-token bookkeeping if it appeared inside a question or step.
_RESERVED_STRINGS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")

ScoringMode = Literal["single_forward", "per_step"]
SCORING_MODES = ("single_forward", "per_step")


# --------------------------------------------------------------------------------------------- steps and scores
def _check_max_steps(max_steps: int | None) -> None:
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None (no merging), got {max_steps!r}.")


def split_steps(
    response: str, max_steps: int | None = DEFAULT_MAX_STEPS, separator: str = STEP_SEPARATOR
) -> list[str]:
    """Split a response into reasoning steps with the official VisualPRM rule (`split_response`).

    Steps are the pieces between `separator` (a blank line). With more than `max_steps` pieces, consecutive pieces
    are merged in groups of ceil(n / max_steps), re-joined with the separator (so 13 pieces and max_steps=12 give
    7 steps of 2). Nothing is stripped: a trailing blank line leaves an empty last step, as in VisualPRM training.
    """
    _check_max_steps(max_steps)
    if not separator:
        raise ValueError("The step separator must be a non-empty string.")
    pieces = response.split(separator)
    if max_steps is None:
        return pieces
    group = math.ceil(len(pieces) / max_steps)
    return [separator.join(pieces[start : start + group]) for start in range(0, len(pieces), group)]


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": lambda scores: sum(scores) / len(scores),  # VisualPRM's `generate_overall_score` for soft scores
    "min": min,
    "last": lambda scores: scores[-1],
    "product": math.prod,
}


def aggregate_step_scores(step_scores: Sequence[float], method: str = "mean") -> float:
    """One response score from its step scores: `mean` (official), `min`, `last` or `product`."""
    if method not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {method!r}; choose one of {sorted(AGGREGATIONS)}.")
    if len(step_scores) == 0:
        raise ValueError("Cannot aggregate an empty list of step scores.")
    return float(AGGREGATIONS[method](list(step_scores)))


# --------------------------------------------------------------------------------------------- prompt
def as_image_list(images) -> list:
    """A question's images as a list: `None` → no image, one image or path → a list of one."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def check_scoring_settings(aggregation: str, batch_size: int, max_steps: int | None) -> None:
    """The settings every critic takes: a known aggregation, a positive batch size, a valid step limit."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    _check_max_steps(max_steps)


def check_critic_text(text: str, what: str, *, placeholder_allowed: bool = False) -> None:
    """Refuse text holding chat or image special tokens (they would corrupt the conversation), and `<image>`
    placeholders where images are placed by the prompt builder."""
    for token in _RESERVED_STRINGS:
        if token in text:
            raise ValueError(f"The {what} contains the special token {token!r}; remove it (it would break the turns).")
    if not placeholder_allowed and IMAGE_PLACEHOLDER in text:
        raise ValueError(
            f"The {what} contains an {IMAGE_PLACEHOLDER!r} placeholder; pass images separately (they are placed "
            "by the prompt builder, as the official pipelines do)."
        )


def critic_messages(question: str, steps: Sequence[str], num_images: int = 1) -> list[dict]:
    """The critic conversation: PRM system prompt, one user turn per step, each answered with `+`.

    Images go right after `### Question:\\n` (`<image>\\n`, or `Image-k: <image>\\n` lines for several), where the
    official pipeline puts them by prefixing the question.
    """
    if len(steps) == 0:
        raise ValueError("A response needs at least one step.")
    first = [{"type": "text", "text": "### Question:\n"}]
    first += [{"type": "image"} for _ in range(num_images)]
    first += [{"type": "text", "text": f"{question}\n\n### Solution Process:\n{steps[0]}"}]
    messages = [{"role": "system", "content": PRM_SYSTEM_PROMPT}, {"role": "user", "content": first}]
    for index, step in enumerate(steps):
        if index > 0:
            messages.append({"role": "user", "content": step})
        messages.append({"role": "assistant", "content": GOOD})
    return messages


def render_critic_prompt(processor, question: str, steps: Sequence[str], num_images: int = 1) -> str:
    """The critic conversation rendered with the processor's (official `internvl2_5`) chat template."""
    return processor.apply_chat_template(critic_messages(question, steps, num_images), tokenize=False)


def expand_image_placeholders(text: str, tiles_per_image: Sequence[int], processor) -> str:
    """Replace the first `<image>` placeholders, in order, by each image's `<img>…</img>` token span."""
    pieces = text.split(IMAGE_PLACEHOLDER, len(tiles_per_image))
    if len(pieces) != len(tiles_per_image) + 1:
        raise ValueError(
            f"The prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(tiles_per_image)} images."
        )
    spans = [processor.image_span(int(tiles)) for tiles in tiles_per_image]
    return "".join(piece + span for piece, span in zip(pieces, spans)) + pieces[-1]


# --------------------------------------------------------------------------------------------- model helpers
def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Float rotary positions of a padded batch: V2PE positions under the model's V2PE setting, else 0, 1, 2, …

    Computed once on the full conversations and handed to the model ready-made (float positions feed the rotary
    embedding only), so that per-step chunks, left-padded and continuing a cache, sit exactly where they sit in
    the single forward pass.
    """
    if model.config.v2pe_mode != "none":
        positions, _ = model.model.v2pe_positions(input_ids == model.config.image_token_id, attention_mask)
        return positions
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0).to(torch.float32)


def _pad(rows: Sequence, value, side: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists (or 1-D tensors) into a `(batch, longest)` tensor and its 0/1 mask."""
    length = max((len(row) for row in rows), default=0)
    values = torch.full((len(rows), length), value, dtype=dtype, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if len(row) == 0:
            continue
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        values[index, span] = torch.as_tensor(row, dtype=dtype, device=device)
        mask[index, span] = 1
    return values, mask


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"The critic tokenizer splits {text!r} into {len(ids)} tokens; VisualPRM needs one token.")
    return ids[0]


# --------------------------------------------------------------------------------------------- scorer
@dataclass
class CriticScore:
    """A response as the critic saw it: its steps, P(`+`) for each step and the aggregated score."""

    steps: list[str]
    step_scores: list[float]
    score: float


@dataclass
class CriticInput:
    """One tokenized critic conversation: its steps, token ids (image spans expanded) and, per step, the position
    whose logits predict that step's `+`/`-` answer."""

    steps: list[str]
    input_ids: list[int]
    read_positions: list[int]


class VisualPRM:
    """Score responses step by step with an InternVL3 checkpoint trained as a process reward model (VisualPRM).

    Args:
        model: An `InternVL3ForConditionalGeneration` in eval mode (for example VisualPRM-8B loaded through the
            plugin); its V2PE setting and attention implementation apply.
        processor: Its `InternVL3Processor` (tiling, `<image>` expansion and the `internvl2_5` chat template).
        max_steps: Merge a response into at most this many steps (official rule); `None` keeps every step.
        aggregation: How step scores become a response score: `mean` (official), `min`, `last` or `product`.
        batch_size: Candidate conversations per critic forward pass.
        mode: `single_forward` (all steps in one pass, default) or `per_step` (one cached pass per step).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_steps: int | None = DEFAULT_MAX_STEPS,
        aggregation: str = "mean",
        batch_size: int = 8,
        mode: ScoringMode = "single_forward",
    ):
        check_scoring_settings(aggregation, batch_size, max_steps)
        if mode not in SCORING_MODES:
            raise ValueError(f"Unknown scoring mode {mode!r}; choose one of {SCORING_MODES}.")
        self.model = model
        self.processor = processor
        self.max_steps = max_steps
        self.aggregation = aggregation
        self.batch_size = batch_size
        self.mode = mode
        tokenizer = processor.tokenizer
        self.good_id = _single_token_id(tokenizer, GOOD)
        self.bad_id = _single_token_id(tokenizer, BAD)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id works
        # Each answer is `<|im_start|>assistant\n` `+` `<|im_end|>`; the logits that predict `+` sit on the last
        # header token. Tokenizing the header alone must give the same tokens, or per-step prefixes would differ.
        self._header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._answer_pattern = self._header + [self.good_id, _single_token_id(tokenizer, "<|im_end|>")]
        if tokenizer.encode("<|im_start|>assistant\n+<|im_end|>", add_special_tokens=False) != self._answer_pattern:
            raise ValueError("The critic tokenizer merges the assistant header with `+`: not an InternVL3 tokenizer.")

    # ----------------------------------------------------------------------------------------- public API
    def score(
        self,
        question: str,
        responses: Sequence[str],
        images=None,
        *,
        orm: bool = False,
        mode: ScoringMode | None = None,
    ) -> list[CriticScore]:
        """Score the `responses` to one `question` about `images` (an image or path, a list of them, or `None`).

        `orm=True` scores each whole response as a single step (outcome reward, official `orm_soft`).
        """
        return self.score_many([question], [responses], [images], orm=orm, mode=mode)[0]

    @torch.inference_mode()
    def score_many(
        self,
        questions: Sequence[str],
        responses: Sequence[Sequence[str]],
        images: Sequence[Sequence],
        *,
        orm: bool = False,
        mode: ScoringMode | None = None,
    ) -> list[list[CriticScore]]:
        """Score several questions' responses: `responses[q]` and `images[q]` belong to `questions[q]`.

        Per question, the images are tiled and encoded once, and the conversation prefix every candidate shares
        (system prompt, image tokens, question) goes through the critic once; its KV cache then serves all the
        candidate rows, which are scored in batches of `batch_size`.
        """
        mode = mode or self.mode
        if mode not in SCORING_MODES:
            raise ValueError(f"Unknown scoring mode {mode!r}; choose one of {SCORING_MODES}.")
        if not len(questions) == len(responses) == len(images):
            raise ValueError(
                f"Got {len(questions)} questions, {len(responses)} response lists and {len(images)} image lists; "
                "give one response list and one (possibly empty) image list per question."
            )
        for group in responses:
            self._check_responses(group)
        results = []
        for question, group, question_images in zip(questions, responses, images):
            features, tiles = self._encode_images(as_image_list(question_images))
            rows = [self.tokenize(question, response, tiles, orm=orm) for response in group]
            step_scores = self._score_question(rows, features, mode)
            results.append(
                [
                    CriticScore(row.steps, scores, aggregate_step_scores(scores, self.aggregation))
                    for row, scores in zip(rows, step_scores)
                ]
            )
        return results

    # ----------------------------------------------------------------------------------------- inputs
    @staticmethod
    def _check_responses(responses: Sequence[str]) -> None:
        if isinstance(responses, str):
            raise TypeError("responses must be a list of strings per question, not a single string.")
        if len(responses) == 0:
            raise ValueError("The candidate list is empty: give the critic at least one response per question.")
        for response in responses:
            check_critic_text(response, "response", placeholder_allowed=True)

    def _encode_images(self, images: list) -> tuple[torch.Tensor | None, list[int]]:
        """Tile a question's images and run the vision tower once: `(features, tiles per image)`."""
        if not images:
            return None, []
        tiled = self.processor.image_processor(images, return_tensors="pt")
        features = self.model.get_image_features(tiled["pixel_values"].to(self.model.device)).pooler_output
        return features, tiled["image_num_patches"].tolist()

    def tokenize(
        self, question: str, response: str, tiles_per_image: Sequence[int] = (), *, orm: bool = False
    ) -> CriticInput:
        """The critic conversation for `response` as token ids, for images of `tiles_per_image` tiles each."""
        check_critic_text(question, "question")
        check_critic_text(response, "response", placeholder_allowed=True)  # plain text there, never expanded
        steps = [response] if orm else split_steps(response, self.max_steps)
        text = render_critic_prompt(self.processor, question, steps, len(tiles_per_image))
        text = expand_image_placeholders(text, tiles_per_image, self.processor)
        input_ids = self.processor.tokenizer(text)["input_ids"]
        read_positions = self._read_positions(input_ids)
        if len(read_positions) != len(steps):
            raise ValueError(f"Found {len(read_positions)} answer turns for {len(steps)} steps in the critic prompt.")
        return CriticInput(steps, input_ids, read_positions)

    def _read_positions(self, input_ids: list[int]) -> list[int]:
        """Positions whose logits predict each step's answer: the last token of each answer turn's header."""
        pattern, width = self._answer_pattern, len(self._answer_pattern)
        return [
            start + len(self._header) - 1
            for start in range(len(input_ids) - width + 1)
            if input_ids[start : start + width] == pattern
        ]

    # ----------------------------------------------------------------------------------------- scoring
    def _score_question(
        self, rows: list[CriticInput], features: torch.Tensor | None, mode: ScoringMode
    ) -> list[list[float]]:
        """Step scores of one question's rows: the shared prefix once, then the rest in batches (longest first)."""
        device = self.model.device
        input_ids, mask = _pad([row.input_ids for row in rows], self.pad_id, "right", torch.long, device)
        positions = rope_positions(self.model, input_ids, mask)
        image_mask = input_ids[0] == self.model.config.image_token_id
        shared = _shared_prefix_length(rows, input_ids, positions, image_mask)
        images = {"image": BaseModelOutputWithPooling(pooler_output=features)} if features is not None else None
        images_in_prefix = bool(image_mask[:shared].any())
        prefix_cache = None
        if shared:
            prefix_cache = DynamicCache(config=self.model.config.get_text_config())
            self.model.model(
                input_ids=input_ids[:1, :shared],
                attention_mask=mask[:1, :shared],
                position_ids=positions[:1, :shared],
                past_key_values=prefix_cache,
                use_cache=True,
                mm_encoder_outputs=images if images_in_prefix else None,
            )
        order = sorted(range(len(rows)), key=lambda index: -len(rows[index].input_ids))
        results: list[list[float]] = [[] for _ in rows]
        score_batch = self._score_single_forward if mode == "single_forward" else self._score_per_step
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = _Batch(
                rows=[rows[index] for index in indices],
                input_ids=input_ids[indices],
                mask=mask[indices],
                positions=positions[indices],
                shared=shared,
                cache=_repeat_cache(prefix_cache, len(indices)),
                images=None if images_in_prefix else _repeat_images(images, len(indices)),
            )
            for index, scores in zip(indices, score_batch(batch)):
                results[index] = scores
        return results

    def _good_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(`+`) renormalised over {`+`, `-`} from final hidden states `(n, hidden)`."""
        logits = self.model.get_output_embeddings()(hidden)[:, [self.good_id, self.bad_id]].float()
        return logits.softmax(-1)[:, 0]

    def _score_single_forward(self, batch: _Batch) -> list[list[float]]:
        """Everything after the shared prefix in one pass; logits read at every answer position."""
        end = max(len(row.input_ids) for row in batch.rows)
        hidden = self.model.model(
            input_ids=batch.input_ids[:, batch.shared : end],
            attention_mask=batch.mask[:, :end],
            position_ids=batch.positions[:, batch.shared : end],
            past_key_values=batch.cache,
            mm_encoder_outputs=batch.images,
        ).last_hidden_state
        row_index = [index for index, row in enumerate(batch.rows) for _ in row.read_positions]
        read_at = [position - batch.shared for row in batch.rows for position in row.read_positions]
        probabilities = self._good_probability(hidden[row_index, read_at]).tolist()
        scores, start = [], 0
        for row in batch.rows:
            scores.append(probabilities[start : start + len(row.steps)])
            start += len(row.steps)
        return scores

    def _score_per_step(self, batch: _Batch) -> list[list[float]]:
        """One pass per step: step k feeds the tokens after step k-1's answer position up to its own, on the cache.

        Chunks are left-padded so every row's newest token is last; the attention mask keeps the padding (also the
        padding left inside the cache by earlier chunks) out of attention, and positions come from the full rows.
        """
        device = self.model.device
        cache = batch.cache if batch.cache is not None else DynamicCache(config=self.model.config.get_text_config())
        seen_mask = batch.mask[:, : batch.shared]
        scores: list[list[float]] = [[] for _ in batch.rows]
        for step in range(max(len(row.steps) for row in batch.rows)):
            bounds = [_chunk_bounds(row, step, batch.shared) for row in batch.rows]
            chunk_ids, chunk_mask = _pad(
                [row.input_ids[start:end] for row, (start, end) in zip(batch.rows, bounds)],
                self.pad_id, "left", torch.long, device,
            )  # fmt: skip
            chunk_positions, _ = _pad(
                [batch.positions[index, start:end] for index, (start, end) in enumerate(bounds)],
                0.0, "left", batch.positions.dtype, device,
            )  # fmt: skip
            seen_mask = torch.cat([seen_mask, chunk_mask], dim=-1)
            hidden = self.model.model(
                input_ids=chunk_ids,
                attention_mask=seen_mask,
                position_ids=chunk_positions,
                past_key_values=cache,
                use_cache=True,
                mm_encoder_outputs=batch.images if step == 0 else None,  # image tokens all sit in the first chunk
            ).last_hidden_state[:, -1]
            probabilities = self._good_probability(hidden).tolist()
            for index, row in enumerate(batch.rows):
                if step < len(row.steps):
                    scores[index].append(probabilities[index])
        return scores


@dataclass
class _Batch:
    """Candidate rows of one question scored together, in full-row (right-padded) coordinates.

    `shared` leading tokens are common to every row and already in `cache` (a per-batch copy of the prefix
    cache); `images` holds the rows' image features when no prefix took them.
    """

    rows: list[CriticInput]
    input_ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    shared: int
    cache: DynamicCache | None
    images: dict | None


def _shared_prefix_length(
    rows: list[CriticInput], input_ids: torch.Tensor, positions: torch.Tensor, image_mask: torch.Tensor
) -> int:
    """Leading tokens every row has with the same id at the same rotary position, stopping before the first read
    position (its hidden state is needed per row) and never inside the image tokens: the prefix holds all of them
    or none. Normally that is everything up to the first step; rows whose V2PE `auto` strides differ share only
    the text before the image."""
    limit = min(row.read_positions[0] for row in rows)
    same_ids = (input_ids[:, :limit] == input_ids[:1, :limit]).all(0)
    same_positions = (positions[:, :limit] == positions[:1, :limit]).all(0)
    differing = (~(same_ids & same_positions)).nonzero()
    shared = int(differing[0]) if len(differing) else limit
    image_positions = image_mask.nonzero()
    if len(image_positions) and shared <= int(image_positions[-1]):
        shared = min(shared, int(image_positions[0]))
    return shared


def _repeat_cache(cache: DynamicCache | None, rows: int) -> DynamicCache | None:
    """A copy of the prefix cache for a batch of `rows` (the forward pass appends to it)."""
    if cache is None:
        return None
    copy = deepcopy(cache)
    copy.batch_repeat_interleave(rows)
    return copy


def _repeat_images(images: dict | None, rows: int) -> dict | None:
    """The question's image features once per row, in row order (what the `<IMG_CONTEXT>` tokens expect)."""
    if images is None:
        return None
    return {"image": BaseModelOutputWithPooling(pooler_output=images["image"].pooler_output.repeat(rows, 1, 1))}


def _chunk_bounds(row: CriticInput, step: int, shared: int) -> tuple[int, int]:
    """Token span fed for `step`: from just after the previous read position (the shared prefix's end for the
    first step) through this step's one; empty once the row has no more steps."""
    if step >= len(row.steps):
        return 0, 0
    start = shared if step == 0 else row.read_positions[step - 1] + 1
    return start, row.read_positions[step] + 1


__all__ = [
    "AGGREGATIONS",
    "CriticInput",
    "CriticScore",
    "DEFAULT_MAX_STEPS",
    "PRM_SYSTEM_PROMPT",
    "VisualPRM",
    "aggregate_step_scores",
    "as_image_list",
    "critic_messages",
    "expand_image_placeholders",
    "render_critic_prompt",
    "rope_positions",
    "split_steps",
]
