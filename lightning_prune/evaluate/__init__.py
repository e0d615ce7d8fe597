"""Evaluation of pruned models: the optional lm-evaluation-harness bridge."""

from lightning_prune.evaluate.harness import check_tasks, evaluate_lm_harness

__all__ = ["check_tasks", "evaluate_lm_harness"]
