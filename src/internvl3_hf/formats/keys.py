"""Key tables between the plugin's in-memory parameter names and the two on-disk formats.

Each table is an ordered list of `(on_disk, in_memory)` name fragments. A fragment matches whole dot-separated
name parts; a leading `^` anchors it at the start of the key. The same table drives loading (through
transformers' `WeightRenaming`, so `from_pretrained` reads the format directly) and exporting (applied in
reverse), so the two directions cannot drift apart.
"""

from __future__ import annotations

import re

# Official OpenGVLab (`InternVLChatModel`) layout. The fused `attn.qkv` is split/fused separately (QKV_* below).
OFFICIAL_KEY_TABLE: list[tuple[str, str]] = [
    ("^vision_model.", "model.vision_tower."),
    ("^mlp1.0.", "model.multi_modal_projector.layer_norm."),
    ("^mlp1.1.", "model.multi_modal_projector.linear_1."),
    ("^mlp1.3.", "model.multi_modal_projector.linear_2."),
    ("^language_model.model.", "model.language_model."),
    ("^language_model.lm_head.", "lm_head."),
    ("encoder.layers", "encoder.layer"),
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding", "embeddings.patch_embeddings.projection"),
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
    ("attn.proj", "attention.projection_layer"),
    ("attn.q_norm", "attention.q_norm"),
    ("attn.k_norm", "attention.k_norm"),
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
]
OFFICIAL_QKV = "attn.qkv"
PLUGIN_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")

# transformers-native `-hf` layout as `InternVLForConditionalGeneration.save_pretrained` writes it.
HF_KEY_TABLE: list[tuple[str, str]] = [
    ("^vision_tower.", "model.vision_tower."),
    ("^multi_modal_projector.", "model.multi_modal_projector."),
    ("^language_model.model.", "model.language_model."),
    ("^language_model.lm_head.", "lm_head."),
]


def fragment_regex(fragment: str) -> str:
    """Regex matching `fragment` as whole dot-separated name parts (`^` anchors it at the key start)."""
    body = re.escape(fragment.lstrip("^"))
    end = "" if fragment.endswith(".") else r"(?!\w)"
    return f"^{body}{end}" if fragment.startswith("^") else rf"(?<!\w){body}{end}"


def rename_key(key: str, table: list[tuple[str, str]], *, reverse: bool = False) -> str:
    """Rename one key through `table`: on-disk → in-memory, or in-memory → on-disk with `reverse=True`."""
    rules = [(memory, disk) for disk, memory in reversed(table)] if reverse else table
    for source, target in rules:
        anchored = source.startswith("^") or target.startswith("^")
        source = ("^" + source.lstrip("^")) if anchored else source
        key = re.sub(fragment_regex(source), target.lstrip("^"), key, count=1 if anchored else 0)
    return key
