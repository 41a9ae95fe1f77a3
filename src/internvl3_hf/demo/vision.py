"""The demo's vision encoder starts pre-trained, as InternVL3 starts from a pre-trained InternViT.

Two linear heads on each image token's ViT features (the pixel-unshuffled 2×2 patches of one grid cell) learn what
that cell holds — nothing, or one of the colour × shape combinations — and which cell it is, through
`transformers.Trainer`; the heads are then dropped and the recipe's native pre-training goes on from the ViT.
The "which cell" head keeps the column and row in each token's features: V2PE's small δ puts the image tokens at
almost the same rotary position, so the LLM cannot read the cell from their order. From a random ViT, which
perception skills the LLM picked up in pre-training depended on the run (see the README's demo section).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments

from . import tasks

CELL_CLASSES = (None, *((colour, shape) for colour in tasks.COLOURS for shape in tasks.SHAPES))


def cell_labels(scene: tasks.Scene) -> list[int]:
    """What each grid cell holds, row by row (the order of the image tokens): an index into `CELL_CLASSES`."""
    labels = [0] * (tasks.GRID * tasks.GRID)
    for item in scene.shapes:
        labels[item.row * tasks.GRID + item.column] = CELL_CLASSES.index((item.colour, item.shape))
    return labels


class CellClassifier(nn.Module):
    """The model's ViT and two linear heads on each image token's features as the projector reads them (no
    projector, no LLM): what its cell holds (`logits`, over `CELL_CLASSES`) and which cell it is (`cell_logits`)."""

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.model.vision_tower  # the only trained part (registered: the Trainer optimizes it)
        self.features = model.model.unshuffled_vision_features  # a bound method: registers no LLM parameters
        width = model.config.vision_config.hidden_size * round(1 / model.config.downsample_ratio) ** 2
        self.head = nn.Linear(width, len(CELL_CLASSES))
        self.cell_head = nn.Linear(width, model.config.image_seq_length)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        features = self.features(pixel_values)[1]
        logits, cell_logits = self.head(features), self.cell_head(features)
        loss = None
        if labels is not None:
            cells = torch.arange(features.shape[1], device=features.device).expand(features.shape[:2])
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss = loss + F.cross_entropy(cell_logits.flatten(0, 1), cells.flatten())
        return {"loss": loss, "logits": logits, "cell_logits": cell_logits}


def cell_dataset(processor, scenes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`scenes` random scenes as `{"pixel_values", "labels"}` examples (one tile each, the demo's image processing)."""
    rng = random.Random(seed)
    drawn = [tasks.random_scene(rng, rng.randrange(2**31)) for _ in range(scenes)]
    pixels = processor.image_processor([scene.render() for scene in drawn], return_tensors="pt")["pixel_values"]
    if len(pixels) != scenes:
        raise ValueError(f"the demo's image processor made {len(pixels)} tiles for {scenes} scenes; expected one each")
    return [{"pixel_values": pixel, "labels": torch.tensor(cell_labels(scene))} for pixel, scene in zip(pixels, drawn)]


def pretrain_vision_encoder(model, processor, args: TrainingArguments, scenes: int, seed: int,
                            prepare: Callable[[Trainer], None] | None = None) -> float:
    """Train `model`'s ViT to tell what each grid cell holds and which cell each image token is (`prepare` gets the
    `Trainer` first, e.g. to set its callbacks); returns how often it tells what a cell holds on 500 held-out
    scenes."""
    classifier = CellClassifier(model)
    examples = cell_dataset(processor, scenes + 500, seed)
    trainer = Trainer(model=classifier, args=args, train_dataset=examples[:scenes])
    if prepare is not None:
        prepare(trainer)
    trainer.train()
    held_out = examples[scenes:]
    classifier.eval()
    with torch.no_grad():
        logits = classifier(torch.stack([example["pixel_values"] for example in held_out]))["logits"]
    labels = torch.stack([example["labels"] for example in held_out])
    return (logits.argmax(-1) == labels).float().mean().item()
