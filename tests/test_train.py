"""The `train` recipe path: CLI overfitting on the tiny recipe, freezing, LoRA adapters and their merge."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from internvl3_hf.cli import main
from internvl3_hf.train import apply_freezing, build_model_and_processor, build_trainer, load_recipe, run_training

RECIPE = "recipes/tiny_cpu_sft.yaml"


def test_cli_recipe_overfits_mixed_text_and_image_set(tmp_path, capsys):
    """The tiny recipe: 4 synthetic samples (text-only and image QA), loss must fall by more than 90 %."""
    assert main(["train", "--config", RECIPE, "--set", f"training.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    first, last = (float(value) for value in out.split("loss ")[1].split()[0:3:2])
    assert last < 0.1 * first, out
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_seq_length == processor.image_seq_length


def test_recipe_overrides_and_unknown_sections(tmp_path):
    recipe = load_recipe(RECIPE, ["training.max_steps=3", "data.loss_weighting=sample"])
    assert recipe["training"]["max_steps"] == 3 and recipe["data"]["loss_weighting"] == "sample"
    (tmp_path / "bad.yaml").write_text("modle: {}\n")
    with pytest.raises(ValueError, match=r"unknown recipe key 'modle' \(did you mean 'model'\?\)"):
        load_recipe(tmp_path / "bad.yaml")


def test_recipe_fused_lm_head_option(tmp_path):
    """`training.fused_lm_head` (default true) reaches `InternVL3Trainer`, not `TrainingArguments`."""
    recipe = load_recipe(RECIPE, [f"training.output_dir={tmp_path}"])
    assert recipe["training"]["fused_lm_head"] is True and build_trainer(recipe).fused_lm_head
    del recipe["training"]["fused_lm_head"]
    assert build_trainer(recipe).fused_lm_head
    recipe["training"]["fused_lm_head"] = False
    trainer = build_trainer(recipe)
    assert not trainer.fused_lm_head and "forward" not in trainer.model.__dict__
    recipe["training"]["fused_lm_head"] = "no"
    with pytest.raises(TypeError, match="fused_lm_head"):
        build_trainer(recipe)


@pytest.mark.parametrize(
    "flags, trainable",
    [
        ({"freeze_vision": True}, {"projector", "llm"}),
        ({"freeze_vision": True, "freeze_projector": True}, {"llm"}),
        ({"freeze_llm": True}, {"vision", "projector"}),
        ({"freeze_vision": True, "unfreeze_vision_last_layers": 1}, {"vision_last", "projector", "llm"}),
    ],
)
def test_freeze_flags(flags, trainable):
    model, _ = build_model_and_processor({"name_or_path": "tiny"})
    apply_freezing(model, flags)
    parts = {
        "vision": [p for n, p in model.named_parameters() if "vision_tower" in n and "encoder.layer.1." not in n],
        "vision_last": [p for n, p in model.named_parameters() if "vision_tower.encoder.layer.1." in n],
        "projector": list(model.model.multi_modal_projector.parameters()),
        "llm": list(model.model.language_model.parameters()) + list(model.lm_head.parameters()),
    }
    for part, parameters in parts.items():
        expected = part in trainable or (part == "vision_last" and "vision" in trainable)
        assert all(p.requires_grad == expected for p in parameters), part


def test_lora_adapter_saves_and_merges_to_a_checkpoint_generating_the_same_tokens(tmp_path):
    recipe = load_recipe(
        RECIPE,
        [
            f"training.output_dir={tmp_path / 'lora'}",
            "training.max_steps=5",
            "lora={r: 4, target: both}",
        ],
    )
    trainer = build_trainer(recipe)
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()

    peft_model = trainer.model.eval()
    processor = trainer.processing_class
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}], add_generation_prompt=True
    )
    inputs = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = peft_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
    assert not any("lora" in name for name in reloaded.state_dict())


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """`internvl3-hf train --resume` (`run_training(..., resume_from_checkpoint=True)`): a run stopped after its
    step-3 checkpoint and resumed ends with the same losses and weights as the run that never stopped (optimizer,
    scheduler, RNG and data position all restored; packed rows of 16 mixed samples, so the order matters)."""

    def recipe(output_dir, **training):
        settings = load_recipe(RECIPE, [f"training.output_dir={output_dir}", "data.max_packed_tokens=600"])
        settings["data"]["sources"][0]["count"] = 16
        settings["training"].update({"max_steps": 6, "per_device_train_batch_size": 1, "logging_steps": 1, **training})
        return settings

    straight = run_training(recipe(tmp_path / "straight"))
    stopped = run_training(recipe(tmp_path / "stopped", max_steps=3, save_strategy="steps", save_steps=3))
    assert len(stopped.train_dataset) >= 6  # more rows than steps: resuming must skip the rows already seen
    resumed = run_training(recipe(tmp_path / "stopped", save_strategy="no"), resume_from_checkpoint=True)

    assert resumed.state.global_step == 6
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 3] for t in (straight, resumed)]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, expected), actual in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
