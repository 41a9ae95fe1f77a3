"""VisualPRM critic: step splitting, the critic prompt, single-forward vs per-step scores, aggregation, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from internvl3_hf.best_of_n import (
    PRM_SYSTEM_PROMPT,
    ImplicitPRM,
    VisualPRM,
    aggregate_step_scores,
    critic_messages,
    render_critic_prompt,
    split_steps,
)
from internvl3_hf.best_of_n import prm
from internvl3_hf.best_of_n.prm import expand_image_placeholders
from internvl3_hf.modeling.processing_internvl3 import processor_for_config

QUESTION = "How many shapes are in the image?"
THREE_STEPS = "Step 1: count the red shapes.\n\nStep 2: count the blue shapes.\n\nStep 3: add them. The answer is 5."
RESPONSES = [
    THREE_STEPS,
    "There are three shapes.",
    "\n\n".join(f"part {i}" for i in range(7)),  # 7 pieces, merged in pairs by max_steps=4
    "Step 1: count.\n\n\n\nStep 2: done.\n\n",  # an empty middle step and an empty last step
]


# --------------------------------------------------------------------------------------------- step splitting
@pytest.mark.parametrize(
    ("response", "max_steps", "expected"),
    [
        ("A single paragraph.", 12, ["A single paragraph."]),  # no blank line: one step
        ("line one\nline two", 12, ["line one\nline two"]),  # a single newline does not split
        ("a\n\nb\n\nc", 12, ["a", "b", "c"]),  # fewer pieces than max_steps: untouched
        ("a\n\nb\n\nc", 3, ["a", "b", "c"]),  # exactly max_steps
        ("a\n\nb\n\nc\n\nd\n\ne", 2, ["a\n\nb\n\nc", "d\n\ne"]),  # ceil(5/2) = 3 per group
        ("a\n\nb\n\nc\n\nd\n\ne\n\nf\n\ng", 3, ["a\n\nb\n\nc", "d\n\ne\n\nf", "g"]),  # ceil(7/3) = 3
        ("\n\n".join("abcdefghijklm"), 12, ["a\n\nb", "c\n\nd", "e\n\nf", "g\n\nh", "i\n\nj", "k\n\nl", "m"]),
        ("a\n\nb\n\nc\n\nd\n\ne", None, ["a", "b", "c", "d", "e"]),  # None: never merge
        ("a\n\nb\n\n", 12, ["a", "b", ""]),  # a trailing blank line leaves an empty step
        ("a  \n\nb \n", 12, ["a  ", "b \n"]),  # trailing spaces and newlines are kept
        ("a\n\n\nb", 12, ["a", "\nb"]),  # three newlines: the third starts the next step
        ("a\n\n\n\nb", 12, ["a", "", "b"]),  # two blank lines: an empty step between
        ("", 12, [""]),
    ],
)
def test_split_steps_follows_the_official_rule(response, max_steps, expected):
    assert split_steps(response, max_steps) == expected


@pytest.mark.parametrize("max_steps", [0, -1, 2.5])
def test_split_steps_refuses_a_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match="max_steps"):
        split_steps("a\n\nb", max_steps)


# --------------------------------------------------------------------------------------------- critic prompt
OFFICIAL_PRM_SYSTEM_PROMPT = (
    "You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will "
    "provide a problem statement followed by the first step of the solution process. For each subsequent turn, I "
    "will give you a new step in the solution. Your role is to assess whether the solution process is correct up to "
    "the current step.\n\n"
    "- In the **first round**, I will input the problem and the first step of the solution process.\n"
    "- In **each subsequent round**, I will provide the next step in the solution.\n\n"
    "For each step, you should:\n\n"
    '- Respond with **"+"** if you believe the solution process is correct up to this step.\n'
    '- Respond with **"-"** if you detect any issues or errors in the process up to this step.\n\n'
    "Please note:\n"
    '- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or '
    "justifications.\n\n"
    "Your task is to verify the accuracy and correctness of each step in the given solution process."
)


def test_prm_system_prompt_is_the_official_text():
    assert PRM_SYSTEM_PROMPT == OFFICIAL_PRM_SYSTEM_PROMPT


def test_critic_prompt_for_three_steps_matches_the_hand_written_conversation(critic, tokenizer):
    image_span = "<img>" + "<IMG_CONTEXT>" * 12 + "</img>"  # 3 tiles x 4 tokens
    expected = (
        f"<|im_start|>system\n{OFFICIAL_PRM_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n### Question:\n{image_span}\n{QUESTION}\n\n"
        "### Solution Process:\nStep 1: count the red shapes.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\nStep 2: count the blue shapes.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\nStep 3: add them. The answer is 5.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
    )
    encoded = critic.tokenize(QUESTION, THREE_STEPS, [3])
    assert encoded.input_ids == tokenizer(expected)["input_ids"]
    assert tokenizer.decode(encoded.input_ids) == expected
    assert encoded.steps == THREE_STEPS.split("\n\n")
    # Each read position is the newline closing `<|im_start|>assistant\n`, right before a `+` answer.
    plus, newline = tokenizer.convert_tokens_to_ids("+"), tokenizer.encode("\n")[0]
    assert [encoded.input_ids[p + 1] for p in encoded.read_positions] == [plus] * 3
    assert [encoded.input_ids[p] for p in encoded.read_positions] == [newline] * 3


def test_critic_prompt_with_several_images_and_without_images(critic, processor):
    two = processor.apply_chat_template(critic_messages(QUESTION, ["s1"], num_images=2), tokenize=False)
    expected = f"### Question:\nImage-1: <image>\nImage-2: <image>\n{QUESTION}\n\n### Solution Process:\ns1<|im_end|>"
    assert expected in two
    encoded = critic.tokenize(QUESTION, "s1", [])
    assert "### Question:\nHow many" in processor.tokenizer.decode(encoded.input_ids)


def test_orm_scores_the_whole_response_as_one_step(critic):
    assert critic.tokenize(QUESTION, THREE_STEPS, [3], orm=True).steps == [THREE_STEPS]


# --------------------------------------------------------------------------------------------- scores
def test_single_forward_and_per_step_agree_with_the_official_per_prefix_scores(
    critic, processor, image, reference_step_scores
):
    critic.max_steps = 4
    single = critic.score(QUESTION, RESPONSES, [image], mode="single_forward")
    per_step = critic.score(QUESTION, RESPONSES, [image], mode="per_step")
    for response, a, b in zip(RESPONSES, single, per_step):
        assert a.steps == b.steps == split_steps(response, 4)
        reference = reference_step_scores(critic, processor, QUESTION, a.steps, [image])
        torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(b.step_scores), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(reference), atol=1e-5, rtol=0)
        assert a.score == pytest.approx(sum(a.step_scores) / len(a.step_scores))
    # Random weights must give distinct scores, or the agreement above would prove little.
    all_scores = [s for score in single for s in score.step_scores]
    assert max(all_scores) - min(all_scores) > 1e-2


def test_scores_do_not_depend_on_batch_size_or_on_other_questions(critic, image):
    critic.batch_size = 8
    together = critic.score_many([QUESTION, "Hello?"], [RESPONSES, RESPONSES[:2]], [[image], None])
    critic.batch_size = 1
    alone = [critic.score(QUESTION, RESPONSES, image), critic.score("Hello?", RESPONSES[:2])]
    for batched, single in zip(together, alone):
        for a, b in zip(batched, single):
            torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(b.step_scores), atol=1e-5, rtol=0)


def test_text_only_and_v2pe_critics_agree_with_the_reference(
    model_factory, config, processor, image, reference_step_scores
):
    config.v2pe_mode, config.v2pe_delta = "fixed", 0.25
    critic = VisualPRM(model_factory(config, seed=5), processor)
    for images, responses in (([image], RESPONSES[:2]), ([], RESPONSES[:1])):
        single = critic.score(QUESTION, responses, images)
        per_step = critic.score(QUESTION, responses, images, mode="per_step")
        for a, b in zip(single, per_step):
            reference = reference_step_scores(critic, processor, QUESTION, a.steps, images)
            torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(reference), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(b.step_scores), torch.tensor(reference), atol=1e-5, rtol=0)


def test_good_probability_computes_only_the_verdict_rows_of_a_plain_linear_head(critic):
    head, reader = critic.model.get_output_embeddings(), critic.reader
    hidden = torch.randn(5, head.in_features)
    expected = head(hidden)[:, [reader.good_id, reader.bad_id]].softmax(-1)[:, 0]
    torch.testing.assert_close(reader.good_probability(hidden, head), expected, atol=1e-6, rtol=0)

    class Doubled(torch.nn.Linear):  # a subclass (say a quantized layer) is called as it is
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(head.in_features, head.out_features, bias=False)
    doubled.weight = head.weight
    expected = (2 * head(hidden)[:, [reader.good_id, reader.bad_id]]).softmax(-1)[:, 0]
    torch.testing.assert_close(reader.good_probability(hidden, doubled), expected, atol=1e-6, rtol=0)


def full_row_scores(critic: VisualPRM, processor, question: str, response: str, images: list) -> list[float]:
    """P(`+`) at each answer position of the whole conversation, from one plain forward of the model on it."""
    encoded = critic.tokenize(question, response, [3] * len(images))
    prompt = render_critic_prompt(processor, question, encoded.steps, len(images))
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encoded.input_ids
    with torch.no_grad():
        logits = critic.model(**inputs).logits[0, encoded.read_positions]
        logits = logits[:, [critic.reader.good_id, critic.reader.bad_id]]
    return logits.softmax(-1)[:, 0].tolist()


def record_llm_inputs(critic: VisualPRM) -> tuple[list[tuple[int, int]], object]:
    """(batch, length) of every pass through the critic's language model, and the hook handle."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    return shapes, critic.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("mode", ["single_forward", "per_step"])
def test_the_shared_prefix_goes_through_the_critic_once(critic, image, mode):
    rows = [critic.tokenize(QUESTION, response, [3]) for response in RESPONSES]
    shapes, hook = record_llm_inputs(critic)
    try:
        critic.score(QUESTION, RESPONSES, [image], mode=mode)
    finally:
        hook.remove()
    # System prompt, image tokens and question (the rows' longest common prefix): one pass of batch 1.
    common = next(i for i, ids in enumerate(zip(*(row.input_ids for row in rows))) if len(set(ids)) > 1)
    assert common < min(row.read_positions[0] for row in rows)
    assert shapes[0] == (1, common)
    # Every later pass feeds candidate tokens only, each once: none re-encodes the prefix. Each batch of
    # candidates (3, longest first) is packed into one row (sdpa), up to their last answer positions: in one pass
    # (`single_forward`) or one pass per step of its longest row (`per_step`).
    assert {batch for batch, _ in shapes[1:]} == {1}
    assert sum(length for _, length in shapes[1:]) == sum(row.read_positions[-1] + 1 - common for row in rows)
    batches = [sorted(rows, key=lambda row: -len(row.input_ids))[start : start + 3] for start in (0, 3)]
    passes = [1 if mode == "single_forward" else max(len(row.steps) for row in batch) for batch in batches]
    assert len(shapes) == 1 + sum(passes)


def test_tokenize_many_with_a_tokenizer_that_appends_a_token(critic, config, tokenizer):
    """Where the tokenizer appends a token to every text (so a shared start cannot be tokenized alone), each
    conversation is tokenized whole."""
    tokenizer = copy.deepcopy(tokenizer)  # the session's stays as it is
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", end_of_text)]
    )
    processor = processor_for_config(tokenizer, config)
    responses = ["Step 1.\n\nStep 2.", "One step."]
    for response, row in zip(responses, VisualPRM(critic.model, processor).tokenize_many(QUESTION, responses, [3])):
        text = render_critic_prompt(processor, QUESTION, split_steps(response), 1)
        assert row.input_ids == tokenizer(expand_image_placeholders(text, [3], processor))["input_ids"]
        assert row.input_ids[-1] == end_of_text


@pytest.mark.parametrize("mode", ["single_forward", "per_step"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_candidates_score_as_one_row_per_candidate(model_factory, processor, image, monkeypatch,
                                                          attn_implementation, mode):  # fmt: skip
    """A batch's candidates are packed into one row under a block mask (eager and sdpa); the scores are those of
    one padded row per candidate on copies of the prefix cache (what other backends run)."""
    critic = VisualPRM(model_factory(seed=7, attn_implementation=attn_implementation), processor, batch_size=3,
                       mode=mode)  # fmt: skip
    questions, responses, images = [QUESTION, "Hello?"], [RESPONSES, RESPONSES[1:3]], [[image], None]
    packed = critic.score_many(questions, responses, images)
    again = critic.score_many(questions, responses, images)  # the prefix cache was cut back after each batch
    monkeypatch.setattr(prm, "PACKING_BACKENDS", ())
    rows = critic.score_many(questions, responses, images)
    for first, second, reference in zip(packed, again, rows):
        for a, b, c in zip(first, second, reference):
            assert a.steps == c.steps and a.step_scores == b.step_scores
            torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(c.step_scores), atol=1e-5, rtol=0)


def test_candidates_longer_than_their_prefix_get_one_row_each(critic, processor, image):
    """Packing stops paying once the candidates outgrow the prefix (the masked attention between them grows
    quadratically): such a batch runs one padded row per candidate, with the same scores."""
    responses = ["word " * 300 + "\n\nso 5", THREE_STEPS]
    shapes, hook = record_llm_inputs(critic)
    try:
        scores = critic.score(QUESTION, responses, [image])
    finally:
        hook.remove()
    assert len(shapes) == 2 and shapes[1][0] == 2
    for response, score in zip(responses, scores):
        expected = full_row_scores(critic, processor, QUESTION, response, [image])
        torch.testing.assert_close(torch.tensor(score.step_scores), torch.tensor(expected), atol=1e-5, rtol=0)


def test_sliding_window_critics_keep_one_row_per_candidate(model_factory, config, processor, image):
    """A ready 4D mask would reach sliding-window layers unchanged: such critics are not packed."""
    text = config.text_config
    text.use_sliding_window, text.sliding_window = True, 4096  # wider than any row: scores as full attention
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    critic = VisualPRM(model_factory(config, seed=7), processor, batch_size=3)
    shapes, hook = record_llm_inputs(critic)
    try:
        scores = critic.score(QUESTION, RESPONSES[:2], [image])
    finally:
        hook.remove()
    assert shapes[1][0] == 2
    for response, score in zip(RESPONSES[:2], scores):
        expected = full_row_scores(critic, processor, QUESTION, response, [image])
        torch.testing.assert_close(torch.tensor(score.step_scores), torch.tensor(expected), atol=1e-5, rtol=0)


def test_a_question_continues_the_system_prompt_of_the_previous_one(critic, image):
    """The text the questions' prefixes share (system prompt, `### Question:`) goes through the critic once per
    `score_many` call; each question then feeds its own image and question, and scores as when scored alone."""
    other = "Which shape is largest?"
    rows = [[critic.tokenize(question, response, [3]) for response in RESPONSES[:2]] for question in (QUESTION, other)]
    prefix_ends = [
        next(i for i, ids in enumerate(zip(*(row.input_ids for row in group))) if len(set(ids)) > 1) for group in rows
    ]
    # The first rows agree beyond the image start (same `<IMG_CONTEXT>` ids), but the image features differ.
    image_start = rows[1][0].input_ids.index(critic.model.config.image_token_id)
    assert rows[0][0].input_ids[: image_start + 1] == rows[1][0].input_ids[: image_start + 1]
    shapes, hook = record_llm_inputs(critic)
    try:
        together = critic.score_many([QUESTION, other], [RESPONSES[:2]] * 2, [[image], [image.rotate(90)]])
    finally:
        hook.remove()
    # First question: its whole prefix, then its two candidates packed in one pass; second: its prefix from the
    # image on, then its candidates.
    assert shapes[0] == (1, prefix_ends[0]) and shapes[2] == (1, prefix_ends[1] - image_start) and len(shapes) == 4
    alone = [critic.score(QUESTION, RESPONSES[:2], image), critic.score(other, RESPONSES[:2], image.rotate(90))]
    for batched, single in zip(together, alone):
        for a, b in zip(batched, single):
            torch.testing.assert_close(torch.tensor(a.step_scores), torch.tensor(b.step_scores), atol=1e-5, rtol=0)


@pytest.mark.parametrize("orm", [False, True])
@pytest.mark.parametrize("tiles", [[3], [], [2, 3]])
def test_tokenize_many_tokenizes_each_conversation_as_a_whole(critic, processor, tiles, orm):
    """The shared start of the conversations is tokenized once; every row equals the tokenizer's ids for its whole
    text, whatever the response starts with (newlines, spaces, a literal `<image>`, non-ASCII, nothing)."""
    responses = ["\n\nStep 1.\n\nStep 2.", " leading space", "<image> as text", "αβγ — 答案：3", "", "x\n\n"]
    question = "Image-1 and Image-2: which is larger?" if len(tiles) > 1 else QUESTION
    encoded = critic.tokenize_many(question, responses, tiles, orm=orm)
    for response, row in zip(responses, encoded):
        steps = [response] if orm else split_steps(response)
        text = render_critic_prompt(processor, question, steps, len(tiles))
        text = expand_image_placeholders(text, tiles, processor)
        assert row.input_ids == processor.tokenizer(text)["input_ids"]
        assert row.steps == steps and len(row.read_positions) == len(steps)


def test_v2pe_auto_rows_with_different_strides_share_only_the_text_before_the_image(
    model_factory, config, processor, image
):
    short, long = RESPONSES[1], THREE_STEPS
    lengths = [len(VisualPRM(model_factory(), processor).tokenize(QUESTION, r, [3]).input_ids) for r in (short, long)]
    assert lengths[1] - lengths[0] > 20
    # The short conversation fits below the limit with δ = 1, the long one with no δ (it gets the smallest).
    config.v2pe_mode, config.v2pe_max_position = "auto", lengths[0] + 2
    critic = VisualPRM(model_factory(config, seed=5), processor)
    image_start = critic.tokenize(QUESTION, short, [3]).input_ids.index(config.image_token_id)
    for mode in ("single_forward", "per_step"):
        shapes, hook = record_llm_inputs(critic)
        try:
            scores = critic.score(QUESTION, [short, long], [image], mode=mode)
        finally:
            hook.remove()
        assert shapes[0] == (1, image_start)
        for response, score in zip((short, long), scores):
            expected = full_row_scores(critic, processor, QUESTION, response, [image])
            torch.testing.assert_close(torch.tensor(score.step_scores), torch.tensor(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["single_forward", "per_step"])
def test_the_vision_tower_runs_once_per_question(critic, image, mode):
    calls = []
    hook = critic.model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args))
    try:
        critic.score_many([QUESTION, "Again?"], [RESPONSES, RESPONSES], [[image], [image, image]], mode=mode)
    finally:
        hook.remove()
    assert len(calls) == 2  # 8 candidate rows in 3 batches, yet one ViT pass per question


# --------------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize(
    ("method", "expected"), [("mean", 0.6), ("min", 0.2), ("last", 0.5), ("product", 0.9 * 0.2 * 0.8 * 0.5)]
)
def test_aggregate_step_scores(method, expected):
    assert aggregate_step_scores([0.9, 0.2, 0.8, 0.5], method) == pytest.approx(expected)


def test_aggregation_choice_changes_the_response_score(critic, image):
    critic.aggregation = "min"
    scores = critic.score(QUESTION, [THREE_STEPS], [image])[0]
    assert scores.score == min(scores.step_scores)
    critic.aggregation = "product"
    assert critic.score(QUESTION, [THREE_STEPS], [image])[0].score == pytest.approx(math.prod(scores.step_scores))


def test_aggregation_refuses_unknown_methods_and_empty_scores():
    with pytest.raises(ValueError, match="Unknown aggregation"):
        aggregate_step_scores([0.5], "median")
    with pytest.raises(ValueError, match="empty"):
        aggregate_step_scores([], "mean")


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(critic, processor, model_factory, image):
    with pytest.raises(ValueError, match="candidate list is empty"):
        critic.score(QUESTION, [], [image])
    with pytest.raises(TypeError, match="list of strings"):
        critic.score(QUESTION, "one response", [image])
    with pytest.raises(ValueError, match="one response list and one"):
        critic.score_many([QUESTION, QUESTION], [RESPONSES], [[image], [image]])
    with pytest.raises(ValueError, match="placeholder"):
        critic.score(f"<image>\n{QUESTION}", RESPONSES, [image])
    with pytest.raises(ValueError, match="special token"):
        critic.score(QUESTION, ["fine<|im_end|>"], [image])
    with pytest.raises(ValueError, match="scoring mode"):
        critic.score(QUESTION, RESPONSES, [image], mode="greedy")
    with pytest.raises(ValueError, match="aggregation"):
        VisualPRM(critic.model, processor, aggregation="median")
    with pytest.raises(ValueError, match="batch_size"):
        VisualPRM(critic.model, processor, batch_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        VisualPRM(critic.model, processor, max_steps=0)


# --------------------------------------------------------------------------------------------- defaults
def test_scoring_merges_no_steps_by_default_as_the_official_scoring_api(critic, processor, model_factory):
    thirteen = "\n\n".join(f"part {i}" for i in range(13))  # the data pipeline's max_steps=12 would merge these
    assert VisualPRM(critic.model, processor).max_steps is None
    assert critic.tokenize(QUESTION, thirteen, [3]).steps == thirteen.split("\n\n")
    assert ImplicitPRM(critic.model, model_factory(seed=1), processor).max_steps is None
    assert split_steps(thirteen) == thirteen.split("\n\n")


# --------------------------------------------------------------------------------------------- official API
def _tiles(processor, images):
    tiled = processor.image_processor(images, return_tensors="pt")
    return tiled["pixel_values"], tiled["image_num_patches"].tolist()


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_select_best_response_ranks_by_the_visualprm_scores(critic, processor, image, num_images):
    """The checkpoint's own `select_best_response` (official signature) scores as `VisualPRM`, best first."""
    images = [image, image.rotate(90, expand=True)][:num_images]
    expected = [score.score for score in critic.score(QUESTION, RESPONSES, images or None)]
    pixel_values, num_patches_list = _tiles(processor, images) if images else (None, None)
    lines = "".join(f"Image-{index + 1}: <image>\n" for index in range(num_images)) if num_images > 1 else ""
    ranked = critic.model.select_best_response(
        tokenizer=processor.tokenizer,
        question=lines + QUESTION,
        response_list=RESPONSES,
        pixel_values=pixel_values,
        num_patches_list=num_patches_list,
        return_scores=True,
    )
    order = sorted(range(len(RESPONSES)), key=lambda index: -expected[index])
    assert [response for response, _ in ranked] == [RESPONSES[index] for index in order]
    torch.testing.assert_close(
        torch.tensor([score for _, score in ranked]), torch.tensor([expected[i] for i in order]), atol=1e-5, rtol=0
    )
    plain = critic.model.select_best_response(processor.tokenizer, lines + QUESTION, RESPONSES, pixel_values,
                                              num_patches_list)  # fmt: skip
    assert plain == [RESPONSES[index] for index in order]


def test_select_best_response_versions_steps_and_ties(critic, processor, image):
    pixel_values, tiles = _tiles(processor, [image])
    model, tokenizer = critic.model, processor.tokenizer
    orm = [score.score for score in critic.score(QUESTION, RESPONSES, image, orm=True)]
    ranked = model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, tiles, version="orm_soft",
                                        return_scores=True)  # fmt: skip
    assert sorted(score for _, score in ranked) == pytest.approx(sorted(orm), abs=1e-5)
    soft = model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, version="soft", return_scores=True)
    soft_v2 = model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, return_scores=True)
    assert soft == soft_v2  # num_patches_list defaults to all tiles for one image
    critic.max_steps = 4
    merged = {score.steps[0]: score.score for score in critic.score(QUESTION, RESPONSES, image)}
    for response, score in model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, max_steps=4,
                                                      return_scores=True):  # fmt: skip
        assert score == pytest.approx(merged[split_steps(response, 4)[0]], abs=1e-5)
    twice = model.select_best_response(tokenizer, QUESTION, ["same", "same"], pixel_values, return_scores=True)
    assert twice[0][1] == twice[1][1]  # equal scores keep their order, as Python's sorted(reverse=True) does


def test_select_best_response_refuses_bad_input(critic, processor, image):
    pixel_values, tiles = _tiles(processor, [image])
    model, tokenizer = critic.model, processor.tokenizer
    with pytest.raises(ValueError, match="hard"):
        model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, version="hard")
    with pytest.raises(ValueError, match="non-empty list"):
        model.select_best_response(tokenizer, QUESTION, [], pixel_values)
    with pytest.raises(ValueError, match="sums to"):
        model.select_best_response(tokenizer, QUESTION, RESPONSES, pixel_values, num_patches_list=[1])
    with pytest.raises(ValueError, match="placeholders"):
        model.select_best_response(tokenizer, "<image>\n<image>\n" + QUESTION, RESPONSES, pixel_values, tiles)


def test_select_best_response_under_v2pe_scores_as_visualprm(model_factory, config, processor, image):
    config.v2pe_mode, config.v2pe_delta = "fixed", 0.25
    critic = VisualPRM(model_factory(config, seed=5), processor)
    expected = sorted((score.score for score in critic.score(QUESTION, RESPONSES, image)), reverse=True)
    pixel_values, tiles = _tiles(processor, [image])
    ranked = critic.model.select_best_response(processor.tokenizer, QUESTION, RESPONSES, pixel_values, tiles,
                                               return_scores=True)  # fmt: skip
    torch.testing.assert_close(torch.tensor([score for _, score in ranked]), torch.tensor(expected), atol=1e-5, rtol=0)
