"""Wanda (Sun et al., 2023): prune by |W_ij|·‖X_j‖₂, compared within each output row; no update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_prune.calibration.stats import FeatureNormStats
from lightning_prune.oneshot.method import LayerStats, OneShotMethod, statistic
from lightning_prune.registry import register_method
from lightning_prune.selection import parse_pattern, select_n_m, select_row_wise
from lightning_prune.validation import check_sparsity


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores |W_ij|·‖X_j‖₂ of an (out, in) weight matrix, in fp32 (paper, equation 1), written
    into `out` (an fp32 (out, in) tensor) when given."""
    return torch.mul(
        weight.detach().float().abs(), feature_norms.to(weight.device, torch.float32).unsqueeze(0), out=out
    )


def wanda_mask(
    weight: torch.Tensor, feature_norms: torch.Tensor, sparsity: float, pattern: str | None = None
) -> torch.Tensor:
    """Keep-mask (out, in): the lowest `sparsity` of each row's scores pruned, or N:M per row."""
    check_sparsity(sparsity)
    scores = wanda_scores(weight, feature_norms)
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return select_n_m(scores, n, m)
    return select_row_wise(scores, sparsity)


@register_method("wanda")
class Wanda(OneShotMethod):
    """Wanda: the lowest |W_ij|·‖X_j‖₂ of each row (or N:M per row) pruned; weights not updated.

    Example YAML (`lightning_prune/conf/pruning/wanda.yaml`)::

        _target_: lightning_prune.OneShotPruning
        method: wanda
    """

    statistics = (FeatureNormStats,)

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, wanda_mask(weight, statistic(stats, FeatureNormStats).feature_norms(), sparsity, pattern)

    def prune_many(
        self, weights: Sequence[torch.Tensor], stats: Sequence[LayerStats], sparsity: float, pattern: str | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All matrices (of one input width) in one selection: Wanda compares scores within a row
        only, so the rows of their stacked scores, each matrix with its own norms, get exactly each
        matrix's own mask."""
        if len(weights) < 2:
            return super().prune_many(weights, stats, sparsity, pattern)
        scores = torch.empty(
            sum(weight.shape[0] for weight in weights),
            weights[0].shape[1],
            dtype=torch.float32,
            device=weights[0].device,
        )
        for weight, layer_stats, rows in zip(
            weights, stats, scores.split([weight.shape[0] for weight in weights]), strict=True
        ):
            wanda_scores(
                weight, statistic(layer_stats, FeatureNormStats).feature_norms(), out=rows
            )  # no copy through torch.cat
        if pattern is not None:
            keep = select_n_m(scores, *parse_pattern(pattern))
        else:
            keep = select_row_wise(scores, sparsity)
        return list(zip(weights, keep.split([weight.shape[0] for weight in weights]), strict=True))
