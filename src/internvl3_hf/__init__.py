"""internvl3-hf: InternVL3 as a Hugging Face Transformers plugin.

Importing the package registers InternVL3 with transformers' Auto classes, teaches `AutoConfig` the official
OpenGVLab `internvl_chat` config, and lets `from_pretrained` read official and `-hf` weight layouts directly.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .formats import register_checkpoint_formats
from .formats.official import InternVLChatConfig
from .modeling.configuration_internvl3 import InternVL3Config
from .modeling.image_processing_internvl3 import InternVL3ImageProcessor
from .modeling.modeling_internvl3 import InternVL3ForConditionalGeneration, InternVL3Model, InternVL3PreTrainedModel
from .modeling.processing_internvl3 import InternVL3Processor


def _register() -> None:
    AutoConfig.register(InternVL3Config.model_type, InternVL3Config, exist_ok=True)
    AutoConfig.register(InternVLChatConfig.model_type, InternVLChatConfig, exist_ok=True)
    AutoModel.register(InternVL3Config, InternVL3Model, exist_ok=True)
    AutoModelForImageTextToText.register(InternVL3Config, InternVL3ForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(InternVL3Config, InternVL3ForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(InternVL3Config, InternVL3Processor, exist_ok=True)
    AutoImageProcessor.register(InternVL3Config, image_processor_classes={"pil": InternVL3ImageProcessor}, exist_ok=True)
    register_checkpoint_formats()


_register()

__all__ = [
    "InternVL3Config",
    "InternVL3ForConditionalGeneration",
    "InternVL3ImageProcessor",
    "InternVL3Processor",
    "InternVL3Model",
    "InternVL3PreTrainedModel",
    "InternVLChatConfig",
]
