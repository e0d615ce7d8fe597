"""SparseGPT (Frantar & Alistarh, 2023): prune with the inverse-Hessian error feedback of OBS.

`sparsegpt_prune` is the solver: an (out, in) weight and the layer Hessian H = (2/n)·Σ x xᵀ in,
pruned weight and keep-mask out. Everything runs in fp32; the caller casts back.
"""

from __future__ import annotations

import torch

from lightning_prune.oneshot.method import LayerStats, OneShotMethod, statistic
from lightning_prune.oneshot.stats import HessianStats
from lightning_prune.registry import register_method
from lightning_prune.selection import lowest_in_groups, parse_pattern, select_layer_wise
from lightning_prune.validation import check_integer, check_number

MAX_DAMPING_ATTEMPTS = 6  # percdamp × 10^k for k < 6, then raise


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, attempts: int = MAX_DAMPING_ATTEMPTS) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H) (SparseGPT, section 3.2).

    When a factorisation fails, the damping is raised tenfold and the whole computation retried;
    after `attempts` failures a ValueError is raised (never a silent fallback).
    """
    columns = hessian.shape[0]
    diagonal = torch.arange(columns, device=hessian.device)
    damp = percdamp
    for _ in range(attempts):
        damped = hessian.clone()
        damped[diagonal, diagonal] += damp * torch.mean(torch.diag(hessian))
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
        damp *= 10.0
    raise ValueError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp / 10:g}·mean(diag H) "
        f"(from `percdamp`={percdamp}); use more calibration samples or a larger `percdamp`"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight with SparseGPT; returns (pruned fp32 weight, keep-mask).

    Unstructured: in each block of `blocksize` columns, the lowest `sparsity` fraction of the
    block's scores w²/[H⁻¹]_jj² are pruned. N:M: per row, the M−N lowest of each group of M,
    chosen when the sweep reaches the group's first column (algorithm 1 of the paper).
    """
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    rows, columns = W.shape
    n = m = 0
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if columns % m or blocksize % m:
            raise ValueError(f"`pattern` {pattern} needs the input dimension ({columns}) and `blocksize` ({blocksize}) to divide by {m}")
    # Dead inputs (never active in calibration) carry no information: H_jj = 1, zero their weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1_sq = torch.diag(Hinv1).square().unsqueeze(0)
        if pattern is None:
            mask1 = ~select_layer_wise(W1.square() / diag1_sq, sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if m and i % m == 0:
                group = W1[:, i : i + m].square() / diag1_sq[:, i : i + m]
                mask1[:, i : i + m].scatter_(1, lowest_in_groups(group, m - n), True)  # in place in the block mask
            q = w.masked_fill(mask1[:, i], 0.0)
            err1 = (w - q) / d
            # OBS update (paper, equation 3): spread the error over the block's later columns.
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Q1[:, i] = q
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        # Lazy batch update (section 3.3): the block's accumulated error reaches all later columns.
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.masked_fill(pruned, 0.0), ~pruned


@register_method("sparsegpt")
class SparseGPT(OneShotMethod):
    """SparseGPT: OBS error feedback from each layer's Hessian; updates the surviving weights.

    Example YAML (`conf/pruning/sparsegpt.yaml`)::

        _target_: lightning_prune.OneShotPruning
        method: sparsegpt
        method_options: {blocksize: 128, percdamp: 0.01}
    """

    statistics = (HessianStats,)
    updates_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = check_integer(blocksize, "blocksize", low=1)
        self.percdamp = check_number(percdamp, "percdamp", low=0.0, low_open=True)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        hessian = statistic(stats, HessianStats).hessian()
        return sparsegpt_prune(weight, hessian, sparsity, pattern, self.blocksize, self.percdamp)
