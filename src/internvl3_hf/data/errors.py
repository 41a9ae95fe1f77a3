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
    OTHER = "other"


class DataError(ValueError):
    """A sample that cannot be used: the message names its origin (`file:line` or `dataset[index]`) and says what
    to do; `reason` sorts it for the drop counts (None: read from the message, see `drop_reason`)."""

    def __init__(self, message: str, reason: DataErrorReason | str | None = None):
        super().__init__(message)
        self.reason = None if reason is None else DataErrorReason(reason)


# Message texts of errors raised without a `reason`, in the order they are tried.
_LEGACY_MESSAGES = (
    ("does not exist", DataErrorReason.MISSING_IMAGE),
    ("not a readable image", DataErrorReason.CORRUPT_IMAGE),
    ("Could not decode", DataErrorReason.CORRUPT_IMAGE),
    ("placeholder", DataErrorReason.PLACEHOLDER_MISMATCH),
    ("unknown role", DataErrorReason.UNKNOWN_ROLE),
    ("empty", DataErrorReason.EMPTY_CONVERSATION),
    ("exceed max_length", DataErrorReason.TOO_LONG),
    ("no assistant answer", DataErrorReason.NOTHING_TO_LEARN),
)


def drop_reason(error: Exception) -> str:
    """The drop-count name of `error`: its `reason`; for an error raised without one, read from its message."""
    reason = getattr(error, "reason", None)
    if reason is None:
        text = str(error).split(": ", 1)[-1]  # after the origin: a path must not decide the reason
        reason = next((known for key, known in _LEGACY_MESSAGES if key in text), DataErrorReason.OTHER)
    return reason.value
