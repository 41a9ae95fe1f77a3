"""Shared fixtures for the InternVL3 test suite: a tiny tokenizer/config/model and hand-built multimodal inputs.

Everything is built locally (no Hub access). The tiny config uses 28-px tiles with 7-px patches: a 4×4 ViT grid,
pixel-unshuffled to 2×2 = 4 `<IMG_CONTEXT>` tokens per tile.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config

TOKENS_PER_TILE = 4


# --------------------------------------------------------------------------------------------------- tokenizer/config
@pytest.fixture(autouse=True)
def flex_attention_on_one_thread(request):
    """flex_attention tests run on one CPU thread from a clean torch.compile cache. On the CPU, torch 2.13's compiled
    flex kernel gave wrong logits on padded batches with two threads (up to 13 off; right with one), and a second
    compile with other shapes in the same process turns dynamic and read out of bounds, depending on test order."""
    if "flex" not in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def config(tokenizer):
    """A fresh tiny `InternVL3Config` (tests may mutate it)."""
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def special_ids(tokenizer):
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
    return {name: tokenizer.convert_tokens_to_ids(name) for name in names}


# --------------------------------------------------------------------------------------------------- model
def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so that activations and logits are O(1), not the ~0.02-std init.

    With the default init the logits are nearly flat (std ~0.1), so wrong token orders or wrong masks could hide
    below a 1e-5 tolerance and greedy decoding sits on near-ties. These weights make any such bug visible.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("lambda_1") or name.endswith("lambda_2"):
                value = 0.5 + 0.1 * noise  # InternViT layer scale
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif param.ndim >= 2 and name.endswith("weight"):
                value = noise / math.sqrt(param[0].numel())
                if name == "lm_head.weight":
                    value = value * 3.0
            else:  # biases, CLS token, absolute position embeddings
                value = 0.2 * noise
            param.copy_(value.to(param.dtype))
    return model


def build_model(config, seed: int = 0, attn_implementation: str | None = None) -> InternVL3ForConditionalGeneration:
    config = copy.deepcopy(config)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = InternVL3ForConditionalGeneration(config)
    return randomize_weights_(model, seed).eval()


@pytest.fixture
def model(config):
    """The tiny InternVL3 (~110k parameters) with O(1) random weights, in eval mode."""
    return build_model(config)


def build_native_model(model: InternVL3ForConditionalGeneration):
    """transformers' own `InternVLForConditionalGeneration` holding exactly `model`'s weights (strict load)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = model.config
    native_config = InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    native = InternVLForConditionalGeneration(native_config)
    native.load_state_dict(model.state_dict(), strict=True)
    native.generation_config = copy.deepcopy(model.generation_config)
    native.set_attn_implementation(model.config._attn_implementation)
    return native.eval()


@pytest.fixture
def native_model(model):
    return build_native_model(model)


# --------------------------------------------------------------------------------------------------- inputs
def image_span(special_ids: dict, num_tiles: int) -> list[int]:
    """`<img>` + `<IMG_CONTEXT>` × (4·tiles) + `</img>`: what the processor puts in place of one `<image>`."""
    return (
        [special_ids["<img>"]]
        + [special_ids["<IMG_CONTEXT>"]] * (TOKENS_PER_TILE * num_tiles)
        + [special_ids["</img>"]]
    )


def build_prompt(
    tokenizer, special_ids: dict, tiles_per_image: list[int], question: str = "Describe the image."
) -> list[int]:
    """A chat-formatted user turn with one image span per entry of `tiles_per_image`, ending at the assistant tag."""
    ids = [special_ids["<|im_start|>"]] + tokenizer.encode("user\n", add_special_tokens=False)
    for index, tiles in enumerate(tiles_per_image):
        if len(tiles_per_image) > 1:
            ids += tokenizer.encode(f"Image-{index + 1}: ", add_special_tokens=False)
        ids += image_span(special_ids, tiles) + tokenizer.encode("\n", add_special_tokens=False)
    ids += tokenizer.encode(question, add_special_tokens=False)
    ids += [special_ids["<|im_end|>"]] + tokenizer.encode("\n", add_special_tokens=False)
    ids += [special_ids["<|im_start|>"]] + tokenizer.encode("assistant\n", add_special_tokens=False)
    return ids


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into `(input_ids, attention_mask)`."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq)
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


def make_pixel_values(num_tiles: int, image_size: int = 28, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn((num_tiles, 3, image_size, image_size), generator=generator)


def make_inputs(tokenizer, special_ids, samples: list[list[int]], question: str = "Describe the image.", seed: int = 0):
    """Model inputs for a batch; `samples[b]` lists the tile count of each image of sample b (may be empty).

    Returns a dict with `input_ids`, `attention_mask` (left padding), and, when any image exists, `pixel_values`
    (all tiles, in text order) and `image_num_patches`.
    """
    sequences = [build_prompt(tokenizer, special_ids, tiles, question) for tiles in samples]
    input_ids, attention_mask = left_pad(sequences, special_ids["<|endoftext|>"])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    all_tiles = [tiles for sample in samples for tiles in sample]
    if all_tiles:
        inputs["pixel_values"] = make_pixel_values(sum(all_tiles), seed=seed)
        inputs["image_num_patches"] = torch.tensor(all_tiles, dtype=torch.long)
    return inputs


@pytest.fixture
def make_batch(tokenizer, special_ids):
    def factory(samples: list[list[int]], question: str = "Describe the image.", seed: int = 0):
        return make_inputs(tokenizer, special_ids, samples, question, seed)

    return factory


@pytest.fixture
def model_factory(config):
    """`model_factory(config=None, seed=0, attn_implementation=None)` → a fresh randomized tiny model."""

    def factory(config_=None, seed: int = 0, attn_implementation: str | None = None):
        return build_model(config_ if config_ is not None else config, seed, attn_implementation)

    return factory


@pytest.fixture
def native_factory():
    """`native_factory(model)` → native `InternVLForConditionalGeneration` with `model`'s weights and attention."""
    return build_native_model


@pytest.fixture
def image_span_ids(special_ids):
    """`image_span_ids(num_tiles)` → `<img>` + `<IMG_CONTEXT>` × 4·tiles + `</img>`."""
    return lambda num_tiles: image_span(special_ids, num_tiles)


@pytest.fixture
def pixel_values_factory():
    return make_pixel_values


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they make each step up to 10x slower
    (and 2-rank DDP tests run one thread per rank). Modules opt in with `pytestmark`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
