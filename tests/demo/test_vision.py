"""The demo's vision-encoder pre-training: labels per grid cell, the classifier's loss, and a short real run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl3_hf.demo import recipe, tasks
from internvl3_hf.demo.model import build_demo_model, build_demo_tokenizer, demo_config
from internvl3_hf.demo.vision import CELL_CLASSES, CellClassifier, cell_dataset, cell_labels, pretrain_vision_encoder
from internvl3_hf.modeling.processing_internvl3 import processor_for_config


def _demo_model():
    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, hidden_size=32, layers=1)
    return build_demo_model(config, 0), processor_for_config(tokenizer, config)


def test_cell_labels_follow_the_image_token_order():
    scene = tasks.Scene([tasks.Shape("red", "circle", 0, 1), tasks.Shape("blue", "triangle", 1, 0)], (255, 255, 255), 3)
    assert cell_labels(scene) == [0, CELL_CLASSES.index(("red", "circle")), CELL_CLASSES.index(("blue", "triangle")), 0]
    assert len(CELL_CLASSES) == 1 + len(tasks.COLOURS) * len(tasks.SHAPES)


def test_the_classifier_reads_each_image_token_of_the_model():
    model, processor = _demo_model()
    classifier = CellClassifier(model)
    examples = cell_dataset(processor, 3, seed=0)
    pixels = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.stack([example["labels"] for example in examples])
    output = classifier(pixels, labels)
    tokens = model.config.image_seq_length
    assert output["logits"].shape == (3, tokens, len(CELL_CLASSES))
    assert output["cell_logits"].shape == (3, tokens, tokens)
    # what each cell holds, plus which cell each token is (image tokens go row by row: token i is cell i)
    expected = F.cross_entropy(output["logits"].reshape(-1, len(CELL_CLASSES)), labels.reshape(-1))
    expected = expected + F.cross_entropy(output["cell_logits"].reshape(-1, tokens), torch.arange(tokens).repeat(3))
    torch.testing.assert_close(output["loss"], expected)
    # The ViT it trains is the model's own: the same parameters, not a copy.
    assert classifier.vision_tower is model.model.vision_tower


def test_pretraining_the_vision_encoder_trains_the_model_vit_only(tmp_path):
    model, processor = _demo_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    args = recipe.vision_training_arguments(tmp_path, 40, 0, batch_size=32)
    accuracy = pretrain_vision_encoder(model, processor, args, 400, seed=1)
    assert accuracy > 0.6  # "empty" everywhere scores 37.5 % (2.5 shapes in 4 cells on average)
    assert set(model.state_dict()) == set(before)  # the head is not attached to the model
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
