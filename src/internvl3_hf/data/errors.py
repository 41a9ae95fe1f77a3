"""Why a training sample or preference pair cannot be used: `DataError` and its reason codes."""

from __future__ import annotations

from enum import Enum


class DataErrorReason(str, Enum):
    """The reasons a sample is refused; the value is how the drop counts (`SFTDataset.dropped`, ...) name it."""

    MISSING_IMAGE = "missing image"
    CORRUPT_IMAGE = "corrupt image"
    UNREADABLE_VIDEO = "unreadable video"  # not a directory of frame images, or an empty one
    # Placeholders and images/videos do not pair up, or a placeholder stands where none may (an answer, mid-line).
    PLACEHOLDER_MISMATCH = "placeholder count"
    UNKNOWN_ROLE = "unknown role"
    EMPTY_CONVERSATION = "empty conversation"  # no turns, an empty prompt, an empty answer
    NO_USER_TURN = "no user turn"  # nothing to attach images to, or a prompt not ending with a user turn
    UNSUPPORTED_CONTENT = "unsupported content"  # a content part or answer that is not text, image or video
    TEMPLATE_REJECTED = "template rejected"
    TOO_LONG = "too long"  # more tokens than max_length: never truncated, it would cut image tokens or the answer
    NOTHING_TO_LEARN = "nothing to learn"  # every label masked
    INVALID_RECORD = "invalid record"  # a record of the wrong shape: not an object, a missing key, unpaired rows


class DataError(ValueError):
    """A sample that cannot be used: the message names its origin (`file:line` or `dataset[index]`) and says what
    to do; `reason` sorts it for the drop counts."""

    def __init__(self, message: str, reason: DataErrorReason | str):
        super().__init__(message)
        self.reason = DataErrorReason(reason)

    def __reduce__(self):  # `args` holds the message only: without this a copy or pickle would lose the reason
        return type(self), (str(self), self.reason)


def drop_reason(error: DataError) -> str:
    """The name `error` is counted under in the drop counts (`SFTDataset.dropped`, `plan_pairs`, ...)."""
    return error.reason.value
