"""Wanda (Sun et al., 2023): prune by |W_ij|·‖X_j‖₂, compared within each output row; no update."""

from __future__ import annotations

import torch

from lightning_prune.oneshot.method import LayerStats, OneShotMethod, statistic
from lightning_prune.oneshot.stats import FeatureNormStats
from lightning_prune.registry import register_method
from lightning_prune.selection import parse_pattern, select_n_m, select_row_wise


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """Scores |W_ij|·‖X_j‖₂ of an (out, in) weight matrix, in fp32 (paper, equation 1)."""
    return weight.detach().float().abs() * feature_norms.to(weight.device, torch.float32).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, feature_norms: torch.Tensor, sparsity: float, pattern: str | None = None) -> torch.Tensor:
    """Keep-mask (out, in): the lowest `sparsity` of each row's scores pruned, or N:M per row."""
    scores = wanda_scores(weight, feature_norms)
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return select_n_m(scores, n, m)
    return select_row_wise(scores, sparsity)


@register_method("wanda")
class Wanda(OneShotMethod):
    """Wanda: the lowest |W_ij|·‖X_j‖₂ of each row (or N:M per row) pruned; weights not updated.

    Example YAML (`conf/pruning/wanda.yaml`)::

        _target_: lightning_prune.OneShotPruning
        method: wanda
    """

    statistics = (FeatureNormStats,)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, wanda_mask(weight, statistic(stats, FeatureNormStats).feature_norms(), sparsity, pattern)
