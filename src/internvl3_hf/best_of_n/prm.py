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
with every earlier answer teacher-forced to `+` (VisualPRM's `InternVLRewardModel`). The conversation, the step
split and the score reading live in `modeling/critic_internvl3.py`, which checkpoints carry for the official
`select_best_response`; this module adds batching and prefix caching. Two ways to get a step's score:

- `single_forward` (official `soft_v2`): the whole conversation in one pass, logits read at every answer position.
- `per_step` (official `soft`): one pass per step, each continuing the previous ones through the KV cache, logits
  read at the end of the prefix. Same tokens and positions as `single_forward`, so both agree to float noise.

Per question, the images are tiled and encoded by the ViT once (the features reach the model as pre-computed
`mm_encoder_outputs`), and the conversation prefix all candidates share (system prompt, image tokens, question)
goes through the critic once: its KV cache serves every candidate row, which then feeds only its own steps. The
system prompt runs once per call, as every question's prefix starts with it. Under eager and sdpa attention, a
batch of candidates is packed into one row after the prefix (a block mask keeps them apart) while they are
together no longer than the prefix, so its keys and values are neither copied nor read once per candidate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..chat import user_turn
from ..modeling import critic_internvl3 as core
from ..modeling.chat_internvl3 import END_OF_TURN
from ..modeling.chat_template import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_PLACEHOLDER, IMAGE_START_TOKEN
from ..modeling.critic_internvl3 import (
    AGGREGATIONS,
    PRM_SYSTEM_PROMPT,
    STEP_SEPARATOR,
    AnswerReader,
    aggregate_step_scores,
    check_max_steps,
    split_steps,
)

# Text that would break the conversation or the image-token bookkeeping if it appeared inside a question or step.
_RESERVED_STRINGS = ("<|im_start|>", END_OF_TURN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN)

# Attention backends that take a ready 4D float mask: a batch's rows are packed into one row there (the flash
# attention kernels know only causal segments, and flex_attention wants a BlockMask: one row per candidate).
PACKING_BACKENDS = ("eager", "sdpa")
ScoringMode = Literal["single_forward", "per_step"]
SCORING_MODES = ("single_forward", "per_step")


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
    check_max_steps(max_steps)


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
    """The critic conversation for `question` about `num_images` images: the images go right after
    `### Question:\\n` (`<image>\\n`, or `Image-k: <image>\\n` lines for several), where the official pipeline puts
    them by prefixing the question."""
    return core.critic_messages(user_turn(question, num_images)["content"], steps)


def render_critic_prompt(processor, question: str, steps: Sequence[str], num_images: int = 1) -> str:
    """The critic conversation rendered with the official `internvl2_5` chat template."""
    return core.render_critic_prompt(processor.tokenizer, user_turn(question, num_images)["content"], steps)


def expand_image_placeholders(text: str, tiles_per_image: Sequence[int], processor) -> str:
    """Replace the first `<image>` placeholders, in order, by each image's `<img>…</img>` token span."""
    return core.expand_image_placeholders(text, tiles_per_image, processor.image_span)


# --------------------------------------------------------------------------------------------- model helpers
def row_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(position_ids, rope_position_ids)` of a padded batch: integer positions 0, 1, 2, … for masks and kernels,
    and the rotary positions (V2PE's under the model's V2PE setting, else the same as floats).

    Computed once on the full conversations and handed to the model ready-made, so that per-step chunks,
    left-padded and continuing a cache, sit exactly where they sit in the single forward pass.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if model.config.v2pe_mode != "none":
        rope, _ = model.model.v2pe_positions(input_ids == model.config.image_token_id, attention_mask)
        return position_ids, rope
    return position_ids, position_ids.to(torch.float32)


def pad_rows(rows: Sequence, value, side: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
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
        max_steps: Merge a response into at most this many steps (official rule); `None` (the official scoring
            default) keeps every step.
        aggregation: How step scores become a response score: `mean` (official), `min`, `last` or `product`.
        batch_size: Candidate conversations per critic forward pass.
        mode: `single_forward` (all steps in one pass, default) or `per_step` (one cached pass per step).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_steps: int | None = None,
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
        self.reader = AnswerReader(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id works
        # Added tokens that split text cleanly (no whitespace stripping around them): tokenization restarts there.
        self._split_tokens = [
            token.content
            for token in tokenizer.added_tokens_decoder.values()
            if not (token.lstrip or token.rstrip or token.single_word)
        ]

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
        candidate rows, which are scored in batches of `batch_size`. The text a question's prefix shares with the
        previous question's (the system prompt) is not run again: that part of the previous cache is kept.
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
        results, previous = [], None
        for question, group, question_images in zip(questions, responses, images):
            features, tiles = self._encode_images(as_image_list(question_images))
            rows = self.tokenize_many(question, group, tiles, orm=orm)
            step_scores, previous = self._score_question(rows, features, mode, previous)
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
        return self.tokenize_many(question, [response], tiles_per_image, orm=orm)[0]

    def tokenize_many(
        self, question: str, responses: Sequence[str], tiles_per_image: Sequence[int] = (), *, orm: bool = False
    ) -> list[CriticInput]:
        """`tokenize` for each of the `responses` to one question; the text their conversations share (system
        prompt, image tokens) is tokenized once."""
        check_critic_text(question, "question")
        rows = []
        for response in responses:
            check_critic_text(response, "response", placeholder_allowed=True)  # plain text there, never expanded
            rows.append([response] if orm else split_steps(response, self.max_steps))
        texts = [
            expand_image_placeholders(
                render_critic_prompt(self.processor, question, steps, len(tiles_per_image)), tiles_per_image,
                self.processor,
            )
            for steps in rows
        ]  # fmt: skip
        inputs = []
        for steps, input_ids in zip(rows, self._token_ids(texts)):
            read_positions = self.reader.read_positions(input_ids)
            if len(read_positions) != len(steps):
                raise ValueError(
                    f"Found {len(read_positions)} answer turns for {len(steps)} steps in the critic prompt."
                )
            inputs.append(CriticInput(steps, input_ids, read_positions))
        return inputs

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as `tokenizer(text)` gives them.

        A tokenizer splits its text at added tokens such as `<|im_end|>` or `</img>` before anything else, so the
        text up to the last added token that all `texts` share tokenizes alone: it is tokenized once (in the first
        row) and only the rest of each row is tokenized. Should the first row not split that way (a tokenizer that
        appends tokens at the end), every row is tokenized whole.
        """
        tokenizer = self.processor.tokenizer
        split = _shared_split(texts, self._split_tokens) if len(texts) > 1 else 0
        if split == 0:
            return tokenizer(texts)["input_ids"]
        first = tokenizer(texts[0])["input_ids"]
        rests = tokenizer([text[split:] for text in texts], add_special_tokens=False)["input_ids"]
        shared = len(first) - len(rests[0])
        if shared < 0 or first[shared:] != rests[0]:
            return tokenizer(texts)["input_ids"]
        return [first[:shared] + rest for rest in rests]

    # ----------------------------------------------------------------------------------------- scoring
    def _score_question(
        self, rows: list[CriticInput], features: torch.Tensor | None, mode: ScoringMode, previous: _Prefix | None
    ) -> tuple[list[list[float]], _Prefix | None]:
        """Step scores of one question's rows: the shared prefix once (continuing the part of the `previous`
        question's prefix cache it shares), then the rest in batches (longest first). Returns the scores and this
        question's prefix for the next question."""
        device = self.model.device
        input_ids, mask = pad_rows([row.input_ids for row in rows], self.pad_id, "right", torch.long, device)
        position_ids, positions = row_positions(self.model, input_ids, mask)
        image_mask = input_ids[0] == self.model.config.image_token_id
        shared = _shared_prefix_length(rows, input_ids, positions, image_mask)
        images = {"image": BaseModelOutputWithPooling(pooler_output=features)} if features is not None else None
        images_in_prefix = bool(image_mask[:shared].any())
        prefix = None
        if shared:
            row = (input_ids[:1, :shared], mask[:1, :shared], position_ids[:1, :shared], positions[:1, :shared])
            prefix = self._prefix_pass(*row, images if images_in_prefix else None, image_mask, previous)
        prefix_cache = prefix.cache if prefix is not None else None
        text_config = self.model.config.get_text_config()
        sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or ())  # a 4D mask reaches all
        can_pack = prefix_cache is not None and text_config._attn_implementation in PACKING_BACKENDS and not sliding
        order = sorted(range(len(rows)), key=lambda index: -len(rows[index].input_ids))
        results: list[list[float]] = [[] for _ in rows]
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch_rows = [rows[index] for index in indices]
            # A packed row also computes attention between different candidates' tokens (masked out): worth it
            # while the candidates together are no longer than the prefix they would otherwise each copy and read.
            packed = can_pack and sum(row.read_positions[-1] + 1 - shared for row in batch_rows) <= shared
            batch = _Batch(
                rows=batch_rows,
                input_ids=input_ids[indices],
                mask=mask[indices],
                position_ids=position_ids[indices],
                positions=positions[indices],
                shared=shared,
                cache=prefix_cache if packed else _repeat_cache(prefix_cache, len(indices)),
                images=None if images_in_prefix else _repeat_images(images, len(indices)),
            )
            if packed:
                batch_scores = self._score_packed(batch, mode)
            elif mode == "single_forward":
                batch_scores = self._score_single_forward(batch)
            else:
                batch_scores = self._score_per_step(batch)
            for index, scores in zip(indices, batch_scores):
                results[index] = scores
        return results, prefix

    def _prefix_pass(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        positions: torch.Tensor,
        images: dict | None,
        image_mask: torch.Tensor,
        previous: _Prefix | None,
    ) -> _Prefix:
        """Run the shared prefix `(1, shared)` through the critic into a KV cache, starting after the leading
        tokens the `previous` question's prefix cache already holds."""
        kept = previous.keep_shared(input_ids[0], positions[0], image_mask) if previous else 0
        cache = previous.cache if kept else DynamicCache(config=self.model.config.get_text_config())
        if kept < input_ids.shape[1]:
            self.model.model(
                input_ids=input_ids[:, kept:],
                attention_mask=mask,
                position_ids=position_ids[:, kept:],
                rope_position_ids=positions[:, kept:],
                past_key_values=cache,
                use_cache=True,
                mm_encoder_outputs=images,
            )
        return _Prefix(input_ids[0], positions[0], cache)

    def _good_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(`+`) renormalised over {`+`, `-`} from final hidden states `(n, hidden)`."""
        return self.reader.good_probability(hidden, self.model.get_output_embeddings())

    def _score_single_forward(self, batch: _Batch) -> list[list[float]]:
        """Everything after the shared prefix up to the last answer position in one pass; logits read at every
        answer position."""
        end = max(row.read_positions[-1] for row in batch.rows) + 1
        hidden = self.model.model(
            input_ids=batch.input_ids[:, batch.shared : end],
            attention_mask=batch.mask[:, :end],
            position_ids=batch.position_ids[:, batch.shared : end],
            rope_position_ids=batch.positions[:, batch.shared : end],
            past_key_values=batch.cache,
            mm_encoder_outputs=batch.images,
        ).last_hidden_state
        row_index = [index for index, row in enumerate(batch.rows) for _ in row.read_positions]
        read_at = [position - batch.shared for row in batch.rows for position in row.read_positions]
        return _per_row(batch.rows, self._good_probability(hidden[row_index, read_at]).tolist())

    def _score_packed(self, batch: _Batch, mode: ScoringMode) -> list[list[float]]:
        """Score a batch with its rows' tokens after the shared prefix packed into one row on the prefix cache
        itself, each token at its position in its full row. `single_forward` feeds every row up to its last answer
        position in one pass; `per_step` feeds, in pass k, each row's chunk for step k (as `_score_per_step`). A
        mask lets each token see the prefix and the earlier tokens of its own row only: the prefix's keys and
        values are neither copied nor read once per row, and no padding runs. The cache is cut back to the prefix
        afterwards."""
        if mode == "single_forward":
            chunks = [[(batch.shared, row.read_positions[-1] + 1)] for row in batch.rows]
        else:
            chunks = [[_chunk_bounds(row, step, batch.shared) for step in range(len(row.steps))] for row in batch.rows]
        cached_rows = torch.full((batch.shared,), -1, device=self.model.device)  # each cached token's row; -1: prefix
        scores: list[list[float]] = [[] for _ in batch.rows]
        try:
            for step in range(max(len(row_chunks) for row_chunks in chunks)):
                fed = [(index, *row_chunks[step]) for index, row_chunks in enumerate(chunks) if step < len(row_chunks)]
                hidden, fed_rows = self._packed_pass(batch, fed, cached_rows, step == 0)
                cached_rows = torch.cat([cached_rows, fed_rows])
                reads, offset = [], 0
                for index, start, end in fed:
                    row_reads = [p for p in batch.rows[index].read_positions if start <= p < end]
                    reads.append((index, [offset + position - start for position in row_reads]))
                    offset += end - start
                probabilities = self._good_probability(hidden[[at for _, row_at in reads for at in row_at]]).tolist()
                for index, row_at in reads:
                    scores[index] += probabilities[: len(row_at)]
                    probabilities = probabilities[len(row_at) :]
        finally:
            batch.cache.crop(batch.shared - batch.cache.get_seq_length())
        return scores

    def _packed_pass(
        self, batch: _Batch, fed: list[tuple[int, int, int]], cached_rows: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the spans `fed` (row, start, end in full-row coordinates) packed into one row on the
        batch's cache: their final hidden states `(tokens, hidden)` and the row of each token. Image tokens all
        sit in the `first` pass."""

        def packed(values: torch.Tensor) -> torch.Tensor:
            return torch.cat([values[index, start:end] for index, start, end in fed])[None]

        device = self.model.device
        fed_rows = torch.cat([torch.full((end - start,), index, device=device) for index, start, end in fed])
        dtype = self.model.get_input_embeddings().weight.dtype  # the language model's (the ViT's may differ)
        hidden = self.model.model(
            input_ids=packed(batch.input_ids),
            attention_mask=_packed_mask(cached_rows, fed_rows, dtype),
            position_ids=packed(batch.position_ids),
            rope_position_ids=packed(batch.positions),
            past_key_values=batch.cache,
            mm_encoder_outputs=batch.images if first else None,
        ).last_hidden_state[0]
        return hidden, fed_rows

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
            chunk_ids, chunk_mask = pad_rows(
                [row.input_ids[start:end] for row, (start, end) in zip(batch.rows, bounds)],
                self.pad_id, "left", torch.long, device,
            )  # fmt: skip
            chunk_position_ids, _ = pad_rows(
                [batch.position_ids[index, start:end] for index, (start, end) in enumerate(bounds)],
                0, "left", torch.long, device,
            )  # fmt: skip
            chunk_positions, _ = pad_rows(
                [batch.positions[index, start:end] for index, (start, end) in enumerate(bounds)],
                0.0, "left", batch.positions.dtype, device,
            )  # fmt: skip
            seen_mask = torch.cat([seen_mask, chunk_mask], dim=-1)
            hidden = self.model.model(
                input_ids=chunk_ids,
                attention_mask=seen_mask,
                position_ids=chunk_position_ids,
                rope_position_ids=chunk_positions,
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
    cache; the prefix cache itself for packed rows); `images` holds the rows' image features when no prefix took
    them. `position_ids` are the integer positions, `positions` the rotary ones.
    """

    rows: list[CriticInput]
    input_ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    shared: int
    cache: DynamicCache | None
    images: dict | None


@dataclass
class _Prefix:
    """A question's shared prefix: its token ids and rotary positions `(length,)`, and the KV cache holding them."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache

    def keep_shared(self, input_ids: torch.Tensor, positions: torch.Tensor, image_mask: torch.Tensor) -> int:
        """Cut the cache to the leading tokens it shares with the next question's prefix `input_ids` (same ids at
        the same positions, before that prefix's first image token: image features differ per question) and
        return their count (0: nothing to keep)."""
        if not self.cache.is_croppable:
            return 0
        limit = min(len(self.input_ids), len(input_ids))
        image_positions = image_mask[:limit].nonzero()
        if len(image_positions):
            limit = int(image_positions[0])
        same = (input_ids[:limit] == self.input_ids[:limit]) & (positions[:limit] == self.positions[:limit])
        differing = (~same).nonzero()
        kept = int(differing[0]) if len(differing) else limit
        if kept:
            self.cache.crop(kept - len(self.input_ids))  # a negative count: the tokens dropped from the end
        return kept


def _per_row(rows: Sequence[CriticInput], probabilities: list[float]) -> list[list[float]]:
    """Step scores listed row after row, split into one list per row."""
    starts = [0]
    for row in rows:
        starts.append(starts[-1] + len(row.steps))
    return [probabilities[start:end] for start, end in zip(starts, starts[1:])]


def _packed_mask(cached_rows: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(1, 1, new, cached + new)` mask for packed tokens of the `rows` given (row index per new token) on
    a cache whose tokens belong to `cached_rows` (-1: the shared prefix): each new token sees the prefix, its own
    row's cached tokens and its own row's earlier new tokens."""
    sees_cached = (cached_rows[None, :] == -1) | (cached_rows[None, :] == rows[:, None])
    sees_new = (rows[:, None] == rows[None, :]).tril_()
    visible = torch.cat([sees_cached, sees_new], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


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


def _shared_split(texts: list[str], split_tokens: Sequence[str]) -> int:
    """Length of the longest start all `texts` share that ends with one of `split_tokens` (0 if none does)."""
    common = len(os.path.commonprefix(texts))
    ends = (texts[0].rfind(token, 0, common) + len(token) for token in split_tokens)
    return max((end for end, token in zip(ends, split_tokens) if end >= len(token)), default=0)


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
    "PRM_SYSTEM_PROMPT",
    "STEP_SEPARATOR",
    "VisualPRM",
    "aggregate_step_scores",
    "as_image_list",
    "critic_messages",
    "expand_image_placeholders",
    "pad_rows",
    "render_critic_prompt",
    "row_positions",
    "split_steps",
]
