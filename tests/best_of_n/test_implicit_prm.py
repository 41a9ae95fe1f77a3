"""ImplicitPRM: step scores are σ(β × cumulative log-likelihood ratio), checked against a plain forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from internvl3_hf.best_of_n import ImplicitPRM, VisualPRM, best_of_n, split_steps
from internvl3_hf.best_of_n.critic import Critic
from internvl3_hf.chat import build_messages

QUESTION = "How many shapes are in the image?"
RESPONSES = [
    "Red shapes: 2.\n\nBlue shapes: 1.\n\n2 + 1 = 3.\n\nAnswer: 3",
    "There are three shapes.",
    "Step 1: count.\n\n\n\nStep 2: done.",  # an empty middle step
]
BETA = 0.5


@pytest.fixture
def pair(model_factory):
    """A critic and its reference: two different tiny random models."""
    return model_factory(seed=3).eval(), model_factory(seed=4).eval()


def sequence_logprobs(model, processor, question: str, response: str, images: list) -> tuple[list[int], list[float]]:
    """The response tokens (+ `<|im_end|>`) and their log-probabilities from one unpadded forward of the whole
    conversation, images through the processor and the ViT."""
    prompt = processor.apply_chat_template(build_messages(question, len(images)), add_generation_prompt=True)
    inputs = processor(text=prompt + response + "<|im_end|>", images=images or None, return_tensors="pt")
    prompt_length = processor(text=prompt, images=images or None, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logprobs = model(**inputs).logits[0].float().log_softmax(-1)
    ids = inputs["input_ids"][0].tolist()
    return ids[prompt_length:], [logprobs[i - 1, ids[i]].item() for i in range(prompt_length, len(ids))]


def expected_step_scores(critic, reference, processor, question, response, images, beta) -> list[float]:
    """Written out independently: each token is assigned to a step by decoding the response prefix up to it."""
    ids, critic_logprobs = sequence_logprobs(critic, processor, question, response, images)
    _, reference_logprobs = sequence_logprobs(reference, processor, question, response, images)
    steps = split_steps(response)
    step_ends = [len("\n\n".join(steps[: index + 1])) for index in range(len(steps))]
    totals = [0.0] * len(steps)
    for position, (critic_value, reference_value) in enumerate(zip(critic_logprobs, reference_logprobs)):
        start = len(processor.tokenizer.decode(ids[:position]))  # where this token's text begins
        step = min(next(k for k, end in enumerate(step_ends + [math.inf]) if start < end + 2), len(steps) - 1)
        totals[step] += critic_value - reference_value
    cumulative = [sum(totals[: index + 1]) for index in range(len(totals))]
    return [1 / (1 + math.exp(-beta * value)) for value in cumulative]


@pytest.mark.parametrize("with_image", [True, False])
def test_step_scores_match_the_written_out_likelihood_ratio(pair, processor, image, with_image):
    critic, reference = pair
    images = [image] if with_image else []
    prm = ImplicitPRM(critic, reference, processor, beta=BETA, batch_size=2)
    scores = prm.score(QUESTION, RESPONSES, images)
    for response, score in zip(RESPONSES, scores):
        assert score.steps == split_steps(response)
        expected = expected_step_scores(critic, reference, processor, QUESTION, response, images, BETA)
        assert score.step_scores == pytest.approx(expected, abs=1e-5)
        assert score.score == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_batching_and_orm(pair, processor, image):
    critic, reference = pair
    one_by_one = ImplicitPRM(critic, reference, processor, beta=BETA, batch_size=1, aggregation="min")
    batched = ImplicitPRM(critic, reference, processor, beta=BETA, batch_size=3, aggregation="min")
    single = [s.step_scores for s in one_by_one.score(QUESTION, RESPONSES, [image])]
    for scores, alone in zip((s.step_scores for s in batched.score(QUESTION, RESPONSES, [image])), single):
        assert scores == pytest.approx(alone, abs=1e-5)
    # ORM: one step, the whole response's ratio, which is the last step's cumulative score.
    outcome = batched.score(QUESTION, RESPONSES, [image], orm=True)
    for response, score, steps in zip(RESPONSES, outcome, single):
        assert score.steps == [response] and score.step_scores == pytest.approx([steps[-1]], abs=1e-5)


def test_a_critic_equal_to_its_reference_is_indifferent(model_factory, processor, image):
    prm = ImplicitPRM(model_factory(seed=3).eval(), model_factory(seed=3).eval(), processor)
    for score in prm.score(QUESTION, RESPONSES, [image]):
        assert score.step_scores == pytest.approx([0.5] * len(score.steps), abs=1e-6)


def test_best_of_n_takes_the_implicit_prm(pair, model_factory, processor, image):
    critic, reference = pair
    prm = ImplicitPRM(critic, reference, processor, beta=BETA)
    result = best_of_n(model_factory(seed=1).eval(), processor, prm, [image], QUESTION, n=3, strategy="prm",
                       max_new_tokens=6, pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    live = [candidate for candidate in result.candidates if not candidate.empty]
    rescored = prm.score(QUESTION, [candidate.text for candidate in live], [image])
    assert [c.score for c in live] == pytest.approx([s.score for s in rescored], abs=1e-6)
    assert result.best.score == max(c.score for c in result.candidates)


def test_both_critics_implement_the_critic_protocol(pair, processor):
    critic, reference = pair
    assert isinstance(ImplicitPRM(critic, reference, processor), Critic)
    assert isinstance(VisualPRM(critic, processor), Critic)
    assert not isinstance(object(), Critic)


def test_bad_arguments_are_refused(pair, processor, image):
    critic, reference = pair
    with pytest.raises(ValueError, match="same object"):
        ImplicitPRM(critic, critic, processor)
    with pytest.raises(ValueError, match="beta must be positive"):
        ImplicitPRM(critic, reference, processor, beta=0)
    with pytest.raises(ValueError, match="aggregation"):
        ImplicitPRM(critic, reference, processor, aggregation="median")
    prm = ImplicitPRM(critic, reference, processor)
    with pytest.raises(ValueError, match="non-empty list"):
        prm.score(QUESTION, [], [image])
    with pytest.raises(ValueError, match="non-empty list"):
        prm.score(QUESTION, "a single string", [image])
    with pytest.raises(ValueError, match="one response list"):
        prm.score_many([QUESTION, QUESTION], [RESPONSES], [[image]])
