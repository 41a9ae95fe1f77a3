"""What the official `chat` / `batch_chat` / `select_best_response` answer, computed with transformers' native
`InternVLForConditionalGeneration` and prompts written out by hand from the official rules.

Official rules (OpenGVLab/InternVL `internvl_chat/internvl/conversation.py` template `internvl2_5`, and
`modeling_internvl_chat.py` `chat`/`batch_chat`): the MPT-style prompt below, `<image>\\n` prepended on an image
first turn, each `<image>` replaced in order by `<img>` + `<IMG_CONTEXT>` x 256·tiles + `</img>` (here
`image_seq_length`·tiles), generation stopped at `<|im_end|>`, the answer decoded without special tokens, cut at
`<|im_end|>` and stripped. VisualPRM (`InternVLRewardModel`, soft scoring): one user turn per `\\n\\n` step, the first
`### Question:\\n{question}\\n\\n### Solution Process:\\n{step}`, each answered `+`; a step's score is the softmax over
the `+`/`-` logits at the last token of its `<|im_start|>assistant\\n`, the response's the mean.
"""

from __future__ import annotations

import torch

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


def official_query(question: str, history: list, system: str, num_patches_list: list[int], tokens_per_tile: int) -> str:
    query = f"<|im_start|>system\n{system}<|im_end|>\n"
    for old_question, old_answer in history:
        query += f"<|im_start|>user\n{old_question}<|im_end|>\n<|im_start|>assistant\n{old_answer}<|im_end|>\n"
    query += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    for tiles in num_patches_list:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>", 1)
    return query


def _generate(native, tokenizer, queries: list[str], pixel_values, generation_config: dict) -> list[str]:
    tokenizer.padding_side = "left"
    inputs = tokenizer(queries, return_tensors="pt", padding=True)
    settings = dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if pixel_values is not None:
        settings["pixel_values"] = pixel_values.to(native.dtype)
    with torch.no_grad():
        output = native.generate(**inputs, **settings)
    answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.split("<|im_end|>")[0].strip() for answer in answers]


def native_chat(native, tokenizer, question, pixel_values, generation_config, num_patches_list=None, history=None,
                system=DEFAULT_SYSTEM_MESSAGE) -> str:  # fmt: skip
    if history is None and pixel_values is not None and "<image>" not in question:
        question = "<image>\n" + question
    if num_patches_list is None:
        num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
    query = official_query(question, history or [], system, num_patches_list, native.config.image_seq_length)
    return _generate(native, tokenizer, [query], pixel_values, generation_config)[0]


def native_batch_chat(native, tokenizer, questions, pixel_values, num_patches_list, generation_config) -> list[str]:
    queries = []
    for question, tiles in zip(questions, num_patches_list):
        question = question if "<image>" in question else "<image>\n" + question
        queries.append(official_query(question, [], DEFAULT_SYSTEM_MESSAGE, [tiles], native.config.image_seq_length))
    return _generate(native, tokenizer, queries, pixel_values, generation_config)


def official_critic_scores(native, tokenizer, prm_system_prompt, question, responses, pixel_values,
                           num_patches_list) -> list[float]:  # fmt: skip
    if "<image>" not in question:
        question = "<image>\n" + question
    good, bad = tokenizer.convert_tokens_to_ids(["+", "-"])
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    target = tokenizer.encode("<|im_start|>assistant\n+<|im_end|>\n", add_special_tokens=False)
    scores = []
    for response in responses:
        steps = response.split("\n\n")
        query = f"<|im_start|>system\n{prm_system_prompt}<|im_end|>\n"
        for index, step in enumerate(steps):
            text = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if index == 0 else step
            query += f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
        for tiles in num_patches_list:
            span = "<img>" + "<IMG_CONTEXT>" * (native.config.image_seq_length * tiles) + "</img>"
            query = query.replace("<image>", span, 1)
        ids = tokenizer(query, return_tensors="pt")["input_ids"]
        row = ids[0].tolist()
        positions = [i + len(header) - 1 for i in range(len(row)) if row[i : i + len(target)] == target]
        assert len(positions) == len(steps)
        with torch.no_grad():
            logits = native(input_ids=ids, pixel_values=pixel_values.to(native.dtype)).logits[0, positions]
        scores.append(logits[:, [good, bad]].softmax(-1)[:, 0].mean().item())
    return scores
