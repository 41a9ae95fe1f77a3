"""Synthetic visual QA for the recipe demo: coloured shapes on a 2×2 grid over a pale background, made on the fly.

Every question has one checkable answer. Question kinds:

- perception: `colour` "What colour is the shape?" → "red", `shape` "What shape is it?" → "triangle" (one-shape
  scenes), `count` "How many shapes are there?" → "3", `position` "Where is the shape?" → "top left"
- `reasoning`: two- or three-step arithmetic over the counts of colours, answered step by step (steps separated by
  blank lines, the VisualPRM convention: each count, then each operation, then "Answer: N"), in three templates:
  `plus` "How many red shapes plus blue shapes?", `twice` "What is twice the red shapes plus the blue shapes?",
  `minus` "How many red shapes plus blue shapes, minus green shapes?"
- `text`: text-only arithmetic and counting facts ("What is 3 plus 4?", "What number comes after 7?")

Also: captions ("Describe the image.") and counts of one colour, for pre-training; the solutions of an imperfect
annotator (`annotated_solution`: slips in `minus` questions), for SFT; and step-labelled solutions (some steps
corrupted, every step labelled `+` until the first error and `-` from there on, the VisualPRM rule), for the critic.

Everything is deterministic given the seed; the train and held-out splits use disjoint seeds.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 80, 225), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (236, 236, 236), (245, 236, 215), (226, 238, 248), (238, 248, 228))
GRID = 2
ROWS = ("top", "bottom")
COLUMNS = ("left", "right")
PERCEPTION_KINDS = ("colour", "shape", "count", "position")
REASONING = "reasoning"
KINDS = (*PERCEPTION_KINDS, REASONING)
SINGLE_OBJECT_QUESTIONS = {  # kind -> (question, the `Shape` attribute that answers it)
    "colour": ("What colour is the shape?", "colour"),
    "shape": ("What shape is it?", "shape"),
    "position": ("Where is the shape?", "position"),
}
SINGLE_OBJECT_KINDS = tuple(SINGLE_OBJECT_QUESTIONS)
MAX_SHAPES = GRID * GRID


def cell_name(row: int, column: int) -> str:
    """The 4 positions: "top left", "top right", "bottom left", "bottom right"."""
    return f"{ROWS[row]} {COLUMNS[column]}"


POSITIONS = tuple(cell_name(row, column) for row in range(GRID) for column in range(GRID))


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    row: int
    column: int

    @property
    def position(self) -> str:
        return cell_name(self.row, self.column)


@dataclass
class Scene:
    shapes: list[Shape]
    background: tuple[int, int, int]
    seed: int

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum((colour is None or s.colour == colour) and (shape is None or s.shape == shape) for s in self.shapes)

    def render(self, size: int = 56) -> Image.Image:
        """The scene as an RGB image of `size` pixels; each grid cell holds at most one shape, jittered a little."""
        rng = random.Random(self.seed * 7919 + 1)
        image = Image.new("RGB", (size, size), self.background)
        draw = ImageDraw.Draw(image)
        cell = size / GRID
        for item in self.shapes:
            extent = cell * rng.uniform(0.75, 0.85)
            cx = (item.column + 0.5) * cell + rng.uniform(-1, 1) * (cell - extent) / 2
            cy = (item.row + 0.5) * cell + rng.uniform(-1, 1) * (cell - extent) / 2
            box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
            colour = COLOURS[item.colour]
            if item.shape == "circle":
                draw.ellipse(box, fill=colour)
            elif item.shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
        return image

    def caption(self) -> str:
        return " ".join(f"A {s.colour} {s.shape} at the {s.position}." for s in self.shapes)


def random_scene(rng: random.Random, seed: int, max_shapes: int = MAX_SHAPES) -> Scene:
    cells = rng.sample(range(GRID * GRID), rng.randint(1, max_shapes))
    shapes = [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell // GRID, cell % GRID) for cell in sorted(cells)]
    return Scene(shapes, rng.choice(BACKGROUNDS), seed)


@dataclass
class Question:
    """One question: `kind`, text, the gold final answer and a reference answer (steps for `sum`)."""

    kind: str
    question: str
    answer: str
    solution: str
    scene: Scene | None = None
    # what a step-by-step solution needs (`reasoning`: template, colours, counts)
    facts: dict = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.scene is not None

    @property
    def template(self) -> str:
        """The reasoning template (`plus`, `twice`, `minus`), or the kind for other questions."""
        return self.facts.get("template", self.kind)


# Each reasoning template: the question, how many colours it counts, and its operations in order. An operation
# (op, i, j) writes "v_i op v_j = result." over the values so far: the counts first, then each result.
TEMPLATES = {
    "plus": ("How many {0} shapes plus {1} shapes?", 2, (("+", 0, 1),)),
    "twice": ("What is twice the {0} shapes plus the {1} shapes?", 2, (("+", 0, 0), ("+", 2, 1))),
    "minus": ("How many {0} shapes plus {1} shapes, minus {2} shapes?", 3, (("+", 0, 1), ("-", 3, 2))),
}
REASONING_TEMPLATES = tuple(TEMPLATES)
# The imperfect annotator of the SFT data: in `minus` questions it slips SLIP_RATE of the time, and never elsewhere.
# The slip copies a number from the wrong earlier step: the subtraction starts from the first count instead of the
# sum ("2 + 1 = 3." then "2 - 1 = 1."), and the answer follows from it. More likely than not in that situation, the
# slip is what an SFT model's greedy answer imitates, while some of its samples are sound: the gap MPO closes. (At
# 0.6 the SFT model still mostly started from the sum, the most recent number, and its greedy answer did not slip.)
SLIP_TEMPLATE = "minus"
SLIP_RATE = 0.8
SLIP_READS = {1: (0, 2)}  # operation index -> the operands the slip reads (the first count, not the sum)


def count_step(colour: str, count: int) -> str:
    """The perception step of a reasoning solution: "Red shapes: 2."."""
    return f"{colour.capitalize()} shapes: {count}."


def reasoning_values(template: str, counts: Sequence[int], reads: dict[int, tuple[int, int]] | None = None,
                     results: dict[int, int] | None = None) -> list[tuple[int, str, int, int]]:
    """Each operation of `template` over `counts` as (a, op, b, result); `reads` replaces an operation's operands
    (indices into the values so far: the counts, then each result), `results` an operation's result."""
    values, written = list(counts), []
    for index, (op, left, right) in enumerate(TEMPLATES[template][2]):
        left, right = (reads or {}).get(index, (left, right))
        a, b = values[left], values[right]
        result = (results or {}).get(index, a + b if op == "+" else a - b)
        written.append((a, op, b, result))
        values.append(result)
    return written


def reasoning_steps(template: str, colours: Sequence[str], counts: Sequence[int],
                    reads: dict[int, tuple[int, int]] | None = None, results: dict[int, int] | None = None,
                    final: int | None = None) -> list[str]:
    """The steps of a `template` solution that names `colours` with `counts`: one step per count, one per operation
    (`reasoning_values`: `reads` a number copied from the wrong step, `results` a wrong calculation), then the
    answer (`final`, default the last result); later steps follow from what is written."""
    operations = reasoning_values(template, counts, reads, results)
    steps = [count_step(colour, count) for colour, count in zip(colours, counts)]
    steps += [f"{a} {op} {b} = {result}." for a, op, b, result in operations]
    steps.append(f"Answer: {operations[-1][3] if final is None else final}")
    return steps


STEP_SEPARATOR = "\n\n"


def visual_question(scene: Scene, kind: str, rng: random.Random, template: str | None = None) -> Question | None:
    """A question of `kind` (for `reasoning`: of `template`, default random) about `scene`, or None when the scene
    cannot ask it."""
    if kind in SINGLE_OBJECT_QUESTIONS:
        if len(scene.shapes) != 1:
            return None
        question, attribute = SINGLE_OBJECT_QUESTIONS[kind]
        answer = getattr(scene.shapes[0], attribute)
        return Question(kind, question, answer, answer, scene)
    if kind == "count":
        total = str(len(scene.shapes))
        return Question(kind, "How many shapes are there?", total, total, scene)
    if kind == "colour_count":  # pre-training only: counts of one colour, what `sum` adds up
        # mostly a colour the scene holds, as `sum` asks: a random one would be absent or single most of the time
        colour = rng.choice(sorted({s.colour for s in scene.shapes}) if rng.random() < 0.8 else list(COLOURS))
        total = str(scene.count(colour))
        # answered as a reasoning step counts: naming the colour asked, so that naming it is learned with counting it
        solution = count_step(colour, scene.count(colour))
        return Question(kind, f"How many {colour} shapes are there?", total, solution, scene)
    if kind == REASONING:
        return reasoning_question(scene, template or rng.choice(REASONING_TEMPLATES), rng)
    raise ValueError(f"unknown question kind {kind!r}")


def reasoning_question(scene: Scene, template: str, rng: random.Random) -> Question | None:
    """A `template` question about `scene`: the first colour is one the scene holds; the second mostly another one
    it holds (`minus`: always, so that the sum differs from the first count and the slip changes the answer); the
    colour subtracted is one with at most as many shapes as the first (no answer below zero, slip or not)."""
    present = sorted({s.colour for s in scene.shapes})
    first = rng.choice(present)
    others = [c for c in present if c != first]
    if template == "minus" and not others:
        return None
    if others and (template == "minus" or rng.random() < 0.8):
        second = rng.choice(others)
    else:
        second = rng.choice([c for c in COLOURS if c != first])
    colours = [first, second]
    if template == "minus":
        candidates = [c for c in COLOURS if c not in colours and scene.count(c) <= scene.count(first)]
        if not candidates:
            return None
        colours.append(rng.choice(candidates))
    counts = [scene.count(colour) for colour in colours]
    steps = reasoning_steps(template, colours, counts)
    question = TEMPLATES[template][0].format(*colours)
    return Question(REASONING, question, steps[-1].removeprefix("Answer: "), STEP_SEPARATOR.join(steps), scene,
                    {"template": template, "colours": tuple(colours), "counts": tuple(counts)})


def annotated_solution(question: Question, rng: random.Random, slip_rate: float = SLIP_RATE) -> str:
    """The solution an imperfect annotator writes: in `SLIP_TEMPLATE` questions, `slip_rate` of the time the slip
    (`SLIP_READS`) with the answer that follows from it; otherwise, and for every other question, the reference."""
    if question.template != SLIP_TEMPLATE or rng.random() >= slip_rate:
        return question.solution
    facts = question.facts
    return STEP_SEPARATOR.join(reasoning_steps(facts["template"], facts["colours"], facts["counts"], reads=SLIP_READS))


def text_question(rng: random.Random, style: str = "steps") -> Question:
    """A text-only arithmetic / counting fact. `style="steps"` answers "a + b = c.\n\nAnswer: c"; `"plain"` "a + b = c."."""
    kind = rng.choice(("plus", "minus", "after"))
    if kind == "plus":
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        question, op, result = f"What is {a} plus {b}?", "+", a + b
    elif kind == "minus":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        question, op, result = f"What is {a} minus {b}?", "-", a - b
    else:
        a, b = rng.randint(0, 9), 1
        question, op, result = f"What number comes after {a}?", "+", a + 1
    steps = text_steps(a, op, b, result)
    solution = STEP_SEPARATOR.join(steps) if style == "steps" else steps[0]
    return Question("text", question, str(result), solution, facts={"a": a, "op": op, "b": b})


def text_steps(a: int, op: str, b: int, result: int, final: int | None = None) -> list[str]:
    return [f"{a} {op} {b} = {result}.", f"Answer: {result if final is None else final}"]


def visual_questions(count: int, seed: int, kinds=KINDS) -> list[Question]:
    """`count` visual questions, kinds in turn (`reasoning` questions: templates in turn), each on its own new scene."""
    rng = random.Random(seed)
    questions, reasoning = [], 0
    while len(questions) < count:
        kind = kinds[len(questions) % len(kinds)]
        template = REASONING_TEMPLATES[reasoning % len(REASONING_TEMPLATES)] if kind == REASONING else None
        scene = random_scene(rng, rng.randrange(2**31), 1 if kind in SINGLE_OBJECT_KINDS else MAX_SHAPES)
        question = visual_question(scene, kind, rng, template)
        if question is not None:
            questions.append(question)
            reasoning += kind == REASONING
    return questions


def reasoning_questions(count: int, seed: int) -> list[Question]:
    """`count` reasoning questions, the templates in turn."""
    return visual_questions(count, seed, kinds=(REASONING,))


def text_questions(count: int, seed: int, style: str = "steps") -> list[Question]:
    rng = random.Random(seed)
    return [text_question(rng, style) for _ in range(count)]


# ------------------------------------------------------------------------------------------------- answers
_ANSWER = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)


def normalise(text: str) -> str:
    return " ".join(text.strip().strip("*").strip().rstrip(".").split()).casefold()


def final_answer(text: str) -> str:
    """The answer a response commits to: after the last `Answer:`, else after the last `=`, else the whole text."""
    found = _ANSWER.findall(text)
    if found:
        return normalise(found[-1].splitlines()[0])
    if "=" in text:
        return normalise(text.rsplit("=", 1)[1])
    return normalise(text)


def is_correct(question: Question, response: str) -> bool:
    return final_answer(response) == normalise(question.answer)


def answer_space(kind: str) -> int:
    """How many answers a question of `kind` can have (chance = 1 / this)."""
    return {"colour": len(COLOURS), "shape": len(SHAPES), "count": MAX_SHAPES, "position": GRID * GRID,
            REASONING: 2 * MAX_SHAPES + 1}.get(kind, 0)


def chance_accuracy(questions: list[Question]) -> float:
    """Accuracy of uniform guessing among each question's possible answers (visual questions)."""
    spaces = [answer_space(q.kind) for q in questions if answer_space(q.kind)]
    return sum(1 / space for space in spaces) / len(spaces)


# ------------------------------------------------------------------------------------------------- PRM data
CORRUPTIONS = ("none", "none", "count", "colour", "colour", "calculation", "copy", "final")  # the colour slip twice:
# naming a colour the question does not ask is the policy's most common error


def corrupted_solution(question: Question, rng: random.Random) -> tuple[list[str], list[str]]:
    """A solution of a `reasoning` question with zero or one corrupted step, and its `+`/`-` step labels.

    The error lands on a count, on the colour a step counts (another colour than the question's, counted rightly:
    the slip small models make), on an operation's result, on the numbers an operation reads (copied from the wrong
    step: the annotator's slip and others), or on the final answer; later steps follow from what is written, and
    every step from the first wrong one on is `-` (a later step that follows consistently from a wrong one is still
    part of a wrong process).
    """
    facts = question.facts
    template, colours, counts = facts["template"], list(facts["colours"]), list(facts["counts"])
    operations = TEMPLATES[template][2]
    where = rng.choice(CORRUPTIONS)
    reads, results, final, bad_from = {}, {}, None, None
    if where == "colour":
        index = rng.randrange(len(colours))
        # counting another colour is only wrong where its count differs (else the step's number is still right);
        # a colour the scene holds, where there is one: the policy's own slip is to count what it sees
        others = [c for c in COLOURS if c not in colours and question.scene.count(c) != counts[index]]
        others = [c for c in others if question.scene.count(c)] or others
        if others:
            colours[index] = rng.choice(others)
            counts[index], bad_from = question.scene.count(colours[index]), index
        else:
            where = "count"
    if where == "count":
        index = rng.randrange(len(counts))
        counts[index], bad_from = _other(counts[index], rng, 0, MAX_SHAPES), index
    elif where == "calculation":
        index = rng.randrange(len(operations))
        right = reasoning_values(template, counts)[index][3]
        results[index], bad_from = _other(right, rng, 0, 2 * MAX_SHAPES), len(counts) + index
    elif where == "copy":
        index = rng.randrange(len(operations))
        values = list(counts) + [result for *_, result in reasoning_values(template, counts)]
        _, left, right = operations[index]
        known = range(len(counts) + index)  # the values written before this operation
        options = [(i, right) for i in known if values[i] != values[left]]
        options += [(left, j) for j in known if values[j] != values[right]]
        if options:
            reads[index], bad_from = rng.choice(options), len(counts) + index
    steps = reasoning_steps(template, colours, counts, reads, results)
    if where == "final":
        final = _other(int(question.answer), rng, 0, 2 * MAX_SHAPES)
        steps[-1], bad_from = f"Answer: {final}", len(steps) - 1
    labels = ["+" if bad_from is None or index < bad_from else "-" for index in range(len(steps))]
    return steps, labels


def _other(value: int, rng: random.Random, low: int, high: int) -> int:
    choices = [v for v in range(max(low, value - 2), min(high, value + 2) + 1) if v != value]
    return rng.choice(choices)


def prm_example(question: Question, rng: random.Random) -> tuple[list[str], list[str]]:
    """A (steps, labels) pair for any question: multi-step for `reasoning` and `text`, one step (right or wrong)
    otherwise."""
    if question.kind == REASONING:
        return corrupted_solution(question, rng)
    if question.kind == "text":
        a, op, b = question.facts["a"], question.facts["op"], question.facts["b"]
        result = int(question.answer)
        where = rng.choice(("none", "work", "final"))
        if where == "none":
            return text_steps(a, op, b, result), ["+", "+"]
        wrong = _other(result, rng, 0, 20)
        if where == "work":
            return text_steps(a, op, b, wrong), ["-", "-"]
        return text_steps(a, op, b, result, wrong), ["+", "-"]
    if rng.random() < 0.5:
        return [question.solution], ["+"]
    return [wrong_answer(question, rng)], ["-"]


def flawed_example(question: Question, rng: random.Random, attempts: int = 20) -> tuple[list[str], list[str]]:
    """A `prm_example` with at least one `-` step (a wrong solution with its step labels)."""
    for _ in range(attempts):
        steps, labels = prm_example(question, rng)
        if "-" in labels:
            return steps, labels
    raise RuntimeError(f"no flawed solution for {question.question!r} in {attempts} draws")


def reference_steps(question: Question) -> list[str]:
    """The reference solution's steps (blank-line separated, as VisualPRM splits them)."""
    return question.solution.split(STEP_SEPARATOR)


def label_response(question: Question, response: str) -> tuple[list[str], list[str]]:
    """Step labels for a model's own response, as VisualPRM labels rollouts: `+` while each step agrees with the
    reference solution's step (whitespace and a trailing full stop aside), `-` from the first step that does not.

    A response with another number of steps than the reference is judged step by step as far as both go; its
    remaining steps are `-` unless the final answer is right (then they are kept `+`, a longer but sound process).
    """
    steps = [step for step in (part.strip() for part in response.split(STEP_SEPARATOR)) if step] or [response.strip()]
    reference = reference_steps(question)
    labels, sound = [], True
    for index, step in enumerate(steps):
        if index < len(reference):
            sound = sound and normalise(step) == normalise(reference[index])
        else:
            sound = sound and is_correct(question, response)
        labels.append("+" if sound else "-")
    if len(steps) < len(reference) and not is_correct(question, response):
        labels[-1] = "-"
    return steps, labels


def wrong_answer(question: Question, rng: random.Random) -> str:
    if question.kind == "colour":
        return rng.choice([c for c in COLOURS if c != question.answer])
    if question.kind == "shape":
        return rng.choice([s for s in SHAPES if s != question.answer])
    if question.kind == "position":
        return rng.choice([p for p in POSITIONS if p != question.answer])
    if question.kind == "count":
        return str(_other(int(question.answer), rng, 1, MAX_SHAPES))
    raise ValueError(question.kind)


def tokenizer_corpus() -> str:
    """Text covering the demo's vocabulary, for the demo tokenizer."""
    lines = [f"A {c} {s} at the {p}." for c in COLOURS for s in SHAPES for p in POSITIONS]
    lines += [q.question + " " + q.solution for q in visual_questions(400, 999)]
    lines += [q.question + " " + q.solution for q in text_questions(200, 998)]
    lines += [f"{a} + {b} = {a + b}." for a in range(13) for b in range(13)]
    lines += ["system", "user", "assistant", "Describe the image."] * 20
    return "\n".join(lines)
