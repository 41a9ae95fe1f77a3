# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""The official `chat()` / `batch_chat()` API of OpenGVLab's `InternVLChatModel`, on the plugin model.

Evaluation harnesses (VLMEvalKit, lmms-eval) call these with the official signatures: a tokenizer, tiled
`pixel_values` and `num_patches_list`. The prompt is rendered by the canonical chat template (`chat_template.py`),
so it is the official `internvl2_5` conversation byte for byte.
"""

import torch

from .chat_template import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_MESSAGE,
    END_OF_TURN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_START_TOKEN,
)


def with_image_placeholder(question: str) -> str:
    """`question` with `<image>\\n` in front unless it holds a placeholder already (the official chat() rule for an
    image question)."""
    return question if IMAGE_PLACEHOLDER in question else IMAGE_PLACEHOLDER + "\n" + question


def check_num_patches_list(pixel_values: torch.Tensor | None, num_patches_list: list[int] | None) -> list[int]:
    """The tiles of each image: `num_patches_list`, or all of `pixel_values` as one image when it is `None`.

    Raises a `ValueError` when the counts do not add up to the tiles `pixel_values` holds."""
    if num_patches_list is None:
        num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
    if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
        raise ValueError(
            f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)} tiles but pixel_values holds "
            f"{pixel_values.shape[0]}."
        )
    return num_patches_list


class InternVLChatMixin:
    """`chat` / `batch_chat` for a `GenerationMixin` model with `config.image_seq_length`."""

    @property
    def system_message(self) -> str:
        """The default system turn (the template's unless the config or the caller set one)."""
        return getattr(self, "_system_message", None) or self.config.system_message or DEFAULT_SYSTEM_MESSAGE

    @system_message.setter
    def system_message(self, value: str | None) -> None:
        self._system_message = value

    @property
    def img_context_token_id(self) -> int:
        """The official model's name for `config.image_token_id` (official training code sets it from the
        tokenizer: `model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")`)."""
        return self.config.image_token_id

    @img_context_token_id.setter
    def img_context_token_id(self, value: int) -> None:
        self.config.image_token_id = value

    def _chat_prompt(self, tokenizer, question: str, history: list[tuple[str, str]]) -> str:
        messages = [{"role": "system", "content": self.system_message}]
        for old_question, old_answer in history:
            messages += [{"role": "user", "content": old_question}, {"role": "assistant", "content": old_answer}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )

    def _check_image_token_ids(self, tokenizer, start: str, end: str, context: str) -> None:
        """Like the official chat(), take the image token ids from `tokenizer`; the model finds image positions by
        `config.image_token_id`, so a tokenizer that puts them elsewhere is refused rather than silently ignored."""
        tokens = {"image_start_token_id": start, "image_end_token_id": end, "image_token_id": context}
        self.config.check_tokenizer(tokenizer, tokens, tokenizer_source="the tokenizer given to chat()")

    def _expand_images(self, query: str, num_patches_list: list[int], start: str, end: str, context: str) -> str:
        for num_patches in num_patches_list:
            span = start + context * (self.config.image_seq_length * num_patches) + end
            query = query.replace(IMAGE_PLACEHOLDER, span, 1)
        return query

    def _generate_answers(self, tokenizer, queries: list[str], pixel_values, generation_config: dict) -> list[str]:
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(queries, return_tensors="pt", padding=True).to(self.device)
        finally:
            tokenizer.padding_side = previous_side
        settings = dict(generation_config or {})
        settings["eos_token_id"] = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if pixel_values is not None:
            settings["pixel_values"] = pixel_values.to(self.device, self.dtype)
        output = self.generate(**inputs, **settings)
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [answer.split(END_OF_TURN)[0].strip() for answer in answers]

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = IMAGE_START_TOKEN,
        IMG_END_TOKEN: str = IMAGE_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMAGE_CONTEXT_TOKEN,
        verbose: bool = False,
    ):
        """One turn of the official chat: `<image>\\n` is prepended on an image first turn; returns the answer
        (and the updated history with `return_history`)."""
        self._check_image_token_ids(tokenizer, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if history is None and pixel_values is not None:
            question = with_image_placeholder(question)
        num_patches_list = check_num_patches_list(pixel_values, num_patches_list)
        history = list(history or [])
        query = self._chat_prompt(tokenizer, question, history)
        query = self._expand_images(query, num_patches_list, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN * self.config.image_seq_length, IMG_CONTEXT_TOKEN + "×seq"))
        response = self._generate_answers(tokenizer, [query], pixel_values, generation_config)[0]
        history.append((question, response))
        return (response, history) if return_history else response

    @torch.no_grad()
    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        questions: list[str],
        generation_config: dict,
        num_patches_list: list[int] | None = None,
        history=None,
        return_history: bool = False,
        IMG_START_TOKEN: str = IMAGE_START_TOKEN,
        IMG_END_TOKEN: str = IMAGE_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMAGE_CONTEXT_TOKEN,
        verbose: bool = False,
        image_counts: list[int] | None = None,
    ) -> list[str]:
        """Single-turn answers to several questions, one image (`num_patches_list[i]` tiles) each, left-padded."""
        if history is not None or return_history:
            raise ValueError("batch_chat is single-turn: use chat() for multi-turn conversations.")
        self._check_image_token_ids(tokenizer, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if image_counts is not None:
            num_patches_list = image_counts
        if pixel_values is not None:
            if num_patches_list is None or len(num_patches_list) != len(questions):
                raise ValueError("batch_chat needs num_patches_list with one tile count per question.")
            num_patches_list = check_num_patches_list(pixel_values, num_patches_list)
        queries = []
        for index, question in enumerate(questions):
            if pixel_values is not None:
                question = with_image_placeholder(question)
            query = self._chat_prompt(tokenizer, question, [])
            tiles = [num_patches_list[index]] if pixel_values is not None else []
            queries.append(self._expand_images(query, tiles, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
        if verbose:
            print(f"batch_chat: {len(queries)} queries")
        return self._generate_answers(tokenizer, queries, pixel_values, generation_config)
