"""Fixtures for the Best-of-N tests: a tiny processor, a test image, a random critic and the official scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl3_hf.best_of_n import VisualPRM, critic_messages
from internvl3_hf.modeling.processing_internvl3 import processor_for_config


@pytest.fixture
def processor(tokenizer, config):
    return processor_for_config(tokenizer, config)


@pytest.fixture(scope="session")
def image():
    """A 60×30 noise image: two 28-px tiles plus the thumbnail in the tiny config (3 tiles, 12 image tokens)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 60, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def critic(model_factory, processor):
    """A VisualPRM around a tiny random InternVL3 (seed 7, different from the policy's)."""
    return VisualPRM(model_factory(seed=7), processor, batch_size=3)


def official_step_scores(critic: VisualPRM, processor, question: str, steps: list[str], images: list) -> list[float]:
    """The official `soft` computation written out: for step k, render the conversation up to the k-th user turn
    with the generation prompt, run the whole model on it (images through the processor and the ViT every time)
    and take the softmax over the `+`/`-` logits of the last position."""
    messages = critic_messages(question, steps, len(images))
    good, bad = processor.tokenizer.convert_tokens_to_ids(["+", "-"])
    scores = []
    for step in range(len(steps)):
        prompt = processor.apply_chat_template(messages[: 2 * step + 2], add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.no_grad():
            logits = critic.model(**inputs).logits[0, -1, [good, bad]]
        scores.append(logits.softmax(-1)[0].item())
    return scores


@pytest.fixture
def reference_step_scores():
    return official_step_scores
