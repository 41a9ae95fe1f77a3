"""Data-parallel SFT on CPU: 2 processes on gloo give the same optimizer step as 1 process with the same global batch.

The test launches this file under `torch.distributed.run --nproc_per_node 2` (the worker is `__main__` below), then
runs the single-process reference in the test process and compares every updated parameter to 1e-5. The samples
have very different numbers of supervised tokens (1 to 30) and the ranks get different ones, so a per-rank loss
normalisation (instead of the all-reduced weight total of the step) would show.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (per-device batch, gradient accumulation) on 2 ranks: a global batch of 4 samples each time.
DDP_SPLITS = ((2, 1), (1, 2))
WEIGHTINGS = ("square", "sample")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # two processes: ~20 s per test


def launch(output_dir: Path, mode: str, timeout: int = 300) -> None:
    """Run `_worker(output_dir, mode)` on 2 CPU processes (gloo) with torch.distributed.run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
        str(output_dir), mode,
    ]
    root = Path(__file__).parents[1]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired as error:  # a rank hung or died: show what the ranks printed, not only "timeout"
        output = [(stream or b"").decode(errors="replace") for stream in (error.stdout, error.stderr)]
        pytest.fail(f"torch.distributed.run did not finish in {timeout} s; its output:\n"
                    f"{output[0][-4000:]}{output[1][-8000:]}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def test_two_process_ddp_step_equals_single_process_step(tmp_path, tokenizer, config, model_factory):
    import test_sft

    launch(tmp_path, "plain")

    model = model_factory()
    dataset = test_sft.sft_dataset(tokenizer, config)
    for weighting in WEIGHTINGS:
        args = test_sft.sgd_args(tmp_path / f"single_{weighting}", 4, 1)
        expected, expected_loss = test_sft.one_step(model, dataset, args, False, weighting, tokenizer.pad_token_id)
        for batch_size, accumulation in DDP_SPLITS:
            saved = torch.load(tmp_path / f"ddp_{weighting}_{batch_size}x{accumulation}.pt")
            assert saved["world_size"] == 2 and saved["ranks_agree"]
            # Each rank saw different samples (the split really is data-parallel), with very different token counts.
            assert saved["rank_samples"] == ([[0, 1], [2, 3]] if batch_size == 2 else [[0, 2], [1, 3]])
            test_sft.assert_params_close(saved["params"], expected)
            # The logged loss is the step's loss (the mean over ranks of each rank's share, times 2 ranks).
            assert abs(saved["loss"] - expected_loss) < 1e-5, (weighting, batch_size, accumulation)


def test_ddp_gradient_checkpointing_with_a_text_only_rank(tmp_path, tokenizer, config, model_factory):
    """Native multimodal training mixes text-only and image samples: with micro-batch 1 × GA 2 on 2 ranks and the
    sequential order (image, text, image, text), rank 1 only ever sees text. The real recipes all turn on
    gradient checkpointing, so this must work (and give the single-process step) with it on."""
    import test_sft

    launch(tmp_path, "checkpointing", timeout=120)
    saved = torch.load(tmp_path / "ddp_square_1x2.pt")
    assert saved["rank_samples"] == [[0, 2], [1, 3]]
    dataset = test_sft.sft_dataset(tokenizer, config)
    batch = test_sft.SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    expected, expected_loss = test_sft.reference_step(model_factory(), batch, "square")
    test_sft.assert_params_close(saved["params"], expected)
    assert abs(saved["loss"] - expected_loss) < 1e-5


# --------------------------------------------------------------------------------------------------- worker
def _worker(output_dir: Path, mode: str) -> None:
    """One rank of `torch.distributed.run`: one SGD step per (weighting, split), rank 0 saves the parameters."""
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    import test_sft
    from conftest import build_model
    from internvl3_hf.data import SFTCollator
    from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    model = build_model(config)  # the same weights as the `model_factory` fixture: same config, same seed
    dataset = test_sft.sft_dataset(tokenizer, config)
    input_ids = [tuple(dataset[index][0].input_ids) for index in range(len(dataset))]

    class RecordingCollator(SFTCollator):
        """Remembers which dataset items this rank was given."""

        seen: list[int] = []

        def __call__(self, items):
            self.seen += [input_ids.index(tuple(item[0].input_ids)) for item in items]
            return super().__call__(items)

    if mode == "plain":
        runs = [(weighting, split, {}) for weighting in WEIGHTINGS for split in DDP_SPLITS]
    else:
        runs = [("square", (1, 2), {"gradient_checkpointing": True})]
    for weighting, (batch_size, accumulation), extra in runs:
        collator = RecordingCollator(tokenizer.pad_token_id)
        collator.seen = []
        trainer = test_sft.SequentialTrainer(
            model=copy.deepcopy(model),
            args=test_sft.sgd_args(output_dir / f"ddp_{weighting}_{batch_size}x{accumulation}", batch_size,
                                   accumulation, ddp_backend="gloo", **extra),
            train_dataset=dataset,
            data_collator=collator,
            loss_weighting=weighting,
        )
        output = trainer.train()
        params = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        params = {name.removeprefix("module."): value for name, value in params.items()}
        flat = torch.cat([value.flatten() for value in params.values()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        samples = [None] * dist.get_world_size()
        dist.all_gather_object(samples, collator.seen)
        if dist.get_rank() == 0:
            torch.save(
                {
                    "params": params,
                    "loss": output.training_loss,
                    "world_size": dist.get_world_size(),
                    "ranks_agree": all(torch.equal(gathered[0], other) for other in gathered[1:]),
                    "rank_samples": samples,
                },
                output_dir / f"ddp_{weighting}_{batch_size}x{accumulation}.pt",
            )
        dist.barrier()
    # Every result is on disk once all ranks pass the barrier: leave without any gloo teardown. Its threads raced a
    # normal interpreter exit (abort), and in CI rank 0 hung after the last barrier (in destroy_process_group or at
    # exit) once rank 1 had gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
