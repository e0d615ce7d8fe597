"""SparseGPT (Frantar & Alistarh, 2023): prune with the inverse-Hessian error feedback of OBS.

`sparsegpt_prune` is the solver: an (out, in) weight and the layer Hessian H = (2/n)·Σ x xᵀ in,
pruned weight and keep-mask out. Everything runs in fp32; the caller casts back.
"""

from __future__ import annotations

import torch

from lightning_prune.calibration.stats import HessianStats
from lightning_prune.masking import keep_only_
from lightning_prune.oneshot.method import LayerStats, OneShotMethod, statistic
from lightning_prune.registry import register_method
from lightning_prune.selection import check_scores, lowest_in_groups, lowest_k, parse_pattern, prune_count
from lightning_prune.validation import check_integer, check_number, check_sparsity

MAX_DAMPING_ATTEMPTS = 6  # percdamp × 10^k for k < 6, then raise


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, attempts: int = MAX_DAMPING_ATTEMPTS
) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H) (SparseGPT, section 3.2).

    When a factorisation fails, the damping is raised tenfold and the whole computation retried;
    after `attempts` failures a ValueError is raised (never a silent fallback).
    """
    damp = percdamp
    for _ in range(attempts):
        damped = hessian.clone()
        damped.diagonal().add_(damp * torch.mean(torch.diag(hessian)))
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:  # (cholesky_inverse raises on a failed factor instead of retrying)
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if bool((info == 0) & torch.isfinite(upper).all()):  # one host sync for both checks
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
    check_sparsity(sparsity)
    check_integer(blocksize, "blocksize", low=1)
    check_number(percdamp, "percdamp", low=0.0, low_open=True)
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    rows, columns = W.shape
    n = m = 0
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if columns % m or blocksize % m:
            raise ValueError(
                f"`pattern` {pattern} needs the input dimension ({columns}) "
                f"and `blocksize` ({blocksize}) to divide by {m}"
            )
    # Dead inputs (never active in calibration) carry no information: H_jj = 1, zero their weights.
    # (masked_fill, not boolean indexing, which syncs with the host to count the dead inputs)
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(0), 0.0)
    check_scores(W)  # once per layer, so that the per-block selection below never syncs
    Hinv = inverse_hessian_factor(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    errors = torch.empty(rows, min(blocksize, columns), device=W.device)
    # Two kernels per column (the error, then the rank-1 update in place) where the reference code
    # runs seven: no q, no Q1: a pruned entry of column i ends as w − (w/d)·d ≈ 0 and is zeroed at
    # the end, a kept one stays exactly w.
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1, mask1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], pruned[:, i1:i2], errors[:, : i2 - i1]
        diag1 = torch.diag(Hinv1).unsqueeze(0)
        diag1_sq = diag1.square()
        if pattern is None:
            scores = (W1.square() / diag1_sq).reshape(-1)
            mask1.copy_(lowest_k(scores, prune_count(scores.numel(), sparsity)).reshape(W1.shape))
        scale = mask1 / diag1  # 1/[H⁻¹]_jj where pruned, 0 where kept (N:M: filled group by group)
        for i in range(i2 - i1):
            if m and i % m == 0:
                group = W1[:, i : i + m].square() / diag1_sq[:, i : i + m]
                mask1[:, i : i + m].scatter_(1, lowest_in_groups(group, m - n), True)
                torch.div(mask1[:, i : i + m], diag1[:, i : i + m], out=scale[:, i : i + m])
            torch.mul(W1[:, i], scale[:, i], out=Err1[:, i])  # (w − q)/d, q = w with the pruned entries 0
            # OBS update (paper, equation 3): spread the error over the block's later columns.
            W1[:, i:].addmm_(Err1[:, i : i + 1], Hinv1[i : i + 1, i:], alpha=-1.0)
        W[:, i1:i2] = W1
        # Lazy batch update (section 3.3): the block's accumulated error reaches all later columns.
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    keep = ~pruned
    return keep_only_(W, keep), keep


@register_method("sparsegpt")
class SparseGPT(OneShotMethod):
    """SparseGPT: OBS error feedback from each layer's Hessian; updates the surviving weights.

    Example YAML (`lightning_prune/conf/pruning/sparsegpt.yaml`)::

        _target_: lightning_prune.OneShotPruning
        method: sparsegpt
        method_options: {blocksize: 128, percdamp: 0.01}
    """

    statistics = (HessianStats,)
    updates_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = check_integer(blocksize, "blocksize", low=1)
        self.percdamp = check_number(percdamp, "percdamp", low=0.0, low_open=True)

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hessian = statistic(stats, HessianStats).hessian()
        return sparsegpt_prune(weight, hessian, sparsity, pattern, self.blocksize, self.percdamp)
