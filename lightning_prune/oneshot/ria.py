"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance times activations; no update.

Score (the paper's relative importance times activations)::

    RIA_ij = (|W_ij| / Σ_k |W_ik|  +  |W_ij| / Σ_k |W_kj|) · (‖X_j‖₂)^a

the first sum over row i (all inputs of output i), the second over column j (all outputs fed by
input j), as in the reference code (`biomedical-cybernetics/Relative-importance-and-activation-
pruning`, `prune_ria`). Unstructured RIA compares the scores over the whole layer, the reference's
default (its `--per_outneuron` flag, "Wanda's tactic", compares within each output row: `scope="row"`
here). N:M keeps the N highest of every M consecutive inputs of each row. The paper's optional
channel permutation for N:M (heuristic reallocation + linear sum assignment) is a separate step and
is not part of this method.
"""

from __future__ import annotations

import torch

from lightning_prune.calibration.stats import FeatureNormStats
from lightning_prune.oneshot.method import LayerStats, OneShotMethod, statistic
from lightning_prune.registry import register_method
from lightning_prune.selection import parse_pattern, select_layer_wise, select_n_m, select_row_wise
from lightning_prune.validation import check_choice, check_number

SCOPES = ("layer", "row")


def ria_scores(weight: torch.Tensor, feature_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA scores of an (out, in) weight matrix in fp32: relative importance × ‖X_j‖₂^a.

    A row or column whose weights are all zero contributes 0 (not 0/0) to its relative importance.
    """
    magnitude = weight.detach().float().abs()
    tiny = torch.finfo(torch.float32).tiny
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)  # Σ_k |W_ik|, one per output i
    column_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)  # Σ_k |W_kj|, one per input j
    relative = magnitude / row_sums + magnitude / column_sums
    return relative * feature_norms.to(weight.device, torch.float32).pow(a).unsqueeze(0)


def ria_mask(
    weight: torch.Tensor,
    feature_norms: torch.Tensor,
    sparsity: float,
    pattern: str | None = None,
    a: float = 0.5,
    scope: str = "layer",
) -> torch.Tensor:
    """Keep-mask (out, in): the lowest RIA scores of the layer (or of each row) pruned, or N:M per row."""
    scores = ria_scores(weight, feature_norms, a)
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return select_n_m(scores, n, m)
    if scope == "row":
        return select_row_wise(scores, sparsity)
    return select_layer_wise(scores, sparsity)


@register_method("ria")
class Ria(OneShotMethod):
    """RIA: prune the lowest relative-importance × activation scores; weights not updated.

    Args:
        a: exponent of the activation norm ‖X_j‖₂ (the paper's default and ablation optimum: 0.5).
        scope: "layer" (the reference's default) or "row" (per output row, as Wanda) for
            unstructured sparsity; N:M patterns are always per row.

    Example YAML (`lightning_prune/conf/pruning/ria.yaml`)::

        _target_: lightning_prune.OneShotPruning
        method: ria
        method_options: {a: 0.5, scope: layer}
    """

    statistics = (FeatureNormStats,)

    def __init__(self, a: float = 0.5, scope: str = "layer") -> None:
        self.a = check_number(a, "a", low=0.0)
        self.scope = check_choice(scope, "scope", SCOPES)

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norms = statistic(stats, FeatureNormStats).feature_norms()
        return weight, ria_mask(weight, norms, sparsity, pattern, self.a, self.scope)
