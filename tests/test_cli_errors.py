"""`internvl3-hf`: bad input (a missing recipe, a bad key, a missing checkpoint, a missing or corrupt image, an
unusable sample) is one line on stderr and exit status 2, without a traceback; `--debug` shows the traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from internvl3_hf.cli import main
from internvl3_hf.data import DataError
from internvl3_hf.errors import UserError
from internvl3_hf.recipes import RecipeError

SFT = "recipes/tiny_cpu_sft.yaml"
MPO = "recipes/tiny_cpu_mpo.yaml"


def one_line_error(capsys, *argv: str) -> str:
    """Run the command, check the exit status 2 and the single `internvl3-hf: error:` line, return that line."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("internvl3-hf: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A directory that passes for a checkpoint until its weights are read (the errors below come earlier)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path / "model"


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return path


def test_a_missing_recipe(capsys):
    line = one_line_error(capsys, "train", "--config", "recipes/no_such_recipe.yaml")
    assert "recipe 'recipes/no_such_recipe.yaml' does not exist" in line


@pytest.mark.parametrize(
    ("command", "recipe", "override", "message"),
    [
        ("train", SFT, "data.max_packed_token=64", "unknown recipe key 'data.max_packed_token' (did you mean 'data.max_packed_tokens'?)"),
        ("mpo", MPO, "training.betta=0.2", "unknown recipe key 'training.betta' (did you mean 'training.beta'?)"),
        ("train", SFT, "training.max_steps=ten", "recipe key 'training.max_steps' must be an integer, got 'ten'"),
        ("train", SFT, "model.name_or_path=/no/such/checkpoint", "model.name_or_path '/no/such/checkpoint': no such checkpoint directory"),
    ],
)
def test_a_bad_recipe_key_or_value(capsys, command, recipe, override, message):
    assert message in one_line_error(capsys, command, "--config", recipe, "--set", override)


@pytest.mark.parametrize("command", [["chat"], ["bon", "--strategy", "majority"]])
def test_a_model_directory_that_does_not_exist(capsys, command, tmp_path):
    line = one_line_error(capsys, *command, "--model", "/nonexistent", "What is this?")
    assert "--model '/nonexistent': no such checkpoint directory" in line
    line = one_line_error(capsys, *command, "--model", str(tmp_path), "What is this?")
    assert "is not a checkpoint directory: it holds no config.json" in line


def test_a_conversion_source_that_does_not_exist(capsys, tmp_path):
    line = one_line_error(capsys, "convert", "/no/such/checkpoint", str(tmp_path / "out"), "--to", "hf")
    assert "source '/no/such/checkpoint': no such checkpoint directory" in line


def test_a_critic_directory_that_does_not_exist(capsys, checkpoint_dir):
    line = one_line_error(capsys, "bon", "--model", str(checkpoint_dir), "--critic", "missing-critic", "Which?")
    assert "--critic 'missing-critic': no such checkpoint directory" in line


@pytest.mark.parametrize("command", [["chat"], ["bon", "--strategy", "majority"]])
def test_a_missing_or_corrupt_image(capsys, command, checkpoint_dir, corrupt_image):
    line = one_line_error(capsys, *command, "--model", str(checkpoint_dir), "--image", str(corrupt_image), "What?")
    assert f"Could not decode the image file '{corrupt_image}'" in line
    line = one_line_error(capsys, *command, "--model", str(checkpoint_dir), "--image", "missing.png", "What?")
    assert "Image file 'missing.png' does not exist" in line


def test_an_unusable_sample_with_on_error_raise(capsys, tmp_path, corrupt_image):
    """The data layer's `DataError` (here: a corrupt image under `data.on_error: raise`) is an input error too."""
    record = {"image": corrupt_image.name, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Red."}]}  # fmt: skip
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    source = f"[{{type: official_jsonl, path: {tmp_path / 'data.jsonl'}, root: {tmp_path}}}]"
    line = one_line_error(capsys, "train", "--config", SFT, "--set", f"data.sources={source}",
                          "--set", "data.on_error=raise", "--set", f"training.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert "data.jsonl:1" in line and corrupt_image.name in line


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_raises_the_error_with_its_traceback(position):
    command = ["train", "--config", SFT, "--set", "data.max_packed_token=64"]
    argv = ["--debug", *command] if position == "before" else [*command, "--debug"]
    with pytest.raises(RecipeError, match="did you mean 'data.max_packed_tokens'"):
        main(argv)


def test_a_bug_is_not_reported_as_an_input_error(monkeypatch):
    def broken(recipe, resume_from_checkpoint=None):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr("internvl3_hf.train.run_training", broken)
    with pytest.raises(KeyError):
        main(["train", "--config", SFT])


def test_the_errors_are_the_expected_kinds():
    assert issubclass(RecipeError, UserError) and issubclass(UserError, ValueError) and issubclass(DataError, ValueError)


def test_the_console_script_exits_2_with_one_line_and_debug_shows_the_traceback():
    command = [sys.executable, "-m", "internvl3_hf.cli", "chat", "--model", "/nonexistent", "Hello?"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert quiet.stderr.splitlines() == [
        "internvl3-hf: error: --model '/nonexistent': no such checkpoint directory. Give a local checkpoint "
        "directory (plugin, official or -hf format) or a Hub id such as OpenGVLab/InternVL3-1B."
    ]
    loud = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "UserError" in loud.stderr
