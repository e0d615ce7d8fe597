"""Learned N:M masks (MaskLLM, Fang et al., NeurIPS 2024): logits over the candidate patterns of every
group of M weights, sampled with Gumbel-softmax in training, the argmax at the end. Pure PyTorch;
`lightning_prune.callbacks.learned.LearnedSparsity` runs it on a Trainer."""

from lightning_prune.learned.masks import LearnedMasks, freeze_parameters
from lightning_prune.learned.patterns import (
    MAX_CANDIDATES,
    bytes_per_weight,
    candidate_count,
    candidate_patterns,
    check_candidates,
    gumbel_noise,
    hard_mask,
    init_logits,
    pattern_indices,
    soft_mask,
)
from lightning_prune.learned.schedules import ANNEAL_SHAPES, Anneal

__all__ = [
    "ANNEAL_SHAPES",
    "MAX_CANDIDATES",
    "Anneal",
    "LearnedMasks",
    "bytes_per_weight",
    "candidate_count",
    "candidate_patterns",
    "check_candidates",
    "freeze_parameters",
    "gumbel_noise",
    "hard_mask",
    "init_logits",
    "pattern_indices",
    "soft_mask",
]
