"""Tiny InternVL3 parts built locally, deterministically and without downloads: for tests, demos and benchmarks.

The tokenizer is a real Qwen2 byte-level BPE (trained in milliseconds on an embedded corpus) carrying the same
special tokens, in the same order, as the released InternVL3 tokenizer; ids are small so that models stay tiny.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import InternVLVisionConfig, Qwen2Config, Qwen2Tokenizer

from .modeling.chat_template import END_OF_TURN
from .modeling.chat_template import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN
from .modeling.configuration_internvl3 import TOKEN_ID_FIELDS, InternVL3Config

# Same order as Qwen2 (151643..) followed by InternVL's (151665..): only the offsets differ.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", END_OF_TURN)
INTERNVL_SPECIAL_TOKENS = (
    IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A red circle sits left of a blue square.
How many shapes are in the image? There are three shapes: two triangles and one circle.
Describe the image in detail. The picture shows a green triangle on a white background.
What colour is the square? The square is yellow. Answer the question step by step.
Step 1: count the red shapes. Step 2: count the blue shapes. Step 3: add them. The answer is 5.
user assistant system image video frame question answer please thanks hello world.
You are a helpful assistant. Frame1: Frame2: Image-1: Image-2: 0 1 2 3 4 5 6 7 8 9 + - = ?
你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。
"""


def build_tiny_tokenizer(vocab_size: int = 400) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer with InternVL3's special tokens; the same every call."""
    return train_bpe_tokenizer([_CORPUS] * 4, vocab_size)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE trained on `texts`, with Qwen2's and InternVL3's special tokens; deterministic."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[QWEN_SPECIAL_TOKENS[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    model_state = json.loads(bpe.model.__getstate__())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model_state["vocab"], merges=merges)
    tokenizer.add_special_tokens(
        {
            "eos_token": END_OF_TURN,
            "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:] + INTERNVL_SPECIAL_TOKENS),
        }
    )
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = 8192
    return tokenizer


def tiny_config(
    tokenizer: Qwen2Tokenizer | None = None,
    *,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden_size: int = 32,
    hidden_size: int = 48,
    intermediate_size: int = 96,
    layers: int = 2,
    **overrides,
) -> InternVL3Config:
    """A few-hundred-thousand-parameter InternVL3 config whose token ids match `tokenizer`.

    `image_size=28` with patch 7 gives a 4×4 ViT grid → 4 image tokens per tile (`image_seq_length`). The sizes
    (ViT width, Qwen2 width / MLP width / depth) scale it up for the demo; `overrides` go to `InternVL3Config`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * vision_hidden_size,
        attention_bias=True,
        image_size=image_size,
        patch_size=patch_size,
        layer_scale_init_value=0.1,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_ID_FIELDS.items()}
    settings = dict(
        vision_config=vision,
        text_config=text,
        force_image_size=image_size,
        image_seq_length=(image_size // patch_size) ** 2 // 4,
        **ids,
    )
    settings.update(overrides)
    return InternVL3Config(**settings)
