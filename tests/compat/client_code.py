"""The evaluation clients' own preprocessing, re-implemented from their source for the call replays.

Nothing here imports `internvl3_hf`: the replays run it in a process where the package cannot be imported, and the
parent test feeds the same tiles to transformers' native InternVL.

Sources (line numbers at these commits):
- lmms-eval 0.7.2, EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
  `lmms_eval/models/simple/internvl3.py` (model `internvl3`).
- VLMEvalKit 0.2rc1, open-compass/VLMEvalKit@e8e78f05f3080fe28154f2130321f17951c3be94,
  `vlmeval/vlm/internvl/utils.py` and `vlmeval/vlm/internvl/internvl_chat.py` (class `InternVLChat`).
Both clients tile with the same code (the InternVL model card's), so it is written once.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILE = 448  # both clients' `input_size` default


# lmms-eval internvl3.py L32-50, VLMEvalKit utils.py L19-27: RGB, `T.Resize((s, s), BICUBIC)`, `T.ToTensor()`,
# `T.Normalize(IMAGENET_MEAN, IMAGENET_STD)`. Written without torchvision (not installed here): on a PIL image its
# Resize is PIL's `resize(..., BICUBIC)`, ToTensor is uint8 HWC -> float CHW / 255, Normalize is (x - mean) / std.
def transform(image: Image.Image, input_size: int) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    image = image.resize((input_size, input_size), Image.BICUBIC)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


# lmms-eval internvl3.py L53-84, VLMEvalKit utils.py L30-43
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


# lmms-eval internvl3.py L87-133, VLMEvalKit utils.py L46-82
def dynamic_preprocess(image, min_num=1, max_num=6, image_size=TILE, use_thumbnail=False):
    width, height = image.size
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}  # fmt: skip
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    columns, rows = find_closest_aspect_ratio(width / height, ratios, width, height, image_size)
    resized = image.resize((image_size * columns, image_size * rows))
    tiles = [
        resized.crop(((i % columns) * image_size, (i // columns) * image_size,
                      (i % columns + 1) * image_size, (i // columns + 1) * image_size))
        for i in range(columns * rows)
    ]  # fmt: skip
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def tiles_to_pixels(tiles: list, input_size: int = TILE) -> torch.Tensor:
    return torch.stack([transform(tile, input_size) for tile in tiles])


# lmms-eval internvl3.py L136-151: a PIL image, `max_num` 12 by default.
def lmms_eval_load_image(image: Image.Image, max_num: int = 12) -> torch.Tensor:
    return tiles_to_pixels(dynamic_preprocess(image, image_size=TILE, use_thumbnail=True, max_num=max_num))


# lmms-eval internvl3.py L383-396: the task's gen_kwargs, normalised to the adapter's three keys.
LMMS_EVAL_DEFAULT_GEN_KWARGS = dict(num_beams=1, max_new_tokens=1024, do_sample=False)  # L25-29


def lmms_eval_gen_kwargs(task_gen_kwargs: dict) -> dict:
    gen_kwargs = dict(task_gen_kwargs)
    gen_kwargs.pop("until", None)
    for key, value in LMMS_EVAL_DEFAULT_GEN_KWARGS.items():
        gen_kwargs.setdefault(key, value)
    return {key: value for key, value in gen_kwargs.items() if key in LMMS_EVAL_DEFAULT_GEN_KWARGS}


# lmms-eval internvl3.py L405-434: how many tiles per image, and `<image>` tags for a plain-text context.
def lmms_eval_image_inputs(images: list, contexts: str, max_num: int = 12, total_max_num: int = 64):
    dynamic_max_num = max(1, min(max_num, total_max_num // len(images)))
    processed = [lmms_eval_load_image(image, max_num=dynamic_max_num).to(torch.bfloat16) for image in images]
    if contexts.count("<image>") != len(processed):
        contexts = " ".join(["<image>"] * len(processed)) + "\n" + contexts
    return torch.cat(processed, dim=0), [v.size(0) for v in processed], contexts


# lmms-eval internvl3.py L184-218 and L453-461: video frames, one `Frame{i}: <image>` line each (decord's frame
# reading is replaced by the given frames).
def lmms_eval_video_inputs(frames: list, contexts: str, max_num: int = 12, total_max_num: int = 64):
    dynamic_max_num = max(1, min(max_num, total_max_num // len(frames)))
    pixels = [lmms_eval_load_image(frame, max_num=dynamic_max_num) for frame in frames]
    prefix = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(pixels)))
    return torch.cat(pixels).to(torch.bfloat16), [p.shape[0] for p in pixels], prefix + contexts


# VLMEvalKit utils.py L85-93: a file path, optional 2x bilinear upscale (MMMU), `max_num` 6 by default.
def vlmevalkit_load_image(image_file, input_size: int = TILE, max_num: int = 6, upscale: bool = False):
    image = Image.open(image_file).convert("RGB")
    if upscale:
        image = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
    tiles = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return tiles_to_pixels(tiles, input_size)


# VLMEvalKit internvl_chat.py L212-214: generation settings of `InternVLChat(**kwargs)`.
def vlmevalkit_kwargs(**kwargs) -> dict:
    return {**dict(do_sample=False, max_new_tokens=4096, top_p=None), **kwargs}


# VLMEvalKit internvl_chat.py L414-417: the settings of Best-of-N candidate `idx` (the first is greedy).
def vlmevalkit_candidate_kwargs(kwargs: dict, idx: int) -> dict:
    settings = dict(kwargs)
    settings["do_sample"] = idx > 0 or settings.get("do_sample", False)
    settings["temperature"] = 0.6
    settings["top_p"] = 0.95
    return settings


# VLMEvalKit internvl_chat.py L570: multi-turn settings.
VLMEVALKIT_CHAT_KWARGS = dict(do_sample=False, max_new_tokens=512, top_p=None, num_beams=1)


# VLMEvalKit utils.py L202-240 (`reorganize_prompt`, no dataset): one image → `<image>\n` + text; several →
# `Image-k: <image>` lines first, the inline `<Image-k>` tags removed.
def vlmevalkit_reorganize_prompt(message: list[dict], image_num: int) -> str:
    if image_num == 1:
        return "<image>\n" + "\n".join(x["value"] for x in message if x["type"] == "text")
    prompt, image_idx = "", 1
    for x in message:
        if x["type"] == "text":
            prompt += x["value"]
        elif x["type"] == "image":
            prompt += f"<Image-{image_idx}>"
            image_idx += 1
    prompt = "".join(f"Image-{i + 1}: <image>\n" for i in range(image_num)) + prompt
    return prompt.replace("".join(f"<Image-{i + 1}>" for i in range(image_num)), "")


# VLMEvalKit internvl_chat.py L384-410 (`generate_v2`, no dataset: `set_max_num` gives 6 tiles, 64 in total).
def vlmevalkit_image_inputs(message: list[dict], max_num: int = 6, total_max_num: int = 64):
    paths = [x["value"] for x in message if x["type"] == "image"]
    max_num = max(1, min(max_num, total_max_num // len(paths)))
    pixels = [vlmevalkit_load_image(path, max_num=max_num).to(torch.bfloat16) for path in paths]
    return torch.cat(pixels), [p.size(0) for p in pixels], vlmevalkit_reorganize_prompt(message, len(paths))


# VLMEvalKit internvl_chat.py L479-505 and L507-546 (`build_history`, `chat_inner_v2`): earlier turns become
# `(question, answer)` pairs with `<image>\n` per image; the current turn's images follow.
def vlmevalkit_chat_inputs(message: list[dict], max_num: int = 6):
    def concat(items, paths):
        text = ""
        for item in items:
            if item["type"] == "text":
                text += re.sub(r"Image(\d+)", r"Image-\1", item["value"])
            else:
                text += "<image>\n"
                paths.append(item["value"])
        return text

    paths: list = []
    history = [(concat(message[i]["content"], paths), concat(message[i + 1]["content"], paths))
               for i in range(0, len(message) - 1, 2)] or None  # fmt: skip
    question = concat(message[-1]["content"], paths)
    pixels = [vlmevalkit_load_image(path, max_num=max_num).to(torch.bfloat16) for path in paths]
    pixel_values = torch.cat(pixels) if pixels else None
    return pixel_values, [p.size(0) for p in pixels], question, history
