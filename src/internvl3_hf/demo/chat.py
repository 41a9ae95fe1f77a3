"""`internvl3-hf demo --chat-only`: build a tiny InternVL3 locally, save it as a plugin checkpoint, load it back
through the Auto classes and chat with it about a generated image. The weights are random: this shows the pipeline,
not skill."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..chat import build_messages, chat
from ..modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from ..modeling.processing_internvl3 import processor_for_config
from ..tiny import build_tiny_tokenizer, tiny_config

QUESTION = "What colour is the square?"


def draw_demo_image(width: int = 640, height: int = 480) -> Image.Image:
    """A red circle and a blue square on white."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 120, 260, 320), fill="red")
    draw.rectangle((380, 140, 560, 320), fill="blue")
    return image


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> None:
    """A tiny random InternVL3 in the plugin format (config, safetensors, processor, modeling code)."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    model = InternVL3ForConditionalGeneration(tiny_config(tokenizer)).eval()
    model.save_pretrained(directory)
    processor_for_config(tokenizer, model.config).save_pretrained(directory)


def run_demo(output_dir: str | Path = "demo_out", max_new_tokens: int = 12) -> str:
    """Run the demo and return the model's answer."""
    directory = Path(output_dir) / "tiny-internvl3"
    write_tiny_checkpoint(directory)
    print(f"wrote a tiny plugin-format checkpoint: {directory} ({', '.join(sorted(p.name for p in directory.iterdir()))})")

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__} ({parameters:,} parameters) and {type(processor).__name__} via Auto classes")

    image = draw_demo_image()
    image_path = Path(output_dir) / "demo.png"
    image.save(image_path)
    prompt = processor.apply_chat_template(build_messages(QUESTION, 1), add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    tiles = int(inputs["image_num_patches"][0])
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"image {image.width}x{image.height} ({image_path}) -> {tiles} tiles of {model.config.force_image_size} px "
          f"-> {image_tokens} <IMG_CONTEXT> tokens; prompt of {inputs['input_ids'].shape[1]} tokens:")
    print(prompt)
    print("answer (random weights, so not meaningful): ", end="", flush=True)
    answer = chat(model, processor, QUESTION, [image], stream=True, max_new_tokens=max_new_tokens, do_sample=False)
    return answer
