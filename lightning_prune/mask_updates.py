"""Scores to masks: select keep-masks for a model's targets (FSDP2-sharded or not) and attach them.

Lifecycle::

    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, sparsity=0.5)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_prune.masking import get_mask, set_mask
from lightning_prune.parallel.sharded import is_sharded, select_target_masks_sharded
from lightning_prune.selection import select_masks
from lightning_prune.targets import PruneTarget
from lightning_prune.validation import check_sparsity


def _name_nan_scores(targets: Sequence[PruneTarget], scores: Mapping[str, torch.Tensor], error: ValueError) -> None:
    """After a failed selection: raise a ValueError naming the first target whose scores hold NaN."""
    for target in targets:
        if bool(torch.isnan(scores[target.name]).any()):
            bad = int(torch.isnan(target.weight).sum())
            raise ValueError(
                f"the scores of {target.name!r} contain NaN ({bad} of its {target.weight.numel()} weights are NaN); "
                "the model diverged before this prune step: lower the learning rate or check the inputs"
            ) from error


def update_masks(
    targets: Sequence[PruneTarget],
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    pattern: str | None = None,
    monotone: bool = True,
) -> dict[str, torch.Tensor]:
    """Select keep-masks from per-target scores (in weight shape) and attach them.

    Each expert of a fused experts weight is selected as one matrix (`PruneTarget.matrices`).
    Entries already pruned stay pruned when `monotone` (they are scored lowest and kept out).
    Returns the new masks by target name.
    """
    check_sparsity(sparsity)
    matrices: dict[str, torch.Tensor] = {}
    pruned: dict[str, torch.Tensor] = {}
    for target in targets:
        current = get_mask(target.module, target.param_name)
        names = target.matrix_names()
        matrices.update(zip(names, target.matrices(scores[target.name])))
        if monotone and current is not None:
            pruned.update(zip(names, (~m for m in target.matrices(current))))
    try:  # selection checks every layer's scores for NaN once (one host sync per layer)
        if any(is_sharded(target.weight) for target in targets):
            selected = select_target_masks_sharded(targets, matrices, sparsity, scope, pattern, pruned)
        else:
            selected = select_masks(matrices, sparsity, scope=scope, pattern=pattern, pruned=pruned)
    except ValueError as error:
        _name_nan_scores(targets, scores, error)
        raise
    masks = {}
    for target in targets:
        names = target.matrix_names()
        mask = target.from_matrices([selected[n] & ~pruned[n] if n in pruned else selected[n] for n in names])
        set_mask(target.module, mask, target.param_name)
        masks[target.name] = mask
    return masks
