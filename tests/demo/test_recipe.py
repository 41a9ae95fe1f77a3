"""`internvl3-hf demo --fast`: the whole recipe on a tiny model, end to end, and it really learns."""

from __future__ import annotations

import logging

import pytest
from PIL import Image
from transformers.utils import logging as hf_logging

from internvl3_hf.cli import main
from internvl3_hf.demo import recipe
from internvl3_hf.demo.report import format_table

pytestmark = pytest.mark.slow  # the whole --fast recipe: ~2.5 min on a CPU


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


def test_pretraining_beats_chance_and_sft_does_not_lose_it(fast_run):
    report, _ = fast_run
    assert [stage.name for stage in report.stages] == ["pre-training", "SFT", "MPO", "Best-of-N"]
    assert report.extra["vision_cell_accuracy"] > 0.9  # the ViT starts pre-trained (`demo.vision`)
    pretrain, sft = report.stage("pre-training"), report.stage("SFT")
    assert pretrain.visual_total == sft.visual_total == 120
    # The kinds the pre-training mix asks (colour, shape, count, position): well above uniform guessing.
    asked = ("colour", "shape", "count", "position")
    correct = sum(pretrain.kind_accuracy(kind)[0] for kind in asked)
    total = sum(pretrain.kind_accuracy(kind)[1] for kind in asked)
    chance = sum(1 / recipe.tasks.answer_space(kind) for kind in asked) / len(asked)
    assert correct / total > chance + 0.1, (correct, total, chance)
    # SFT keeps what pre-training taught and adds the step-by-step sums, which pre-training never asks.
    assert sft.visual_correct >= pretrain.visual_correct, (sft.visual_correct, pretrain.visual_correct)
    assert sft.kind_accuracy("sum")[0] >= pretrain.kind_accuracy("sum")[0] + 3


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
        assert f"| {stage.name} | {stage.visual_accuracy:.1%} ({stage.visual_correct}/{stage.visual_total})" in table
    # Best-of-N's PRM arg-max, and the PRM-weighted vote and the majority vote over the same candidates, on the same
    # held-out questions as the other stages.
    bon = report.stage("Best-of-N")
    assert bon.visual_total == report.stage("MPO").visual_total and len(bon.text) == len(report.stage("MPO").text)
    assert "| (same candidates: PRM-weighted vote) |" in table and "| (same candidates: majority vote) |" in table
    assert (output / "tiny-internvl3-recipe" / "config.json").exists()
