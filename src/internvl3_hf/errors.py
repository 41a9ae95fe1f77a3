"""Expected errors: something the user gave (a recipe, a checkpoint path, an image) is wrong.

The library raises `UserError` with a message that says what was wrong, where, and what to do; the `internvl3-hf`
command prints it on one line and exits with status 2 (`--debug` shows the traceback). The data layer's
`DataError` (an unusable sample) is the other expected error. This module imports nothing heavy, so that the
command line can name these errors before a command loads torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# `org/name`: the only form of a checkpoint reference that may name a Hub repository instead of a local folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong, where, and what to do."""


def require_checkpoint(path: str | os.PathLike, what: str) -> None:
    """Refuse a checkpoint reference (`what` names where it came from, e.g. `--model`) that is neither a local
    checkpoint directory nor a Hub id (`org/name`), before anything tries to download it."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{what} {os.fspath(path)!r} is not a checkpoint directory: it holds no config.json.")
        return
    if local.exists() or not HUB_ID.match(os.fspath(path)):
        raise UserError(
            f"{what} {os.fspath(path)!r}: no such checkpoint directory. Give a local checkpoint directory (plugin, "
            "official or -hf format) or a Hub id such as OpenGVLab/InternVL3-1B."
        )


def open_image(path: str | os.PathLike, where: str = ""):
    """The image file at `path` as an RGB PIL image, or a `UserError` naming it (and `where` it was given)."""
    from .modeling.image_processing_internvl3 import open_image_file

    try:
        return open_image_file(path)
    except (FileNotFoundError, ValueError) as error:  # open_image_file's two refusals, both with what to do
        raise UserError(f"{where}{error}") from error
