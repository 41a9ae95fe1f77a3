"""The demo's synthetic visual QA: deterministic, answerable, and its step labels follow the VisualPRM rule."""

from __future__ import annotations

import random

import pytest

from internvl3_hf.best_of_n import split_steps
from internvl3_hf.demo import tasks


def test_generation_is_deterministic_and_splits_are_disjoint():
    first, again = tasks.visual_questions(40, seed=5), tasks.visual_questions(40, seed=5)
    assert [(q.question, q.answer, q.scene.caption()) for q in first] == [
        (q.question, q.answer, q.scene.caption()) for q in again
    ]
    assert first[0].scene.render().tobytes() == again[0].scene.render().tobytes()
    held_out = tasks.visual_questions(40, seed=6)
    assert {q.scene.seed for q in first}.isdisjoint({q.scene.seed for q in held_out})


def test_every_kind_is_asked_and_answers_are_consistent_with_the_scene():
    questions = tasks.visual_questions(60, seed=1)
    assert {q.kind for q in questions} == set(tasks.KINDS)
    for question in questions:
        scene = question.scene
        if question.kind == "count":
            assert int(question.answer) == len(scene.shapes)
        elif question.kind == "colour":
            assert len(scene.shapes) == 1 and question.answer == scene.shapes[0].colour
        elif question.kind == "position":
            assert question.answer == scene.shapes[0].position
        elif question.kind == "sum":
            (a, b), (count_a, count_b) = question.facts["colours"], question.facts["counts"]
            assert (scene.count(a), scene.count(b)) == (count_a, count_b)
            assert int(question.answer) == count_a + count_b
            assert tasks.is_correct(question, question.solution)
            assert len(split_steps(question.solution)) == 4  # blank-line steps, as VisualPRM splits them


def test_colour_counts_mostly_ask_a_colour_the_scene_holds():
    rng = random.Random(0)
    scenes = [tasks.random_scene(rng, seed) for seed in range(300)]
    questions = [tasks.visual_question(scene, "colour_count", rng) for scene in scenes]
    asked = [q.question.split()[2] for q in questions]
    assert all(int(q.answer) == q.scene.count(colour) for q, colour in zip(questions, asked))
    present = sum(q.scene.count(colour) > 0 for q, colour in zip(questions, asked)) / len(questions)
    assert 0.8 <= present < 1  # as `sum` asks (absent colours too, so that "0" stays an answer)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Red shapes: 1.\n\nBlue shapes: 2.\n\n1 + 2 = 3.\n\nAnswer: 3", "3"),
        ("answer: Top Left.", "top left"),
        ("4 + 3 = 7.", "7"),
        ("blue", "blue"),
        ("Answer: 2\n\nAnswer: 5", "5"),
    ],
)
def test_final_answer(response, expected):
    assert tasks.final_answer(response) == expected


def test_corrupted_solutions_are_labelled_minus_from_the_first_wrong_step():
    rng = random.Random(0)
    questions = [q for q in tasks.visual_questions(200, seed=2) if q.kind == "sum"]
    seen_errors, wrong_colours = set(), 0
    for question in questions:
        steps, labels = tasks.corrupted_solution(question, rng)
        assert len(steps) == len(labels) == 4
        right = tasks.is_correct(question, tasks.STEP_SEPARATOR.join(steps))
        assert right == (labels[-1] == "+")
        if "-" in labels:
            first = labels.index("-")
            assert labels == ["+"] * first + ["-"] * (4 - first)
            seen_errors.add(first)
        else:
            assert steps == question.solution.split(tasks.STEP_SEPARATOR)
        colour_b = question.facts["colours"][1]
        named, count = steps[1].removesuffix(".").split(" shapes: ")
        if named.lower() != colour_b:  # the second step counted another colour: rightly, but not the one asked
            wrong_colours += 1
            assert labels[1] == "-" and int(count) == question.scene.count(named.lower())
    assert seen_errors == {0, 1, 2, 3}
    assert wrong_colours > 0


def test_chance_accuracy_is_the_mean_of_one_over_the_answer_space():
    questions = [q for q in tasks.visual_questions(50, seed=3)]
    expected = sum(1 / tasks.answer_space(q.kind) for q in questions) / len(questions)
    assert tasks.chance_accuracy(questions) == pytest.approx(expected)
    assert 0.15 < expected < 0.4


def test_rollouts_are_labelled_plus_until_the_first_step_that_leaves_the_reference():
    question = next(q for q in tasks.visual_questions(20, seed=4) if q.kind == "sum")
    steps = question.solution.split(tasks.STEP_SEPARATOR)
    assert tasks.label_response(question, question.solution) == (steps, ["+"] * 4)
    wrong_count = tasks.STEP_SEPARATOR.join([steps[0].replace(": ", ": 7"), *steps[1:]])
    assert tasks.label_response(question, wrong_count)[1] == ["-"] * 4
    wrong_final = tasks.STEP_SEPARATOR.join([*steps[:3], "Answer: 11"])
    assert tasks.label_response(question, wrong_final)[1] == ["+", "+", "+", "-"]
    truncated = tasks.STEP_SEPARATOR.join(steps[:2])
    assert tasks.label_response(question, truncated)[1] == ["+", "-"]
    colour = next(q for q in tasks.visual_questions(20, seed=4) if q.kind == "colour")
    assert tasks.label_response(colour, colour.answer + ".") == ([colour.answer + "."], ["+"])
    assert tasks.label_response(colour, "purple")[1] == ["-"]


def test_critic_pairs_put_a_sound_solution_against_a_flawed_one():
    from internvl3_hf.demo.recipe import critic_pairs

    rollout_question = next(q for q in tasks.visual_questions(20, seed=4) if q.kind == "sum")
    steps = rollout_question.solution.split(tasks.STEP_SEPARATOR)
    wrong_final = tasks.STEP_SEPARATOR.join([*steps[:3], "Answer: 11"])
    rollouts = [(rollout_question, [wrong_final, rollout_question.solution, ""])]  # "" (empty answer) is skipped
    pairs = critic_pairs(60, seed=9, rollouts=rollouts)
    assert len(pairs) == 61
    assert [(p.chosen, p.rejected) for p in pairs] == [(p.chosen, p.rejected) for p in critic_pairs(60, 9, rollouts)]
    by_origin = {pair.origin: pair for pair in pairs}
    rollout = by_origin["critic_rollout[0]"]
    assert (rollout.chosen, rollout.rejected) == (rollout_question.solution, wrong_final)
    for pair in pairs:
        assert pair.chosen != pair.rejected
        assert len(pair.images) == ("<image>" in pair.prompt[0]["content"])
    generated = [pair for pair in pairs if pair.origin.startswith("critic[")]
    assert 0 < sum(bool(pair.images) for pair in generated) < len(generated)  # visual and text-only questions


def test_flawed_examples_always_hold_a_wrong_step():
    rng = random.Random(3)
    for question in tasks.visual_questions(30, seed=8) + tasks.text_questions(10, seed=8):
        steps, labels = tasks.flawed_example(question, rng)
        assert len(steps) == len(labels) and labels[-1] == "-"
        assert not tasks.is_correct(question, tasks.STEP_SEPARATOR.join(steps))


def test_mpo_pairs_put_a_sound_answer_against_an_unsound_one_even_when_it_is_right_by_luck():
    from internvl3_hf.demo.recipe import mpo_pairs

    question = next(q for q in tasks.visual_questions(20, seed=4) if q.kind == "sum")
    (colour_a, _), (a, b) = question.facts["colours"], question.facts["counts"]
    steps = question.solution.split(tasks.STEP_SEPARATOR)
    lucky = tasks.STEP_SEPARATOR.join(  # a wrong count, then a wrong sum that lands on the right answer
        [f"{colour_a.capitalize()} shapes: {a + 1}.", steps[1], f"{a + 1} + {b} = {a + b}.", f"Answer: {a + b}"]
    )
    assert tasks.is_correct(question, lucky) and tasks.label_response(question, lucky)[1] == ["-"] * 4
    colour = next(q for q in tasks.visual_questions(20, seed=4) if q.kind == "colour")
    wrong_colour = tasks.wrong_answer(colour, random.Random(0))
    pairs, stats = mpo_pairs(
        [question, colour, colour], [[question.solution, lucky, "", question.solution], [colour.answer] * 2,
                                     [wrong_colour]], per_question=3, seed=0,
    )  # fmt: skip
    assert stats == {"questions": 3, "all_sound": 1, "none_sound": 1, "mixed": 1}
    assert [(pair.chosen, pair.rejected, pair.origin) for pair in pairs] == [(question.solution, lucky, "mpo[0]")]
