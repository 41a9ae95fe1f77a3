"""The whole InternVL3 recipe on a laptop: native pre-training → SFT → MPO → Best-of-N, on synthetic visual QA,
from a pre-trained ViT as in the paper (`vision.pretrain_vision_encoder`).

Every stage is a recipe under `recipes/demo/` built by the builders users call: `internvl3_hf.train.build_trainer`
(pre-training, SFT) and `build_mpo_trainer` (MPO, the critic), given the demo's model, processor and data from
Python; sampling, the critic and Best-of-N go through `generate_candidates`, `ImplicitPRM` and `best_of_n`. After
each stage the policy answers the same held-out questions greedily; the table shows each stage's accuracy with a
95 % interval and its paired difference to the stage before.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from ..best_of_n import ImplicitPRM, best_of_n, generate_candidates, select_best
from ..data import Sample
from ..modeling.processing_internvl3 import processor_for_config
from ..recipes import load_recipe
from ..train import build_mpo_trainer, build_trainer
from . import tasks
from .model import build_demo_model, build_demo_tokenizer, demo_config
from .tasks import Question
from .vision import pretrain_vision_encoder

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "demo"  # the stage recipes, in the source tree
GROUPS = (*tasks.PERCEPTION_KINDS, *tasks.REASONING_TEMPLATES, "text")  # how the held-out results are kept
MAX_NEW_TOKENS = {tasks.REASONING: 64, "text": 20}  # other kinds answer in a few tokens
SHORT_ANSWER_TOKENS = 8
BON_TEMPERATURE = 0.7  # diverse candidates that are still mostly sensible
# A candidate's score is its weakest step's: one wrong step makes a wrong process (on the validation split, 16
# candidates: min +5.7 points over MPO, mean +5.3, last +3.7, product +4.0; with 8 candidates every choice +2 to +3)
CRITIC_AGGREGATION = "min"
# Sampling for the MPO pairs: where the greedy answer slips, some samples do not; at 1.0 most samples of a
# five-step solution go wrong somewhere, and a question gives a pair only if one of them is sound.
MPO_SAMPLE_TEMPERATURE = 0.7


# --------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class RecipeSize:
    """How much data each stage gets and how many questions are held out; `overrides` change the stage recipes
    (`recipes/demo/<stage>.yaml`, dotted keys as `internvl3-hf train --set`)."""

    vision_scenes: int  # scenes the ViT is pre-trained on before the recipe (`vision.pretrain_vision_encoder`)
    vision_steps: int
    pretrain_scenes: int
    pretrain_text: int
    sft_samples: int
    mpo_questions: int
    mpo_samples: int  # N answers sampled per question to build the pairs
    critic_pairs: int  # generator questions with a flawed solution (plus the policy's own sound/unsound pairs)
    eval_reasoning: int  # held-out reasoning questions (the templates in turn)
    eval_per_perception_kind: int
    eval_text: int
    bon_n: int
    sft_text_share: float = 0.3  # text-only share of the SFT mix: keeps the text ability pre-training gave
    mpo_pairs_per_question: int = 3
    hidden_size: int = 128
    layers: int = 4
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


SIZES = {
    "default": RecipeSize(
        vision_scenes=4000, vision_steps=300, pretrain_scenes=10000, pretrain_text=2000, sft_samples=3000,
        mpo_questions=800, mpo_samples=8, critic_pairs=3000,
        eval_reasoning=300, eval_per_perception_kind=30, eval_text=150, bon_n=16,
    ),
    "fast": RecipeSize(
        vision_scenes=2000, vision_steps=150, pretrain_scenes=4000, pretrain_text=800, sft_samples=1500,
        mpo_questions=240, mpo_samples=4, critic_pairs=400,
        eval_reasoning=120, eval_per_perception_kind=12, eval_text=48, bon_n=4,
        overrides={
            "pretrain": ("training.max_steps=500", "training.warmup_steps=25", "data.max_packed_tokens=256",
                         "data.max_length=256"),
            "sft": ("training.max_steps=300", "training.warmup_steps=15", "training.learning_rate=1e-3",
                    "data.max_packed_tokens=256", "data.max_length=256"),
            "mpo": ("training.max_steps=30",),
            "critic": ("training.max_steps=40", "training.warmup_steps=2"),
        },
    ),
}


def stage_recipe(stage: str, size: RecipeSize, seed: int, output_dir: Path) -> dict:
    """`recipes/demo/<stage>.yaml` with the demo's seed, output folder and size overrides."""
    path = RECIPES / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the demo reads its stage recipes from the source tree's "
                                f"recipes/demo/ (install the package from a clone: pip install -e .).")
    seeds = (f"training.seed={seed}", f"training.data_seed={seed}", f"training.output_dir={output_dir / stage}")
    recipe = load_recipe(path, (*seeds, *size.overrides.get(stage, ())))
    if "max_packed_tokens" in recipe.get("data", {}):  # SFT recipes: the tiling / augmentation seed too
        recipe["data"]["seed"] = seed
    return recipe


# --------------------------------------------------------------------------------------------------- reproducibility
THREADS = 1  # intra-op threads: reductions split by thread sum in another order; one thread is the same on any machine
# The kernels' instruction set: AVX-512 and AVX2 kernels round differently, so two machines of the same kind with
# different CPUs would train different models. These are read when torch, MKL and oneDNN first dispatch.
KERNEL_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@contextmanager
def reproducible(seed: int) -> Iterator[str]:
    """Fix what the demo's numbers depend on for the run (thread count and environment restored afterwards): the
    thread count, the kernels' instruction set (where torch has not run a kernel yet in this process) and the seed;
    yields a line saying what is in effect. `torch.use_deterministic_algorithms` is left off: the demo's CPU kernels
    give the same bits run after run at a fixed thread count, and the flag made the ViT's training 5 times slower."""
    saved = {name: os.environ.get(name) for name in KERNEL_ISA}
    for name, value in KERNEL_ISA.items():
        os.environ.setdefault(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    try:
        yield (f"reproducibility: seed {seed}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"{torch.backends.cpu.get_cpu_capability()} kernels (MKL_CBWR={os.environ['MKL_CBWR']}, "
               f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']})")
    finally:
        torch.set_num_threads(threads)
        # the caller's process keeps its own settings: torch.compile's C++ kernels read ATEN_CPU_CAPABILITY too
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------------- results
@dataclass
class StageResult:
    """One stage's greedy answers to the held-out questions: correctness per group (`GROUPS`), in question order."""

    name: str
    groups: dict[str, list[bool]]
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)

    def correct(self, *groups: str) -> list[bool]:
        """Correctness over `groups`, concatenated in that order (the same questions in every stage: pairable)."""
        return [ok for group in groups for ok in self.groups.get(group, [])]

    @property
    def reasoning(self) -> list[bool]:
        return self.correct(*tasks.REASONING_TEMPLATES)

    @property
    def perception(self) -> list[bool]:
        return self.correct(*tasks.PERCEPTION_KINDS)

    @property
    def text(self) -> list[bool]:
        return self.correct("text")


@dataclass
class RecipeReport:
    stages: list[StageResult]
    chance: float
    seconds: float
    output_dir: Path
    settings: str = ""
    png: Path | None = None
    answer: str = ""
    extra: dict = field(default_factory=dict)

    def stage(self, name: str) -> StageResult:
        return next(stage for stage in self.stages if stage.name == name)


# --------------------------------------------------------------------------------------------------- data
def _image_prompt(question: str) -> str:
    return f"<image>\n{question}"


PRETRAINING_KINDS = (*tasks.PERCEPTION_KINDS, "colour_count")


def pretraining_samples(scenes: int, texts: int, seed: int, caption_share: float = 0.1) -> list[Sample]:
    """The native pre-training mix: short-answer questions about scenes (colour, shape, count, position, count of
    one colour), scene captions, and text-only arithmetic facts; one conversation each.

    One question per conversation matters here: the square loss weighting gives a conversation weight √l for its
    l answer tokens, so a two-token answer inside a long multi-turn conversation would barely be trained.
    """
    rng = random.Random(seed)
    samples = []
    for index in range(scenes):
        if rng.random() < caption_share:
            scene = tasks.random_scene(rng, rng.randrange(2**31))
            question = Question("caption", "Describe the image.", scene.caption(), scene.caption(), scene)
        else:
            kind = rng.choice(PRETRAINING_KINDS)
            question = None
            while question is None:
                single = kind in tasks.SINGLE_OBJECT_KINDS
                scene = tasks.random_scene(rng, rng.randrange(2**31), 1 if single else tasks.MAX_SHAPES)
                question = tasks.visual_question(scene, kind, rng)
        samples.append(question_sample(question, origin=f"pretrain_scene[{index}]"))
    for index, question in enumerate(tasks.text_questions(texts, rng.randrange(2**31), style="plain")):
        samples.append(question_sample(question, origin=f"pretrain_text[{index}]"))
    rng.shuffle(samples)
    return samples


def question_sample(question: Question, answer: str | None = None, origin: str = "?") -> Sample:
    """A one-turn conversation: the question (with its image) and `answer` (default: the reference solution)."""
    answer = question.solution if answer is None else answer
    if question.has_image:
        return Sample(
            messages=[{"role": "user", "content": _image_prompt(question.question)}, {"role": "assistant", "content": answer}],
            images=[question.scene.render()],
            origin=origin,
        )
    return Sample(messages=[{"role": "user", "content": question.question}, {"role": "assistant", "content": answer}], origin=origin)


SFT_KINDS = (*tasks.PERCEPTION_KINDS, "colour_count", tasks.REASONING, tasks.REASONING, tasks.REASONING)


def sft_samples(count: int, seed: int, text_share: float,
                slip_rate: float = tasks.SLIP_RATE) -> tuple[list[Sample], dict]:
    """Instruction data: one question per conversation, every visual kind (half of them reasoning, answered step
    by step as the imperfect annotator wrote it: `tasks.annotated_solution`) and `text_share` text-only arithmetic
    answered step by step. Returns the samples and how many reasoning solutions slip."""
    rng = random.Random(seed)
    visual = tasks.visual_questions(round(count * (1 - text_share)), seed, kinds=SFT_KINDS)
    questions = visual + tasks.text_questions(count - len(visual), seed + 1, style="steps")
    rng.shuffle(questions)
    samples, stats = [], {"reasoning": 0, "slipped": 0}
    for index, question in enumerate(questions):
        answer = tasks.annotated_solution(question, rng, slip_rate) if question.kind == tasks.REASONING else None
        if question.kind == tasks.REASONING:
            stats["reasoning"] += 1
            stats["slipped"] += answer != question.solution
        samples.append(question_sample(question, answer, origin=f"sft[{index}]"))
    return samples, stats


def mixed_questions(count: int, seed: int, reasoning_share: float, text_share: float) -> list[Question]:
    """Training-split questions for sampling: reasoning, perception and text-only in the given shares."""
    reasoning = tasks.reasoning_questions(round(count * reasoning_share), seed)
    text = tasks.text_questions(round(count * text_share), seed + 1)
    perception = tasks.visual_questions(count - len(reasoning) - len(text), seed + 2, kinds=tasks.PERCEPTION_KINDS)
    return reasoning + perception + text


def critic_pairs(count: int, seed: int, rollouts: Sequence[tuple[Question, list[str]]] = ()) -> list:
    """The critic's training pairs, from step labels: for `count` generator questions the reference solution
    (every step `+`) against a solution with a corrupted step (`-` from there on, `tasks.flawed_example`); and for
    the policy's own `rollouts` (a question and its sampled answers, labelled step by step against the reference
    by `tasks.label_response`) each sound answer against an unsound one, so that the critic also sees the
    mistakes the policy really makes."""
    rng = random.Random(seed)
    questions = mixed_questions(count, seed, reasoning_share=0.6, text_share=0.2)
    pairs = [
        preference_pair(question, question.solution, tasks.STEP_SEPARATOR.join(tasks.flawed_example(question, rng)[0]),
                        f"critic[{index}]")
        for index, question in enumerate(questions)
    ]  # fmt: skip
    for index, (question, answers) in enumerate(rollouts):
        sound, unsound = sound_and_unsound(question, answers)
        pairs += [preference_pair(question, good, bad, f"critic_rollout[{index}]")
                  for good, bad in _shuffled_pairs(sound, unsound, rng)]  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def held_out_questions(size: RecipeSize, seed: int) -> list[Question]:
    """The held-out questions every stage answers: perception, reasoning (the templates in turn), text-only."""
    perception = tasks.visual_questions(size.eval_per_perception_kind * len(tasks.PERCEPTION_KINDS), seed,
                                        kinds=tasks.PERCEPTION_KINDS)
    reasoning = tasks.reasoning_questions(size.eval_reasoning, seed + 1)
    return perception + reasoning + tasks.text_questions(size.eval_text, seed + 2)


def group_of(question: Question) -> str:
    """Where a question's result is kept: its reasoning template, or its kind."""
    return question.template


# --------------------------------------------------------------------------------------------------- training
class _StageProgress(TrainerCallback):
    """One progress bar per stage with the running loss; records (step, loss) for the curves."""

    def __init__(self, description: str, key: str = "loss"):
        self.description = description
        self.key = key
        self.losses: list[tuple[int, float]] = []
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.description, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.key in logs:
            self.losses.append((state.global_step, float(logs[self.key])))
            self.bar.set_postfix(loss=f"{logs[self.key]:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _quiet(trainer, progress: _StageProgress):
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress)


def vision_training_arguments(output_dir: Path, steps: int, seed: int, batch_size: int = 64) -> TrainingArguments:
    """`transformers.Trainer` arguments for the ViT's pre-training (`vision.pretrain_vision_encoder`): it trains a
    classifier head on the ViT alone, which no recipe builder (they train the VLM) fits."""
    return TrainingArguments(output_dir=str(output_dir), max_steps=steps, learning_rate=1e-3,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
                             per_device_train_batch_size=batch_size, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0)


def train_stage(trainer, description: str) -> list[tuple[int, float]]:
    """Train a built trainer with the demo's progress bar; returns the (step, loss) curve."""
    progress = _StageProgress(description)
    _quiet(trainer, progress)
    trainer.model.train()
    trainer.train()
    trainer.model.eval()
    return progress.losses


# --------------------------------------------------------------------------------------------------- answering
def _batches(questions: Sequence[Question], batch_size: int):
    """Questions in batches of one kind (similar answer lengths, so `generate` stops early)."""
    by_kind: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        by_kind.setdefault(question.kind, []).append(index)
    for kind, indices in by_kind.items():
        for start in range(0, len(indices), batch_size):
            yield kind, indices[start : start + batch_size]


def _images(question: Question):
    return [question.scene.render()] if question.has_image else None


def sample_answers(model, processor, questions: Sequence[Question], n: int, description: str, batch_size: int = 32,
                   **generate_kwargs) -> list[list[str]]:
    """`n` answers per question (one batched `generate` per group, `generate_candidates`)."""
    answers: list[list[str]] = [[] for _ in questions]
    batches = list(_batches(questions, max(1, batch_size // n)))
    for kind, indices in tqdm(batches, desc=description, unit="batch", dynamic_ncols=True):
        groups = generate_candidates(
            model, processor, [questions[i].question for i in indices], [_images(questions[i]) for i in indices], n,
            max_new_tokens=MAX_NEW_TOKENS.get(kind, SHORT_ANSWER_TOKENS), pad_token_id=processor.tokenizer.pad_token_id,
            **generate_kwargs,
        )  # fmt: skip
        for index, group in zip(indices, groups):
            answers[index] = [candidate.text for candidate in group]
    return answers


def by_group(questions: Sequence[Question], correct: Sequence[bool]) -> dict[str, list[bool]]:
    """Correctness per group (`GROUPS`), in question order."""
    groups: dict[str, list[bool]] = {group: [] for group in GROUPS}
    for question, ok in zip(questions, correct):
        groups[group_of(question)].append(bool(ok))
    return groups


def evaluate(model, processor, questions: Sequence[Question], description: str) -> dict[str, list[bool]]:
    """Greedy answers to the held-out questions: correctness per group."""
    answers = sample_answers(model, processor, questions, 1, description, batch_size=64, do_sample=False)
    return by_group(questions, [tasks.is_correct(question, group[0]) for question, group in zip(questions, answers)])


def preference_pair(question: Question, chosen: str, rejected: str, origin: str):
    """An MPO `PreferencePair` for `question` (with its image)."""
    from ..mpo import PreferencePair

    prompt = _image_prompt(question.question) if question.has_image else question.question
    return PreferencePair(prompt=[{"role": "user", "content": prompt}], chosen=chosen, rejected=rejected,
                          images=_images(question) or [], origin=origin)


def sound_and_unsound(question: Question, answers: Sequence[str]) -> tuple[set[str], set[str]]:
    """The distinct non-empty `answers` whose every step agrees with the reference solution
    (`tasks.label_response`; a one-step answer: the right one), and the others."""
    sound = {answer for answer in answers if answer and "-" not in tasks.label_response(question, answer)[1]}
    return sound, {answer for answer in answers if answer} - sound


def _shuffled_pairs(good: set[str], bad: set[str], rng: random.Random) -> list[tuple[str, str]]:
    """Each good answer against a bad one, both sides in a seeded random order (sorted first: sets have none)."""
    good_order, bad_order = sorted(good), sorted(bad)
    rng.shuffle(good_order)
    rng.shuffle(bad_order)
    return list(zip(good_order, bad_order))


def mpo_pairs(questions: Sequence[Question], answers: Sequence[list[str]], per_question: int, seed: int):
    """Preference pairs from the model's own samples: a sound answer (chosen) against an unsound one (rejected).

    Sound means every step agrees with the reference solution (`tasks.label_response`; for a one-step answer: it is
    right). An answer that reaches the right number after a wrong step ("2 + 2 = 2. Answer: 2" where 2 is right)
    is unsound: as chosen it would teach the wrong step.
    """
    rng = random.Random(seed)
    pairs, stats = [], {"questions": len(questions), "all_sound": 0, "none_sound": 0, "mixed": 0}
    for index, (question, group) in enumerate(zip(questions, answers)):
        sound, unsound = sound_and_unsound(question, group)
        if not unsound:
            stats["all_sound"] += 1
            continue
        if not sound:
            stats["none_sound"] += 1
            continue
        stats["mixed"] += 1
        for chosen, rejected in _shuffled_pairs(sound, unsound, rng)[:per_question]:
            pairs.append(preference_pair(question, chosen, rejected, f"mpo[{index}]"))
    rng.shuffle(pairs)
    return pairs, stats


# --------------------------------------------------------------------------------------------------- the recipe
def _log(message: str) -> None:
    tqdm.write(message)


def run_recipe(output_dir: str | Path = "demo_out", fast: bool = False, seed: int = 0, png: bool = True,
               chat: bool = True) -> RecipeReport:
    """Run the four stages and return the report (the table is printed, the PNG written to `output_dir`)."""
    with _quiet_libraries(), reproducible(seed) as settings:
        _log(settings)
        return _run_stages(Path(output_dir), fast, seed, png, chat, settings)


def _run_stages(output_dir: Path, fast: bool, seed: int, png: bool, chat: bool, settings: str) -> RecipeReport:
    from .report import format_table, write_png

    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    size = SIZES["fast" if fast else "default"]

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, hidden_size=size.hidden_size, layers=size.layers)
    model = build_demo_model(config, seed)
    processor = processor_for_config(tokenizer, config)
    parameters = sum(p.numel() for p in model.parameters())
    held_out = held_out_questions(size, seed * 1000 + 99)
    chance = tasks.chance_accuracy([q for q in held_out if q.kind == tasks.REASONING])
    _log(f"tiny InternVL3: {parameters / 1e6:.2f}M parameters (InternViT {config.vision_config.hidden_size}-d x "
         f"{config.vision_config.num_hidden_layers}, Qwen2 {config.text_config.hidden_size}-d x "
         f"{config.text_config.num_hidden_layers}), {len(tokenizer)}-token BPE, {config.image_seq_length} image tokens "
         f"per {config.force_image_size}-px image, V2PE {config.v2pe_mode}")
    counts = Counter(group_of(q) for q in held_out)
    per_template = ", ".join(f"{counts[t]} {t}" for t in tasks.REASONING_TEMPLATES)
    _log(f"held-out: {size.eval_reasoning} reasoning ({per_template}), "
         f"{sum(counts[k] for k in tasks.PERCEPTION_KINDS)} perception, {counts['text']} text-only questions")
    stages: list[StageResult] = []

    def finish(name: str, began: float, losses) -> StageResult:
        result = StageResult(name, evaluate(model, processor, held_out, f"{name}: evaluate"), 0.0, losses)
        result.seconds = time.perf_counter() - began
        stages.append(result)
        _log(f"{name}: reasoning {sum(result.reasoning)}/{len(result.reasoning)}, perception "
             f"{sum(result.perception)}/{len(result.perception)}, text {sum(result.text)}/{len(result.text)} "
             f"({result.seconds:.0f} s)")
        return result

    # 0. the ViT starts pre-trained, as InternVL3's InternViT does (heads on its features, then dropped)
    began = time.perf_counter()
    progress = _StageProgress("0/4 vision encoder")
    args = vision_training_arguments(output_dir / "vision", size.vision_steps, seed)
    vision_accuracy = pretrain_vision_encoder(model, processor, args, size.vision_scenes, seed * 1000 + 11,
                                              prepare=lambda trainer: _quiet(trainer, progress))
    _log(f"vision encoder: tells what each grid cell holds in {vision_accuracy:.1%} of held-out scenes' cells "
         f"({time.perf_counter() - began:.0f} s)")

    # 1. native multimodal pre-training: the mix, text-token loss, square averaging, packing, V2PE with random δ
    began = time.perf_counter()
    samples = pretraining_samples(size.pretrain_scenes, size.pretrain_text, seed * 1000 + 1)
    trainer = build_trainer(stage_recipe("pretrain", size, seed, output_dir), model=model, processor=processor,
                            samples=samples)
    finish("pre-training", began, train_stage(trainer, "1/4 pre-training"))

    # 2. SFT on instruction data; the reasoning as an imperfect annotator wrote it (slips in `minus` questions)
    began = time.perf_counter()
    samples, slips = sft_samples(size.sft_samples, seed * 1000 + 2, size.sft_text_share)
    _log(f"SFT data: {len(samples)} conversations, {slips['reasoning']} reasoning solutions of which "
         f"{slips['slipped']} ({slips['slipped'] / max(1, slips['reasoning']):.0%}) hold the annotator's slip")
    trainer = build_trainer(stage_recipe("sft", size, seed, output_dir), model=model, processor=processor,
                            samples=samples)
    finish("SFT", began, train_stage(trainer, "2/4 SFT"))

    # 3. MPO on pairs of the SFT model's own sound and unsound answers
    began = time.perf_counter()
    mpo_questions = mixed_questions(size.mpo_questions, seed * 1000 + 3, reasoning_share=0.75, text_share=0.15)
    sampled = sample_answers(model, processor, mpo_questions, size.mpo_samples, "3/4 MPO: sample answers",
                             do_sample=True, temperature=MPO_SAMPLE_TEMPERATURE)
    pairs, stats = mpo_pairs(mpo_questions, sampled, size.mpo_pairs_per_question, seed)
    _log(f"MPO pairs: {len(pairs)} from {stats['mixed']} questions with sound and unsound answers "
         f"({stats['all_sound']} all sound, {stats['none_sound']} none sound, of {stats['questions']})")
    trainer = build_mpo_trainer(stage_recipe("mpo", size, seed, output_dir), model=model, processor=processor,
                                pairs=pairs)
    finish("MPO", began, train_stage(trainer, "3/4 MPO"))

    # 4. Best-of-N with an implicit PRM: a copy of the policy trained by MPO on pairs built from step labels; its
    #    step scores are the cumulative likelihood ratio to the policy (`ImplicitPRM`)
    began = time.perf_counter()
    critic_recipe = stage_recipe("critic", size, seed, output_dir)
    pairs = critic_pairs(size.critic_pairs, seed * 1000 + 5, list(zip(mpo_questions, sampled)))
    trainer = build_mpo_trainer(critic_recipe, model=copy.deepcopy(model), processor=processor, pairs=pairs)
    critic_losses = train_stage(trainer, "4/4 critic (implicit PRM)")
    prm = ImplicitPRM(trainer.model.eval(), model, processor, beta=critic_recipe["training"]["beta"],
                      aggregation=CRITIC_AGGREGATION, batch_size=16)
    auc = critic_step_auc(prm, size, seed * 1000 + 6)
    _log("critic: AUC of the step scores between right and wrong held-out steps: "
         + ", ".join(f"{group} {value:.2f}" for group, value in auc.items()) + " (0.5 = cannot tell them apart)")
    bon = _best_of_n_stage(model, processor, prm, held_out, size, seed)
    result = StageResult(f"Best-of-{size.bon_n}", bon[BON_SELECTIONS[0]], time.perf_counter() - began, critic_losses)
    stages.append(result)
    report = RecipeReport(stages, chance, 0.0, output_dir, settings,
                          extra={"bon": bon, "bon_n": size.bon_n, "mpo_pairs": stats, "sft_slips": slips,
                                 "critic_auc": auc, "vision_cell_accuracy": vision_accuracy})
    _log(f"{result.name}: reasoning {sum(result.reasoning)}/{len(result.reasoning)} (pass@{size.bon_n} "
         f"{sum(StageResult('', bon['pass'], 0).reasoning)}), text {sum(result.text)}/{len(result.text)} "
         f"({result.seconds:.0f} s)")

    if chat:
        report.answer = chat_with_final_model(model, processor, output_dir / "tiny-internvl3-recipe", seed)
    report.seconds = time.perf_counter() - start
    if png:
        report.png = write_png(report, output_dir / "recipe.png")
    print(format_table(report))
    return report


CRITIC_GROUPS = {"perception": tasks.PERCEPTION_KINDS, "reasoning steps": (tasks.REASONING,), "text steps": ("text",)}


def critic_step_auc(critic: ImplicitPRM, size: RecipeSize, seed: int) -> dict[str, float]:
    """How well the critic ranks right steps above wrong ones on held-out generator solutions (with injected
    errors, labelled like its training data): the AUC of its step scores, per group of question kinds."""
    rng = random.Random(seed)
    questions = mixed_questions(200, seed, reasoning_share=0.6, text_share=0.2)
    solutions = [tasks.prm_example(question, rng) for question in questions]
    scores = critic.score_many(
        [q.question for q in questions], [[tasks.STEP_SEPARATOR.join(steps)] for steps, _ in solutions],
        [_images(q) or [] for q in questions],
    )  # fmt: skip
    auc = {}
    for group, kinds in CRITIC_GROUPS.items():
        right, wrong = [], []
        for question, (_, labels), (score,) in zip(questions, solutions, scores):
            if question.kind in kinds:
                for label, value in zip(labels, score.step_scores):
                    (right if label == "+" else wrong).append(value)
        pairs = [(r > w) + 0.5 * (r == w) for r in right for w in wrong]
        auc[group] = sum(pairs) / max(1, len(pairs))
    return auc


BON_SELECTIONS = ("prm", "prm_vote", "majority")  # the stage's strategy first; the others on the same candidates


def _best_of_n_stage(model, processor, critic: ImplicitPRM, questions: Sequence[Question], size: RecipeSize,
                     seed: int) -> dict[str, dict[str, list[bool]]]:
    """Best-of-N on every held-out question, the candidate with the best critic score winning (`prm`, the paper's
    selection); the weighted vote (`prm_vote`) and the majority vote pick from the same candidates, so the three
    selections differ only in how they choose; `pass` says whether any candidate is right (pass@N)."""
    torch.manual_seed(seed)
    correct: dict[str, list[bool]] = {name: [False] * len(questions) for name in (*BON_SELECTIONS, "pass")}
    batches = list(_batches(questions, 8))
    for kind, indices in tqdm(batches, desc="4/4 Best-of-N", unit="batch", dynamic_ncols=True):
        results = best_of_n(
            model, processor, critic, [_images(questions[i]) for i in indices], [questions[i].question for i in indices],
            n=size.bon_n, strategy=BON_SELECTIONS[0], answer_extractor=tasks.final_answer,
            max_new_tokens=MAX_NEW_TOKENS.get(kind, SHORT_ANSWER_TOKENS), temperature=BON_TEMPERATURE,
            pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
        for index, result in zip(indices, results):
            for name in BON_SELECTIONS:
                chosen = result.candidates[select_best(result.candidates, name)]
                correct[name][index] = tasks.is_correct(questions[index], chosen.text)
            correct["pass"][index] = any(tasks.is_correct(questions[index], c.text) for c in result.candidates)
    return {name: by_group(questions, values) for name, values in correct.items()}


def chat_with_final_model(model, processor, directory: Path, seed: int) -> str:
    """Save the final policy as a plugin checkpoint, load it back through the Auto classes and ask about a scene."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..chat import chat

    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    reloaded = AutoModelForImageTextToText.from_pretrained(directory).eval()
    reloaded_processor = AutoProcessor.from_pretrained(directory)
    rng = random.Random(seed * 1000 + 7)
    scene = tasks.random_scene(rng, 7)
    question = tasks.visual_question(scene, tasks.REASONING, rng, "twice")
    image_path = directory.parent / "recipe_scene.png"
    scene.render().resize((336, 336), resample=0).save(image_path)
    _log(f"\nsaved the final model to {directory} and reloaded it with AutoModelForImageTextToText / AutoProcessor")
    _log(f"chat about {image_path} ({scene.caption()})\nuser: {question.question}\nassistant: ")
    answer = chat(reloaded, reloaded_processor, question.question, [scene.render()], max_new_tokens=48, do_sample=False,
                  pad_token_id=reloaded_processor.tokenizer.pad_token_id)
    _log(answer)
    _log(f"({'right' if tasks.is_correct(question, answer) else 'wrong'}: the answer is {question.answer})\n")
    return answer


@contextmanager
def _quiet_libraries():
    """Keep the progress bars readable (no per-step log dicts, no repeated library warnings) for the run only:
    the caller's logging levels and warning filters are restored afterwards."""
    ours = logging.getLogger("internvl3_hf")
    levels = hf_logging.get_verbosity(), ours.level
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        hf_logging.set_verbosity_error()
        ours.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(levels[0])
            ours.setLevel(levels[1])
