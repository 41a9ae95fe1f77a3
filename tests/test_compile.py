"""`compile_blocks`: per-block `torch.compile` gives eager's numbers, recompiles within its documented bound, trains
through `InternVL3Trainer`, saves the same keys, and is wired into the YAML recipes.

The backend is `aot_eager` (dynamo + AOTAutograd, no C++ compiler needed), so compiled and eager results agree to
float32 rounding; the bound on compilations does not depend on the backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.utils.data import Dataset

from internvl3_hf.compile import compile_blocks, is_compiled
from internvl3_hf.data import SFTCollator
from internvl3_hf.train import apply_lora, build_trainer, load_recipe
from test_sft import SequentialTrainer, sft_dataset, sgd_args

BACKEND = "aot_eager"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with empty dynamo caches and counters."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts compilations: distinct compile ids, so that dynamo's internal restarts of one
    compilation (e.g. after specialising a float) are not counted twice."""

    def __init__(self, backend: str = BACKEND):
        self.backend = lookup_backend(backend)
        self.compile_ids: set[tuple[int, int]] = set()

    def __call__(self, graph_module, example_inputs):
        compile_id = torch._guards.CompileContext.current_compile_id()
        self.compile_ids.add((compile_id.frame_id, compile_id.frame_compile_id))
        return self.backend(graph_module, example_inputs)

    @property
    def count(self) -> int:
        return len(self.compile_ids)


@pytest.fixture(scope="module")
def items(tokenizer):
    from internvl3_hf.tiny import tiny_config

    dataset = sft_dataset(tokenizer, tiny_config(tokenizer))
    return [dataset[index] for index in range(len(dataset))]  # 57, 58, 75, 168 tokens; 3, 0, 1, 0 tiles


def packed(items, indices, pad_token_id) -> dict:
    """One padding-free row of the samples `indices` (no labels: model inputs only)."""
    batch = SFTCollator(pad_token_id, padding_free=True)([items[index] for index in indices])
    batch.pop("labels")
    return batch


def forward_backward(model, batch: dict):
    model.zero_grad()
    logits = model(**batch).logits
    (logits.float().square().mean()).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return logits.detach(), grads


# --------------------------------------------------------------------------------------------------- numerics
def test_compiled_blocks_give_eager_logits_and_gradients(items, tokenizer, model_factory):
    """A packed row of 4 samples (2 images, 4 tiles): logits and every parameter's gradient equal eager's to 1e-5;
    every block compiled (2 LLM + 2 ViT layers) without a graph break."""
    eager = model_factory().train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend=BACKEND) == 4
    batch = packed(items, (0, 1, 2, 3), tokenizer.pad_token_id)
    expected_logits, expected_grads = forward_backward(eager, batch)
    logits, grads = forward_backward(compiled, batch)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(list(eager.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert not counters["graph_break"]
    assert all(is_compiled(layer) for layer in compiled.model.language_model.layers)
    assert all(is_compiled(layer) for layer in compiled.model.vision_tower.encoder.layer)
    assert not any(is_compiled(module) for module in eager.modules())  # deep copies are not compiled


# --------------------------------------------------------------------------------------------------- recompilation
def test_packed_batches_of_any_length_compile_each_block_type_at_most_twice(items, tokenizer, model_factory):
    """Forward + backward on 10 packed rows of 57 to 358 tokens, 1 to 4 samples, 0 to 4 tiles.

    The bound in `compile_blocks`' docstring, exactly: one compilation per block type (serving every layer) for
    rows of several samples and micro-batches of several tiles, whatever their lengths; one more LLM compilation for
    a row holding a single sample (no packed-sequence mask) and one more ViT compilation for a single tile (size 1
    is specialised). Then nothing recompiles (`fail_on_recompile`).
    """
    model = model_factory().train()
    language, vision = CountingBackend(), CountingBackend()
    assert compile_blocks(model, vision=False, backend=language) == 2
    assert compile_blocks(model, language=False, backend=vision) == 2
    pad = tokenizer.pad_token_id
    lengths = set()

    def run(indices):
        batch = packed(items, indices, pad)
        lengths.add(batch["input_ids"].shape[1])
        forward_backward(model, batch)
        return language.count, vision.count

    # Several samples per row; 4, 4, 3 or no tiles.
    for indices in ((0, 1, 2, 3), (0, 2), (3, 1, 0), (1, 3)):
        assert run(indices) == (1, 1), indices
    assert run((2, 3)) == (1, 2)  # one tile
    assert run((1,)) == (2, 2)  # one sample: a causal row without a mask
    with torch.compiler.set_stance("fail_on_recompile"):
        for indices in ((0,), (0, 1, 2), (2,), (3,), (0, 3)):
            assert run(indices) == (2, 2), indices
    assert len(lengths) == 11  # every row had a different length
    assert not counters["graph_break"]


# --------------------------------------------------------------------------------------------------- Trainer
class ItemList(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_trainer_with_compiled_blocks_matches_eager_training(tmp_path, items, tokenizer, model_factory):
    """3 SGD steps of `InternVL3Trainer` (fused LM head, packed rows of 2 samples) with compiled blocks: the same
    losses and final parameters as without compilation, to 1e-5, from one compilation per block type."""
    dataset = ItemList([items[0], items[2], items[1], items[3]])  # rows: 2 images (4 tiles), text only, again
    base = model_factory()
    language, vision = CountingBackend(), CountingBackend()
    results = {}
    for compiled in (False, True):
        model = copy.deepcopy(base)
        if compiled:
            assert compile_blocks(model, vision=False, backend=language) == 2
            assert compile_blocks(model, language=False, backend=vision) == 2
        args = sgd_args(tmp_path / str(compiled), 2, 1, max_steps=3, learning_rate=0.1)
        trainer = SequentialTrainer(
            model=model, args=args, train_dataset=dataset,
            data_collator=SFTCollator(tokenizer.pad_token_id, padding_free=True),
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[compiled] = losses, {name: param.detach().clone() for name, param in model.named_parameters()}
    (eager_losses, eager_params), (losses, params) = results[False], results[True]
    assert (language.count, vision.count) == (1, 1)  # the compiled blocks did run (rows of 132 and 226 tokens)
    assert len(losses) == 3 and losses == pytest.approx(eager_losses, abs=1e-5)
    for name, param in params.items():
        torch.testing.assert_close(param, eager_params[name], atol=1e-5, rtol=1e-5, msg=name)
    assert (params["lm_head.weight"] - base.lm_head.weight).abs().max() > 1e-3  # it did train


# --------------------------------------------------------------------------------------------------- saving, PEFT
def test_save_pretrained_of_a_compiled_model_writes_the_same_keys(tmp_path, model_factory):
    model = model_factory()
    keys = set(model.state_dict())
    model.save_pretrained(tmp_path / "eager")
    compile_blocks(model, backend=BACKEND)
    assert set(model.state_dict()) == keys and not any("_orig_mod" in key for key in keys)
    model.save_pretrained(tmp_path / "compiled")

    def saved_keys(directory):
        with safe_open(str(directory / "model.safetensors"), "pt") as handle:
            return set(handle.keys())

    assert saved_keys(tmp_path / "compiled") == saved_keys(tmp_path / "eager")


def test_peft_model_and_block_selection(model_factory):
    """Blocks are found inside a `PeftModel`; `language`/`vision` select them; nothing to compile is an error."""
    peft_model = apply_lora(model_factory(), {"target": "both", "r": 4})
    assert compile_blocks(peft_model, backend=BACKEND) == 4
    base = peft_model.get_base_model()
    assert all(is_compiled(layer) for layer in base.model.language_model.layers)
    model = model_factory()
    assert compile_blocks(model, vision=False, backend=BACKEND) == 2
    assert not any(is_compiled(layer) for layer in model.model.vision_tower.encoder.layer)
    assert compile_blocks(model_factory(), language=False, backend=BACKEND) == 2
    with pytest.raises(ValueError, match="found no Qwen2DecoderLayer, InternVLVisionLayer"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing to compile"):
        compile_blocks(model, language=False, vision=False)


# --------------------------------------------------------------------------------------------------- recipe
def test_recipe_compile_blocks_option(tmp_path):
    """`training.compile_blocks` (default false) compiles the blocks before the trainer is built, never reaches
    `TrainingArguments` and leaves `torch_compile` (whole model) off."""
    recipe = load_recipe("recipes/tiny_cpu_sft.yaml", [f"training.output_dir={tmp_path}"])
    assert "compile_blocks" not in recipe["training"]  # a commented line in the recipe: off by default
    trainer = build_trainer(recipe)
    assert not any(is_compiled(module) for module in trainer.model.modules())
    recipe["training"]["compile_blocks"] = {"backend": BACKEND, "vision": False}
    trainer = build_trainer(recipe)
    assert all(is_compiled(layer) for layer in trainer.model.model.language_model.layers)
    assert not any(is_compiled(layer) for layer in trainer.model.model.vision_tower.encoder.layer)
    assert not trainer.args.torch_compile
    recipe["training"]["compile_blocks"] = True
    assert sum(is_compiled(module) for module in build_trainer(recipe).model.modules()) == 4
    recipe["training"]["compile_blocks"] = "yes"
    with pytest.raises(TypeError, match="compile_blocks"):
        build_trainer(recipe)
