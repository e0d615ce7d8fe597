"""OWL (Yin et al., 2023): non-uniform layer sparsity from the outlier ratio of Wanda scores.

Blocks whose Wanda scores hold more outliers (scores above `threshold` × their mean) keep more
weights: ratios D are rescaled to [0, 2λ], centred on the target density 1 − s, and each block's
sparsity is 1 − (its rescaled ratio), so the mean sparsity over blocks is the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.driver import Batch, BlockRunner, calibrate_sequentially
from lightning_prune.calibration.stats import FeatureNormStats, TokenStatistic
from lightning_prune.oneshot.wanda import wanda_scores
from lightning_prune.targets import PruneTarget


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


def owl_block_sparsities(
    model: nn.Module,
    batches: list[Batch],
    per_block: Mapping[str, Sequence[PruneTarget]],
    sparsity: float,
    reduce_stats: Callable[[list[TokenStatistic]], None],
    threshold: float,
    lam: float,
    **driver: Any,
) -> dict[str, float]:
    """A dense calibration pass that measures each block's Wanda outlier ratio, then OWL sparsities."""
    ratios: dict[str, float] = {}

    def measure(index: int, name: str, block: nn.Module, run_block: BlockRunner) -> None:
        if not per_block[name]:
            return
        stats = collect_statistics(per_block[name], (FeatureNormStats,), run_block)
        reduce_stats([stat for per_kind in stats.values() for stat in per_kind.values()])
        scores = [
            wanda_scores(m, stats[n][FeatureNormStats].feature_norms())
            for t in per_block[name]
            for n, m in zip(t.matrix_names(), t.matrices(t.weight))
            if int(stats[n][FeatureNormStats].count)
        ]
        ratios[name] = outlier_ratio(scores, threshold)

    calibrate_sequentially(model, batches, measure, **driver)
    spread = owl_sparsities(list(ratios.values()), sparsity, lam)
    return {**dict.fromkeys(per_block, sparsity), **dict(zip(ratios, spread))}
