"""The whole InternVL3 recipe on a laptop: native pre-training → SFT → MPO → Best-of-N, on synthetic visual QA,
from a pre-trained ViT as in the paper (`vision.pretrain_vision_encoder`, through `transformers.Trainer`).

Every stage goes through the plugin's public APIs: `SFTDataset`/`SFTCollator`/`InternVL3Trainer` (pre-training
and SFT), `MPOTrainer`/`MPOConfig` (MPO and the critic), `generate_candidates` (sampling), `ImplicitPRM` and
`best_of_n` (Best-of-N). After each stage the policy answers the same held-out questions greedily; the table and
the PNG show how each stage moves the accuracy.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from ..best_of_n import ImplicitPRM, best_of_n, generate_candidates, select_best
from ..data import Sample, SFTCollator, SFTDataset, SupervisedEncoder
from ..processing import processor_for_config
from ..sft import InternVL3Trainer
from . import tasks
from .model import build_demo_model, build_demo_tokenizer, demo_config
from .tasks import Question
from .vision import pretrain_vision_encoder

logger = logging.getLogger(__name__)

KIND_COLUMNS = (*tasks.KINDS, "text")
MAX_NEW_TOKENS = {"sum": 40, "text": 20}  # other kinds answer in a few tokens
SHORT_ANSWER_TOKENS = 8
BON_TEMPERATURE = 0.7  # diverse candidates that are still mostly sensible


# --------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class RecipeSize:
    """How much data and how many optimizer steps each stage gets."""

    vision_scenes: int  # scenes the ViT is pre-trained on before the recipe (`vision.pretrain_vision_encoder`)
    vision_steps: int
    pretrain_scenes: int
    pretrain_text: int
    pretrain_steps: int
    sft_samples: int
    sft_steps: int
    mpo_questions: int
    mpo_samples: int  # N answers sampled per question to build the pairs
    mpo_steps: int
    critic_pairs: int  # generator questions with a flawed solution (plus the policy's own sound/unsound pairs)
    critic_steps: int
    eval_per_kind: int  # held-out questions per visual kind
    eval_text: int
    bon_n: int
    packed_tokens: int = 512  # tokens per packed row (pre-training, SFT): fewer means more optimizer steps
    pretrain_learning_rate: float = 1e-3
    sft_learning_rate: float = 5e-4  # half the pre-training rate: SFT adds the step format without unlearning position
    mpo_learning_rate: float = 1e-4
    mpo_pairs_per_question: int = 3
    critic_learning_rate: float = 5e-4
    hidden_size: int = 128
    layers: int = 4


SIZES = {
    "default": RecipeSize(
        vision_scenes=4000, vision_steps=300, pretrain_scenes=10000, pretrain_text=2000, pretrain_steps=1200,
        sft_samples=3000, sft_steps=400,
        mpo_questions=300, mpo_samples=8, mpo_steps=60, critic_pairs=3000, critic_steps=300,
        eval_per_kind=60, eval_text=60, bon_n=8,
    ),
    "fast": RecipeSize(
        vision_scenes=2000, vision_steps=150, pretrain_scenes=3200, pretrain_text=600, pretrain_steps=600,
        sft_samples=900, sft_steps=250,
        mpo_questions=80, mpo_samples=4, mpo_steps=10, critic_pairs=400, critic_steps=30,
        eval_per_kind=24, eval_text=24, bon_n=4, packed_tokens=256, hidden_size=96, layers=3,
        sft_learning_rate=1e-3,  # the smaller, shorter run needs the full rate (at 5e-4 SFT fell below pre-training)
    ),
}


# --------------------------------------------------------------------------------------------------- results
@dataclass
class StageResult:
    name: str
    visual: dict[str, list[bool]]  # kind -> correctness of each held-out question
    text: list[bool]
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def visual_correct(self) -> int:
        return sum(sum(values) for values in self.visual.values())

    @property
    def visual_total(self) -> int:
        return sum(len(values) for values in self.visual.values())

    @property
    def visual_accuracy(self) -> float:
        return self.visual_correct / max(1, self.visual_total)

    @property
    def text_accuracy(self) -> float:
        return sum(self.text) / max(1, len(self.text))

    def kind_accuracy(self, kind: str) -> tuple[int, int]:
        values = self.text if kind == "text" else self.visual.get(kind, [])
        return sum(values), len(values)


@dataclass
class RecipeReport:
    stages: list[StageResult]
    chance: float
    majority_baseline: float
    seconds: float
    output_dir: Path
    png: Path | None = None
    answer: str = ""
    extra: dict = field(default_factory=dict)

    def stage(self, name: str) -> StageResult:
        return next(stage for stage in self.stages if stage.name == name)


# --------------------------------------------------------------------------------------------------- data
def _image_prompt(question: str) -> str:
    return f"<image>\n{question}"


def pretraining_samples(scenes: int, texts: int, seed: int, caption_share: float = 0.1, kinds=("colour", "shape", "count", "position", "colour_count")) -> list[Sample]:
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
            kind = rng.choice(kinds)
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


def sft_samples(count: int, seed: int) -> list[Sample]:
    """Instruction data: one question per conversation, every kind, `sum` and text answered step by step."""
    visual = tasks.visual_questions(int(count * 0.85), seed, kinds=(*tasks.KINDS, "sum"))
    text = tasks.text_questions(count - len(visual), seed + 1, style="steps")
    questions = visual + text
    random.Random(seed).shuffle(questions)
    return [question_sample(question, origin=f"sft[{index}]") for index, question in enumerate(questions)]


def critic_pairs(count: int, seed: int, rollouts: Sequence[tuple[Question, list[str]]] = ()) -> list:
    """The critic's training pairs, from step labels: for `count` generator questions the reference solution
    (every step `+`) against a solution with a corrupted step (`-` from there on, `tasks.flawed_example`); and for
    the policy's own `rollouts` (a question and its sampled answers, labelled step by step against the reference
    by `tasks.label_response`) each sound answer against an unsound one, so that the critic also sees the
    mistakes the policy really makes."""
    rng = random.Random(seed)
    visual = tasks.visual_questions(int(count * 0.8), seed, kinds=(*tasks.KINDS, "sum", "sum"))
    questions = visual + tasks.text_questions(count - len(visual), seed + 1)
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


def held_out_questions(size: RecipeSize, seed: int) -> tuple[list[Question], list[Question]]:
    visual = tasks.visual_questions(size.eval_per_kind * len(tasks.KINDS), seed)
    return visual, tasks.text_questions(size.eval_text, seed + 1)


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


def _training_arguments(output_dir: Path, steps: int, learning_rate: float, batch_size: int, seed: int, **extra) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        per_device_train_batch_size=batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **extra,
    )


VISION_LR_SCALE = 0.03  # the ViT learns this much slower than the LLM and the projector (see `optimizer`)


def optimizer(model, learning_rate: float, vision_lr_scale: float = VISION_LR_SCALE) -> torch.optim.Optimizer:
    """AdamW with the vision tower at `vision_lr_scale` × the learning rate of the LLM and the projector.

    At one shared rate, Adam moves the randomly initialised ViT so fast that the image features drift from step to
    step and the LLM never learns to read them (the loss stalls at chance on every visual question). A slow ViT
    under a fast projector is what the stage-1 "MLP warm-up" of LLaVA-style recipes does (there the ViT is
    frozen); slowing the projector too costs colour and count accuracy.
    """
    vision, language = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (vision if "vision_tower" in name else language).append(parameter)
    groups = [{"params": language, "lr": learning_rate}, {"params": vision, "lr": learning_rate * vision_lr_scale}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=learning_rate, weight_decay=0.0)


def train_sft(model, processor, samples: list[Sample], output_dir: Path, steps: int, learning_rate: float, seed: int,
              description: str, max_packed_tokens: int = 512, batch_size: int = 1) -> list[tuple[int, float]]:
    """Packed, square-weighted training with `InternVL3Trainer` (text-token loss on the answers)."""
    encoder = SupervisedEncoder(processor, max_length=max_packed_tokens, seed=seed)
    dataset = SFTDataset(samples, encoder, max_packed_tokens=max_packed_tokens)
    args = TrainingArguments(**_training_arguments(output_dir, steps, learning_rate, batch_size, seed))
    trainer = InternVL3Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id, padding_free=True),
        processing_class=processor,
        loss_weighting="square",
        optimizers=(optimizer(model, learning_rate), None),
    )
    progress = _StageProgress(description)
    _quiet(trainer, progress)
    trainer.train()
    model.eval()
    return progress.losses


MPO_BETA = 0.1


def train_mpo(model, processor, pairs: list, output_dir: Path, steps: int, learning_rate: float, seed: int,
              description: str) -> list[tuple[int, float]]:
    """`MPOTrainer` with the paper's loss weights (w_p 0.8 DPO, w_q 0.2 BCO, w_g 1 LM on chosen) against a frozen
    copy of `model` as the reference, and the same slowed ViT as pre-training and SFT (`optimizer`): at the full
    rate the preference gradients drift the image features (100 steps on 600 questions: shape 56/60, against
    60/60 with the ViT slowed)."""
    from ..mpo import MPOConfig, MPOTrainer

    args = MPOConfig(**_training_arguments(
        output_dir, steps, learning_rate, 8, seed, beta=MPO_BETA, w_p=0.8, w_q=0.2, w_g=1.0, max_length=512,
        bf16=False, gradient_checkpointing=False,
    ))  # fmt: skip
    trainer = MPOTrainer(model, args=args, train_dataset=pairs, processing_class=processor,
                         optimizers=(optimizer(model, learning_rate), None))
    progress = _StageProgress(description)
    _quiet(trainer, progress)
    trainer.train()
    model.eval()
    return progress.losses


# --------------------------------------------------------------------------------------------------- answering
def _groups(questions: Sequence[Question], batch_size: int):
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
    batches = list(_groups(questions, max(1, batch_size // n)))
    for kind, indices in tqdm(batches, desc=description, unit="batch", dynamic_ncols=True):
        groups = generate_candidates(
            model, processor, [questions[i].question for i in indices], [_images(questions[i]) for i in indices], n,
            max_new_tokens=MAX_NEW_TOKENS.get(kind, SHORT_ANSWER_TOKENS), pad_token_id=processor.tokenizer.pad_token_id,
            **generate_kwargs,
        )  # fmt: skip
        for index, group in zip(indices, groups):
            answers[index] = [candidate.text for candidate in group]
    return answers


def evaluate(model, processor, visual: Sequence[Question], text: Sequence[Question], description: str):
    """Greedy answers to the held-out questions: correctness per visual kind, and for the text questions."""
    questions = list(visual) + list(text)
    answers = sample_answers(model, processor, questions, 1, description, batch_size=64, do_sample=False)
    return split_by_kind(visual, [tasks.is_correct(question, group[0]) for question, group in zip(questions, answers)])


def split_by_kind(visual: Sequence[Question], correct: Sequence[bool]) -> tuple[dict[str, list[bool]], list[bool]]:
    """Correctness of `visual` + text questions (in that order) as ({visual kind: [...]}, [text...])."""
    by_kind: dict[str, list[bool]] = {kind: [] for kind in tasks.KINDS}
    for question, ok in zip(visual, correct):
        by_kind[question.kind].append(ok)
    return by_kind, list(correct[len(visual) :])


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
    with _quiet_libraries():
        return _run_stages(Path(output_dir), fast, seed, png, chat)


def _run_stages(output_dir: Path, fast: bool, seed: int, png: bool, chat: bool) -> RecipeReport:
    from .report import format_table, write_png

    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    size = SIZES["fast" if fast else "default"]
    torch.manual_seed(seed)

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, hidden_size=size.hidden_size, layers=size.layers)
    model = build_demo_model(config, seed)
    processor = processor_for_config(tokenizer, config)
    parameters = sum(p.numel() for p in model.parameters())
    visual_eval, text_eval = held_out_questions(size, seed * 1000 + 99)
    chance = tasks.chance_accuracy(visual_eval)
    majority = _majority_baseline(visual_eval)
    _log(f"tiny InternVL3: {parameters / 1e6:.2f}M parameters (InternViT {config.vision_config.hidden_size}-d x "
         f"{config.vision_config.num_hidden_layers}, Qwen2 {config.text_config.hidden_size}-d x "
         f"{config.text_config.num_hidden_layers}), {len(tokenizer)}-token BPE, {config.image_seq_length} image tokens "
         f"per {config.force_image_size}-px image, V2PE {config.v2pe_mode}")
    _log(f"held-out: {len(visual_eval)} visual questions ({', '.join(tasks.KINDS)}), {len(text_eval)} text questions; "
         f"chance {chance:.1%}, majority answer {majority:.1%}")
    stages: list[StageResult] = []

    def finish(name: str, began: float, losses) -> StageResult:
        visual, text = evaluate(model, processor, visual_eval, text_eval, f"{name}: evaluate")
        result = StageResult(name, visual, text, time.perf_counter() - began, losses)
        stages.append(result)
        _log(f"{name}: held-out visual {result.visual_correct}/{result.visual_total} = {result.visual_accuracy:.1%}, "
             f"text {sum(text)}/{len(text)} = {result.text_accuracy:.1%} ({result.seconds:.0f} s)")
        return result

    # 0. the ViT starts pre-trained, as InternVL3's InternViT does (heads on its features, then dropped)
    began = time.perf_counter()
    progress = _StageProgress("0/4 vision encoder")
    args = TrainingArguments(**_training_arguments(output_dir / "vision", size.vision_steps, 1e-3, 64, seed))
    vision_accuracy = pretrain_vision_encoder(model, processor, args, size.vision_scenes, seed * 1000 + 11,
                                              prepare=lambda trainer: _quiet(trainer, progress))
    _log(f"vision encoder: tells what each grid cell holds in {vision_accuracy:.1%} of held-out scenes' cells "
         f"({time.perf_counter() - began:.0f} s)")

    # 1. native multimodal pre-training: the mix, text-token loss, square averaging, packing, V2PE with random δ
    began = time.perf_counter()
    samples = pretraining_samples(size.pretrain_scenes, size.pretrain_text, seed * 1000 + 1)
    model.train()
    losses = train_sft(model, processor, samples, output_dir / "pretrain", size.pretrain_steps,
                       size.pretrain_learning_rate, seed, "1/4 pre-training", size.packed_tokens)
    finish("pre-training", began, losses)

    # 2. SFT on instruction data (step-by-step answers for the arithmetic)
    began = time.perf_counter()
    samples = sft_samples(size.sft_samples, seed * 1000 + 2)
    model.train()
    losses = train_sft(model, processor, samples, output_dir / "sft", size.sft_steps, size.sft_learning_rate, seed,
                       "2/4 SFT", size.packed_tokens)
    finish("SFT", began, losses)

    # 3. MPO on pairs of the SFT model's own sound and unsound answers
    began = time.perf_counter()
    mpo_questions = tasks.visual_questions(int(size.mpo_questions * 0.85), seed * 1000 + 3)
    mpo_questions += tasks.text_questions(size.mpo_questions - len(mpo_questions), seed * 1000 + 4)
    sampled = sample_answers(model, processor, mpo_questions, size.mpo_samples, "3/4 MPO: sample answers",
                             do_sample=True, temperature=1.0)
    pairs, stats = mpo_pairs(mpo_questions, sampled, size.mpo_pairs_per_question, seed)
    _log(f"MPO pairs: {len(pairs)} from {stats['mixed']} questions with sound and unsound answers "
         f"({stats['all_sound']} all sound, {stats['none_sound']} none sound, of {stats['questions']})")
    model.train()
    losses = train_mpo(model, processor, pairs, output_dir / "mpo", size.mpo_steps, size.mpo_learning_rate, seed,
                       "3/4 MPO")
    finish("MPO", began, losses)

    # 4. Best-of-N with an implicit PRM: a copy of the policy trained by MPO on pairs built from step labels; its
    #    step scores are the cumulative likelihood ratio to the policy (`ImplicitPRM`)
    began = time.perf_counter()
    critic = copy.deepcopy(model)
    pairs = critic_pairs(size.critic_pairs, seed * 1000 + 5, list(zip(mpo_questions, sampled)))
    critic.train()
    critic_losses = train_mpo(critic, processor, pairs, output_dir / "critic", size.critic_steps,
                              size.critic_learning_rate, seed, "4/4 critic (implicit PRM)")
    prm = ImplicitPRM(critic.eval(), model, processor, beta=MPO_BETA, batch_size=16)
    auc = critic_step_auc(prm, size, seed * 1000 + 6)
    _log("critic: AUC of the step scores between right and wrong held-out steps: "
         + ", ".join(f"{group} {value:.2f}" for group, value in auc.items()) + " (0.5 = cannot tell them apart)")
    bon = _best_of_n_stage(model, processor, prm, visual_eval, text_eval, size, seed)
    result = StageResult("Best-of-N", *bon[BON_SELECTIONS[0]], time.perf_counter() - began, critic_losses)
    stages.append(result)
    report = RecipeReport(stages, chance, majority, 0.0, output_dir,
                          extra={"bon": bon, "mpo_pairs": stats, "critic_auc": auc,
                                 "vision_cell_accuracy": vision_accuracy})
    _log(f"Best-of-{size.bon_n}: held-out visual {result.visual_correct}/{result.visual_total} = "
         f"{result.visual_accuracy:.1%}, text {sum(result.text)}/{len(result.text)} ({result.seconds:.0f} s)")

    if chat:
        report.answer = chat_with_final_model(model, processor, output_dir / "tiny-internvl3-recipe", seed)
    report.seconds = time.perf_counter() - start
    if png:
        report.png = write_png(report, output_dir / "recipe.png")
    print(format_table(report))
    return report


CRITIC_GROUPS = {"one-step visual": tasks.SINGLE_OBJECT_KINDS + ("count",), "sum steps": ("sum",), "text steps": ("text",)}


def critic_step_auc(critic: ImplicitPRM, size: RecipeSize, seed: int) -> dict[str, float]:
    """How well the critic ranks right steps above wrong ones on held-out generator solutions (with injected
    errors, labelled like its training data): the AUC of its step scores, per group of question kinds."""
    rng = random.Random(seed)
    questions = tasks.visual_questions(size.eval_per_kind * len(tasks.KINDS), seed)
    questions += tasks.text_questions(size.eval_text, seed + 1)
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


def _best_of_n_stage(model, processor, critic: ImplicitPRM, visual: Sequence[Question], text: Sequence[Question],
                     size: RecipeSize, seed: int) -> dict[str, tuple[dict[str, list[bool]], list[bool]]]:
    """Best-of-N on every held-out question, the candidate with the best critic score winning (`prm`, the paper's
    selection); the weighted vote (`prm_vote`) and the majority vote pick from the same candidates, so the three
    selections differ only in how they choose."""
    questions = list(visual) + list(text)
    torch.manual_seed(seed)
    correct: dict[str, list[bool | None]] = {name: [None] * len(questions) for name in BON_SELECTIONS}
    batches = list(_groups(questions, 8))
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
    return {name: split_by_kind(visual, values) for name, values in correct.items()}


def _majority_baseline(questions: Sequence[Question]) -> float:
    """Accuracy of always giving each kind's most common held-out answer."""
    total = 0
    for kind in tasks.KINDS:
        answers = Counter(q.answer for q in questions if q.kind == kind)
        total += max(answers.values(), default=0)
    return total / max(1, len(questions))


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
    question = tasks.visual_question(scene, "sum", rng)
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
