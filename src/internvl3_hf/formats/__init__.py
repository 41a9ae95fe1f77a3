"""Checkpoint formats: the plugin's own, the official OpenGVLab one and transformers' native `-hf` one."""

from __future__ import annotations

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

from ..modeling.configuration_internvl3 import FOREIGN_CONFIG_READERS
from .hf import hf_config_to_plugin
from .keys import HF_KEY_TABLE, OFFICIAL_KEY_TABLE, OFFICIAL_QKV, PLUGIN_QKV, fragment_regex
from .official import official_config_to_plugin

PLUGIN_MODEL_CLASSES = ("InternVL3ForConditionalGeneration", "InternVL3Model")


def checkpoint_weight_transforms() -> list[WeightRenaming | WeightConverter]:
    """Loader transforms that read official and `-hf` weight names into the plugin's in-memory names.

    Plugin checkpoints already use in-memory names, which none of these patterns match.
    """
    renamings = [
        WeightRenaming(source_patterns=fragment_regex(disk), target_patterns=memory.lstrip("^"))
        for disk, memory in HF_KEY_TABLE + OFFICIAL_KEY_TABLE
    ]
    split_qkv = WeightConverter(
        source_patterns=fragment_regex(OFFICIAL_QKV),
        target_patterns=list(PLUGIN_QKV),
        operations=[Chunk(dim=0)],
    )
    return [*renamings, split_qkv]


def register_checkpoint_formats() -> None:
    """Let `from_pretrained` of the plugin's classes read official and `-hf` configs and weights directly."""
    FOREIGN_CONFIG_READERS["internvl_chat"] = official_config_to_plugin
    FOREIGN_CONFIG_READERS["internvl"] = hf_config_to_plugin
    for class_name in PLUGIN_MODEL_CLASSES:
        register_checkpoint_conversion_mapping(class_name, checkpoint_weight_transforms(), overwrite=True)
