"""One-call chat with an InternVL3 model: chat template → processor → `generate` → decoded answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TextStreamer


def build_messages(question: str, num_images: int, system: str | None = None) -> list[dict]:
    """OpenAI-style messages: the images first, then the question (the official `<image>\\n{question}` order)."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


@torch.inference_mode()
def chat(
    model,
    processor,
    question: str,
    images: Sequence = (),
    *,
    system: str | None = None,
    stream: bool = False,
    **generate_kwargs,
) -> str:
    """Answer `question` about `images` (PIL images or paths); extra kwargs go to `generate`."""
    prompt = processor.apply_chat_template(build_messages(question, len(images), system), add_generation_prompt=True)
    inputs = processor(text=prompt, images=list(images) or None, return_tensors="pt").to(model.device)
    if stream:
        generate_kwargs["streamer"] = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_kwargs.setdefault("max_new_tokens", 64)
    output = model.generate(**inputs, **generate_kwargs)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
