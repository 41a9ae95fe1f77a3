"""internvl3-hf: InternVL3 as a Hugging Face Transformers plugin."""

from .modeling.configuration_internvl3 import InternVL3Config
from .modeling.modeling_internvl3 import InternVL3ForConditionalGeneration, InternVL3Model, InternVL3PreTrainedModel

__all__ = ["InternVL3Config", "InternVL3ForConditionalGeneration", "InternVL3Model", "InternVL3PreTrainedModel"]
