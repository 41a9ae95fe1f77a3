"""Chat with an InternVL3 model: chat template → processor → `generate` → decoded answer, over several turns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TextStreamer


def build_messages(question: str, num_images: int, system: str | None = None) -> list[dict]:
    """OpenAI-style messages: the images first, then the question (the official `<image>\\n{question}` order)."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [user_turn(question, num_images)]


def user_turn(question: str, num_images: int) -> dict:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


class ChatSession:
    """A multi-turn conversation: every turn sees the earlier turns and all images given so far."""

    def __init__(self, model, processor, system: str | None = None):
        self.model = model
        self.processor = processor
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.images: list = []

    @torch.inference_mode()
    def ask(self, question: str, images: Sequence = (), stream: bool = False, **generate_kwargs) -> str:
        """Answer `question` (about `images`, PIL images or paths, added to this turn); kwargs go to `generate`."""
        messages = self.messages + [user_turn(question, len(images))]
        all_images = self.images + list(images)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=all_images or None, return_tensors="pt").to(self.model.device)
        if stream:
            generate_kwargs["streamer"] = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_kwargs.setdefault("max_new_tokens", 64)
        output = self.model.generate(**inputs, **generate_kwargs)
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images = all_images
        return answer


def chat(model, processor, question: str, images: Sequence = (), *, system: str | None = None, stream: bool = False,
         **generate_kwargs) -> str:
    """A one-turn `ChatSession`."""
    return ChatSession(model, processor, system).ask(question, images, stream=stream, **generate_kwargs)
