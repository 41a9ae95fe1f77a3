"""SFT loss and training: per-sample weights by hand, packed == unpacked, gradient accumulation, Trainer, V2PE.

The CLI-recipe path (`internvl3-hf train`) is covered by tests/test_train.py; here `InternVL3Trainer` is driven
directly. Every Trainer run is one plain SGD step with lr = 1 and no clipping, so `updated = initial - gradient`
and comparing parameters compares gradients.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import TrainingArguments

from internvl3_hf.data import IGNORE_INDEX, Sample, SFTCollator, SFTDataset, SupervisedEncoder
from internvl3_hf.losses import shifted_targets, target_weights, weighted_lm_loss
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf._compat import has_fused_lm_head
from internvl3_hf.sft import InternVL3Trainer
from internvl3_hf.tiny import tiny_config

WEIGHTINGS = ("token", "square", "sample")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------- shared data
def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sft_samples() -> list[Sample]:
    """Four samples, mixed text-only and image, with very different numbers of supervised tokens (1 to 30)."""
    red = PIL.Image.new("RGB", (56, 28), (200, 30, 30))  # 3 tiles
    texture = torch.randint(0, 256, (28, 28, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise = PIL.Image.fromarray(texture.numpy())  # 1 tile; seeded (PIL's effect_noise is not), same in every process
    system = {"role": "system", "content": "You are a helpful assistant."}  # shorter rows than the default prompt
    return [
        Sample([system, user("<image>\nWhat colour?"), assistant("red")], [red]),
        Sample(
            [
                system,
                {"role": "user", "content": "How many shapes?"},
                {"role": "assistant", "content": "There are three shapes: two triangles and one circle."},
            ]
        ),
        Sample(
            [
                system,
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "A green triangle."},
                {"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "green"},
            ],
            [noise],
        ),
        Sample(
            [  # the default (long) system prompt
                {"role": "user", "content": "Answer the question step by step."},
                {"role": "assistant", "content": "Step 1: count the red shapes. Step 2: add them. The answer is 5."},
            ]
        ),
    ]


def sft_dataset(tokenizer, config, **kwargs) -> SFTDataset:
    encoder = SupervisedEncoder(processor_for_config(tokenizer, config), seed=0)
    return SFTDataset(sft_samples(), encoder, **kwargs)


# The dataset order is fixed by `sgd_args` (`train_sampling_strategy="sequential"`), so that runs split the same
# samples differently; the name stays for the test modules that import it.
SequentialTrainer = InternVL3Trainer


def sgd_args(output_dir, batch_size: int, accumulation: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def one_step(model, dataset, args, padding_free: bool, weighting: str, pad_token_id: int, **trainer_kwargs):
    """Parameters after one Trainer step, and the loss the Trainer reported for it."""
    model = copy.deepcopy(model)
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(pad_token_id, padding_free=padding_free),
        loss_weighting=weighting,
        **trainer_kwargs,
    )
    output = trainer.train()
    return {name: param.detach().clone() for name, param in model.named_parameters()}, output.training_loss


def reference_step(model, batch: dict, weighting: str):
    """Parameters after one SGD step (lr 1) on the whole batch at once, outside the Trainer, and its loss."""
    model = copy.deepcopy(model).train()
    labels = batch["labels"]
    outputs = model(**{key: value for key, value in batch.items() if key != "labels"})
    loss = weighted_lm_loss(outputs.logits, labels, batch["position_ids"], weighting)
    loss.backward()
    with torch.no_grad():
        return {name: (param - param.grad).clone() for name, param in model.named_parameters()}, float(loss)


def assert_params_close(actual: dict, expected: dict, atol: float = 1e-5):
    assert actual.keys() == expected.keys()
    worst = max(((actual[name] - expected[name]).abs().max().item(), name) for name in expected)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} in {worst[1]}"


# --------------------------------------------------------------------------------------------------- loss by hand
def hand_loss(logits_rows: list[torch.Tensor], labels_rows: list[list[int]], weighting: str) -> float:
    """Σ_i w_i Σ_t CE_it / Σ_i w_i l_i with CE from an explicit log-softmax and w_i ∈ {1, 1/√l_i, 1/l_i}."""
    numerator, denominator = 0.0, 0.0
    for logits, labels in zip(logits_rows, labels_rows):
        targets = labels[1:]
        ces = []
        for position, target in enumerate(targets):
            if target == IGNORE_INDEX:
                continue
            row = logits[position].double()
            shift = row.max()
            log_probs = row - shift - torch.log(torch.exp(row - shift).sum())
            ces.append(-float(log_probs[target]))
        length = len(ces)
        weight = {"token": 1.0, "square": 1 / math.sqrt(length), "sample": 1 / length}[weighting]
        numerator += weight * sum(ces)
        denominator += weight * length
    return numerator / denominator


def three_sample_batch(vocab: int = 11):
    """Three samples with 1, 4 and 9 supervised targets (weights 1, 1/2, 1/3 under `square`), padded and packed."""
    generator = torch.Generator().manual_seed(0)
    ignore = IGNORE_INDEX
    labels = [
        [ignore, ignore, 3],  # 1 target
        [ignore, 4, ignore, 5, 6, 7],  # 4 targets (the first label is never a target)
        [ignore, ignore, 1, 2, 3, 4, 5, 6, 7, 8, 9, ignore],  # 9 targets
    ]
    logits = [torch.randn((len(row), vocab), generator=generator, dtype=torch.float64) * 3 for row in labels]
    width = max(len(row) for row in labels)
    padded_logits = torch.zeros((3, width, vocab), dtype=torch.float64)
    padded_labels = torch.full((3, width), ignore)
    padded_positions = torch.zeros((3, width), dtype=torch.long)
    for index, (row_logits, row_labels) in enumerate(zip(logits, labels)):
        padded_logits[index, : len(row_labels)] = row_logits  # padding logits stay 0: never read
        padded_labels[index, : len(row_labels)] = torch.tensor(row_labels)
        padded_positions[index, : len(row_labels)] = torch.arange(len(row_labels))
    packed_logits = torch.cat(logits)[None]
    packed_labels = torch.tensor([label for row in labels for label in row])[None]
    packed_positions = torch.cat([torch.arange(len(row)) for row in labels])[None]
    padded = (padded_logits, padded_labels, padded_positions)
    return logits, labels, padded, (packed_logits, packed_labels, packed_positions)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weighted_loss_equals_hand_computation(weighting):
    logits, labels, padded, packed = three_sample_batch()
    expected = hand_loss(logits, labels, weighting)
    # Cross-entropy runs in float32 (as in training), the weighted sum in float64.
    assert float(weighted_lm_loss(*padded, weighting)) == pytest.approx(expected, rel=1e-6)
    assert float(weighted_lm_loss(*packed, weighting)) == pytest.approx(expected, rel=1e-6)
    # An external normaliser (the step's global weight total) replaces the batch's own.
    total = float(target_weights(packed[1], packed[2], weighting).sum())
    assert float(weighted_lm_loss(*packed, weighting, normalizer=2 * total)) == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_rows_without_position_ids_are_samples(weighting):
    """A collator that sends no `position_ids` (one sample per row) must get the same per-sample weights.

    `target_weights` marks EVERY token as a sample start when `position_ids` is None, so each supervised token
    becomes its own one-token sample: `square` and `sample` silently turn into `token`.
    """
    logits, labels, padded, _ = three_sample_batch()
    expected = hand_loss(logits, labels, weighting)
    assert float(weighted_lm_loss(padded[0], padded[1], None, weighting)) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(target_weights(padded[1], None, weighting), target_weights(padded[1], padded[2], weighting))


def test_weights_are_one_over_sqrt_and_one_over_length():
    _, _, _, (_, labels, positions) = three_sample_batch()
    per_sample = {
        "token": [1.0, 1.0, 1.0],
        "square": [1.0, 1 / 2, 1 / 3],
        "sample": [1.0, 1 / 4, 1 / 9],
    }
    targets = shifted_targets(labels, positions)[0]
    # targets[t] is label t + 1; the target at a sample's last token (the next sample's first label) is ignored.
    assert targets[1].item() == 3 and targets[2].item() == IGNORE_INDEX and targets[3].item() == 4
    for weighting, values in per_sample.items():
        weights = target_weights(labels, positions, weighting)[0]
        expected = torch.zeros_like(weights)
        starts = [0, 3, 9]
        for start, value, length in zip(starts, values, (3, 6, 12)):
            stop = start + length - 1  # the last token of a sample predicts nothing inside it
            window = targets[start:stop] != IGNORE_INDEX
            expected[start:stop][window] = value
        assert torch.allclose(weights, expected, rtol=0, atol=1e-15), weighting
        assert weights.dtype == torch.float64
    with pytest.raises(ValueError, match="loss weighting"):
        target_weights(labels, positions, "mean")


def test_padding_and_boundary_tokens_never_count():
    """A packed row's next sample must not be a target of the previous one, even when its first label is set."""
    labels = torch.tensor([[-100, 5, 6, 7, 8]])
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    assert shifted_targets(labels, positions).tolist() == [[5, 6, -100, 8]]
    assert target_weights(labels, positions, "sample")[0].tolist() == [0.5, 0.5, 0.0, 1.0]


# --------------------------------------------------------------------------------------------------- packed == padded
def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


@pytest.mark.parametrize(
    "use_cache", [None, True, False], ids=["config-use_cache", "use_cache=True", "use_cache=False"]
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_equals_padded_batch(tokenizer, config, model_factory, attn, use_cache):
    """Logits per sample to 1e-5, loss and every parameter's gradient equal: one padding-free row vs padded rows.

    Regression: transformers only detects packed sequences (no attention mask, position_ids restarting at 0) when
    no cache is passed; the decoder used to create a `DynamicCache` whenever `use_cache` (True in the config), so
    the samples of a packed row attended to each other. A training-mode forward must isolate them whatever
    `use_cache` says.
    """
    model = model_factory(attn_implementation=attn).train()
    dataset = sft_dataset(tokenizer, config)
    items = [dataset[index] for index in range(len(dataset))]
    extra = {} if use_cache is None else {"use_cache": use_cache}
    results = {}
    for padding_free in (False, True):
        batch = SFTCollator(tokenizer.pad_token_id, padding_free=padding_free)(items)
        model.zero_grad()
        logits = model(**model_inputs(batch), **extra).logits
        loss = weighted_lm_loss(logits, batch["labels"], batch["position_ids"], "square")
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        results[padding_free] = (logits.detach(), float(loss), grads)
    (padded, padded_loss, padded_grads), (packed, packed_loss, packed_grads) = results[False], results[True]
    assert packed.shape[0] == 1 and padded.shape[0] == 4
    cursor = 0
    for row, (sample,) in enumerate(items):
        length = len(sample.input_ids)
        torch.testing.assert_close(packed[0, cursor : cursor + length], padded[row, :length], atol=1e-5, rtol=1e-5)
        cursor += length
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert len(padded_grads) == len(list(model.parameters()))  # the ViT and projector get gradients too
    assert_params_close(packed_grads, padded_grads)


# --------------------------------------------------------------------------------------------------- Trainer
@pytest.fixture
def base_model(model_factory):
    return model_factory()


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_trainer_step_does_not_depend_on_micro_batch_size(tmp_path, tokenizer, config, base_model, weighting):
    """micro-batch 4 × GA 1 == micro-batch 1 × GA 4 == 2 × 2 == one plain step on the whole batch."""
    dataset = sft_dataset(tokenizer, config)
    full_batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    expected, expected_loss = reference_step(base_model, full_batch, weighting)
    moved = max((expected[n] - p).abs().max().item() for n, p in base_model.named_parameters())
    assert moved > 1e-2  # the step is not trivially zero
    splits = ((4, 1), (1, 4), (2, 2)) if weighting == "square" else ((4, 1), (1, 4))
    for batch_size, accumulation in splits:
        args = sgd_args(tmp_path / f"{batch_size}x{accumulation}", batch_size, accumulation)
        params, loss = one_step(base_model, dataset, args, False, weighting, tokenizer.pad_token_id)
        assert loss == pytest.approx(expected_loss, abs=1e-5), (batch_size, accumulation)
        assert_params_close(params, expected)


def test_trainer_packed_step_equals_unpacked_step(tmp_path, tokenizer, config, base_model):
    """The padding-free collator (one packed row per micro-batch) trains exactly like padded rows."""
    assert base_model.config.text_config.use_cache  # the default config, as a user's checkpoint has it
    dataset = sft_dataset(tokenizer, config)
    full_batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    expected, expected_loss = reference_step(base_model, full_batch, "square")
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = sgd_args(tmp_path / f"{batch_size}x{accumulation}", batch_size, accumulation)
        params, loss = one_step(base_model, dataset, args, True, "square", tokenizer.pad_token_id)
        assert loss == pytest.approx(expected_loss, abs=1e-5), (batch_size, accumulation)
        assert_params_close(params, expected)


def test_dataset_level_packing_trains_like_unpacked(tmp_path, tokenizer, config, base_model):
    """`SFTDataset(max_packed_tokens=...)` groups + padding-free collation: same step as the padded reference."""
    packed_dataset = sft_dataset(tokenizer, config, max_packed_tokens=10_000, max_packed_tiles=100)
    assert len(packed_dataset) == 1 and sorted(packed_dataset.groups[0]) == [0, 1, 2, 3]
    items = packed_dataset[0]
    unpacked = SFTCollator(tokenizer.pad_token_id)([[sample] for sample in items])
    expected, expected_loss = reference_step(base_model, unpacked, "square")
    args = sgd_args(tmp_path, 1, 1)
    params, loss = one_step(base_model, packed_dataset, args, True, "square", tokenizer.pad_token_id)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert_params_close(params, expected)


def test_trainer_overrides_only_public_trainer_hooks():
    """The step's weight total reaches `compute_loss` through public hooks (`get_batch_samples`), not through a
    private `Trainer` method that a transformers release may rename."""
    from transformers import Trainer

    overridden = {name for name in vars(InternVL3Trainer) if hasattr(Trainer, name)}
    assert overridden and not {name for name in overridden if name.startswith("_") and not name.endswith("__")}


def test_trainer_rejects_unknown_weighting(tmp_path, base_model):
    with pytest.raises(ValueError, match="loss_weighting"):
        InternVL3Trainer(model=base_model, args=sgd_args(tmp_path, 1, 1), loss_weighting="mean")


def test_tiny_model_overfits_mixed_text_and_image_set(tmp_path, tokenizer, config):
    """4 samples (2 with images, 2 text-only) through InternVL3Trainer; the loss falls by more than 90 %."""
    from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration

    system = {"role": "system", "content": "You are a helpful assistant."}  # short rows keep this fast
    red, blue = (PIL.Image.new("RGB", (28, 28), colour) for colour in ((200, 30, 30), (30, 30, 200)))
    samples = [
        Sample([system, user("<image>\nWhat colour?"), assistant("red")], [red]),
        Sample([system, user("<image>\nWhat colour?"), assistant("blue")], [blue]),
        Sample([system, user("How many shapes?"), assistant("There are three shapes.")]),
        Sample([system, user("2 + 3 = ?"), assistant("The answer is 5.")]),
    ]
    dataset = SFTDataset(samples, SupervisedEncoder(processor_for_config(tokenizer, config), seed=0))
    torch.manual_seed(0)
    model = InternVL3ForConditionalGeneration(config)  # the ordinary initialisation, not the O(1) test weights
    args = sgd_args(
        tmp_path, 4, 1, max_steps=25, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0,
    )
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=SFTCollator(tokenizer.pad_token_id),
        loss_weighting="square",
    )
    flush = torch.set_flush_denormal(True)  # the ~0.02-std init makes denormal gradients: 10x slower on CPU
    try:
        trainer.train()
    finally:
        if flush:
            torch.set_flush_denormal(False)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 25
    assert losses[-1] < 0.1 * losses[0], losses


# --------------------------------------------------------------------------------------------------- V2PE
def test_v2pe_random_positions_restart_per_packed_sample(tokenizer, model_factory):
    """Random V2PE through the padding-free collator: positions restart at 0 at every sample start, each sample's
    positions are those it gets alone with the same per-image δ, and packed logits equal the unpacked ones."""
    config = tiny_config(tokenizer, v2pe_mode="random", v2pe_delta_set=[0.5, 0.25, 0.125])
    model = model_factory(config).train()
    dataset = sft_dataset(tokenizer, config)
    items = [dataset[index] for index in range(len(dataset))]
    batch = SFTCollator(tokenizer.pad_token_id, padding_free=True)(items)
    torch.manual_seed(0)
    with torch.no_grad():
        packed = model(**model_inputs(batch))
    positions, strides = packed.rope_position_ids[0], packed.v2pe_strides
    starts = batch["position_ids"][0] == 0
    assert int(starts.sum()) == 4 and starts[0]
    assert positions[starts].tolist() == [0.0] * 4
    assert strides.numel() == 2 and set(strides.tolist()) <= {128, 64, 32}
    assert (positions != positions.round()).any()  # fractional image positions: V2PE is on

    image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    cursor, image = 0, 0
    padded = SFTCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        unpacked = model(**model_inputs(padded), v2pe_strides=strides)
    for row, (sample,) in enumerate(items):
        length = len(sample.input_ids)
        ids = torch.tensor(sample.input_ids)[None]
        count = len(sample.image_num_patches)
        alone, _ = model.model.v2pe_positions(ids == image_token, v2pe_strides=strides[image : image + count])
        assert torch.equal(positions[cursor : cursor + length], alone[0])
        assert torch.equal(unpacked.rope_position_ids[row, :length], alone[0])
        torch.testing.assert_close(
            packed.logits[0, cursor : cursor + length], unpacked.logits[row, :length], atol=1e-5, rtol=1e-5
        )
        if count == 0:
            assert torch.equal(alone[0], torch.arange(length, dtype=alone.dtype))
        cursor, image = cursor + length, image + count


# --------------------------------------------------------------------------------------------------- fused LM head
def independent_step(model, items: list, weighting: str, pad_token_id: int):
    """Loss and gradients from plain `F.cross_entropy` over full logits, one padded row per sample, with per-sample
    weights counted here (no `losses.py` code): Σ_i w_i Σ_t CE_it / Σ_i w_i l_i, w_i ∈ {1, 1/√l_i, 1/l_i}."""
    model.zero_grad()
    batch = SFTCollator(pad_token_id)(items)
    logits = model(**model_inputs(batch), use_cache=False).logits
    numerator, denominator = 0.0, 0.0
    for row, (sample,) in enumerate(items):
        length = len(sample.input_ids)
        targets = torch.tensor(sample.labels[1:])
        count = int((targets != IGNORE_INDEX).sum())
        weight = {"token": 1.0, "square": 1 / math.sqrt(count), "sample": 1 / count}[weighting]
        nll = F.cross_entropy(logits[row, : length - 1].double(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        numerator = numerator + weight * nll
        denominator += weight * count
    loss = numerator / denominator
    loss.backward()
    return float(loss), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fused_loss_and_gradients_equal_full_logits(tmp_path, tokenizer, config, base_model, weighting):
    """`InternVL3Trainer.compute_loss` through TRL's fused LM head, on a padded batch and on one padding-free packed
    row: loss and every parameter's gradient equal an independent full-logits computation (and the logits path)."""
    model = base_model.train()
    dataset = sft_dataset(tokenizer, config)
    items = [dataset[index] for index in range(len(dataset))]
    expected_loss, expected_grads = independent_step(model, items, weighting, tokenizer.pad_token_id)
    assert len(expected_grads) == len(list(model.parameters()))  # the ViT, projector and LM head included
    fused = InternVL3Trainer(model=model, args=sgd_args(tmp_path / "fused", 1, 1), loss_weighting=weighting)
    plain = InternVL3Trainer(
        model=model, args=sgd_args(tmp_path / "plain", 1, 1), loss_weighting=weighting, fused_lm_head=False
    )
    assert fused.fused_lm_head and not plain.fused_lm_head
    for padding_free in (False, True):
        batch = SFTCollator(tokenizer.pad_token_id, padding_free=padding_free)(items)
        assert batch["input_ids"].shape[0] == (1 if padding_free else 4)
        for trainer in (fused, plain):
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            grads = {name: param.grad for name, param in model.named_parameters()}
            assert float(loss) == pytest.approx(expected_loss, abs=1e-5), (padding_free, trainer.fused_lm_head)
            assert_params_close(grads, expected_grads)
        # An external normaliser (the step's global weight total) replaces the batch's own.
        total = target_weights(batch["labels"], batch["position_ids"], weighting).sum()
        halved = fused.compute_loss(model, dict(batch), num_items_in_batch=2 * total)
        assert float(halved) * fused.accelerator.num_processes == pytest.approx(expected_loss / 2, abs=1e-5)


def test_unfused_trainer_step_equals_reference(tmp_path, tokenizer, config, base_model):
    """`fused_lm_head=False` keeps the full-logits loss: packed, micro-batch 2 × GA 2, same step as the reference."""
    dataset = sft_dataset(tokenizer, config)
    full_batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    expected, expected_loss = reference_step(base_model, full_batch, "sample")
    args = sgd_args(tmp_path, 2, 2)
    params, loss = one_step(base_model, dataset, args, True, "sample", tokenizer.pad_token_id, fused_lm_head=False)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert_params_close(params, expected)


def test_fused_lm_head_trains_a_lora_model(tmp_path, tokenizer, config, base_model):
    """A PEFT LoRA model (adapters on the LLM linears): the base model is patched, not the `PeftModel`, and one
    packed SGD step (micro-batch 2 × GA 2) gives the loss and adapter update of the full-logits path."""
    from peft import LoraConfig, get_peft_model

    from internvl3_hf.train import LLM_LORA_TARGETS

    def lora_model():
        torch.manual_seed(0)  # init_lora_weights=False draws A and B at random: both get gradients
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLM_LORA_TARGETS, init_lora_weights=False)
        return get_peft_model(copy.deepcopy(base_model), lora)

    dataset = sft_dataset(tokenizer, config)
    initial = {name: param.detach().clone() for name, param in lora_model().named_parameters() if param.requires_grad}
    assert initial and all("lora_" in name for name in initial)
    results = {}
    for fused in (True, False):
        model = lora_model()
        trainer = SequentialTrainer(
            model=model,
            args=sgd_args(tmp_path / f"fused_{fused}", 2, 2),
            train_dataset=dataset,
            data_collator=SFTCollator(tokenizer.pad_token_id, padding_free=True),
            loss_weighting="square",
            fused_lm_head=fused,
        )
        assert trainer.fused_lm_head is fused
        assert ("forward" in model.get_base_model().__dict__) is fused and "forward" not in model.__dict__
        output = trainer.train()
        trained = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        results[fused] = (trained, output.training_loss)
    (fused_params, fused_loss), (plain_params, plain_loss) = results[True], results[False]
    assert max((fused_params[name] - initial[name]).abs().max().item() for name in initial) > 1e-3  # it trained
    assert fused_loss == pytest.approx(plain_loss, abs=1e-5)
    assert_params_close(fused_params, plain_params)


def test_lora_on_the_lm_head_falls_back_to_full_logits(tmp_path, base_model):
    """TRL reads `lm_head.weight` directly, which would silently drop a LoRA adapter on the head itself."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=2, target_modules=["lm_head"]))
    trainer = InternVL3Trainer(model=model, args=sgd_args(tmp_path, 1, 1))
    assert not trainer.fused_lm_head and "forward" not in model.get_base_model().__dict__


class ShapeRecorder(TorchDispatchMode):
    """The shape of every tensor an aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(leaf.shape) for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        return out


def test_fused_training_step_never_materialises_logits(tmp_path, tokenizer, config, base_model, monkeypatch):
    """A fused training step (forward and backward) never runs `lm_head` and creates no tensor as wide as the
    vocabulary besides the `(vocab, hidden)` weights and their gradients; the head scores only supervised rows.

    TRL scores only the supervised rows on Triton devices (CUDA/XPU); on CPU it scores every row to keep tile shapes
    fixed, so the test takes the CUDA decision. Its vocabulary tiles are 32768 wide (wider than the tiny vocabulary):
    128 here, so that a tile holding the whole vocabulary would show.
    """
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 128)
    scored = []
    chunked = trl_utils._ChunkedLogProbFunction

    def recording_apply(hidden, weight, *args):
        scored.append(tuple(hidden.shape))
        return chunked.apply(hidden, weight, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", SimpleNamespace(apply=recording_apply))

    model = base_model.train()
    vocab, hidden = config.text_config.vocab_size, config.text_config.hidden_size
    head_outputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(tuple(output.shape)))
    dataset = sft_dataset(tokenizer, config)
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    rows, width = batch["input_ids"].shape
    targets = int((shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).sum())
    assert targets < rows * (width - 1) // 2  # most positions are prompt or padding

    losses = {}
    for fused in (True, False):
        trainer = InternVL3Trainer(model=model, args=sgd_args(tmp_path / f"{fused}", 1, 1), fused_lm_head=fused)
        model.zero_grad()
        with ShapeRecorder() as recorder:
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
        losses[fused] = float(loss)
        wide = {shape for shape in recorder.shapes if vocab in shape} - {(vocab, hidden)}
        if fused:
            assert head_outputs == [] and scored == [(targets, hidden)]
            assert wide == set(), wide
            assert (targets, 128) in recorder.shapes  # the logits exist only as (supervised rows, 128) tiles
        else:  # the recorder does see full logits when they exist
            assert head_outputs == [(rows, width, vocab)] and (rows, width, vocab) in wide
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)

    # A packed row whose samples' first labels are set: those are no targets (of the previous sample) and not scored.
    items = [dataset[i] for i in range(len(dataset))]
    packed = SFTCollator(tokenizer.pad_token_id, padding_free=True)(items)
    starts = packed["position_ids"] == 0
    packed["labels"][starts] = packed["input_ids"][starts]
    assert (shifted_targets(packed["labels"], packed["position_ids"]) != IGNORE_INDEX).sum() == targets
    scored.clear()
    trainer = InternVL3Trainer(model=model, args=sgd_args(tmp_path / "packed", 1, 1))
    assert float(trainer.compute_loss(model, dict(packed))) == pytest.approx(losses[True], abs=1e-5)
    assert scored == [(targets, hidden)] and head_outputs == [(rows, width, vocab)]


def test_fused_lm_head_is_added_once(tmp_path, model_factory):
    """A second trainer on the same model does not patch again; a deep copy keeps a patch that runs the copy's own
    weights (TRL's own patch would run the original's off the fused path); a TRL patch with another temperature is
    patched afresh."""
    from trl.trainer.utils import add_fused_lm_head

    model = model_factory()
    InternVL3Trainer(model=model, args=sgd_args(tmp_path, 1, 1), fused_lm_head=False)
    assert "forward" not in model.__dict__ and not has_fused_lm_head(model)
    InternVL3Trainer(model=model, args=sgd_args(tmp_path, 1, 1))
    forward = model.__dict__["forward"]
    assert has_fused_lm_head(model)
    InternVL3Trainer(model=model, args=sgd_args(tmp_path, 1, 1))
    assert model.__dict__["forward"] is forward

    clone = copy.deepcopy(model)
    assert has_fused_lm_head(clone) and clone.forward.__self__ is clone
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    cloned_forward = clone.__dict__["forward"]
    assert InternVL3Trainer(model=clone, args=sgd_args(tmp_path, 1, 1)).fused_lm_head
    assert clone.__dict__["forward"] is cloned_forward
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = clone.lm_head(clone.model(input_ids=input_ids).last_hidden_state)
        torch.testing.assert_close(clone(input_ids=input_ids).logits, expected, rtol=0, atol=0)

    warm = model_factory(seed=1)
    add_fused_lm_head(warm, temperature=0.5)  # as a sampling trainer would
    assert not has_fused_lm_head(warm)
    InternVL3Trainer(model=warm, args=sgd_args(tmp_path, 1, 1))
    assert has_fused_lm_head(warm)


def test_loss_only_evaluation_is_fused(tmp_path, tokenizer, config, base_model):
    """`evaluate()` without `compute_metrics` only needs the loss: fused (no `lm_head` call), same `eval_loss`."""
    dataset = sft_dataset(tokenizer, config)
    losses = {}
    for fused in (True, False):
        model = copy.deepcopy(base_model)
        head_calls = []
        model.lm_head.register_forward_hook(lambda *args, calls=head_calls: calls.append(1))
        trainer = SequentialTrainer(
            model=model,
            args=sgd_args(tmp_path / f"{fused}", 2, 1, per_device_eval_batch_size=2),
            eval_dataset=dataset,
            data_collator=SFTCollator(tokenizer.pad_token_id, padding_free=True),
            fused_lm_head=fused,
        )
        losses[fused] = trainer.evaluate()["eval_loss"]
        assert bool(head_calls) is not fused
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
