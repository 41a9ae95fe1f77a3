"""The chat template reproduces the official `internvl2_5` conversation byte for byte."""

import pytest
from jinja2.exceptions import TemplateError

from internvl3_hf.modeling.chat_template import CHAT_TEMPLATE, DEFAULT_SYSTEM_MESSAGE, build_chat_template
from internvl3_hf.modeling.image_processing_internvl3 import InternVL3ImageProcessor
from internvl3_hf.modeling.processing_internvl3 import InternVL3Processor

DEFAULT_SYSTEM = (
    "<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态"
    "大语言模型。<|im_end|>\n"
)


@pytest.fixture
def processor(tokenizer) -> InternVL3Processor:
    return InternVL3Processor(InternVL3ImageProcessor(size=28), tokenizer, image_seq_length=4)


def render(processor, messages, add_generation_prompt=True, chat_template=None) -> str:
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def test_default_system_message_constant():
    assert DEFAULT_SYSTEM == f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
    assert build_chat_template() == CHAT_TEMPLATE


def test_processor_uses_the_canonical_template(processor):
    assert processor.chat_template == CHAT_TEMPLATE


def test_no_system_turn_uses_default(processor):
    messages = [{"role": "user", "content": "Hello"}]
    assert render(processor, messages) == DEFAULT_SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert render(processor, messages, add_generation_prompt=False) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nHello<|im_end|>\n"
    )


def test_empty_system_turn_uses_default(processor):
    for empty in ("", [{"type": "text", "text": ""}]):
        messages = [{"role": "system", "content": empty}, {"role": "user", "content": "Hi"}]
        assert render(processor, messages) == DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_user_system_message(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": "Hi"},
    ]
    assert render(processor, messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_history(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Black."}]},
    ]
    assert render(processor, messages, add_generation_prompt=False) == (
        DEFAULT_SYSTEM + "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n"
    )


def test_multi_image_numbers_images_over_the_conversation(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}],
        },
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this one? "}, {"type": "image"}]},
    ]
    assert render(processor, messages) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nCompare them.<|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n"
        "<|im_start|>user\nAnd this one? Image-3: <image>\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_video(processor):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert render(processor, messages) == (
        DEFAULT_SYSTEM + "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_list_content_renders_like_string_content(processor):
    as_list = [{"role": "user", "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "two."}]}]
    as_string = [{"role": "user", "content": "Part one, two."}]
    assert render(processor, as_list) == render(processor, as_string)


def test_empty_assistant_turn_renders_its_header_only(processor):
    # Official MPT style: a message with no content adds its role header and no separator.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    assert render(processor, messages, add_generation_prompt=False) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_custom_default_system_message(processor):
    template = build_chat_template('Say "hi"\nthen stop.')
    messages = [{"role": "user", "content": "Hi"}]
    assert render(processor, messages, chat_template=template) == (
        '<|im_start|>system\nSay "hi"\nthen stop.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    )


def test_default_system_message_is_kept_as_written(processor):
    system = "Write __IMAGE_PLACEHOLDER__ and __END_OF_TURN__ literally."
    template = build_chat_template(system)
    assert render(processor, [{"role": "user", "content": "Hi"}], chat_template=template).startswith(
        f"<|im_start|>system\n{system}<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "tool", "content": "x"}], "Unsupported role tool"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "Only the first message"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "Unsupported content type audio"),
        ([{"role": "system", "content": [{"type": "image"}]}], "system message may only hold text"),
    ],
)
def test_bad_conversations_raise(processor, messages, error):
    with pytest.raises(TemplateError, match=error):
        render(processor, messages)
