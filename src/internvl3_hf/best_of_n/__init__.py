"""Best-of-N test-time scaling for InternVL3 with a VisualPRM process-reward critic.

```python
from internvl3_hf.best_of_n import VisualPRM, best_of_n

critic = VisualPRM(prm_model, prm_processor)                  # any InternVL3 checkpoint trained as VisualPRM
result = best_of_n(model, processor, critic, [image], "How many shapes are there?", n=8, max_new_tokens=512)
print(result.best.text, result.best.step_scores)
```
"""

from .critic import Critic
from .implicit_prm import ImplicitPRM
from .prm import (
    PRM_SYSTEM_PROMPT,
    CriticScore,
    VisualPRM,
    aggregate_step_scores,
    critic_messages,
    render_critic_prompt,
    split_steps,
)
from .search import (
    BestOfNResult,
    Candidate,
    best_of_n,
    extract_answer,
    generate_candidates,
    generate_with_shared_prefill,
    majority_vote,
    select_best,
)

__all__ = [
    "BestOfNResult",
    "Candidate",
    "Critic",
    "CriticScore",
    "ImplicitPRM",
    "PRM_SYSTEM_PROMPT",
    "VisualPRM",
    "aggregate_step_scores",
    "best_of_n",
    "critic_messages",
    "extract_answer",
    "generate_candidates",
    "generate_with_shared_prefill",
    "majority_vote",
    "render_critic_prompt",
    "select_best",
    "split_steps",
]
