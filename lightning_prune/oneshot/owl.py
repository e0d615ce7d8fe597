"""OWL (Yin et al., 2023): non-uniform layer sparsity from the outlier ratio of Wanda scores.

Blocks whose Wanda scores hold more outliers (scores above `threshold` × their mean) keep more
weights: ratios D are rescaled to [0, 2λ], centred on the target density 1 − s, and each block's
sparsity is 1 − (its rescaled ratio), so the mean sparsity over blocks is the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float = 5.0) -> float:
    """Fraction of the block's scores (all its layers together) above `threshold` × their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).sum()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities from outlier ratios (OWL, section 4): mean `sparsity`, spread ≤ 2·`lam`."""
    d = torch.tensor(list(ratios), dtype=torch.float64)
    spread = d.max() - d.min()
    if len(d) < 2 or spread == 0:
        return [sparsity] * len(d)
    density = (d - d.min()) / spread * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    return [min(max(1.0 - float(x), 0.0), 0.999) for x in density]
