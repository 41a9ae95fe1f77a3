# Copyright 2026 The internvl3-hf authors. Licensed under the Apache License, Version 2.0.
"""The official `internvl2_5` conversation template as a Jinja chat template.

Self-contained (stdlib only): copied into checkpoints for `trust_remote_code`.

Rendering, byte for byte as `internvl/conversation.py` (MPT style) builds it (one line, wrapped here):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n...

plus `<|im_start|>assistant\\n` when `add_generation_prompt`. A message with empty content renders its role header
only, as the official template does. Images render as `<image>\\n` where they appear in the content; when the
conversation holds more than one image each becomes `Image-{k}: <image>\\n` (k counts over the whole conversation,
the official multi-image prompt). A video renders as `<video>\\n`; the processor expands it into `Frame...` lines.

Each assistant answer and its `<|im_end|>` (not the newline after it) sit inside `{% generation %}`: the tokens
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks are exactly those the official
`preprocess_internvl2_5` supervises.
"""

import json
import re

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# The tokens an image span is made of: `<img>` + `<IMG_CONTEXT>` x (tokens per tile · tiles) + `</img>`.
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# Closes every turn; generation stops on it.
END_OF_TURN = "<|im_end|>"
# Label of the k-th image when a conversation holds several (the official multi-image prompt).
IMAGE_LABEL = "Image-{}: "

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# Each `__NAME__` is replaced by a JSON string literal, which is also a valid Jinja string literal.
_TEMPLATE = """\
{%- set ns = namespace(images=0, image_index=0, system=__DEFAULT_SYSTEM_MESSAGE__) -%}
{%- for message in messages -%}
    {%- if message['content'] is not string -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- if system is not string -%}
        {%- set parts = namespace(text='') -%}
        {%- for item in system -%}
            {%- if item['type'] != 'text' -%}
                {{- raise_exception('A system message may only hold text, found a ' ~ item['type'] ~ ' item.') -}}
            {%- endif -%}
            {%- set parts.text = parts.text ~ item['text'] -%}
        {%- endfor -%}
        {%- set system = parts.text -%}
    {%- endif -%}
    {%- if system -%}{%- set ns.system = system -%}{%- endif -%}
{%- endif -%}
{{- '<|im_start|>system\\n' ~ ns.system ~ __END_OF_TURN__ ~ '\\n' -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('Only the first message may have the system role.') -}}
        {%- endif -%}
    {%- elif message['role'] in ['user', 'assistant'] -%}
        {%- set turn = namespace(text='') -%}
        {%- if message['content'] is string -%}
            {%- set turn.text = message['content'] -%}
        {%- else -%}
            {%- for item in message['content'] -%}
                {%- if item['type'] == 'image' -%}
                    {%- set ns.image_index = ns.image_index + 1 -%}
                    {%- if ns.images > 1 -%}
                        {%- set turn.text = turn.text ~ __IMAGE_LABEL_HEAD__ ~ ns.image_index ~ __IMAGE_LABEL_TAIL__ -%}
                    {%- endif -%}
                    {%- set turn.text = turn.text ~ __IMAGE_PLACEHOLDER__ ~ '\\n' -%}
                {%- elif item['type'] == 'video' -%}
                    {%- set turn.text = turn.text ~ __VIDEO_PLACEHOLDER__ ~ '\\n' -%}
                {%- elif item['type'] == 'text' -%}
                    {%- set turn.text = turn.text ~ item['text'] -%}
                {%- else -%}
                    {{- raise_exception('Unsupported content type ' ~ item['type'] ~ '; use text, image or video.') -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}
        {%- if turn.text and message['role'] == 'assistant' -%}
            {%- generation -%}{{- turn.text ~ __END_OF_TURN__ -}}{%- endgeneration -%}{{- '\\n' -}}
        {%- elif turn.text -%}
            {{- turn.text ~ __END_OF_TURN__ ~ '\\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('Unsupported role ' ~ message['role'] ~ '; InternVL3 knows system, user and assistant.') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def build_chat_template(default_system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """The chat template with `default_system_message` used when a conversation has no (or an empty) system turn.

    Official configs with a non-null `system_message` override the template's default this way.
    """
    label_head, label_tail = IMAGE_LABEL.split("{}")
    literals = {
        "__DEFAULT_SYSTEM_MESSAGE__": default_system_message,
        "__END_OF_TURN__": END_OF_TURN,
        "__IMAGE_LABEL_HEAD__": label_head,
        "__IMAGE_LABEL_TAIL__": label_tail,
        "__IMAGE_PLACEHOLDER__": IMAGE_PLACEHOLDER,
        "__VIDEO_PLACEHOLDER__": VIDEO_PLACEHOLDER,
    }
    # One pass, so that a system message which happens to contain a `__NAME__` is kept as written.
    return re.sub("|".join(literals), lambda match: json.dumps(literals[match.group()], ensure_ascii=False), _TEMPLATE)


def image_prompt(number: int, num_images: int) -> str:
    """The text the `number`-th image (from 1) of a conversation holding `num_images` images renders as.

    The chat template renders image items this way; data sources that write placeholders into plain text use it
    so that both agree.
    """
    return (IMAGE_LABEL.format(number) if num_images > 1 else "") + IMAGE_PLACEHOLDER + "\n"


def video_prompt() -> str:
    """The text a video item renders as (the processor expands the placeholder into frame lines)."""
    return VIDEO_PLACEHOLDER + "\n"


CHAT_TEMPLATE = build_chat_template()

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_MESSAGE",
    "END_OF_TURN",
    "IMAGE_CONTEXT_TOKEN",
    "IMAGE_END_TOKEN",
    "IMAGE_LABEL",
    "IMAGE_PLACEHOLDER",
    "IMAGE_START_TOKEN",
    "VIDEO_PLACEHOLDER",
    "build_chat_template",
    "image_prompt",
    "video_prompt",
]
