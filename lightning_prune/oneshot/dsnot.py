"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free prune-and-grow swaps.

After any method chose a mask, each output row i swaps pruned and kept weights to shrink its
expected reconstruction error ε_i = Σ_j (W_ij − W'_ij)·E[X_j] (W dense, W' pruned), as the
reference code does (`zyxxmu/DSnoT`, `prune_DSnoT`):

- grow: a pruned weight with the largest sign(ε)·W_ij·E[X_j] / Var[X_j]^pow_of_var_regrowing
  (it cancels the most error, from inputs whose mean is reliable);
- prune: a kept weight whose removal moves ε toward zero (W'_ij·E[X_j] of the sign opposite to ε)
  with the lowest Wanda importance |W'_ij|·‖X_j‖₂; for N:M, the lowest-importance kept weight of
  the regrown weight's group of M, so that the pattern stays exact;
- rows stop for good when |ε_i| ≤ `update_threshold` or a swap is refused; at most
  `max_cycle_time` swaps per row. Each weight moves at most once (candidates are ranked once).

A regrown weight gets its dense value (the reference never updates weights; after SparseGPT's
updates the dense value is the one the error ε is measured against); kept weights keep the
method's values. Where we differ from the reference, and why:

- a swap is accepted only if |ε_i| strictly shrinks (the reference's default `without_same_sign`
  accepts a swap that overshoots zero to a larger error), so no row's error ever grows;
- the N:M pruning candidate is the lowest Wanda importance in the group (the reference uses the
  initial method's own score, which a refiner of any method does not have);
- Var[X_j] is the pooled variance over all tokens (the reference averages per-sequence variances)
  and E[X_j] is per token (the reference sums over each 2048-token sequence: its
  `update_threshold` 0.1 is 0.1/2048 here);
- the reference's `pow_of_var_pruning` is parsed but never used, so it is not an option here; its
  default `skip_layer="mlp"` (refine only attention layers of Llama) is a choice of targets, not of
  the algorithm: every targeted layer is refined here.
"""

from __future__ import annotations

import torch

from lightning_prune.calibration.stats import FeatureNormStats
from lightning_prune.oneshot.method import LayerStats, MaskRefiner, statistic
from lightning_prune.registry import register_refiner
from lightning_prune.selection import parse_pattern
from lightning_prune.validation import check_bool, check_integer, check_number

# The reference's `update_threshold` 0.1 is on sums over 2048-token sequences; ours is per token.
REFERENCE_THRESHOLD = 0.1 / 2048


def expected_error(dense: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """ε_i = Σ_j (W_ij − W'_ij)·E[X_j] for every output row i (fp32): the expected output error."""
    return ((dense.float() - pruned.float()) * mean.float().unsqueeze(0)).sum(1)


def _ranked(key: torch.Tensor, allowed: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns of the `depth` lowest `key` among `allowed` entries, and how many are allowed."""
    masked = key.masked_fill(~allowed, float("inf"))
    order = torch.topk(masked, min(depth, key.shape[1]), dim=1, largest=False, sorted=True).indices
    return order, allowed.sum(1)


def _take(lists: tuple[torch.Tensor, torch.Tensor], pointer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate at `pointer` of each row's ranked list, and whether one is left."""
    order, count = lists
    index = pointer.clamp_max(order.shape[1] - 1).unsqueeze(1)
    return order.gather(1, index).squeeze(1), (pointer < count) & (pointer < order.shape[1])


def _group_candidate(
    grown: torch.Tensor, importance: torch.Tensor, prunable: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M: the prunable weight of lowest importance in the group of M holding column `grown`."""
    start = (grown - grown % m).unsqueeze(1)
    columns = start + torch.arange(m, device=grown.device).unsqueeze(0)
    scores = importance.gather(1, columns).masked_fill(~prunable.gather(1, columns), float("inf"))
    best = scores.argmin(1, keepdim=True)
    return columns.gather(1, best).squeeze(1), torch.isfinite(scores.gather(1, best).squeeze(1))


def _variance(stats: FeatureNormStats, device: torch.device) -> torch.Tensor:
    """Var[X_j], floored where E[x²] − E[x]² is rounding noise (about eps·E[x²]) and kept > 0."""
    second = stats.sum.to(device) / float(stats.count)
    floor = second * torch.finfo(torch.float32).eps
    return stats.variance().to(device).maximum(floor).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def dsnot_refine(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    stats: FeatureNormStats,
    pattern: str | None = None,
    max_cycle_time: int = 50,
    update_threshold: float = REFERENCE_THRESHOLD,
    pow_of_var_regrowing: float = 1.0,
    without_same_sign: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine an (out, in) keep-mask with DSnoT; returns (fp32 weight with +0.0 at pruned, keep-mask).

    Per-row kept counts (and the N:M pattern) are those of `keep`; every row's |ε_i| is at most
    its starting value. `without_same_sign=False` also requires ε to keep its starting sign
    (always so for N:M, as in the reference).
    """
    W = dense.detach().float()
    kept0 = keep.bool()
    current = pruned.detach().float().masked_fill(~kept0, 0.0)
    mean, norms = stats.mean().to(W.device), stats.feature_norms().to(W.device)
    grow_effect = W * mean  # ε falls by this when the weight is regrown
    prune_effect = current * mean  # ε rises by this when the weight is pruned
    grow_key = grow_effect / _variance(stats, W.device).pow(pow_of_var_regrowing)
    importance = current.abs() * norms  # Wanda's |W|·‖X‖ of the kept weights
    m = parse_pattern(pattern)[1] if pattern is not None else 0
    depth = max_cycle_time
    grow_lists = (_ranked(-grow_key, ~kept0 & (grow_key > 0), depth), _ranked(grow_key, ~kept0 & (grow_key < 0), depth))
    if not m:
        prune_lists = (
            _ranked(importance, kept0 & (prune_effect < 0), depth),
            _ranked(importance, kept0 & (prune_effect > 0), depth),
        )
    error = expected_error(W, current, mean)
    initial_sign = error.sign()
    rows = torch.arange(W.shape[0], device=W.device)
    pointers = torch.zeros(4, W.shape[0], dtype=torch.long, device=W.device)  # grow+, grow−, prune−, prune+
    keep_now, active = kept0.clone(), torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycle_time):
        if not bool(active.any()):
            break
        positive = error > 0
        grow_pos, ok_pos = _take(grow_lists[0], pointers[0])
        grow_neg, ok_neg = _take(grow_lists[1], pointers[1])
        grown, grow_ok = torch.where(positive, grow_pos, grow_neg), torch.where(positive, ok_pos, ok_neg)
        if m:
            cut, cut_ok = _group_candidate(grown, importance, kept0 & keep_now, m)
        else:
            cut_neg, ok_cut_neg = _take(prune_lists[0], pointers[2])
            cut_pos, ok_cut_pos = _take(prune_lists[1], pointers[3])
            cut, cut_ok = torch.where(positive, cut_neg, cut_pos), torch.where(positive, ok_cut_neg, ok_cut_pos)
        after = error - grow_effect[rows, grown] + prune_effect[rows, cut]
        accept = active & grow_ok & cut_ok & (error.abs() > update_threshold) & (after.abs() < error.abs())
        if m or not without_same_sign:
            accept &= after.sign() == initial_sign
        keep_now[rows[accept], grown[accept]] = True
        keep_now[rows[accept], cut[accept]] = False
        error = torch.where(accept, after, error)
        used = torch.stack([positive, ~positive, positive, ~positive]) & accept.unsqueeze(0)
        pointers += used.long()
        active = accept
    weight = torch.where(kept0, current, W).masked_fill(~keep_now, 0.0)
    return weight, keep_now


@register_refiner("dsnot")
class DSnoT(MaskRefiner):
    """DSnoT mask refinement after any one-shot method (`refine="dsnot"`); needs no gradients.

    Args:
        max_cycle_time: most swaps per row (reference default 50).
        update_threshold: a row stops once its |ε_i| (per-token expected output error) is at most
            this; the default is the reference's 0.1 on 2048-token sums, per token.
        pow_of_var_regrowing: power of Var[X_j] dividing the growing criterion (reference: 1).
        without_same_sign: True (the reference's default) lets ε change sign in unstructured
            swaps, as long as |ε| shrinks; False keeps its starting sign (always kept for N:M).

    Example YAML (in `lightning_prune/conf/pruning/wanda.yaml`)::

        refine: dsnot
        refine_options: {max_cycle_time: 50, update_threshold: 4.8828125e-05, pow_of_var_regrowing: 1.0}
    """

    statistics = (FeatureNormStats,)

    def __init__(
        self,
        max_cycle_time: int = 50,
        update_threshold: float = REFERENCE_THRESHOLD,
        pow_of_var_regrowing: float = 1.0,
        without_same_sign: bool = True,
    ) -> None:
        self.max_cycle_time = check_integer(max_cycle_time, "max_cycle_time", low=1)
        self.update_threshold = check_number(update_threshold, "update_threshold", low=0.0)
        self.pow_of_var_regrowing = check_number(pow_of_var_regrowing, "pow_of_var_regrowing", low=0.0)
        self.without_same_sign = check_bool(without_same_sign, "without_same_sign")

    def refine(
        self, dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, stats: LayerStats, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dsnot_refine(
            dense,
            pruned,
            keep,
            statistic(stats, FeatureNormStats),
            pattern,
            self.max_cycle_time,
            self.update_threshold,
            self.pow_of_var_regrowing,
            self.without_same_sign,
        )
