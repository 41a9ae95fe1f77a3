"""Build the plugin processor for a model config when a checkpoint ships no processor files of its own."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .modeling.configuration_internvl3 import InternVL3Config
from .modeling.image_processing_internvl3 import InternVL3ImageProcessor
from .modeling.processing_internvl3 import InternVL3Processor, processor_settings_from_model_config


def processor_for_config(tokenizer: PreTrainedTokenizerBase, config: InternVL3Config) -> InternVL3Processor:
    """An `InternVL3Processor` whose tiling, tokens per tile and system message follow `config`."""
    settings = processor_settings_from_model_config(config.to_dict())
    return InternVL3Processor(
        image_processor=InternVL3ImageProcessor(**settings["image_processor"]),
        tokenizer=tokenizer,
        image_seq_length=settings["image_seq_length"],
        chat_template=settings["chat_template"],
    )
