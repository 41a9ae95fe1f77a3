"""`internvl3-hf demo --fast`: the whole recipe on a tiny model, end to end, and it really learns."""

from __future__ import annotations

import logging

import pytest
from PIL import Image
from transformers.utils import logging as hf_logging

from internvl3_hf.cli import main
from internvl3_hf.demo import recipe
from internvl3_hf.demo.report import format_table, paired_difference, rises

pytestmark = pytest.mark.slow  # the whole --fast recipe: under 2 minutes on 2 CPU cores


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    captured = {}
    original = recipe.run_recipe

    def keep_report(*args, **kwargs):
        captured["report"] = original(*args, **kwargs)
        return captured["report"]

    before = logging.getLogger("internvl3_hf").level, hf_logging.get_verbosity()
    with pytest.MonkeyPatch.context() as patch:  # the module-scoped twin of the `monkeypatch` fixture
        patch.setattr(recipe, "run_recipe", keep_report)
        assert main(["demo", "--fast", "--output", str(output)]) == 0
    # The demo quiets the libraries for its own run only.
    assert (logging.getLogger("internvl3_hf").level, hf_logging.get_verbosity()) == before
    return captured["report"], output


def test_the_stages_fast_can_show_move_reasoning_the_way_the_recipe_says(fast_run):
    report, _ = fast_run
    assert [stage.name for stage in report.stages] == ["pre-training", "SFT", "MPO", "Best-of-4"]
    assert report.extra["vision_cell_accuracy"] > 0.9  # the ViT starts pre-trained (`demo.vision`)
    pretrain, sft, mpo, bon = report.stages
    assert len(pretrain.reasoning) == len(bon.reasoning) == 120 and len(pretrain.text) == len(bon.text) == 48
    # SFT teaches the step-by-step reasoning, which pre-training never asks, beyond noise (paired 95 % interval)
    assert rises(sft.reasoning, pretrain.reasoning), paired_difference(sft.reasoning, pretrain.reasoning)
    # Best-of-N keeps a right answer more often than greedy MPO, and pass@N bounds what it can pick
    assert sum(bon.reasoning) > sum(mpo.reasoning)
    passed = report.extra["bon"]["pass"]
    assert sum(ok for template in recipe.tasks.REASONING_TEMPLATES for ok in passed[template]) >= sum(bon.reasoning)
    # MPO's repair of the annotator's slip needs the full run's SFT model and 800 questions of samples: at --fast
    # size it is within noise of SFT (docs/demo.md), so its direction is not asserted here.


def test_the_table_and_the_png(fast_run, capsys):
    report, output = fast_run
    assert report.png == output / "recipe.png"
    with Image.open(report.png) as image:
        image.verify()
    with Image.open(report.png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert image.size == (1200, 820) and colours is not None and len(colours) > 20
    assert report.png.stat().st_size > 20_000
    table = format_table(report)
    for stage in report.stages:
        share = sum(stage.reasoning) / len(stage.reasoning)
        assert f"| {stage.name} | {share:.1%} ({sum(stage.reasoning)}/{len(stage.reasoning)}) |" in table
    # Best-of-N's PRM arg-max, the PRM-weighted vote and the majority vote over the same candidates, and pass@N
    assert "| (same candidates: PRM-weighted vote) |" in table and "| (same candidates: majority vote) |" in table
    assert "| (pass@4: a right answer among the 4) |" in table
    assert "MPO vs SFT, reasoning: " in table and "paired 95 % interval" in table
    assert "threads" in report.settings and "kernels" in report.settings
    assert (output / "tiny-internvl3-recipe" / "config.json").exists()
