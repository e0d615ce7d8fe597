"""Evaluation of pruned models: perplexity on held-out text (the way LLM pruning is judged) and the optional
lm-evaluation-harness bridge."""

from lightning_prune.evaluate.harness import check_tasks, evaluate_lm_harness
from lightning_prune.evaluate.perplexity import (
    PerplexityResult,
    encode_text,
    evaluate_perplexity,
    pad_windows,
    perplexity_windows,
    token_nll,
)

__all__ = [
    "PerplexityResult",
    "check_tasks",
    "encode_text",
    "evaluate_lm_harness",
    "evaluate_perplexity",
    "pad_windows",
    "perplexity_windows",
    "token_nll",
]
