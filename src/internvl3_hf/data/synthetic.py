"""Synthetic visual QA made on the fly (no downloads): coloured shapes, plus a little text-only chat."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ..modeling.chat_template import image_prompt
from .sources import Sample

COLOUR_QUESTION = "What colour is the square?"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30)}
TEXT_PAIRS = [
    ("Say hello.", "hello"),
    ("What is one plus one?", "two"),
    ("Name a colour.", "blue"),
    ("Count to three.", "1 2 3"),
]


def shape_image(colour: str, size: int = 56) -> Image.Image:
    """A square of `colour` on white."""
    image = Image.new("RGB", (size, size), "white")
    margin = size // 5
    ImageDraw.Draw(image).rectangle((margin, margin, size - margin, size - margin), fill=COLOURS[colour])
    return image


def synthetic_samples(count: int, seed: int = 0, text_share: float = 0.25) -> list[Sample]:
    """`count` samples: "What colour is the square?" about a generated image, and text-only turns."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        if rng.random() < text_share:
            question, answer = TEXT_PAIRS[index % len(TEXT_PAIRS)]
            samples.append(
                Sample(
                    messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    origin=f"synthetic[{index}]",
                )
            )
            continue
        colour = rng.choice(sorted(COLOURS))
        samples.append(
            Sample(
                messages=[
                    {"role": "user", "content": image_prompt(1, 1) + COLOUR_QUESTION},
                    {"role": "assistant", "content": colour},
                ],
                images=[shape_image(colour)],
                origin=f"synthetic[{index}]",
            )
        )
    return samples
