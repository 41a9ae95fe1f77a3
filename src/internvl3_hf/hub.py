"""Self-describing checkpoints for the Hub: weights, config, processor, chat template, generation config, the
`modeling/` code (trust_remote_code) and a model card; plus merging LoRA adapters into full checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import HfApi

from .formats.convert import load_checkpoint, load_processor
from .formats.serving import V2PE_ENGINE_WARNING
from .modeling.processing_internvl3 import InternVL3Processor

logger = logging.getLogger(__name__)

MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: {license}
{base_model_line}tags:
- internvl3
- internvl3-hf
- vision-language
---

# {title}

An InternVL3 checkpoint in the [internvl3-hf](https://github.com/) plugin format ({parameters} parameters:
InternViT → pixel unshuffle → MLP projector → Qwen2).

| | |
|---|---|
| base model | {base_model} |
| training recipe | {recipe} |
| training data | {datasets} |
| tiles per image | {min_tiles}–{max_tiles} of {tile_size} px{thumbnail} |
| V2PE | {v2pe} |
| stop token | `<|im_end|>` (generation_config.json) |

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

# With `pip install internvl3-hf` and `import internvl3_hf`, trust_remote_code is not needed.
model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=["image.jpg"], return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{v2pe_note}"""

def model_card(model, repo_id: str, base_model: str | None = None, recipe: str | None = None,
               datasets: list[str] | None = None, license: str = "apache-2.0") -> str:
    """The README.md of a published checkpoint."""
    config = model.config
    v2pe = "off (ordinary positions)" if config.v2pe_mode == "none" else f"{config.v2pe_mode}, δ={config.v2pe_delta}"
    return MODEL_CARD.format(
        license=license,
        base_model_line=f"base_model: {base_model}\n" if base_model else "",
        title=repo_id.split("/")[-1],
        parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        base_model=base_model or "unknown",
        recipe=recipe or "unknown",
        datasets=", ".join(datasets) if datasets else "unknown",
        min_tiles=config.min_dynamic_patch,
        max_tiles=config.max_dynamic_patch,
        tile_size=config.force_image_size,
        thumbnail=" + thumbnail" if config.use_thumbnail else "",
        v2pe=v2pe,
        repo=repo_id,
        v2pe_note="" if config.v2pe_mode == "none" else "\n> " + V2PE_ENGINE_WARNING.format(mode=config.v2pe_mode, delta=config.v2pe_delta) + "\n",
    )


def save_for_hub(model, processor, save_directory: str | Path, repo_id: str | None = None, **card) -> Path:
    """Write the complete repository folder that `push_to_hub` uploads."""
    save_directory = Path(save_directory)
    model.save_pretrained(save_directory)
    processor.save_pretrained(save_directory)
    (save_directory / "README.md").write_text(model_card(model, repo_id or save_directory.name, **card))
    return save_directory


def push_to_hub(model, processor, repo_id: str, local_directory: str | Path, private: bool = True, **card) -> str:
    """Save with `save_for_hub` and upload that folder; returns the commit URL."""
    folder = save_for_hub(model, processor, local_directory, repo_id, **card)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload InternVL3 (internvl3-hf)")


def merge_lora(adapter_directory: str | Path, output_directory: str | Path, base: str | Path | None = None) -> Path:
    """Merge a LoRA adapter into its base model and save a full plugin checkpoint (+ the processor)."""
    from peft import PeftModel

    adapter_directory = Path(adapter_directory)
    adapter_config = json.loads((adapter_directory / "adapter_config.json").read_text())
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_directory}/adapter_config.json names no base model: pass base=... (--base).")
    model = PeftModel.from_pretrained(load_checkpoint(base, dtype="auto"), adapter_directory).merge_and_unload()
    model.save_pretrained(output_directory)
    if (adapter_directory / "processor_config.json").exists():  # Trainer.save_model saves it beside the adapter
        processor = InternVL3Processor.from_pretrained(adapter_directory)
    else:
        processor = load_processor(base, model.config)
    if processor is not None:
        processor.save_pretrained(output_directory)
    logger.info("merged %s into %s -> %s", adapter_directory, base, output_directory)
    return Path(output_directory)
