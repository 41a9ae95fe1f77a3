"""Where users already work: Hub folders, pipelines, the official chat API, serving exports, merge-lora."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import internvl3_hf.hub as hub
from internvl3_hf.chat import ChatSession
from internvl3_hf.cli import main
from internvl3_hf.formats.official import save_official
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.train import build_trainer, load_recipe

# Every field vLLM / LMDeploy / SGLang read from an official InternVL config.json.
SERVING_FIELDS = (
    "architectures", "model_type", "template", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail",
    "dynamic_image_size", "downsample_ratio", "ps_version", "select_layer", "force_image_size", "llm_config",
    "vision_config",
)

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    directory, mode = sys.argv[1], sys.argv[2]
    if mode == "remote":
        class BlockPackage:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "internvl3_hf":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, BlockPackage())
    else:
        import internvl3_hf  # registers the Auto classes: no remote code needed
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    remote = mode == "remote"
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=remote).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=remote)
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "tokens": output[0].tolist(),
                      "eos": model.generation_config.eos_token_id}))
    """
)


@pytest.fixture
def tiny(tokenizer, model):
    return model, processor_for_config(tokenizer, model.config)


def _images():
    return [Image.new("RGB", (56, 28), "red"), Image.new("RGB", (28, 84), "blue"), Image.new("RGB", (40, 40), "green")]


def test_hub_folder_is_complete_and_loads_with_and_without_the_package(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    uploaded = {}

    class FakeApi:  # records what push_to_hub would upload; no network
        def create_repo(self, repo_id, **kwargs):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["folder"] = folder_path
            return f"https://hub/{repo_id}/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    url = hub.push_to_hub(model, processor, "me/tiny-internvl3", tmp_path / "repo", base_model="OpenGVLab/InternVL3-1B",
                          recipe="recipes/tiny_cpu_sft.yaml", datasets=["synthetic"])
    assert url.endswith("commit/1") and uploaded["repo"] == "me/tiny-internvl3"
    folder = tmp_path / "repo"
    assert uploaded["folder"] == str(folder)
    names = {path.name for path in folder.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                     "chat_template.jinja", "tokenizer.json", "README.md", "modeling_internvl3.py",
                     "configuration_internvl3.py", "processing_internvl3.py", "chat_template.py"):
        assert required in names, required
    card = (folder / "README.md").read_text()
    assert "base_model: OpenGVLab/InternVL3-1B" in card and "recipes/tiny_cpu_sft.yaml" in card and "V2PE" in card
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == im_end

    results = {}
    for mode in ("remote", "package"):
        run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder), mode], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["remote"]["module"].startswith("transformers_modules.")
    assert results["package"]["module"].startswith("internvl3_hf.")
    assert results["remote"]["tokens"] == results["package"]["tokens"]
    assert results["remote"]["eos"] == im_end


def test_pipeline_batched_equals_single(tiny):
    model, processor = tiny
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
        for image in _images()
    ]
    settings = {"generate_kwargs": {"max_new_tokens": 6, "do_sample": False}}
    single = [pipe(text=conversation, **settings)[0]["generated_text"][-1]["content"] for conversation in conversations]
    batched = pipe(text=conversations, batch_size=3, **settings)
    assert [result[0]["generated_text"][-1]["content"] for result in batched] == single
    assert len(set(single)) > 1  # the images really condition the answers


def test_batch_chat_equals_chat_and_official_prompt(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    tiled = [processor.image_processor(image, return_tensors="pt") for image in _images()]
    settings = {"max_new_tokens": 6, "do_sample": False}
    singles = [model.chat(tokenizer, t["pixel_values"], "What colour?", settings) for t in tiled]
    batched = model.batch_chat(
        tokenizer, torch.cat([t["pixel_values"] for t in tiled]), ["What colour?"] * 3, settings,
        num_patches_list=[int(t["image_num_patches"][0]) for t in tiled],
    )
    assert batched == singles
    # chat() answers what the processor + generate path answers for the same conversation.
    session = ChatSession(model, processor)
    assert session.ask("What colour?", [_images()[0]], **settings) == singles[0]
    # Multi-turn: the history is replayed; a custom system message changes the prompt.
    answer, history = model.chat(tokenizer, tiled[0]["pixel_values"], "What colour?", settings, return_history=True)
    follow_up, history = model.chat(tokenizer, tiled[0]["pixel_values"], "Sure?", settings, history=history,
                                    return_history=True)
    assert [turn[0] for turn in history] == ["<image>\nWhat colour?", "Sure?"]
    assert follow_up == session.ask("Sure?", **settings)
    with pytest.raises(ValueError, match="single-turn"):
        model.batch_chat(tokenizer, None, ["Hi"], settings, history=[])


def test_system_message_attribute_changes_the_prompt(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    default = model._chat_prompt(tokenizer, "Hi", [])
    model.system_message = "You are terse."
    assert model._chat_prompt(tokenizer, "Hi", []) == default.replace(
        default.split("<|im_start|>system\n")[1].split("<|im_end|>")[0], "You are terse."
    )


def test_official_export_keeps_serving_fields_and_warns_about_v2pe(tiny, tmp_path, caplog):
    model, _ = tiny
    save_official(model, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    for field in SERVING_FIELDS:
        assert field in config, field
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    model.config.v2pe_mode, model.config.v2pe_delta = "fixed", 0.25
    with caplog.at_level(logging.WARNING):
        save_official(model, tmp_path / "v2pe")
    assert "ignore V2PE" in caplog.text


def test_merge_lora_cli_generates_the_adapter_tokens(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    recipe = load_recipe("recipes/tiny_cpu_sft.yaml", [
        f"model.name_or_path={tmp_path / 'base'}", f"training.output_dir={tmp_path / 'adapter'}",
        "training.max_steps=3", "lora={r: 4, target: llm}",
    ])
    trainer = build_trainer(recipe)
    trainer.train()
    trainer.save_model()
    assert main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    merged_processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    inputs = merged_processor(text="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    with torch.no_grad():
        expected = trainer.model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(merged.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
