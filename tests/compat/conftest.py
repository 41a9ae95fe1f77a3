"""Plugin checkpoints (a chat model and a VisualPRM-style critic), their native twins, test images, and a runner for
the client replays in a fresh process without the package.

The checkpoints use 448-px tiles, the clients' hard-coded tile size, with 56-px patches: 8x8 ViT patches, 16 image
tokens per tile, so the clients' own tiling runs unchanged on a model small enough for CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config

HERE = Path(__file__).parent
_BUILT: dict = {}


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _balance_verdicts_(model, tokenizer) -> None:
    """Bring the random critic's `+` and `-` output rows close, so that P(+) spreads around 0.5 instead of sitting
    near 0 or 1 (where rankings and a 1e-4 tolerance would prove little)."""
    plus, minus = tokenizer.convert_tokens_to_ids(["+", "-"])
    weight = model.lm_head.weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight[minus] = weight[plus] + 0.3 * torch.randn(weight.shape[1], generator=generator)


@pytest.fixture
def compat(model_factory, native_factory, tmp_path_factory):
    """Built once per session: `dirs` (checkpoint folders), `natives` (fp32 native twins), `tokenizer`, `images`
    (paths: a 7-tile landscape, a 3-tile portrait, 4 video frames)."""
    if not _BUILT:
        root = tmp_path_factory.mktemp("compat")
        tokenizer = build_tiny_tokenizer()
        config = tiny_config(tokenizer, image_size=448, patch_size=56)
        dirs, natives = {}, {}
        for name, seed in (("chat", 0), ("critic", 7)):
            model = model_factory(config, seed=seed)
            if name == "critic":
                _balance_verdicts_(model, tokenizer)
            model.save_pretrained(root / name)
            processor_for_config(tokenizer, model.config).save_pretrained(root / name)
            dirs[name], natives[name] = str(root / name), native_factory(model)
        sizes = [(500, 300), (200, 400)] + [(160, 120)] * 4
        images = []
        for index, size in enumerate(sizes):
            path = root / f"image_{index}.png"
            _noise_image(*size, seed=index).save(path)
            images.append(str(path))
        _BUILT.update(dirs=dirs, natives=natives, tokenizer=tokenizer, images=images, root=root)
    return _BUILT


@pytest.fixture
def run_replay(compat):
    """`run_replay(spec)`: run `replay.py` on `spec` in a fresh interpreter (package blocked), return its JSON."""

    def run(spec: dict) -> dict:
        path = compat["root"] / f"{spec['client']}_spec.json"
        path.write_text(json.dumps(spec))
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        environment.pop("PYTHONPATH", None)
        done = subprocess.run(
            [sys.executable, str(HERE / "replay.py"), str(path)],
            cwd=HERE, capture_output=True, text=True, timeout=300, env=environment,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
