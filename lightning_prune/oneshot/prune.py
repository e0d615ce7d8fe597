"""One block's pruning from its statistics (per weight, per expert) and the all-or-nothing undo."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence

import torch

from lightning_prune.masking import get_mask, remove_mask, set_mask
from lightning_prune.oneshot.method import LayerStats, MaskRefiner, OneShotMethod
from lightning_prune.targets import PruneTarget

STACKED_ELEMENTS = 2**24  # matrices pruned together hold at most this many weights (64 MiB of fp32 scores)
Entry = tuple[int, int, str, torch.Tensor]  # (target, matrix within it, matrix name, the (out, in) view)


def _groups(entries: list[Entry], together: bool) -> list[list[Entry]]:
    """`entries` one by one, or (`together`) grouped by input width, dtype and device, in order,
    each group of at most STACKED_ELEMENTS weights (at least one matrix)."""
    if not together:
        return [[entry] for entry in entries]
    by_kind: dict[tuple[int, torch.dtype, torch.device], list[list[Entry]]] = {}
    for entry in entries:
        matrix = entry[3]
        groups = by_kind.setdefault((matrix.shape[-1], matrix.dtype, matrix.device), [[]])
        if groups[-1] and sum(e[3].numel() for e in groups[-1]) + matrix.numel() > STACKED_ELEMENTS:
            groups.append([])
        groups[-1].append(entry)
    return [group for groups in by_kind.values() for group in groups]


@torch.no_grad()
def prune_targets(
    targets: Sequence[PruneTarget],
    method: OneShotMethod,
    refiner: MaskRefiner | None,
    stats: Mapping[str, LayerStats],
    sparsity: float,
    pattern: str | None,
    dense: Collection[str] = (),
) -> None:
    """Prune the weights of one block (each expert of a fused weight) in place with `method` (then
    `refiner`) and attach their keep-masks; the matrices named in `dense` keep every weight.

    For a method that only selects, without a refiner, the matrices of one input width go to
    `method.prune_many` together (Wanda selects over their stacked rows at once); otherwise one by one.
    """
    keeps: list[list[torch.Tensor | None]] = []
    entries: list[Entry] = []
    for t, target in enumerate(targets):
        names, matrices = target.matrix_names(), target.matrices(target.weight.data)
        keeps.append(
            [
                torch.ones_like(matrix, dtype=torch.bool) if name in dense else None
                for name, matrix in zip(names, matrices)
            ]
        )
        entries += [(t, i, name, matrix) for i, (name, matrix) in enumerate(zip(names, matrices)) if name not in dense]
    for group in _groups(entries, refiner is None and not method.updates_weights):
        label = ", ".join(repr(name) for _, _, name, _ in group)
        originals = [matrix.clone() if refiner is not None else matrix for _, _, _, matrix in group]
        try:
            results = method.prune_many(
                [matrix for *_, matrix in group], [stats.get(name, {}) for _, _, name, _ in group], sparsity, pattern
            )
            if refiner is not None:
                results = [
                    refiner.refine(original, new_weight, keep, stats.get(entry[2], {}), pattern)
                    for entry, original, (new_weight, keep) in zip(group, originals, results, strict=True)
                ]
        except ValueError as error:
            raise ValueError(
                f"one-shot pruning of {label} failed: {error}. Nothing was changed; leave it dense with `ignore=`"
            ) from error
        for (t, i, _, matrix), (new_weight, keep) in zip(group, results, strict=True):
            if new_weight is not matrix:
                matrix.copy_(new_weight.to(matrix.dtype))
            keeps[t][i] = keep
    for target, target_keeps in zip(targets, keeps, strict=True):
        set_mask(
            target.module, target.from_matrices([keep for keep in target_keeps if keep is not None]), target.param_name
        )


def prune_target(
    target: PruneTarget,
    method: OneShotMethod,
    refiner: MaskRefiner | None,
    stats: Mapping[str, LayerStats],
    sparsity: float,
    pattern: str | None,
    dense: Collection[str] = (),
) -> None:
    """`prune_targets` of one weight."""
    prune_targets([target], method, refiner, stats, sparsity, pattern, dense)


def warn_dense_experts(few: dict[str, int], min_tokens: int) -> None:
    """Say which experts stay dense for lack of calibration tokens."""
    if few:
        listed = ", ".join(f"{name} ({count} tokens)" for name, count in few.items())
        warnings.warn(
            f"left dense: experts that received fewer than `min_expert_tokens`={min_tokens} "
            f"calibration tokens: {listed}",
            stacklevel=3,
        )


class Snapshot:
    """The targets' weights and masks before a one-shot call, to put back if the call fails.

    Only the targets are copied (to CPU), so the cost is one copy of the pruned weights.
    """

    def __init__(self, targets: Sequence[PruneTarget]) -> None:
        self.saved = []
        for target in targets:
            mask = get_mask(target.module, target.param_name)
            self.saved.append(
                (
                    target,
                    target.weight.detach().to("cpu", copy=True),
                    None if mask is None else mask.to("cpu", copy=True),
                )
            )

    @torch.no_grad()
    def restore(self) -> None:
        """Put every saved weight and mask back, bit for bit; remove masks that did not exist."""
        for target, weight, mask in self.saved:
            if mask is None:
                if get_mask(target.module, target.param_name) is not None:
                    remove_mask(target.module, target.param_name)
            else:
                set_mask(target.module, mask, target.param_name)
            target.weight.data.copy_(weight)
