"""Typed recipes: every shipped recipe parses, unknown keys name their dotted path and the nearest valid key, `--set`
values are typed, and the builders configure the same trainers as a hand-built setup from the raw YAML."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from transformers import TrainingArguments

from internvl3_hf.errors import UserError
from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from internvl3_hf.mpo import MPOConfig
from internvl3_hf.recipes import (
    LLM_LORA_TARGETS,
    VISION_LORA_TARGETS,
    DataArgs,
    LoraArgs,
    ModelArgs,
    MPORecipe,
    RecipeError,
    RecipeTypeError,
    SFTDataArgs,
    SFTRecipe,
    SFTTrainingOptions,
    SourceArgs,
    TrainingOptions,
    load_recipe,
)
from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config
from internvl3_hf.train import build_mpo_trainer, build_trainer

SFT = "recipes/tiny_cpu_sft.yaml"
MPO = "recipes/tiny_cpu_mpo.yaml"
RECIPES = sorted(str(path) for path in Path("recipes").rglob("*.yaml"))
# Arguments that need a GPU, DeepSpeed or several processes: switched off to build the arguments on a CPU.
CPU_ONLY = {"bf16": False, "use_cpu": True, "deepspeed": None, "fsdp": "", "fsdp_config": None}


def recipe_class(path: str) -> type:
    stem = Path(path).stem
    return MPORecipe if "mpo" in stem or stem == "critic" else SFTRecipe  # the demo's critic is trained by MPO


@pytest.mark.parametrize("path", RECIPES)
def test_every_recipe_parses_and_its_arguments_build(path):
    recipe = recipe_class(path).from_dict(load_recipe(path))
    raw = yaml.safe_load(Path(path).read_text())
    assert set(recipe.training) <= set(raw["training"])  # the recipe options are split off, nothing is added
    deepspeed = recipe.training.get("deepspeed")
    assert deepspeed is None or Path(deepspeed).is_file()
    recipe.training.update({key: value for key, value in CPU_ONLY.items() if key in recipe.training})
    args = recipe.training_arguments()
    assert isinstance(args.learning_rate, float) and args.report_to == []
    if recipe.lora is not None:
        assert recipe.lora.r > 0 and recipe.lora.target in ("llm", "vision", "both")


def test_the_1b_recipe_learning_rate_is_a_number():
    """YAML 1.1 reads `1e-5` (no dot) as a string; the typed recipe gives TrainingArguments the number."""
    assert yaml.safe_load(Path("recipes/internvl3_1b_sft.yaml").read_text())["training"]["learning_rate"] == "1e-5"
    assert SFTRecipe.from_dict(load_recipe("recipes/internvl3_1b_sft.yaml")).training["learning_rate"] == 1e-5


@pytest.mark.parametrize(
    ("recipe", "override", "message"),
    [
        (SFT, "data.max_packed_token=3", "unknown recipe key 'data.max_packed_token' (did you mean 'data.max_packed_tokens'?)"),
        (SFT, "training.max_step=3", "unknown recipe key 'training.max_step' (did you mean 'training.max_steps'?)"),
        (SFT, "training.fused_lm_heads=true", "(did you mean 'training.fused_lm_head'?)"),
        (SFT, "model.freez_vision=true", "unknown recipe key 'model.freez_vision' (did you mean 'model.freeze_vision'?)"),
        (SFT, "lora.alpah=8", "unknown recipe key 'lora.alpah' (did you mean 'lora.alpha'?)"),
        (SFT, "data.sources.0.cont=3", "unknown recipe key 'data.sources.0.cont' (did you mean 'data.sources.0.count'?)"),
        (SFT, "trainng.max_steps=3", "unknown recipe key 'trainng' (did you mean 'training'?)"),
        (SFT, "data.sources.0.path=x.json", "'data.sources.0.path' does not apply to a synthetic source"),
        (MPO, "training.w_pp=1", "unknown recipe key 'training.w_pp' (did you mean 'training.w_p'?)"),
        (MPO, "training.reward_shift_updates=none", "(did you mean 'training.reward_shift_update'?)"),
        (MPO, "data.on_eror=raise", "unknown recipe key 'data.on_eror' (did you mean 'data.on_error'?)"),
        (MPO, "training.fused_lm_head=false", "unknown recipe key 'training.fused_lm_head' (not a field of MPOConfig"),
        (MPO, "data.max_packed_tokens=64", "unknown recipe key 'data.max_packed_tokens' (valid keys: sources, seed, on_error)"),
    ],
)
def test_an_unknown_key_names_its_dotted_path_and_the_nearest_valid_one(recipe, override, message):
    with pytest.raises(RecipeError) as caught:
        recipe_class(recipe).from_dict(load_recipe(recipe, [override]))
    assert message in str(caught.value)


@pytest.mark.parametrize(("builder", "recipe"), [(build_trainer, SFT), (build_mpo_trainer, MPO)])
def test_the_builders_refuse_an_unknown_key_before_loading_a_model(builder, recipe, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the recipe was checked after the model was loaded")

    monkeypatch.setattr("internvl3_hf.train.build_model_and_processor", no_model)
    with pytest.raises(RecipeError, match=r"'data\.seeds' \(did you mean 'data\.seed'\?\)"):
        builder({**load_recipe(recipe), "data": {**load_recipe(recipe)["data"], "seeds": 1}})


def test_overrides_are_typed():
    recipe = SFTRecipe.from_dict(load_recipe(SFT, [
        "training.max_steps=7",                 # int
        "training.learning_rate=1e-4",          # float (a string to YAML 1.1)
        "training.warmup_steps=1",              # an int given for a float field
        "model.freeze_vision=true",             # bool
        "lora={r: 4, target: both}",            # a mapping for a whole section
        "lora.modules_to_save=[mlp1, lm_head]", # list
        "data.max_packed_tiles=null",           # null
        "data.sources.0.count=16",              # an index into a list
        "training.compile_blocks={backend: aot_eager, vision: false}",
    ]))  # fmt: skip
    assert recipe.training["max_steps"] == 7 and type(recipe.training["max_steps"]) is int
    assert recipe.training["learning_rate"] == 1e-4 and type(recipe.training["learning_rate"]) is float
    assert recipe.training["warmup_steps"] == 1 and type(recipe.training["warmup_steps"]) is int
    assert recipe.model.freeze_vision is True
    assert recipe.lora == LoraArgs(r=4, target="both", modules_to_save=["mlp1", "lm_head"])
    assert recipe.data.max_packed_tiles is None and recipe.data.sources[0].count == 16
    assert recipe.options.compile_blocks == {"backend": "aot_eager", "vision": False}


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("training.max_steps=ten", RecipeTypeError, "'training.max_steps' must be an integer, got 'ten'"),
        ("training.learning_rate=fast", RecipeTypeError, "'training.learning_rate' must be a number, got 'fast'"),
        ("lora.r=4.5", RecipeTypeError, "'lora.r' must be an integer, got 4.5"),
        ("model.freeze_vision=3", RecipeTypeError, "'model.freeze_vision' must be true or false, got 3"),
        ("training.fused_lm_head=[1]", RecipeTypeError, "'training.fused_lm_head' must be true or false"),
        ("data.sources=3", RecipeTypeError, "'data.sources' must be a list"),
        ("lora.target=all", RecipeError, "lora.target must be one of ['both', 'llm', 'vision'], got 'all'"),
        ("data.sources.0.type=csv", RecipeError, "data.sources.0.type must be one of official_meta"),
        ("data.sources.5.count=1", RecipeError, "'data.sources.5' needs an index from 0 to 0"),
        ("model.name_or_path.x=1", RecipeError, "'model.name_or_path' is a value ('tiny'), not a mapping"),
        ("training.max_steps", RecipeError, "must look like section.key=value"),
    ],
)
def test_bad_values_and_overrides_name_the_key(override, error, message):
    with pytest.raises(error) as caught:
        SFTRecipe.from_dict(load_recipe(SFT, [override]))
    assert message in str(caught.value)


def test_a_missing_or_broken_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe 'nowhere.yaml' does not exist"):
        load_recipe("nowhere.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- model\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "schema", [ModelArgs, LoraArgs, SourceArgs, DataArgs, SFTDataArgs, TrainingOptions, SFTTrainingOptions]
)
def test_every_recipe_key_is_documented(schema):
    for spec in dataclasses.fields(schema):
        assert spec.metadata.get("help"), f"{schema.__name__}.{spec.name} has no help"


# --------------------------------------------------------------------------------------------------- builders
def raw_training(path: str, output_dir: Path) -> dict:
    training = yaml.safe_load(Path(path).read_text())["training"]
    training.pop("fused_lm_head", None)
    return {**training, "output_dir": str(output_dir)}


def tiny_model(seed: int = 0) -> InternVL3ForConditionalGeneration:
    torch.manual_seed(seed)
    return InternVL3ForConditionalGeneration(tiny_config(build_tiny_tokenizer()))


def assert_same_weights(model, expected):
    actual = {name.removeprefix("base_model.model."): value for name, value in model.state_dict().items()}
    for name, value in expected.state_dict().items():
        key = name if name in actual else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=name)


def test_sft_builder_configures_the_trainer_from_the_yaml(tmp_path):
    """Arguments as `TrainingArguments(**yaml, report_to=[], remove_unused_columns=False)`, the tiny model of seed 0,
    LoRA with alpha 2r and dropout 0.05, fused head and square weighting as written."""
    trainer = build_trainer(load_recipe(SFT, [f"training.output_dir={tmp_path}"]))
    expected = TrainingArguments(**raw_training(SFT, tmp_path), report_to=[], remove_unused_columns=False,
                                 ddp_find_unused_parameters=True)  # InternVL3Trainer's default: text-only batches
    assert trainer.args.to_dict() == expected.to_dict()
    assert trainer.fused_lm_head and trainer.loss_weighting == "square" and trainer.data_collator.padding_free
    assert trainer.train_dataset.encoder.max_length == 1024 and len(trainer.train_dataset.samples) == 4
    assert_same_weights(trainer.model, tiny_model())
    assert all(parameter.requires_grad for parameter in trainer.model.parameters())

    lora = build_trainer(load_recipe(SFT, [f"training.output_dir={tmp_path}", "lora={r: 4, target: both}",
                                           "model.freeze_vision=true"]))  # fmt: skip
    config = lora.model.peft_config["default"]
    hand_built = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                            target_modules=f"(?:{LLM_LORA_TARGETS})|(?:{VISION_LORA_TARGETS})")  # fmt: skip
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save"):
        assert getattr(config, key) == getattr(hand_built, key), key
    trainable = {name for name, parameter in lora.model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("vision_tower" in name for name in trainable)  # the adapters train although the ViT is frozen
    assert_same_weights(lora.model, tiny_model())


def test_mpo_builder_configures_the_trainer_from_the_yaml(tmp_path):
    trainer = build_mpo_trainer(load_recipe(MPO, [f"training.output_dir={tmp_path}"]))
    expected = MPOConfig(**raw_training(MPO, tmp_path), report_to=[], ddp_find_unused_parameters=True)
    assert trainer.args.to_dict() == expected.to_dict()
    assert trainer.args.term_weights == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
    assert len(trainer.train_dataset) == 8 and not trainer.dropped
    assert all(row["prompt"][0] == {"role": "system", "content": "Be brief."} for row in trainer.train_dataset)
    assert_same_weights(trainer.model, tiny_model())

    lora = build_mpo_trainer(load_recipe(MPO, [f"training.output_dir={tmp_path}", "lora={r: 4, alpha: 16}"]))
    config = lora.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.05)
    assert config.target_modules == f"(?:{LLM_LORA_TARGETS})"


def test_the_builders_take_the_typed_recipe(tmp_path):
    recipe = SFTRecipe.from_dict(load_recipe(SFT, [f"training.output_dir={tmp_path}", "training.max_steps=1"]))
    assert build_trainer(recipe).args.max_steps == 1


def two_rate_adamw(model, learning_rate: float, vision_lr_scale: float) -> torch.optim.AdamW:
    """A hand-built AdamW with the ViT at `vision_lr_scale` × the rate of the rest (no weight decay): the oracle
    for `training.vision_lr_scale`."""
    vision = [p for name, p in model.named_parameters() if p.requires_grad and "vision_tower" in name]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and "vision_tower" not in name]
    groups = [{"params": rest, "lr": learning_rate}, {"params": vision, "lr": learning_rate * vision_lr_scale}]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)


@pytest.mark.parametrize(("builder", "recipe"), [(build_trainer, SFT), (build_mpo_trainer, MPO)])
def test_vision_lr_scale_gives_the_vit_its_own_learning_rate(builder, recipe, tmp_path):
    """`training.vision_lr_scale`: the ViT's parameters at scale × lr, the same partition as a hand-built two-rate
    AdamW, weight decay as the trainer's own split; one step keeps the ratio through the scheduler."""
    scale, learning_rate = 0.03, 0.01
    trainer = builder(load_recipe(recipe, [
        f"training.output_dir={tmp_path}", "training.max_steps=1", f"training.learning_rate={learning_rate}",
        f"training.vision_lr_scale={scale}", "training.weight_decay=0.1", "training.per_device_train_batch_size=2",
    ]))  # fmt: skip
    logging.getLogger("transformers").setLevel(logging.ERROR)
    trainer.train()
    reference = two_rate_adamw(trainer.model, learning_rate, scale)
    expected = {id(p): group["lr"] for group in reference.param_groups for p in group["params"]}
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    seen = set()
    for group in trainer.optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(expected[id(group["params"][0])])
        for parameter in group["params"]:
            assert expected[id(parameter)] == group["initial_lr"]
            assert group["weight_decay"] == (0.1 if names[id(parameter)] in decayed else 0.0)
            seen.add(id(parameter))
        assert group["lr"] == pytest.approx(group["initial_lr"])  # the constant schedule of the tiny recipes
    assert seen == set(expected)


def test_a_missing_data_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("internvl3_hf.train.build_model_and_processor", pytest.fail)
    recipe = load_recipe(SFT, [f"training.output_dir={tmp_path}", "data.sources=[{type: official_meta, path: no.json}]"])
    with pytest.raises(UserError, match=r"data\.sources\.0\.path: 'no\.json' does not exist"):
        build_trainer(recipe)


def test_the_builder_trains_like_a_hand_built_trainer_with_a_slow_vit(tmp_path):
    """`build_trainer(recipe, model=, processor=, samples=)` with `vision_lr_scale` against `InternVL3Trainer` given a
    hand-built two-rate AdamW: the same losses and weights after three steps."""
    from internvl3_hf.data import SFTCollator, SFTDataset, SupervisedEncoder
    from internvl3_hf.data.synthetic import synthetic_samples
    from internvl3_hf.modeling.processing_internvl3 import processor_for_config
    from internvl3_hf.sft import InternVL3Trainer

    learning_rate, scale = 0.01, 0.03
    training = dict(max_steps=3, learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=1,
                    per_device_train_batch_size=2, logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                    data_seed=0, optim="adamw_torch", report_to=[])  # fmt: skip
    samples = synthetic_samples(8, seed=0)

    def model_and_processor():
        model = tiny_model()
        return model, processor_for_config(build_tiny_tokenizer(), model.config)

    model, processor = model_and_processor()
    recipe = {"data": {"max_length": 512, "max_packed_tokens": 512},
              "training": {**training, "output_dir": str(tmp_path / "a"), "vision_lr_scale": scale}}  # fmt: skip
    built = build_trainer(recipe, model=model, processor=processor, samples=samples)

    model, processor = model_and_processor()
    hand = InternVL3Trainer(
        model=model,
        args=TrainingArguments(**training, output_dir=str(tmp_path / "b"), remove_unused_columns=False),
        train_dataset=SFTDataset(samples, SupervisedEncoder(processor, 512, 0), max_packed_tokens=512),
        data_collator=SFTCollator(processor.tokenizer.pad_token_id, padding_free=True),
        processing_class=processor,
        optimizers=(two_rate_adamw(model, learning_rate, scale), None),
    )
    for trainer in (built, hand):
        trainer.train()
    losses = [[entry["loss"] for entry in trainer.state.log_history if "loss" in entry] for trainer in (built, hand)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    for (name, actual), expected in zip(built.model.named_parameters(), hand.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_the_mpo_builder_takes_a_model_and_pairs_from_python(tmp_path):
    from internvl3_hf.mpo import synthetic_preference_pairs
    from internvl3_hf.modeling.processing_internvl3 import processor_for_config

    model = tiny_model(seed=3)
    processor = processor_for_config(build_tiny_tokenizer(), model.config)
    recipe = {"model": {"freeze_vision": True}, "training": {"output_dir": str(tmp_path), "use_cpu": True}}
    trainer = build_mpo_trainer(recipe, model=model, processor=processor, pairs=synthetic_preference_pairs(5, seed=1))
    assert trainer.model is model and len(trainer.train_dataset) == 5
    assert not any(parameter.requires_grad for parameter in model.model.vision_tower.parameters())
    with pytest.raises(TypeError, match="both `model` and `processor`"):
        build_mpo_trainer(recipe, model=model)
