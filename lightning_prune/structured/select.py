"""Group scores → removed units → masks on every part of the group (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_prune.calibration.stats import TokenStatistic
from lightning_prune.masking import get_mask, set_mask
from lightning_prune.structured.groups import GroupSet, removed_units
from lightning_prune.structured.scores import StructuredScore


def units_to_remove(count: int, sparsity: float) -> int:
    """Exactly round(sparsity · count) units (DESIGN, "Exact sparsity")."""
    return round(sparsity * count)


def choose_removed(scores: torch.Tensor, remove: int, already: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (count,): the `remove` lowest-scored units; units in `already` go first (monotone).

    Ties go to the lower index (a stable sort), so the choice is deterministic.
    """
    if not 0 <= remove <= scores.numel():
        raise ValueError(f"cannot remove {remove} of {scores.numel()} units")
    ranked = scores.detach().float().clone()
    if already is not None:
        remove = max(remove, int(already.sum()))
        ranked[already] = -torch.inf
    order = torch.sort(ranked, stable=True).indices
    removed = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    removed[order[:remove]] = True
    return removed


@torch.no_grad()
def mask_units(group: GroupSet, removed: torch.Tensor) -> None:
    """Attach masks that zero every parameter entry of the removed units (AND with existing masks).

    Buffers (BatchNorm statistics) are left alone: the unit's BatchNorm weight and bias are zero,
    so its output is zero whatever the statistics.
    """
    keep = ~removed
    for part in group.parts:
        if not part.is_parameter:
            continue
        mask = part.entry_mask(keep)
        current = get_mask(part.module, part.name)
        set_mask(part.module, mask if current is None else mask & current, part.name)


def prune_group(
    group: GroupSet,
    score: StructuredScore,
    sparsity: float,
    stats: Mapping[str, TokenStatistic] | None = None,
    monotone: bool = True,
) -> torch.Tensor:
    """Score `group`, remove round(sparsity·count) units (keeping removed ones removed), mask them.

    Returns the bool (count,) of removed units.
    """
    already = removed_units(group) if monotone else None
    removed = choose_removed(score.score(group, stats or {}), units_to_remove(group.count, sparsity), already)
    new = removed & ~already if already is not None else removed
    score.compensate(group, new, stats or {})
    mask_units(group, removed)
    return removed


@torch.no_grad()
def mask_block(block: nn.Module) -> None:
    """Zero every linear layer of a block (weights and biases): a pre-norm residual block becomes the identity."""
    from lightning_prune.targets import DEFAULT_TYPES

    for module in block.modules():
        if isinstance(module, DEFAULT_TYPES):
            for name in ("weight", "bias"):
                if getattr(module, name, None) is not None:
                    set_mask(module, torch.zeros_like(getattr(module, name), dtype=torch.bool), name)


def block_is_dropped(block: nn.Module) -> bool:
    """True when every linear layer of the block is all zero (see `mask_block`)."""
    from lightning_prune.targets import DEFAULT_TYPES

    layers = [m for m in block.modules() if isinstance(m, DEFAULT_TYPES)]
    return bool(layers) and all(
        not bool(getattr(m, n).any()) for m in layers for n in ("weight", "bias") if getattr(m, n, None) is not None
    )
