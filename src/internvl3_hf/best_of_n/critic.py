"""What `best_of_n` needs from a critic: step scores for several questions' candidate answers.

`VisualPRM` (a process-reward model's `+`/`-` verdicts) and `ImplicitPRM` (a DPO-trained model's likelihood
ratio) both implement it; any object with this method drops into `best_of_n`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .prm import CriticScore


@runtime_checkable
class Critic(Protocol):
    """A step-level critic of candidate answers."""

    def score_many(
        self,
        questions: Sequence[str],
        responses: Sequence[Sequence[str]],
        images: Sequence,
        *,
        orm: bool = False,
    ) -> list[list[CriticScore]]:
        """Score `responses[q]`, the candidates for `questions[q]` about `images[q]` (an image, a list of them or
        `None`), in order; `orm=True` scores each whole answer as a single step."""
        ...


__all__ = ["Critic"]
