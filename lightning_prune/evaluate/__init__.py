"""Evaluation of pruned models: perplexity on held-out text (the way LLM pruning is judged)."""

from lightning_prune.evaluate.perplexity import (
    PerplexityResult,
    encode_text,
    evaluate_perplexity,
    pad_windows,
    perplexity_windows,
    token_nll,
)

__all__ = ["PerplexityResult", "encode_text", "evaluate_perplexity", "pad_windows", "perplexity_windows", "token_nll"]
