"""The shape of a one-shot method: the calibration statistics it needs and a solver per weight.

A method is one class in one file, registered by name (`register_method`), holding its own
options (validated in `__init__`). The driver collects the statistics every method and refiner of
a call declares, per targeted weight, then calls `prune` on each weight's (out, in) matrix.

Lifecycle::

    method = ONESHOT_METHODS.create("sparsegpt", percdamp=0.01)   # or an instance
    stats = {HessianStats: ...}                 # one per kind in `method.statistics`
    new_weight, keep = method.prune(matrix, stats, sparsity=0.5, pattern=None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from lightning_prune.calibration.stats import TokenStatistic

# A weight's statistics by kind (e.g. {FeatureNormStats: ..., HessianStats: ...}).
LayerStats = Mapping[type[TokenStatistic], TokenStatistic]


def statistic(stats: LayerStats, kind: type[TokenStatistic]) -> Any:
    """The statistic of `kind` in `stats`, or a clear error when the method forgot to declare it."""
    if kind not in stats:
        raise ValueError(f"statistic {kind.__name__} was not collected; declare it in the method's `statistics`")
    return stats[kind]


class OneShotMethod:
    """Base of one-shot methods: `statistics` to collect, `prune` one (out, in) weight.

    `prune` gets the weight as an (out, in) matrix in its own dtype and returns the pruned weight
    (any float dtype; the caller casts back) and the boolean keep-mask. Methods that only select
    (Wanda, RIA, magnitude) return the weight unchanged; `updates_weights` says which do not.
    """

    name: ClassVar[str] = ""
    statistics: ClassVar[tuple[type[TokenStatistic], ...]] = ()
    updates_weights: ClassVar[bool] = False

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pruned (out, in) weight and its keep-mask at `sparsity` (or the N:M `pattern`)."""
        raise TypeError(f"{type(self).__name__} must define `prune`")

    def prune_many(
        self, weights: Sequence[torch.Tensor], stats: Sequence[LayerStats], sparsity: float, pattern: str | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`prune` of each of several (out, in) matrices of one input width (a block's layers, the
        experts of a fused weight), for a method that does not update weights.

        A method may do them at once when that gives each matrix exactly its own result; by default one `prune` each.
        """
        return [
            self.prune(weight, layer_stats, sparsity, pattern)
            for weight, layer_stats in zip(weights, stats, strict=True)
        ]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class MaskRefiner:
    """Base of training-free mask refinements applied after a method chose a mask (e.g. DSnoT).

    `refine` gets the dense (out, in) weight before pruning, the method's pruned weight and
    keep-mask, and the statistics; it returns the refined (pruned weight, keep-mask), with the same
    number of kept weights per row (and the same N:M pattern) as the mask it was given.
    """

    name: ClassVar[str] = ""
    statistics: ClassVar[tuple[type[TokenStatistic], ...]] = ()

    def refine(
        self, dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, stats: LayerStats, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined (pruned weight, keep-mask)."""
        raise TypeError(f"{type(self).__name__} must define `refine`")

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"
