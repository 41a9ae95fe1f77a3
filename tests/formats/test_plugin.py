"""Plugin format: default `save_pretrained` carries the modeling code, so a fresh Python without the package loads it."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from internvl3_hf import InternVL3ForConditionalGeneration, InternVL3Processor
from internvl3_hf.cli import main
from internvl3_hf.demo.chat import draw_demo_image, write_tiny_checkpoint
from internvl3_hf.formats.convert import detect_format, load_checkpoint, load_processor

MODELING_FILES = {
    "configuration_internvl3.py",
    "modeling_internvl3.py",
    "processing_internvl3.py",
    "image_processing_internvl3.py",
    "chat_template.py",
    "critic_internvl3.py",
}

# Loads a plugin checkpoint with trust_remote_code in a process where `internvl3_hf` cannot be imported, runs
# greedy generation on an image and prints the new tokens as JSON.
REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class BlockPackage:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "internvl3_hf":
                raise ImportError("internvl3_hf is deliberately unavailable")

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory, image_path = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(image_path)], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "tokens": output[0].tolist()}))
    """
)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plugin")
    write_tiny_checkpoint(directory)
    image_path = directory.parent / "image.png"
    draw_demo_image(120, 80).save(image_path)
    return directory, image_path


def _generate_in_process(directory, image_path) -> list[int]:
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(image_path)], return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()


def test_plugin_checkpoint_holds_code_and_auto_map(plugin_dir):
    directory, _ = plugin_dir
    assert MODELING_FILES <= {path.name for path in directory.iterdir()}
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_internvl3.InternVL3ForConditionalGeneration"
    assert auto_map["AutoModel"] == "modeling_internvl3.InternVL3ForConditionalGeneration"  # as official checkpoints
    assert auto_map["AutoConfig"] == "configuration_internvl3.InternVL3Config"
    processor_map = json.loads((directory / "processor_config.json").read_text())["auto_map"]
    assert processor_map["AutoProcessor"] == "processing_internvl3.InternVL3Processor"
    assert (directory / "chat_template.jinja").exists()


def test_trust_remote_code_load_without_the_package_generates_the_same_tokens(plugin_dir):
    directory, image_path = plugin_dir
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(directory), str(image_path)],
        capture_output=True,
        text=True,
        cwd=directory.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    assert remote["tokens"] == _generate_in_process(directory, image_path)


def test_plugin_save_keeps_in_memory_key_names(plugin_dir):
    from safetensors.torch import load_file

    directory, _ = plugin_dir
    keys = load_file(directory / "model.safetensors").keys()
    model = InternVL3ForConditionalGeneration.from_pretrained(directory)
    assert set(keys) == set(model.state_dict())


@pytest.mark.parametrize("target", ["official", "hf", "plugin"])
def test_cli_convert_round_trips_every_format_bit_exactly(plugin_dir, tmp_path, target, capsys):
    directory, _ = plugin_dir
    assert main(["convert", str(directory), str(tmp_path / target), "--to", target]) == 0
    assert f"({target})" in capsys.readouterr().out
    assert detect_format(tmp_path / target) == target
    assert main(["convert", str(tmp_path / target), str(tmp_path / "back"), "--to", "plugin"]) == 0
    original = InternVL3ForConditionalGeneration.from_pretrained(directory)
    back = load_checkpoint(tmp_path / "back")
    for key, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    processor = load_processor(tmp_path / "back", back.config)
    assert isinstance(processor, InternVL3Processor)
    assert processor.image_seq_length == original.config.image_seq_length
    assert processor.image_processor.max_patches == original.config.max_dynamic_patch


def test_load_processor_refuses_a_model_config_with_other_token_ids(plugin_dir):
    directory, _ = plugin_dir
    config = InternVL3ForConditionalGeneration.from_pretrained(directory).config
    assert load_processor(directory, config).image_token_id == config.image_token_id
    config.image_end_token_id += 1
    with pytest.raises(ValueError, match=rf"</img> is id {config.image_end_token_id - 1} in the tokenizer of "):
        load_processor(directory, config)


def test_hf_export_writes_native_processor_files(plugin_dir, tmp_path):
    directory, _ = plugin_dir
    main(["convert", str(directory), str(tmp_path / "hf"), "--to", "hf"])
    preprocessor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"].startswith("GotOcr2ImageProcessor")
    assert preprocessor["size"] == {"height": 28, "width": 28} and preprocessor["max_patches"] == 12
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["extra_special_tokens"]["context_image_token"] == "<IMG_CONTEXT>"
    assert json.loads((tmp_path / "hf" / "processor_config.json").read_text())["image_seq_length"] == 4


def test_demo_command_chats_about_an_image(tmp_path, capsys):
    assert main(["demo", "--chat-only", "--output", str(tmp_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "13 tiles of 28 px -> 52 <IMG_CONTEXT> tokens" in out
    assert (tmp_path / "demo.png").exists()
