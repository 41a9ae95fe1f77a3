"""The demo's tiny InternVL3 and its tokenizer, built locally and deterministically (no downloads).

The tokenizer is a real Qwen2 byte-level BPE with InternVL3's special tokens (as `internvl3_hf.tiny`), trained on
the demo's own vocabulary and on the VisualPRM system prompt (so that a VisualPRM critic conversation on the demo
model stays short too; the demo's own critic is an `ImplicitPRM`). The model is InternViT
(56-px images, 14-px patches: a 4×4 grid that pixel unshuffle turns into 4 image tokens, one per cell of the scene's
2×2 grid) + the MLP projector + a Qwen2 decoder (128-d, 4 layers): about 1.1 million parameters.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Tokenizer

from ..best_of_n.prm import PRM_SYSTEM_PROMPT
from ..modeling.configuration_internvl3 import InternVL3Config
from ..modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from ..tiny import tiny_config, train_bpe_tokenizer
from .tasks import tokenizer_corpus

IMAGE_SIZE = 56
PATCH_SIZE = 14
SYSTEM_MESSAGE = "Answer."


def build_demo_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer with InternVL3's special tokens, trained on the demo's text; the same every call."""
    return train_bpe_tokenizer([tokenizer_corpus(), PRM_SYSTEM_PROMPT * 4, (SYSTEM_MESSAGE + "\n") * 20], vocab_size)


def demo_config(tokenizer: Qwen2Tokenizer, *, hidden_size: int = 128, layers: int = 4, **overrides) -> InternVL3Config:
    """The demo model's config: `tiny_config` at demo size (56-px images, a 64-d ViT, a `hidden_size` × `layers`
    Qwen2), one tile per image (no dynamic tiling), V2PE with random δ in training."""
    settings = dict(
        min_dynamic_patch=1,
        max_dynamic_patch=1,
        use_thumbnail=False,
        dynamic_image_size=False,
        system_message=SYSTEM_MESSAGE,
        v2pe_mode="random",
    )
    settings.update(overrides)
    return tiny_config(
        tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_hidden_size=64, hidden_size=hidden_size,
        intermediate_size=3 * hidden_size, layers=layers, **settings,
    )  # fmt: skip


def build_demo_model(config: InternVL3Config, seed: int = 0) -> InternVL3ForConditionalGeneration:
    """The demo model with its random initialisation, plus random ViT position embeddings.

    transformers initialises InternViT's learned position embeddings to zeros (a released checkpoint overwrites
    them); from scratch, zeros would leave the 4 image tokens without any notion of where they are, which V2PE's
    small δ (all image tokens at almost the same rotary position) does not supply either.
    """
    torch.manual_seed(seed)
    model = InternVL3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.3)
    return model
