"""`DataError` reason codes: drop counts go by `reason`, never by the message; errors raised without a reason are
still sorted by their message text, exactly as before reasons existed."""

from __future__ import annotations

import pytest

from internvl3_hf.data.errors import DataError, DataErrorReason, drop_reason


@pytest.mark.parametrize("reason", list(DataErrorReason))
def test_a_reason_decides_the_count_whatever_the_message(reason):
    misleading = "train.jsonl:3: image file missing.png does not exist; the placeholder is empty."
    assert drop_reason(DataError(misleading, reason=reason)) == reason.value
    assert drop_reason(DataError(misleading, reason=reason.value)) == reason.value  # the value names it too


def test_an_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="'truncated' is not a valid DataErrorReason"):
        DataError("x.jsonl:1: too long", reason="truncated")


# Messages of the raise sites as they read without a reason, and the count each got from its text.
LEGACY = {
    "image file a.png does not exist.": "missing image",
    "image file a.png is not a readable image (broken).": "corrupt image",
    "Could not decode the image file 'a.png': OSError.": "corrupt image",
    "more <image>/<video> placeholders than images (1) and videos (0).": "placeholder count",
    "unknown role 'bot'; use system, user or assistant.": "unknown role",
    "empty or missing 'conversations'.": "empty conversation",
    "400 tokens exceed max_length=160; truncating would cut its image tokens or answer.": "too long",
    "no assistant answer to learn from (all labels are masked).": "nothing to learn",
    "no user turn.": "other",
}


@pytest.mark.parametrize("message", list(LEGACY))
def test_errors_without_a_reason_are_sorted_by_message(message):
    assert drop_reason(DataError(f"data/empty_placeholder.jsonl:7: {message}")) == LEGACY[message]
    assert drop_reason(ValueError(f"dataset[3]: {message}")) == LEGACY[message]
