"""Magnitude pruning per layer (the baseline of the Wanda and SparseGPT papers)."""

from __future__ import annotations

import torch

from lightning_prune.criteria import Magnitude
from lightning_prune.oneshot.method import LayerStats, OneShotMethod
from lightning_prune.registry import register_method
from lightning_prune.selection import parse_pattern, select_layer_wise, select_n_m
from lightning_prune.validation import check_sparsity


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str | None = None) -> torch.Tensor:
    """Keep-mask (out, in): the lowest-|w| `sparsity` of the whole layer pruned, or N:M per row."""
    check_sparsity(sparsity)
    scores = Magnitude().score("", weight)
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return select_n_m(scores, n, m)
    return select_layer_wise(scores, sparsity)


@register_method("magnitude")
class MagnitudeMethod(OneShotMethod):
    """Layer-wise magnitude (or N:M per row by |w|): needs no calibration data."""

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, magnitude_mask(weight, sparsity, pattern)
