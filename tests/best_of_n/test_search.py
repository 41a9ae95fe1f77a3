"""Best-of-N end to end through `generate`: candidates and their flags, PRM / ORM / majority selection, a rigged
critic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from internvl3_hf.best_of_n import (
    Candidate,
    VisualPRM,
    best_of_n,
    extract_answer,
    generate_candidates,
    majority_vote,
    select_best,
)
from internvl3_hf.best_of_n.search import generate_with_shared_prefill
from internvl3_hf.chat import build_messages, chat

QUESTION = "How many shapes are in the image?"


# --------------------------------------------------------------------------------------------- answers and votes
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1: add.\n\nAnswer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{3} then \\boxed{5}.", "5"),  # the last box wins
        ("Reasoning.\n\nFinal answer: 12\nDone.", "12"),  # first line after the trigger
        ("Reasoning.\n\nFinal Answer: B", "B"),
        ("answer: maybe\n\nAnswer: 7.", "7."),  # the last trigger wins
        ("推理。\n\n答案：3", "3"),
        ("No answer stated here.", None),
        ("Answer:   ", None),
        ("unbalanced \\boxed{3", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_majority_vote_normalises_answers_and_breaks_ties_by_first_appearance():
    assert majority_vote(["5", None, "  five", "5.", "**5**", "five"]) == 0  # "5" x3 beats "five" x2
    assert majority_vote(["B", "A", "a", "b"]) == 0  # 2-2 tie: the answer seen first
    assert majority_vote([None, "x", "y", "Y"]) == 2
    assert majority_vote([None, None]) is None


def _candidate(text: str, score: float | None = None, answer: str | None = None) -> Candidate:
    return Candidate(text=text, num_tokens=len(text), truncated=False, answer=answer, score=score)


def test_select_best():
    scored = [_candidate("a", 0.2), _candidate("", -math.inf), _candidate("b", 0.7), _candidate("c", 0.7)]
    assert select_best(scored, "prm") == 2  # ties go to the earlier candidate
    assert select_best([_candidate("", -math.inf), _candidate("", -math.inf)], "orm") == 0
    voted = [_candidate(""), _candidate("x", answer="1"), _candidate("y", answer="2"), _candidate("z", answer="2")]
    assert select_best(voted, "majority") == 2
    assert select_best([_candidate(""), _candidate("w")], "majority") == 1  # no answers: first non-empty
    with pytest.raises(ValueError, match="empty candidate list"):
        select_best([], "prm")
    with pytest.raises(ValueError, match="critic score"):
        select_best([_candidate("a", answer="1")], "prm_vote")
    with pytest.raises(ValueError, match="critic score"):
        select_best([_candidate("a")], "prm")
    with pytest.raises(ValueError, match="Unknown strategy"):
        select_best(scored, "beam")


def test_prm_vote_sums_scores_per_answer():
    """Weighted Best-of-N by hand: "7" has 0.4 + 0.35 = 0.75 > "8" at 0.7, although "8" holds the best single
    score (what `prm` picks); the winner's best-scored member is returned."""
    candidates = [
        _candidate("x = 7", 0.4, "7"),
        _candidate("so 8", 0.7, "8"),
        _candidate("", -math.inf),
        _candidate("x = 7.", 0.35, "**7**"),  # normalised, votes with "7"
    ]
    assert select_best(candidates, "prm") == 1
    assert select_best(candidates, "prm_vote") == 0
    # A candidate without an extractable answer stands alone; it wins on its own score when that is the largest.
    lone = [_candidate("a", 0.3, "1"), _candidate("b", 0.9), _candidate("c", 0.5, "1")]
    assert select_best(lone, "prm_vote") == 1
    lone[1].score = 0.7  # 0.7 < 0.3 + 0.5: the "1" group wins, its best member
    assert select_best(lone, "prm_vote") == 2
    # Equal totals: the answer seen first; all empty: the first candidate.
    assert select_best([_candidate("p", 0.5, "A"), _candidate("q", 0.5, "B")], "prm_vote") == 0
    assert select_best([_candidate("", -math.inf), _candidate("", -math.inf)], "prm_vote") == 0
    # With a critic that cannot tell answers apart it is the majority vote, unlike `prm`.
    flat = [_candidate(t, 0.5, a) for t, a in (("p", "2"), ("q", "3"), ("r", "3"))]
    assert select_best(flat, "prm_vote") == select_best(flat, "majority") == 1
    assert select_best(flat, "prm") == 0


# --------------------------------------------------------------------------------------------- candidates
@pytest.fixture
def policy(model_factory):
    return model_factory(seed=0)


@pytest.mark.parametrize("v2pe", [False, True])
def test_candidates_equal_plain_chat_and_run_the_vit_once(model_factory, config, processor, image, v2pe):
    """Greedy-equivalent sampling (top_k=1): every candidate equals `chat()`'s greedy answer to its own question,
    which checks that the n copies of each multi-tile prompt see their own tiles in order (also under V2PE)."""
    if v2pe:
        config.v2pe_mode, config.v2pe_delta = "fixed", 0.25
    policy = model_factory(config, seed=0)
    questions, images = [QUESTION, "Hello?"], [[image], []]
    calls = []
    hook = policy.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args))
    try:
        groups = generate_candidates(policy, processor, questions, images, 3, max_new_tokens=6, do_sample=True, top_k=1)
    finally:
        hook.remove()
    assert len(calls) == 1  # one ViT pass for the whole batch, not one per candidate
    for question, question_images, group in zip(questions, images, groups):
        expected = chat(policy, processor, question, question_images, max_new_tokens=6, do_sample=False)
        assert [candidate.text for candidate in group] == [expected] * 3


@pytest.mark.parametrize("v2pe", [None, "fixed", "auto"])
def test_shared_prefill_equals_num_return_sequences(model_factory, config, processor, image, v2pe):
    """Each prompt prefilled once and its cache repeated: every row's per-step logits within 1e-5 of
    `generate(num_return_sequences=n)` (fp32), the same greedy tokens, also under V2PE (δ = 1/4, or per prompt
    length), with left-padded prompts of different lengths; the language model reads each prompt once."""
    if v2pe is not None:
        config.v2pe_mode, config.v2pe_delta = v2pe, 0.25
        config.v2pe_max_position = 40  # "auto": the long prompt gets a smaller δ than the short one
    policy = model_factory(config, seed=0)
    prompts = [
        processor.apply_chat_template(build_messages(question, len(images), None), add_generation_prompt=True)
        for question, images in ((QUESTION, [image]), ("Hello?", []))
    ]
    inputs = processor(text=prompts, images=[[image], []], padding=True, return_tensors="pt")
    settings = dict(do_sample=True, top_k=1, max_new_tokens=5, min_new_tokens=5, output_logits=True,
                    return_dict_in_generate=True)  # greedy (top_k=1): num_return_sequences needs sampling
    expected = policy.generate(**inputs, num_return_sequences=3, **settings)
    rows = []
    hook = policy.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        shared = generate_with_shared_prefill(policy, inputs, 3, **settings)
    finally:
        hook.remove()
    assert torch.equal(shared.sequences, expected.sequences)
    assert len(shared.logits) == len(expected.logits) == 5
    for step_logits, expected_logits in zip(shared.logits, expected.logits):
        assert torch.allclose(step_logits, expected_logits, atol=1e-5, rtol=0)
    prompt_length = inputs["input_ids"].shape[1]
    assert rows[0] == (2, prompt_length - 1)  # the prefill: each prompt once
    assert rows[1] == (6, 1) and all(row == (6, 1) for row in rows[1:])  # then one token per sample and step


def test_candidates_flag_truncated_and_empty_answers(policy, processor, image):
    eos = policy.config.eos_token_id
    prompt = ([QUESTION], [[image]], 3)
    (truncated,) = generate_candidates(policy, processor, *prompt, max_new_tokens=4, suppress_tokens=[eos])
    assert all(c.truncated and c.num_tokens == 4 and not c.empty for c in truncated)
    (empty,) = generate_candidates(policy, processor, *prompt, max_new_tokens=4, sequence_bias={(eos,): 50.0})
    assert all(c.empty and not c.truncated and c.num_tokens == 0 for c in empty)


def test_empty_candidates_are_never_sent_to_the_critic(policy, processor, critic, image):
    # Bias the end-of-turn token so that it is the first token half of the time: some candidates come out empty.
    eos = policy.config.eos_token_id
    prompt = processor.apply_chat_template(build_messages(QUESTION, 1), add_generation_prompt=True)
    with torch.no_grad():
        logits = policy(**processor(text=prompt, images=[image], return_tensors="pt")).logits[0, -1]
    bias = float(torch.cat([logits[:eos], logits[eos + 1 :]]).logsumexp(0) - logits[eos])
    torch.manual_seed(0)
    result = best_of_n(policy, processor, critic, image, QUESTION, n=8, max_new_tokens=4, sequence_bias={(eos,): bias})
    empty = [c for c in result.candidates if c.empty]
    answered = [c for c in result.candidates if not c.empty]
    assert empty and answered
    assert all(c.score == -math.inf and c.steps == [] for c in empty)
    payload = json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: the -inf scores become null
    assert [c["score"] is None for c in json.loads(payload)["candidates"]] == [c.empty for c in result.candidates]
    expected = critic.score(QUESTION, [c.text for c in answered], [image])
    assert [c.score for c in answered] == pytest.approx([s.score for s in expected], abs=1e-5)
    assert not result.best.empty


# --------------------------------------------------------------------------------------------- selection
def test_selected_candidate_is_the_argmax_of_the_hand_computed_mean(
    policy, processor, critic, image, reference_step_scores
):
    torch.manual_seed(0)
    result = best_of_n(policy, processor, critic, [image], QUESTION, n=4, max_new_tokens=8, temperature=1.5)
    means = []
    for candidate in result.candidates:
        steps = candidate.text.split("\n\n")
        by_hand = reference_step_scores(critic, processor, QUESTION, steps, [image])
        assert candidate.step_scores == pytest.approx(by_hand, abs=1e-5)
        means.append(sum(by_hand) / len(by_hand))
    assert len(set(round(mean, 4) for mean in means)) == len(means)  # distinct, so the arg-max is meaningful
    assert result.best_index == max(range(len(means)), key=means.__getitem__)
    assert result.best is result.candidates[result.best_index]


def rig_critic_to_reward(critic: VisualPRM, marker: int, dim: int = 0) -> None:
    """Make P(`+`) at every answer position grow with the share of `marker` tokens before it, and be exactly 1/2
    without any.

    Layer 0 attends uniformly (zero queries) and copies one residual dimension, which only `marker`'s embedding
    sets, into the same dimension of the reading position; every other attention/MLP output is zeroed, and the LM
    head reads that dimension with opposite signs for `+` and `-`.
    """
    model, text = critic.model, critic.model.model.language_model
    with torch.no_grad():
        text.embed_tokens.weight[:, dim] = 0.0
        text.embed_tokens.weight[marker, dim] = 20.0
        projector = critic.model.model.multi_modal_projector.linear_2
        projector.weight[dim] = 0.0  # image features carry nothing in that dimension either
        projector.bias[dim] = 0.0
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        first = text.layers[0]
        first.input_layernorm.weight[dim] = 1.0
        first.self_attn.q_proj.weight.zero_()
        first.self_attn.q_proj.bias.zero_()
        first.self_attn.v_proj.weight.zero_()
        first.self_attn.v_proj.bias.zero_()
        first.self_attn.v_proj.weight[0, dim] = 1.0  # value head 0, channel 0 <- residual dimension `dim`
        first.self_attn.o_proj.weight[dim, 0] = 1.0  # query head 0 (reads value head 0), channel 0 -> `dim`
        text.norm.weight[dim] = 1.0
        for token, sign in ((critic.reader.good_id, 1.0), (critic.reader.bad_id, -1.0)):
            model.lm_head.weight[token] = 0.0
            model.lm_head.weight[token, dim] = 50.0 * sign


@pytest.mark.parametrize("strategy", ["prm", "orm"])
def test_a_rigged_critic_makes_best_of_n_return_its_favourite(policy, processor, critic, image, tokenizer, strategy):
    def sample():
        torch.manual_seed(11)
        return best_of_n(policy, processor, critic, [image], QUESTION, n=6, max_new_tokens=8, strategy=strategy)

    candidates = sample().candidates
    # The favourite: the last candidate holding a token that no other candidate's critic conversation holds (not
    # the first, which ties would pick).
    token_sets = [set(critic.tokenize(QUESTION, c.text, [3]).input_ids) for c in candidates]
    special = set(tokenizer.all_special_ids)
    favourite, marker = next(
        (index, token)
        for index, tokens in reversed(list(enumerate(token_sets)))
        for token in sorted(tokens - special - set().union(*(token_sets[:index] + token_sets[index + 1 :])))
    )
    assert favourite > 0
    rig_critic_to_reward(critic, marker)

    result = sample()
    assert [c.text for c in result.candidates] == [c.text for c in candidates]  # same samples, only the critic changed
    assert result.best_index == favourite
    assert result.best.score > 0.6
    assert all(c.score == pytest.approx(0.5, abs=1e-6) for i, c in enumerate(result.candidates) if i != favourite)


def test_majority_vote_strategy_needs_no_critic(policy, processor, image):
    torch.manual_seed(0)
    first_character = lambda text: text[:1] or None  # noqa: E731 - a toy extractor with many collisions
    result = best_of_n(
        policy, processor, None, image, QUESTION, n=8, max_new_tokens=4,
        strategy="majority", answer_extractor=first_character,
    )  # fmt: skip
    answers = [c.answer for c in result.candidates]
    assert answers == [c.text[:1] or None for c in result.candidates]
    assert all(c.score is None for c in result.candidates)
    counts = {answer: answers.count(answer) for answer in answers if answer}
    assert answers.count(result.best.answer) == max(counts.values())
    assert result.best_index == answers.index(result.best.answer)


def test_prm_vote_strategy_sums_the_critic_scores_per_answer(policy, processor, critic, image):
    torch.manual_seed(0)
    first_character = lambda text: text[:1].casefold() or None  # noqa: E731 - a toy extractor with collisions
    result = best_of_n(
        policy, processor, critic, image, QUESTION, n=8, max_new_tokens=4, temperature=1.5,
        strategy="prm_vote", answer_extractor=first_character,
    )  # fmt: skip
    totals: dict[str, float] = {}
    for candidate in result.candidates:
        assert candidate.answer and candidate.score is not None and 0 < candidate.score < 1
        totals[candidate.answer] = totals.get(candidate.answer, 0.0) + candidate.score
    assert len(totals) > 1  # a real vote
    assert result.best.answer == max(totals, key=totals.get)
    assert result.best.score == max(c.score for c in result.candidates if c.answer == result.best.answer)


def test_several_questions_in_one_call(policy, processor, critic, image):
    torch.manual_seed(0)
    results = best_of_n(policy, processor, critic, [[image], None], [QUESTION, "Hello?"], n=3, max_new_tokens=6)
    assert [r.question for r in results] == [QUESTION, "Hello?"]
    for result, images in zip(results, [[image], []]):
        assert len(result.candidates) == 3 and result.strategy == "prm"
        texts = [c.text for c in result.candidates if not c.empty]
        alone = critic.score(result.question, texts, images)
        assert [c.score for c in result.candidates if not c.empty] == pytest.approx([s.score for s in alone], abs=1e-5)
        payload = result.to_dict()
        assert payload["response"] == result.best.text and len(payload["candidates"]) == 3


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(policy, processor, critic, image):
    with pytest.raises(ValueError, match="n must be a positive int"):
        best_of_n(policy, processor, critic, image, QUESTION, n=0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        best_of_n(policy, processor, critic, image, QUESTION, n=True)
    with pytest.raises(ValueError, match="Unknown strategy"):
        best_of_n(policy, processor, critic, image, QUESTION, strategy="beam")
    with pytest.raises(ValueError, match="needs a critic"):
        best_of_n(policy, processor, None, image, QUESTION)
    with pytest.raises(ValueError, match="one entry per question"):
        best_of_n(policy, processor, critic, [image], [QUESTION, "Hello?"])
    with pytest.raises(ValueError, match="No questions"):
        best_of_n(policy, processor, critic, [], [])
    with pytest.raises(ValueError, match="placeholder"):
        best_of_n(policy, processor, critic, image, f"<image>\n{QUESTION}")
