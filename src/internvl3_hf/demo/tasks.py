"""Synthetic visual QA for the recipe demo: coloured shapes on a 2×2 grid over a pale background, made on the fly.

Every question has one checkable answer. Question kinds:

- `colour`   "What colour is the shape?"                       → "red"        (one-shape scenes)
- `shape`    "What shape is it?"                               → "triangle"   (one-shape scenes)
- `count`    "How many shapes are there?"                      → "3"
- `position` "Where is the shape?"                             → "top left"   (one-shape scenes; 4 cells)
- `sum`      "How many red shapes plus blue shapes?"           → step by step, steps separated by blank lines
  (the VisualPRM convention), ending with "Answer: N"
- `text`     text-only arithmetic and counting facts ("What is 3 plus 4?", "What number comes after 7?")

Also: captions ("Describe the image."), for pre-training; and step-labelled solutions (some steps corrupted, every
step labelled `+` until the first error and `-` from there on, the VisualPRM rule), for the critic.

Everything is deterministic given the seed; the train and held-out splits use disjoint seeds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 80, 225), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (236, 236, 236), (245, 236, 215), (226, 238, 248), (238, 248, 228))
GRID = 2
ROWS = ("top", "bottom")
COLUMNS = ("left", "right")
KINDS = ("colour", "shape", "count", "position", "sum")
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
    facts: dict = field(default_factory=dict)  # what a step-by-step solution needs (`sum`: the two colours, counts)

    @property
    def has_image(self) -> bool:
        return self.scene is not None


def sum_steps(colour_a: str, count_a: int, colour_b: str, count_b: int, total: int | None = None) -> list[str]:
    total = count_a + count_b if total is None else total
    return [
        f"{colour_a.capitalize()} shapes: {count_a}.",
        f"{colour_b.capitalize()} shapes: {count_b}.",
        f"{count_a} + {count_b} = {total}.",
        f"Answer: {total}",
    ]


STEP_SEPARATOR = "\n\n"


def visual_question(scene: Scene, kind: str, rng: random.Random) -> Question | None:
    """A question of `kind` about `scene`, or None when the scene cannot ask it unambiguously."""
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
        return Question(kind, f"How many {colour} shapes are there?", total, total, scene)
    if kind == "sum":
        present = sorted({s.colour for s in scene.shapes})
        colour_a = rng.choice(present)
        others = [c for c in present if c != colour_a] if len(present) > 1 and rng.random() < 0.8 else []
        colour_b = rng.choice(others or [c for c in COLOURS if c != colour_a])
        a, b = scene.count(colour_a), scene.count(colour_b)
        steps = sum_steps(colour_a, a, colour_b, b)
        question = f"How many {colour_a} shapes plus {colour_b} shapes?"
        return Question(kind, question, str(a + b), STEP_SEPARATOR.join(steps), scene,
                        {"colours": (colour_a, colour_b), "counts": (a, b)})
    raise ValueError(f"unknown question kind {kind!r}")


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
    """`count` visual questions, kinds in turn, each on its own new scene."""
    rng = random.Random(seed)
    questions = []
    while len(questions) < count:
        kind = kinds[len(questions) % len(kinds)]
        scene = random_scene(rng, rng.randrange(2**31), 1 if kind in SINGLE_OBJECT_KINDS else MAX_SHAPES)
        question = visual_question(scene, kind, rng)
        if question is not None:
            questions.append(question)
    return questions


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
            "sum": MAX_SHAPES + 1}.get(kind, 0)


def chance_accuracy(questions: list[Question]) -> float:
    """Accuracy of uniform guessing among each question's possible answers (visual questions)."""
    spaces = [answer_space(q.kind) for q in questions if answer_space(q.kind)]
    return sum(1 / space for space in spaces) / len(spaces)


# ------------------------------------------------------------------------------------------------- PRM data
def corrupted_solution(question: Question, rng: random.Random) -> tuple[list[str], list[str]]:
    """A solution of a `sum` question with zero or one corrupted step, and its `+`/`-` step labels.

    The error lands on a count, on the colour the second step counts (another colour than the question's, counted
    rightly: the slip small models make), on the addition or on the final answer; every step from the first wrong
    one on is `-` (a later step that follows consistently from a wrong one is still part of a wrong process).
    """
    (colour_a, colour_b), (a, b) = question.facts["colours"], question.facts["counts"]
    where = rng.choice(("none", "none", "count_a", "count_b", "colour_b", "sum", "final"))
    wa, wb, named_b = a, b, colour_b
    bad_from = None
    # counting another colour is only wrong where its count differs (else the step's number is still right)
    others = [c for c in COLOURS if c != colour_b and question.scene.count(c) != b]
    if where == "colour_b" and others:
        named_b = rng.choice(others)
        wb, bad_from = question.scene.count(named_b), 1
    elif where == "count_a":
        wa, bad_from = _other(a, rng, 0, MAX_SHAPES), 0
    elif where in ("count_b", "colour_b"):
        wb, bad_from = _other(b, rng, 0, MAX_SHAPES), 1
    total = wa + wb
    steps = sum_steps(colour_a, wa, named_b, wb, total)
    if where == "sum":
        wrong = _other(total, rng, 0, 2 * MAX_SHAPES)
        steps[2], steps[3], bad_from = f"{wa} + {wb} = {wrong}.", f"Answer: {wrong}", 2
    elif where == "final":
        steps[3], bad_from = f"Answer: {_other(total, rng, 0, 2 * MAX_SHAPES)}", 3
    labels = ["+" if bad_from is None or index < bad_from else "-" for index in range(len(steps))]
    return steps, labels


def _other(value: int, rng: random.Random, low: int, high: int) -> int:
    choices = [v for v in range(max(low, value - 2), min(high, value + 2) + 1) if v != value]
    return rng.choice(choices)


def prm_example(question: Question, rng: random.Random) -> tuple[list[str], list[str]]:
    """A (steps, labels) pair for any question: multi-step for `sum` and `text`, one step (right or wrong) otherwise."""
    if question.kind == "sum":
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
