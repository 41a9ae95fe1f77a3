# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""InternVL3: InternViT → drop CLS → pixel unshuffle → MLP projector → Qwen2.

Self-contained (torch/transformers and sibling files only): copied into checkpoints for `trust_remote_code`.
Parameter names follow transformers' native InternVL (`model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head`), so PEFT target names, TRL's fused LM head and the `-hf` format line up.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.internvl.modeling_internvl import (
    InternVLCausalLMOutputWithPast,
    InternVLModelOutputWithPast,
    InternVLMultiModalProjector,
    InternVLVisionModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.import_utils import is_flash_attn_2_available, torch_compilable_check
from transformers.utils.output_capturing import capture_outputs

from .chat_internvl3 import InternVLChatMixin
from .critic_internvl3 import InternVLCriticMixin
from .configuration_internvl3 import InternVL3Config
from .v2pe import v2pe_rope_position_ids

logger = logging.get_logger(__name__)

PLUGIN_AUTO_MAP = {
    "AutoConfig": "configuration_internvl3.InternVL3Config",
    # As in official checkpoints, `AutoModel` is the chat model: evaluation harnesses load it and call `chat`.
    "AutoModel": "modeling_internvl3.InternVL3ForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_internvl3.InternVL3ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_internvl3.InternVL3ForConditionalGeneration",
}


def official_attention(use_flash_attn: bool) -> str:
    """The attention the official `InternVLChatModel(use_flash_attn=...)` picks: FlashAttention-2 when asked for
    and installed, else eager (its fallback without FlashAttention)."""
    return "flash_attention_2" if use_flash_attn and is_flash_attn_2_available() else "eager"


def check_load_in_8bit(load_in_8bit: bool) -> None:
    """`load_in_8bit=False` (VLMEvalKit's default) is a no-op; quantization goes through `quantization_config`."""
    if load_in_8bit:
        raise ValueError(
            "load_in_8bit=True is not a from_pretrained argument in transformers 5: pass "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True) instead (needs bitsandbytes)."
        )


def pixel_unshuffle(features: torch.Tensor, ratio: float, ps_version: str = "v2") -> torch.Tensor:
    """Fold each (1/ratio)² block of a `(N, S, S, C)` feature grid into the channels (official `pixel_shuffle`).

    Output token (i, j) carries x[2i,2j] ‖ x[2i,2j+1] ‖ x[2i+1,2j] ‖ x[2i+1,2j+1] for ratio 0.5. `v2` emits the
    tokens row-major; `v1` (old checkpoints) emits the grid transposed.
    """
    n, height, width, channels = features.shape
    if height * ratio != int(height * ratio) or width * ratio != int(width * ratio):
        raise ValueError(f"The ViT feature grid {height}x{width} is not divisible by 1/downsample_ratio={1 / ratio}.")
    x = features.reshape(n, height, int(width * ratio), int(channels / ratio))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(width * ratio), int(height * ratio), int(channels / (ratio * ratio)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def describe_image_token_mismatch(
    image_token_mask: torch.Tensor, num_tiles: int, tokens_per_tile: int, image_num_patches: torch.Tensor | None
) -> str:
    """Explain, per sample, why `<IMG_CONTEXT>` tokens and image features disagree."""
    per_sample = image_token_mask.reshape(image_token_mask.shape[0], -1).sum(-1).tolist()
    lines = [
        f"Image features and image tokens do not match: input_ids hold {sum(per_sample)} <IMG_CONTEXT> tokens "
        f"(per sample: {per_sample}) but pixel_values holds {num_tiles} tiles x {tokens_per_tile} tokens = "
        f"{num_tiles * tokens_per_tile} image features."
    ]
    for index, count in enumerate(per_sample):
        if count % tokens_per_tile:
            lines.append(
                f"Sample {index} has {count} <IMG_CONTEXT> tokens, not a multiple of {tokens_per_tile}: an image span "
                "was cut, most likely by truncation."
            )
    covered = 0
    for index, count in enumerate(per_sample):
        covered += count
        if covered > num_tiles * tokens_per_tile:
            lines.append(f"Sample {index} is the first whose image tokens have no pixel_values left.")
            break
    if image_num_patches is not None:
        lines.append(f"image_num_patches (tiles per image) = {image_num_patches.tolist()}.")
    lines.append(
        "Build inputs with the InternVL3 processor (each <image> becomes <img> + <IMG_CONTEXT> x "
        f"{tokens_per_tile}·tiles + </img>) and pass the pixel_values of exactly those images; never truncate "
        "inside an image span."
    )
    return " ".join(lines)


@dataclass
class InternVL3ModelOutputWithPast(InternVLModelOutputWithPast):
    r"""
    rope_position_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
        The positions the rotary embedding used when they are not `position_ids`: V2PE's (float32, float64 beyond
        2**16) or those passed in. A next token on the cache sits at `rope_position_ids[:, -1:] + 1`.
    v2pe_strides (`torch.LongTensor` of shape `(num_images,)`, *optional*):
        Each image's V2PE increment in 1/256 position units (δ = stride / 256), images in row-major order; `None`
        where this call derived no V2PE positions.
    """

    rope_position_ids: torch.Tensor | None = None
    v2pe_strides: torch.LongTensor | None = None


@dataclass
class InternVL3CausalLMOutputWithPast(InternVLCausalLMOutputWithPast):
    r"""
    rope_position_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
        The positions the rotary embedding used when they are not `position_ids` (V2PE's, or those passed in).
    v2pe_strides (`torch.LongTensor` of shape `(num_images,)`, *optional*):
        Each image's V2PE increment in 1/256 position units (δ = stride / 256).
    """

    rope_position_ids: torch.Tensor | None = None
    v2pe_strides: torch.LongTensor | None = None


class InternVL3TextModel(Qwen2Model):
    """Qwen2 decoder whose rotary embedding takes its own (fractional, V2PE) positions.

    `Qwen2Model.forward` feeds one `position_ids` to both the rotary embedding and the mask/attention code, which
    reads non-consecutive positions as packed-sequence boundaries (silently wrong logits for fractional ones).
    Here `rope_position_ids` go to the rotary embedding only; masks and attention kernels get the integer
    per-sample `position_ids` (the Qwen2-VL split).
    """

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        rope_position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Integer per-sample positions for masks and attention kernels (restarting at 0 per packed sample).
        rope_position_ids (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions for the rotary embedding only (V2PE); defaults to `position_ids`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("InternVL3TextModel.forward needs exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.training and past_key_values is None:
            # No cache in training: transformers skips packed-sequence detection whenever a cache exists, so a
            # packed row would attend across its samples.
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if self.config._attn_implementation == "eager" and _is_4d_bool(attention_mask):
            # A ready 4-D mask reaches the attention unchanged, and eager adds it to the scores: make it additive.
            additive = torch.zeros_like(attention_mask, dtype=inputs_embeds.dtype)
            attention_mask = additive.masked_fill(~attention_mask, torch.finfo(inputs_embeds.dtype).min)
        causal_mask_mapping = attention_mask
        if not isinstance(causal_mask_mapping, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        rope_positions = rope_position_ids if rope_position_ids is not None else position_ids
        position_embeddings = self.rotary_embeddings(hidden_states, rope_positions)
        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[index]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None
        )

    def rotary_embeddings(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of Qwen2's rotary embedding, computed in float64 for float64 positions."""
        cos, sin = self.rotary_emb(hidden_states, positions)  # also applies dynamic-RoPE frequency updates
        if positions.dtype != torch.float64:
            return cos, sin
        # float32 cannot hold every 1/256 step beyond 2**16: the same formula in float64.
        inv_freq = self.rotary_emb.inv_freq.to(device=positions.device, dtype=torch.float64)
        freqs = positions[..., None] * inv_freq
        embedding = torch.cat((freqs, freqs), dim=-1)
        scaling = self.rotary_emb.attention_scaling
        return (embedding.cos() * scaling).to(hidden_states.dtype), (embedding.sin() * scaling).to(hidden_states.dtype)


def _is_4d_bool(attention_mask: Any) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool


class InternVL3PreTrainedModel(PreTrainedModel):
    config: InternVL3Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        # The plugin format stores the in-memory (native) key names (the official layout is an explicit export)
        # and carries this code, so every Auto class resolves under trust_remote_code without the package.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **PLUGIN_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)


class InternVL3Model(InternVL3PreTrainedModel):
    """Vision tower, projector and Qwen2 decoder, without the LM head."""

    def __init__(self, config: InternVL3Config):
        super().__init__(config)
        if config.ps_version == "v1":
            logger.warning_once(
                "ps_version='v1' transposes the image token grid; it exists only for old InternVL checkpoints. "
                "InternVL2.5/3 use 'v2'."
            )
        vision = config.vision_config
        if vision.use_qk_norm and vision.layer_norm_eps != 1e-6:
            logger.warning_once(
                f"transformers' InternViT builds its q/k RMSNorm with eps 1e-6, the official one with layer_norm_eps="
                f"{vision.layer_norm_eps}: outputs differ slightly from the official model (released 6B ViTs use 1e-6)."
            )
        self.vision_tower = InternVLVisionModel(config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(config)
        self.language_model = InternVL3TextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        r"""ViT outputs of tiles `(num_tiles, 3, S, S)`, with `pooler_output` the projected LLM embeddings
        `(num_tiles, image_seq_length, hidden)` (the transformers VLM convention `generate` pre-encodes with).

        vision_feature_layer (`int`, *optional*):
            The ViT layer the projector reads (defaults to `config.vision_feature_layer`).
        """
        vision_outputs, features = self.unshuffled_vision_features(pixel_values, vision_feature_layer, **kwargs)
        vision_outputs.pooler_output = self.multi_modal_projector(features)
        return vision_outputs

    def unshuffled_vision_features(
        self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """The ViT outputs and the `vision_feature_layer` features the projector reads: CLS dropped, pixel-unshuffled,
        `(num_tiles, image_seq_length, vision_hidden / downsample_ratio**2)`."""
        kwargs.pop("return_dict", None)
        pixel_values = pixel_values.to(dtype=self.vision_tower.dtype)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if layer != -1 and not kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = True
        vision_outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
        features = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
        features = features[:, 1:, :]  # drop CLS
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, features.shape[-1])
        features = pixel_unshuffle(features, self.config.downsample_ratio, self.config.ps_version)
        return vision_outputs, features.reshape(features.shape[0], -1, features.shape[-1])

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Boolean `(batch, seq)` mask of the `<IMG_CONTEXT>` positions."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def merge_image_features(
        self,
        inputs_embeds: torch.Tensor,
        image_token_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_num_patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write the image features over the `<IMG_CONTEXT>` embeddings, refusing any count mismatch."""
        num_tiles, tokens_per_tile = image_features.shape[:2]
        torch_compilable_check(
            image_token_mask.sum() == num_tiles * tokens_per_tile,
            lambda: describe_image_token_mismatch(image_token_mask, num_tiles, tokens_per_tile, image_num_patches),
        )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_token_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features)

    def v2pe_positions(
        self,
        image_token_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        v2pe_strides: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """V2PE rotary positions `(batch, seq)` of sequences starting here, and the per-image strides used.

        Padding (`attention_mask` 0) is skipped; integer `position_ids` mark packed samples where they are 0
        (positions restart there); `v2pe_strides` override `config.v2pe_mode`.
        """
        return v2pe_rope_position_ids(
            self.config, image_token_mask, attention_mask, position_ids, v2pe_strides, training=self.training
        )

    def derives_v2pe_positions(
        self,
        v2pe_strides: torch.LongTensor | None,
        past_key_values: Cache | None,
        position_ids: torch.LongTensor | None,
    ) -> bool:
        """Whether a forward without `rope_position_ids` computes V2PE positions: V2PE is on and its sequences start
        in this call. On a filled cache the caller gives the positions (V2PE cannot be derived from new tokens)."""
        if self.config.v2pe_mode == "none" and v2pe_strides is None:
            return False
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return True
        if position_ids is None:
            raise ValueError(
                "Continuing a cache under V2PE needs the new tokens' positions: pass `rope_position_ids` (for the next "
                "token after an output `out`: `out.rope_position_ids[:, -1:] + 1`), or integer `position_ids` where "
                "every earlier image had δ = 1. `generate` passes them itself."
            )
        return False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rope_position_ids: torch.Tensor | None = None,
        image_num_patches: torch.LongTensor | None = None,
        v2pe_strides: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | InternVL3ModelOutputWithPast:
        r"""
        pixel_values (`torch.Tensor` of shape `(num_tiles, 3, force_image_size, force_image_size)`, *optional*):
            All tiles of all images of the batch, in the order their `<image>` spans appear (thumbnail last per
            image). Only needed on prefill.
        attention_mask (`torch.Tensor`, *optional*):
            A 2-D `(batch, seq)` padding mask, or a ready 4-D mask (bool, or float with 0 / -inf) of shape
            `(batch, 1, seq, past + seq)`, which reaches the attention unchanged (e.g. a block mask that keeps two
            answers sharing one prompt apart).
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Integer per-sample positions (restarting at 0 per packed sample) for the masks and attention kernels,
            as for any transformers model. Under V2PE the rotary positions are derived from them and `input_ids`.
        rope_position_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions for the rotary embedding only (float32; float64 beyond 2**16), e.g. V2PE positions computed
            once for a whole row and fed chunk by chunk. Given, they replace the V2PE derivation; they never reach
            the masks. On a filled cache under V2PE they (or `position_ids`) are required.
        image_num_patches (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Tiles per image, as returned by the processor; checked against `pixel_values` and used in errors.
        v2pe_strides (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Per-image V2PE increment in 1/256 units (δ = stride / 256), overriding `config.v2pe_mode`.
        mm_encoder_outputs (`dict`, *optional*):
            Pre-computed image features instead of `pixel_values`, as in transformers' native InternVL:
            `{"image": BaseModelOutputWithPooling(pooler_output=features)}` with `features` from
            `get_image_features`, shape `(num_tiles, image_seq_length, hidden)`. Lets one ViT pass serve
            several rows (e.g. the chosen and rejected answers of a preference pair).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("InternVL3Model.forward needs exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs, not both.")
        if position_ids is not None and position_ids.is_floating_point():
            raise ValueError(
                "position_ids are integer positions for masks and attention kernels; pass fractional (V2PE) rotary "
                "positions as rope_position_ids."
            )
        if rope_position_ids is not None and rope_position_ids.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"rope_position_ids in {rope_position_ids.dtype} lose V2PE's 1/256 steps (bf16 holds 4096.25 as 4096): "
                "pass float32 (float64 beyond 2**16), and keep them out of any cast of float inputs to the model dtype."
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_token_mask = None  # built only where needed: a decode step needs neither V2PE nor the image merge

        strides = None
        if rope_position_ids is None and self.derives_v2pe_positions(v2pe_strides, past_key_values, position_ids):
            image_token_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            rope_position_ids, strides = self.v2pe_positions(
                image_token_mask, attention_mask, position_ids, v2pe_strides
            )

        image_features = self.image_features(pixel_values, mm_encoder_outputs, image_num_patches)
        if image_features is not None:
            if image_token_mask is None:  # before the merge: with inputs_embeds it is read off the embeddings
                image_token_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = self.merge_image_features(
                inputs_embeds, image_token_mask, image_features, image_num_patches
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            rope_position_ids=rope_position_ids,
            **kwargs,
        )
        return InternVL3ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            rope_position_ids=rope_position_ids,
            v2pe_strides=strides,
        )

    def image_features(
        self,
        pixel_values: torch.Tensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
        image_num_patches: torch.LongTensor | None,
    ) -> torch.Tensor | None:
        """The projected image features of this call, `(num_tiles, image_seq_length, hidden)`, or `None`."""
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            return mm_encoder_outputs["image"].pooler_output
        if pixel_values is None:
            return None
        if image_num_patches is not None and int(image_num_patches.sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"image_num_patches {image_num_patches.tolist()} sums to {int(image_num_patches.sum())} tiles but "
                f"pixel_values holds {pixel_values.shape[0]} tiles."
            )
        return self.get_image_features(pixel_values, return_dict=True).pooler_output


class InternVL3ForConditionalGeneration(
    InternVL3PreTrainedModel, GenerationMixin, InternVLChatMixin, InternVLCriticMixin
):
    """InternVL3 with the language-modelling head; `generate` feeds images on prefill only; `chat`/`batch_chat`
    follow the official OpenGVLab API."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: InternVL3Config, use_flash_attn: bool | None = None, load_in_8bit: bool = False):
        r"""
        use_flash_attn (`bool`, *optional*):
            The official loading keyword (lmms-eval passes it): picks the attention as `InternVLChatModel` does.
        load_in_8bit (`bool`, defaults to `False`):
            VLMEvalKit passes `False`; `True` asks for `quantization_config` instead.
        """
        check_load_in_8bit(load_in_8bit)
        if use_flash_attn is not None:
            config._attn_implementation = official_attention(use_flash_attn)
        super().__init__(config)
        self.model = InternVL3Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, vision_feature_layer=vision_feature_layer, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        rope_position_ids: torch.Tensor | None = None,
        image_num_patches: torch.LongTensor | None = None,
        v2pe_strides: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | InternVL3CausalLMOutputWithPast:
        r"""
        Arguments as for `InternVL3Model.forward`, and:

        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Next-token targets aligned with `input_ids` (shifted inside the loss); -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0 = all), or for the given indices.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            rope_position_ids=rope_position_ids,
            image_num_patches=image_num_patches,
            v2pe_strides=v2pe_strides,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return InternVL3CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            rope_position_ids=outputs.rope_position_ids,
            v2pe_strides=outputs.v2pe_strides,
        )

    # V2PE in `generate`: the prompt's rotary positions are computed once and travel in `model_kwargs` as
    # `rope_position_ids`, beside transformers' integer `position_ids`; each step takes its tokens' positions from
    # them, generated tokens continuing at +1 (as Qwen2-VL's M-RoPE positions do). The cache holds no state.
    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """transformers' integer positions; under V2PE also the prompt's `rope_position_ids` in `model_kwargs`."""
        position_ids = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        v2pe_strides = model_kwargs.get("v2pe_strides")
        if self.config.v2pe_mode == "none" and v2pe_strides is None:
            return position_ids
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = inputs_tensor
        if input_ids.is_floating_point():  # generation from inputs_embeds
            image_token_mask = self.model.get_placeholder_mask(None, input_ids)
        else:
            image_token_mask = self.model.get_placeholder_mask(input_ids, None)
        rope_position_ids, _ = self.model.v2pe_positions(
            image_token_mask, model_kwargs.get("attention_mask"), v2pe_strides=v2pe_strides
        )
        if rope_position_ids.shape == position_ids.shape and torch.equal(
            rope_position_ids, position_ids.to(rope_position_ids.dtype)
        ):  # one host sync per `generate` call, none per step
            # Every δ is 1: the prompt gets the integer positions as they are, and decoding runs transformers'
            # own path (`_update_model_kwargs_for_generation` drops them after the prompt).
            rope_position_ids = position_ids
        model_kwargs["rope_position_ids"] = rope_position_ids
        return position_ids

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        rope_position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        position_ids = kwargs.get("position_ids")
        if rope_position_ids is not None and position_ids is not None:
            if rope_position_ids.shape[-1] > position_ids.shape[-1]:
                # Chunked prefill hands over one chunk's `position_ids`: the chunk right after the cache.
                start = past_key_values.get_seq_length() if past_key_values is not None else 0
                rope_position_ids = rope_position_ids[..., start : start + position_ids.shape[-1]]
            rope_position_ids = _continue_positions(rope_position_ids, position_ids.shape[-1])
            # the tokens of this step, as transformers slices `position_ids`
            model_inputs["rope_position_ids"] = rope_position_ids[..., -model_inputs["position_ids"].shape[-1] :]
        return model_inputs

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:  # fmt: skip
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        rope_position_ids = model_kwargs.get("rope_position_ids")
        if rope_position_ids is not None and not rope_position_ids.is_floating_point():
            del model_kwargs["rope_position_ids"]  # ordinary positions: decoding runs transformers' own path
        return model_kwargs


def _continue_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """`positions` `(batch, n)` continued to `length` by text tokens (+1 each), as generate continues
    `position_ids`: the generated tokens, and those assisted decoding proposes."""
    missing = length - positions.shape[-1]
    if missing <= 0:
        return positions
    steps = torch.arange(1, missing + 1, dtype=positions.dtype, device=positions.device)
    return torch.cat([positions, positions[:, -1:] + steps], dim=-1)


InternVL3Model.register_for_auto_class("AutoModel")
InternVL3ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "InternVL3TextModel","InternVL3Model", "InternVL3ForConditionalGeneration", "InternVL3PreTrainedModel", "pixel_unshuffle"]
