"""What serving engines (vLLM, LMDeploy, SGLang) and the official remote code cannot reproduce."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

V2PE_ENGINE_WARNING = (
    "This model uses V2PE (v2pe_mode={mode}, δ={delta}); serving engines (vLLM, LMDeploy, SGLang) and the official "
    "remote code use ordinary positions and ignore V2PE, so their outputs will differ from this plugin's."
)


def warn_if_engines_ignore_v2pe(config) -> str | None:
    """Log (and return) the V2PE warning for an export of a V2PE model; `None` without V2PE."""
    if config.v2pe_mode == "none":
        return None
    message = V2PE_ENGINE_WARNING.format(mode=config.v2pe_mode, delta=config.v2pe_delta)
    logger.warning(message)
    return message
