"""`internvl3-hf bon`: one question printed, a JSONL file in and out with a progress bar, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

from internvl3_hf.cli import main
from internvl3_hf.modeling.modeling_internvl3 import InternVL3ForConditionalGeneration
from internvl3_hf.modeling.processing_internvl3 import processor_for_config
from internvl3_hf.tiny import build_tiny_tokenizer, tiny_config

QUESTION = "How many shapes are in the image?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, image):
    """Tiny policy and critic checkpoints (plugin format, processor included) and an image file."""
    root = tmp_path_factory.mktemp("bon")
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    for name, seed in (("policy", 0), ("critic", 1)):
        torch.manual_seed(seed)
        InternVL3ForConditionalGeneration(config).save_pretrained(root / name)
        processor_for_config(tokenizer, config).save_pretrained(root / name)
    image.save(root / "shapes.png")
    return root


def run_bon(checkpoints, *arguments: str) -> int:
    return main(["bon", "--model", str(checkpoints / "policy"), "--max-new-tokens", "3", "--seed", "0", *arguments])


def test_one_question_prints_candidates_step_scores_and_the_choice(checkpoints, capsys):
    image = str(checkpoints / "shapes.png")
    assert run_bon(checkpoints, "--critic", str(checkpoints / "critic"), "--image", image, QUESTION, "-n", "3") == 0
    out = capsys.readouterr().out
    for index in (1, 2, 3):
        assert f"candidate {index}/3  score " in out
    assert "  step  1 0." in out
    assert "choice: candidate " in out and "(prm)" in out


def test_jsonl_in_jsonl_out_with_a_progress_bar(checkpoints, tmp_path, capsys):
    records = [
        {"id": "a", "question": QUESTION, "image": str(checkpoints / "shapes.png")},
        {"id": "b", "question": "Hello?"},
        {"id": "c", "question": QUESTION, "image": ["shapes.png", "shapes.png"]},  # relative to the file
    ]
    source = checkpoints / "questions.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records) + "\n")
    target = tmp_path / "answers.jsonl"
    arguments = ["--critic", str(checkpoints / "critic"), "--input", str(source), "--output", str(target)]
    assert run_bon(checkpoints, *arguments, "-n", "2", "--batch-size", "2", "--strategy", "orm") == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    for line, record in zip(lines, records):
        assert line["question"] == record["question"] and line.get("image") == record.get("image")
        assert len(line["candidates"]) == 2 and line["strategy"] == "orm"
        assert line["response"] == line["candidates"][line["best_index"]]["text"]
        assert all(len(c["step_scores"]) == 1 or c["empty"] for c in line["candidates"])  # ORM: one score each
    assert "3/3" in capsys.readouterr().err


def test_majority_vote_needs_no_critic(checkpoints, capsys):
    assert run_bon(checkpoints, "--strategy", "majority", "--image", str(checkpoints / "shapes.png"), QUESTION) == 0
    out = capsys.readouterr().out
    assert "candidate 8/8" in out and "(majority)" in out


class CriticBuilt(Exception):
    """Stops `bon` once the critic is built: what it was built with is all these tests read."""


@pytest.mark.parametrize(("arguments", "max_steps"), [([], None), (["--max-steps", "0"], None), (["--max-steps", "3"], 3)])
def test_the_critic_merges_no_steps_unless_asked(checkpoints, monkeypatch, arguments, max_steps):
    """As the official `select_best_response`: no merging by default; `--max-steps N` merges into N steps."""
    built = {}

    def record(model, processor, **settings):
        built.update(settings)
        raise CriticBuilt

    monkeypatch.setattr("internvl3_hf.best_of_n.prm.VisualPRM", record)
    with pytest.raises(CriticBuilt):
        run_bon(checkpoints, "--critic", str(checkpoints / "critic"), *arguments, QUESTION)
    assert built["max_steps"] == max_steps


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "questions.jsonl", QUESTION], "either a question or --input"),
        ([], "either a question or --input"),
        ([QUESTION], "needs --critic"),
        (["--strategy", "majority", "-n", "0", QUESTION], "--num-candidates must be at least 1"),
        (["--strategy", "majority", "--max-steps", "-1", QUESTION], "--max-steps"),
    ],
)
def test_bad_arguments_are_refused(checkpoints, arguments, message, capsys):
    assert run_bon(checkpoints, *arguments) == 2
    assert message in refusal(capsys)


def refusal(capsys) -> str:
    """The one `internvl3-hf: error: bon: ...` line of a refused command."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("internvl3-hf: error: bon: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "no question field"}, "bad.jsonl:1 is not a JSON object with a string \"question\""),
        ({"question": "Which?", "image": "missing.png"}, "bad.jsonl:1: image file"),
        ("{not json", "bad.jsonl:1 is not valid JSON"),
    ],
)
def test_a_bad_line_is_refused_before_the_model_loads(checkpoints, tmp_path, capsys, line, message, monkeypatch):
    monkeypatch.setattr("internvl3_hf.best_of_n.cli._load", pytest.fail)
    source = tmp_path / "bad.jsonl"
    source.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    assert run_bon(checkpoints, "--strategy", "majority", "--input", str(source)) == 2
    assert message in refusal(capsys)


def test_a_corrupt_image_in_the_input_file_names_its_line(checkpoints, tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    source = tmp_path / "questions.jsonl"
    source.write_text(json.dumps({"question": QUESTION, "image": "corrupt.png"}) + "\n")
    assert run_bon(checkpoints, "--strategy", "majority", "-n", "2", "--input", str(source)) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # decoded with its batch: after the loading progress bars
    assert line.startswith("internvl3-hf: error: bon: ")
    assert "questions.jsonl:1: Could not decode the image file" in line and "corrupt.png" in line
