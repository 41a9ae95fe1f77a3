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


@pytest.mark.parametrize(
    ("template", "answer"),
    [("plus", lambda a, b: a + b), ("twice", lambda a, b: 2 * a + b), ("minus", lambda a, b, c: a + b - c)],
)
def test_reasoning_answers_follow_from_the_counts_in_steps_a_critic_can_check(template, answer):
    questions = [q for q in tasks.reasoning_questions(90, seed=1) if q.template == template]
    assert len(questions) == 30  # the templates in turn
    for question in questions:
        colours, counts = question.facts["colours"], question.facts["counts"]
        assert [question.scene.count(colour) for colour in colours] == list(counts)
        assert all(colour in question.question for colour in colours)
        assert int(question.answer) == answer(*counts) >= 0
        steps = split_steps(question.solution)
        assert len(steps) == len(counts) + len(tasks.TEMPLATES[template][2]) + 1  # counts, operations, answer
        assert steps[-1] == f"Answer: {question.answer}"
        for step in steps[len(counts) : -1]:  # every operation is right on its own: "a op b = c."
            left, result = step.removesuffix(".").split(" = ")
            a, op, b = left.split()
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    if template == "minus":  # the second colour is present, so the slip (first count, not the sum) changes the answer
        assert all(q.facts["counts"][1] > 0 and q.facts["counts"][2] <= q.facts["counts"][0] for q in questions)


def test_the_annotator_slips_at_its_rate_in_minus_questions_only():
    rng = random.Random(0)
    questions = tasks.reasoning_questions(900, seed=2)
    slipped = {template: 0 for template in tasks.REASONING_TEMPLATES}
    for question in questions:
        solution = tasks.annotated_solution(question, rng)
        if solution == question.solution:
            continue
        slipped[question.template] += 1
        a, b, c = question.facts["counts"]
        steps = split_steps(solution)
        # the perception steps and the addition are right; the subtraction copies the first count, not the sum
        assert steps[:4] == split_steps(question.solution)[:4]
        assert steps[4:] == [f"{a} - {c} = {a - c}.", f"Answer: {a - c}"]
        assert not tasks.is_correct(question, solution)
        assert tasks.label_response(question, solution)[1] == ["+"] * 4 + ["-"] * 2
    assert slipped["plus"] == slipped["twice"] == 0
    assert abs(slipped["minus"] / 300 - tasks.SLIP_RATE) < 0.07
    assert all(tasks.annotated_solution(q, rng, slip_rate=0.0) == q.solution for q in questions)


def test_colour_counts_mostly_ask_a_colour_the_scene_holds():
    rng = random.Random(0)
    scenes = [tasks.random_scene(rng, seed) for seed in range(300)]
    questions = [tasks.visual_question(scene, "colour_count", rng) for scene in scenes]
    asked = [q.question.split()[2] for q in questions]
    assert all(int(q.answer) == q.scene.count(colour) for q, colour in zip(questions, asked))
    present = sum(q.scene.count(colour) > 0 for q, colour in zip(questions, asked)) / len(questions)
    assert 0.8 <= present < 1  # as reasoning asks (absent colours too, so that "0" stays an answer)


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
    questions = tasks.reasoning_questions(300, seed=2)
    seen_errors, wrong_colours = set(), 0
    for question in questions:
        steps, labels = tasks.corrupted_solution(question, rng)
        reference = question.solution.split(tasks.STEP_SEPARATOR)
        assert len(steps) == len(labels) == len(reference)
        if "-" in labels:
            first = labels.index("-")
            assert labels == ["+"] * first + ["-"] * (len(steps) - first)
            assert steps[:first] == reference[:first] and steps[first] != reference[first]
            seen_errors.add((question.template, first))
        else:
            assert steps == reference
        for index, colour in enumerate(question.facts["colours"]):
            named, count = steps[index].removesuffix(".").split(" shapes: ")
            if named.lower() != colour:  # a step counted another colour: rightly, but not the one asked
                wrong_colours += 1
                assert labels[index] == "-" and int(count) == question.scene.count(named.lower())
    # every step of every template is sometimes the first wrong one
    for template, (_, colours, operations) in tasks.TEMPLATES.items():
        assert {first for t, first in seen_errors if t == template} == set(range(colours + len(operations) + 1))
    assert wrong_colours > 0


def test_chance_accuracy_is_the_mean_of_one_over_the_answer_space():
    questions = [q for q in tasks.visual_questions(50, seed=3)]
    expected = sum(1 / tasks.answer_space(q.kind) for q in questions) / len(questions)
    assert tasks.chance_accuracy(questions) == pytest.approx(expected)
    assert 0.15 < expected < 0.4


def test_rollouts_are_labelled_plus_until_the_first_step_that_leaves_the_reference():
    question = next(q for q in tasks.visual_questions(20, seed=4) if q.template == "plus")
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

    rollout_question = next(q for q in tasks.visual_questions(20, seed=4) if q.template == "plus")
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

    question = next(q for q in tasks.visual_questions(20, seed=4) if q.template == "plus")
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
