"""Implicit PRM: process rewards from a policy-format model's likelihood ratio against its reference.

A model trained with a DPO-family objective (`MPOTrainer`) against a frozen reference defines the reward
`r(y) = β · log π(y | x) / π_ref(y | x)`; split over the response's tokens it is a process reward, and the
cumulative reward up to the end of step t, `q_t = β · Σ_{tokens ≤ t} log π/π_ref`, is the implicit Q-value whose
sigmoid estimates P(the solution is right up to step t) (Yuan et al. 2024, "Free Process Rewards without Process
Labels", arXiv 2412.01981). That is what a VisualPRM step label says, so `ImplicitPRM` scores steps like
`VisualPRM` does (`CriticScore`, same step split and aggregations) and drops into `best_of_n` in its place.

Unlike VisualPRM, whose `+`/`-` verdict must compare a step with the image inside the network, the likelihood
ratio reads each step's tokens through the language-model head directly: a critic that has learned to *say* the
right colour scores a wrong one low. It needs the reference model at scoring time (two forward passes per row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..chat import build_messages
from ..modeling.chat_internvl3 import END_OF_TURN
from .prm import (
    STEP_SEPARATOR,
    CriticScore,
    aggregate_step_scores,
    as_image_list,
    check_critic_text,
    check_scoring_settings,
    pad_rows,
    row_positions,
    split_steps,
)


class ImplicitPRM:
    """Score responses step by step with the likelihood ratio of `model` to `reference` (an implicit PRM).

    Args:
        model: The critic, an `InternVL3ForConditionalGeneration` trained from `reference` with a DPO-family loss
            (for example `MPOTrainer` on pairs of right and wrong solutions), in eval mode.
        reference: The model it was trained from (the trainer's reference model), in eval mode.
        processor: Their `InternVL3Processor`; responses are read in the policy's own chat format.
        beta: The β of the training loss (`MPOConfig.beta`): rewards are β × log-ratios.
        max_steps: Merge a response into at most this many steps (VisualPRM's rule); `None` (default) keeps every
            step.
        aggregation: How step scores become a response score: `mean`, `min`, `last` or `product`.
        batch_size: Responses per forward pass.
        system: System message of the policy conversation (the chat template default when `None`).
    """

    def __init__(
        self,
        model,
        reference,
        processor,
        *,
        beta: float = 0.1,
        max_steps: int | None = None,
        aggregation: str = "mean",
        batch_size: int = 8,
        system: str | None = None,
    ):
        check_scoring_settings(aggregation, batch_size, max_steps)
        if not beta > 0:
            raise ValueError(f"beta must be positive (the training loss's β), got {beta!r}.")
        if model is reference:
            raise ValueError("The critic and its reference are the same object: every likelihood ratio would be 1.")
        self.model = model
        self.reference = reference
        self.processor = processor
        self.beta = beta
        self.max_steps = max_steps
        self.aggregation = aggregation
        self.batch_size = batch_size
        self.system = system
        tokenizer = processor.tokenizer
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id works

    def score(self, question: str, responses: Sequence[str], images=None, *, orm: bool = False) -> list[CriticScore]:
        """Score the `responses` to one `question` about `images`; `orm=True` scores each as a single step."""
        return self.score_many([question], [responses], [images], orm=orm)[0]

    @torch.inference_mode()
    def score_many(
        self,
        questions: Sequence[str],
        responses: Sequence[Sequence[str]],
        images: Sequence,
        *,
        orm: bool = False,
    ) -> list[list[CriticScore]]:
        """Score several questions' responses (`responses[q]` and `images[q]` belong to `questions[q]`), the
        interface `best_of_n` calls. Each question's images go through both vision towers once."""
        if not len(questions) == len(responses) == len(images):
            raise ValueError(
                f"Got {len(questions)} questions, {len(responses)} response lists and {len(images)} image lists; "
                "give one response list and one (possibly empty) image list per question."
            )
        results = []
        for question, group, question_images in zip(questions, responses, images):
            if isinstance(group, str) or len(group) == 0:
                raise ValueError("Give a non-empty list of response strings per question.")
            for response in group:
                check_critic_text(response, "response")
            prompt_ids, pixel_values = self._encode_prompt(question, as_image_list(question_images))
            features = tuple(_image_features(model, pixel_values) for model in (self.model, self.reference))
            steps = [[response] if orm else split_steps(response, self.max_steps) for response in group]
            rows = [self._tokenize_response(response, row_steps) for response, row_steps in zip(group, steps)]
            scores = []
            for start in range(0, len(rows), self.batch_size):
                scores += self._step_scores(prompt_ids, features, rows[start : start + self.batch_size])
            results.append(
                [
                    CriticScore(row_steps, step_scores, aggregate_step_scores(step_scores, self.aggregation))
                    for row_steps, step_scores in zip(steps, scores)
                ]
            )
        return results

    # ----------------------------------------------------------------------------------------- inputs
    def _encode_prompt(self, question: str, images: list) -> tuple[list[int], torch.Tensor | None]:
        """The policy prompt (chat template, generation header) as token ids with the image spans expanded."""
        check_critic_text(question, "question")
        prompt = self.processor.apply_chat_template(
            build_messages(question, len(images), self.system), add_generation_prompt=True
        )
        encoded = self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        return encoded["input_ids"][0].tolist(), encoded.get("pixel_values")

    def _tokenize_response(self, response: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The response's token ids plus the end-of-turn token, and the step each token belongs to (a token that
        straddles a step boundary counts for the step it starts in; the end-of-turn token for the last step)."""
        encoded = self.processor.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        starts, offset = [], 0
        for step in steps:
            starts.append(offset)
            offset += len(step) + len(STEP_SEPARATOR)
        token_steps = [sum(start <= begin for start in starts[1:]) for begin, _ in encoded["offset_mapping"]]
        return encoded["input_ids"] + [self.end_of_turn_id], token_steps + [len(steps) - 1]

    # ----------------------------------------------------------------------------------------- scoring
    def _step_scores(
        self, prompt_ids: list[int], features: tuple, rows: list[tuple[list[int], list[int]]]
    ) -> list[list[float]]:
        """σ(q_t) for every step of every row: q_t = β × the summed token log-ratios up to the end of step t.
        `features`: the question's image features under the critic and under the reference (or None each)."""
        device = self.model.device
        # Left padding: every response ends at the last column, so only the response logits need computing.
        input_ids, attention_mask = pad_rows(
            [prompt_ids + ids for ids, _ in rows], self.pad_id, "left", torch.long, device
        )
        keep = max(len(ids) for ids, _ in rows) + 1
        positions = row_positions(self.model, input_ids, attention_mask)
        ratio = self._token_logprobs(self.model, input_ids, attention_mask, positions, features[0], keep)
        ratio = ratio - self._token_logprobs(self.reference, input_ids, attention_mask, positions, features[1], keep)
        scores = []
        for row, (ids, token_steps) in enumerate(rows):
            token_ratios = ratio[row, ratio.shape[1] - len(ids) :]
            per_step = torch.zeros(token_steps[-1] + 1, dtype=token_ratios.dtype, device=token_ratios.device)
            per_step.index_add_(0, torch.tensor(token_steps, device=token_ratios.device), token_ratios)
            scores.append(torch.sigmoid(self.beta * per_step.cumsum(0)).tolist())
        return scores

    @staticmethod
    def _token_logprobs(model, input_ids, attention_mask, positions: tuple, features, keep: int) -> torch.Tensor:
        """log P(token) of the last `keep - 1` tokens of each row under `model`, `(batch, keep - 1)`, float32;
        `positions`: `(position_ids, rope_position_ids)`; `features` (the question's image features under `model`, or
        None) serve every row."""
        images = None
        if features is not None:
            images = {"image": BaseModelOutputWithPooling(pooler_output=features.repeat(input_ids.shape[0], 1, 1))}
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions[0],
            rope_position_ids=positions[1], mm_encoder_outputs=images, logits_to_keep=keep,
        ).logits.float()  # fmt: skip
        targets = input_ids[:, -(keep - 1) :]
        return logits[:, :-1].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _image_features(model, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """A question's image features under `model` (one ViT pass, shared by all its candidate rows)."""
    if pixel_values is None:
        return None
    return model.get_image_features(pixel_values.to(model.device, model.dtype)).pooler_output


__all__ = ["ImplicitPRM"]
