# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of InternVL3 (InternViT → pixel unshuffle → MLP projector → Qwen2).

This file is self-contained (torch/transformers imports only) because it is copied into checkpoints for
`trust_remote_code` loading.
"""

import os
from collections.abc import Callable

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from .chat_template import END_OF_TURN, IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN
from .v2pe import DEFAULT_DELTAS, delta_to_stride

# model_type → reader turning a config dict of that type, and the checkpoint it came from (folder or Hub id; `None`
# when unknown), into `InternVL3Config` keyword arguments. The `internvl3_hf` package registers the official
# (`internvl_chat`) and transformers-native (`internvl`) readers, so `InternVL3ForConditionalGeneration.from_pretrained`
# reads those checkpoints directly.
FOREIGN_CONFIG_READERS: dict[str, Callable[[dict, str | None], dict]] = {}

# Constructor defaults of the official InternVLChatConfig and InternVisionConfig: a field an official config.json
# leaves out means these. Released configs write them all, with values that differ from these defaults.
OFFICIAL_CONFIG_DEFAULTS = {
    "select_layer": -1,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": None,
    "dynamic_image_size": False,
    "use_thumbnail": False,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "system_message": None,
}
OFFICIAL_VISION_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}
# Config field → the token whose id it holds. An official config.json stores none of these ids: the official code
# takes them from its tokenizer (`tokenizer.convert_tokens_to_ids`), and so does reading an official checkpoint here.
TOKEN_ID_FIELDS = {
    "image_token_id": IMAGE_CONTEXT_TOKEN,
    "image_start_token_id": IMAGE_START_TOKEN,
    "image_end_token_id": IMAGE_END_TOKEN,
    "eos_token_id": END_OF_TURN,
}

V2PE_MODES = ("none", "fixed", "random", "auto")
PS_VERSIONS = ("v1", "v2")


class InternVL3Config(PreTrainedConfig):
    r"""
    Configuration of [`InternVL3ForConditionalGeneration`] / [`InternVL3Model`].

    Args:
        vision_config (`InternVLVisionConfig` or `dict`):
            InternViT settings. InternViT-300M (InternVL3-1B…14B): `hidden_size=1024`, 24 layers, layer norm,
            `attention_bias=True`. InternViT-6B (38B/78B): `hidden_size=3200`, 45 layers, `norm_type="rms_norm"`,
            `use_qk_norm=True` (official `qk_normalization`), `attention_bias=False` (official `qkv_bias`).
        text_config (`Qwen2Config` or `dict`):
            The Qwen2 language model (official `llm_config`).
        downsample_ratio (`float`, defaults to 0.5):
            Pixel-unshuffle ratio: each 2×2 block of ViT patch features becomes one token of 4× the channels.
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation between the two projector linears (official `mlp1.2`, exact GELU).
        image_token_id (`int`, defaults to 151667):
            Id of `<IMG_CONTEXT>`; these embeddings are replaced by image features.
        image_start_token_id (`int`, defaults to 151665):
            Id of `<img>`, which opens every image span.
        image_end_token_id (`int`, defaults to 151666):
            Id of `</img>`, which closes every image span.
        image_seq_length (`int`, defaults to 256):
            `<IMG_CONTEXT>` tokens per tile: `(force_image_size / patch_size)² · downsample_ratio²`.
        vision_feature_layer (`int`, defaults to -1):
            ViT layer whose output is projected (official `select_layer`); -1 is the last layer.
        min_dynamic_patch (`int`, defaults to 1):
            Fewest tiles an image is cut into.
        max_dynamic_patch (`int`, defaults to 12):
            Most tiles an image is cut into (the thumbnail is extra).
        use_thumbnail (`bool`, defaults to `True`):
            Append a whole-image thumbnail tile after the tiles when an image gives more than one tile.
        dynamic_image_size (`bool`, defaults to `True`):
            Tile images dynamically; `False` resizes every image to one `force_image_size` tile.
        force_image_size (`int`, defaults to 448):
            Side of a tile in pixels (the ViT input size).
        ps_version (`str`, defaults to `"v2"`):
            Pixel-shuffle token order. `"v2"` (InternVL2.5/3) is row-major; `"v1"` (old InternVL checkpoints)
            emits the token grid transposed and is kept only to load those checkpoints.
        template (`str`, *optional*, defaults to `"internvl2_5"`):
            Name of the official conversation template (kept for the official format; the processor's chat
            template reproduces `internvl2_5`).
        system_message (`str`, *optional*):
            Default system message. `None` or empty means the template's own default.
        v2pe_mode (`str`, defaults to `"none"`):
            Variable visual position encoding (V2PE): text tokens advance the position by 1, each `<IMG_CONTEXT>`
            token of an image by that image's δ, and `</img>` resumes at ceil(last image position) + 1.
            `"none"`: ordinary positions (what released InternVL3 checkpoints use). `"fixed"`: every image uses
            `v2pe_delta`. `"random"`: in training each image draws δ uniformly from `v2pe_delta_set` (torch's RNG,
            so `transformers.set_seed` makes it reproducible); in eval it uses `v2pe_delta`. `"auto"`: per sample,
            the largest δ of `v2pe_delta_set` whose last position stays below `v2pe_max_position`.
        v2pe_delta (`float`, defaults to 1.0):
            δ of `"fixed"` mode and of `"random"` mode in eval; a multiple of 1/256 in (0, 1]. 1.0 reproduces the
            ordinary encoding exactly.
        v2pe_delta_set (`list[float]`, defaults to `[1, 1/2, 1/4, ..., 1/256]`):
            Candidates for `"random"` and `"auto"`; each a multiple of 1/256 in (0, 1].
        v2pe_max_position (`int`, *optional*):
            Limit of `"auto"` mode (default `text_config.max_position_embeddings`). It covers the prompt: lower it
            to keep room for the tokens `generate` will add.
        eos_token_id (`int` or `list[int]`, defaults to 151645):
            Token(s) ending an assistant turn (`<|im_end|>`): `generate` stops on them by default. The LLM's own
            `text_config.eos_token_id` (`<|endoftext|>`) is left as the checkpoint has it.
        tie_word_embeddings (`bool`, defaults to `False`):
            Tie `lm_head` to the input embeddings. Released InternVL3 heads are untied.
        official_rope_scaling (`dict`, *optional*):
            The `rope_scaling` of an official checkpoint's `llm_config`, kept only so that an export writes it back.
            The official stack (transformers 4.37's Qwen2) never applies it, so the model uses plain RoPE, as there.
    """

    model_type = "internvl3"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": InternVLVisionConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    image_token_id: int = 151667
    image_start_token_id: int = 151665
    image_end_token_id: int = 151666
    image_seq_length: int = 256
    vision_feature_layer: int = -1
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    force_image_size: int = 448
    ps_version: str = "v2"
    template: str | None = "internvl2_5"
    system_message: str | None = None
    v2pe_mode: str = "none"
    v2pe_delta: float = 1.0
    v2pe_delta_set: list[float] | None = None
    v2pe_max_position: int | None = None
    eos_token_id: int | list[int] = 151645
    tie_word_embeddings: bool = False
    official_rope_scaling: dict | None = None

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        # `AutoConfig` passes the checkpoint to `from_dict` as `name_or_path`; a foreign reader needs it (the official
        # format keeps its token ids in the tokenizer files beside config.json).
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "InternVL3Config":
        reader = FOREIGN_CONFIG_READERS.get(config_dict.get("model_type"))
        if reader is not None:
            config_dict = reader(config_dict, kwargs.get("name_or_path") or None)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.v2pe_delta_set is None:
            self.v2pe_delta_set = list(DEFAULT_DELTAS)
        self.validate_internvl3()

    @property
    def v2pe_stride(self) -> int:
        """`v2pe_delta` in 1/256 position units."""
        return delta_to_stride(self.v2pe_delta)

    @property
    def v2pe_strides(self) -> list[int]:
        """`v2pe_delta_set` in 1/256 position units."""
        return [delta_to_stride(delta) for delta in self.v2pe_delta_set]

    def check_tokenizer(self, tokenizer, tokens: dict[str, str] | None = None, *, tokenizer_source: str) -> None:
        """Raise a `ValueError` if `tokenizer` puts any of `tokens` (config field → token; default: all of
        `TOKEN_ID_FIELDS`) at another id than this config: the model would look for ids the prompts never hold."""
        expected = {field: getattr(self, field) for field in (tokens or TOKEN_ID_FIELDS)}
        model_source = f"the model config ({self.name_or_path})" if self.name_or_path else "the model config"
        check_token_ids(
            expected, tokenizer, model_source=model_source, tokenizer_source=tokenizer_source, tokens=tokens
        )

    def validate_internvl3(self) -> None:
        """Raise a `ValueError` naming the field when the settings cannot describe a working model."""
        if self.ps_version not in PS_VERSIONS:
            raise ValueError(f"InternVL3Config.ps_version must be one of {PS_VERSIONS}, got {self.ps_version!r}.")
        if self.v2pe_mode not in V2PE_MODES:
            raise ValueError(f"InternVL3Config.v2pe_mode must be one of {V2PE_MODES}, got {self.v2pe_mode!r}.")
        if not self.v2pe_delta_set:
            raise ValueError("InternVL3Config.v2pe_delta_set must hold at least one δ.")
        for delta in (self.v2pe_delta, *self.v2pe_delta_set):
            delta_to_stride(delta)
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                "InternVL3Config needs 1 <= min_dynamic_patch <= max_dynamic_patch, got "
                f"{self.min_dynamic_patch} and {self.max_dynamic_patch}."
            )
        patch = square_side(self.vision_config.patch_size)
        expected = tokens_per_tile(self.force_image_size, patch, self.downsample_ratio)
        if self.image_seq_length != expected:
            raise ValueError(
                f"InternVL3Config.image_seq_length={self.image_seq_length} does not match force_image_size="
                f"{self.force_image_size}, patch_size={patch} and downsample_ratio={self.downsample_ratio}, "
                f"which give {expected} tokens per tile."
            )


def square_side(value: int | list | tuple) -> int:
    """The side of a square size given in a config as an int or a (height, width) pair."""
    return value[0] if isinstance(value, (list, tuple)) else value


def tokens_per_tile(tile_size: int, patch_size: int, downsample_ratio: float) -> int:
    """`<IMG_CONTEXT>` tokens of one tile (official `num_image_token`, truncated as there): its ViT patch grid,
    pixel-unshuffled."""
    return int((tile_size // patch_size) ** 2 * downsample_ratio**2)


def check_token_ids(
    expected: dict[str, int | list[int]],
    tokenizer,
    *,
    model_source: str,
    tokenizer_source: str,
    tokens: dict[str, str] | None = None,
) -> None:
    """Raise a `ValueError` naming every config field of `expected` whose id is not the tokenizer's id of its token.

    `tokens` maps config fields to token strings (default `TOKEN_ID_FIELDS`); an `eos_token_id` list agrees when it
    holds the token's id.
    """
    tokens = tokens or TOKEN_ID_FIELDS
    problems = []
    for field, model_id in expected.items():
        token_id = tokenizer.convert_tokens_to_ids(tokens[field])
        if token_id not in (model_id if isinstance(model_id, (list, tuple)) else [model_id]):
            found = f"is id {token_id} in" if token_id is not None else "is missing from"
            problems.append(f"{tokens[field]} {found} {tokenizer_source} but {field}={model_id} in {model_source}")
    if problems:
        raise ValueError(
            "The model and the tokenizer disagree on token ids: " + "; ".join(problems) + ". The model would look for "
            "ids the prompts do not hold. Use the tokenizer saved with the model; if this tokenizer is the right one, "
            "set those config fields to its ids (reading an official checkpoint takes them from the tokenizer files "
            "beside its config.json)."
        )


InternVL3Config.register_for_auto_class()

__all__ = ["InternVL3Config"]
