"""Which one-shot calibration a model gets: block by block over its block lists, or one whole-model pass.

Sequential calibration (both papers' drivers) needs the targets inside chained blocks. A model's
`nn.ModuleList` stacks are used as today (the transformers idiom: layers outside them, such as
embeddings and heads, stay dense). A model without one uses its outermost `nn.Sequential`s of
blocks (a timm ViT's `blocks`) when every target lies inside them; otherwise (a ResNet whose stem
conv sits outside its stages, a plain MLP) its targets are calibrated in one whole-model pass
(`calibration.whole`), as it is when the forward turns out not to chain the found Sequentials'
blocks (a U-Net's skip connections). `blocks=` always means block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_prune.calibration.blocks import BlocksArgument, Stack, block_name, find_block_lists, find_blocks
from lightning_prune.calibration.unfold import is_grouped_convolution
from lightning_prune.targets import PruneTarget, find_targets

ONESHOT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)
WHOLE_MODEL = "<whole model>"  # the one "block" of a whole-model plan


@dataclass(frozen=True)
class OneShotPlan:
    """The stacks calibrated block by block and the targets of each block by name; a whole-model
    plan has no stacks and one entry, WHOLE_MODEL, with every target; `reason` says why.
    `fallback`: the stacks are Sequentials found (not named), so a forward that turns out not to
    chain their blocks (`NotChained`) means a whole-model pass instead."""

    stacks: list[Stack] = field(default_factory=list)
    per_block: dict[str, list[PruneTarget]] = field(default_factory=dict)
    reason: str = ""
    fallback: bool = False

    @property
    def whole_model(self) -> bool:
        """Whether the targets are calibrated in one whole-model pass."""
        return not self.stacks

    @property
    def targets(self) -> list[PruneTarget]:
        """Every target, in block order."""
        return [target for targets in self.per_block.values() for target in targets]

    def as_whole_model(self, reason: str) -> OneShotPlan:
        """The same targets, calibrated in one whole-model pass because of `reason`."""
        return OneShotPlan([], {WHOLE_MODEL: self.targets}, reason)


def oneshot_targets(model: nn.Module, targets: Any, ignore: Any) -> list[PruneTarget]:
    """The Linear/Conv1D/Conv1d/Conv2d weights that `targets`/`ignore` select (`find_targets`).

    Grouped (depthwise) convolutions are not targets by default: their rows see different input
    channels, whose statistics one-shot pruning does not collect; naming one in `targets` is an error.
    """
    found = find_targets(model, types=ONESHOT_TYPES, include=targets, ignore=ignore)
    grouped = [t.name for t in found if is_grouped_convolution(t.module)]
    if grouped and targets is not None:
        raise ValueError(
            f"`targets`={targets!r} matches grouped convolutions (groups > 1), which one-shot pruning cannot "
            f"calibrate: {grouped}; leave them out with `ignore=`"
        )
    kept = [t for t in found if not is_grouped_convolution(t.module)]
    if not kept:
        raise ValueError(f"`targets`={targets!r} (`ignore`={ignore!r}) matches only grouped convolutions: {grouped}")
    return kept


def _inside(target: PruneTarget, blocks: Sequence[str]) -> str | None:
    return next((b for b in blocks if target.module_name == b or target.module_name.startswith(b + ".")), None)


def block_targets(model: nn.Module, stacks: Sequence[Stack], targets: Any, ignore: Any) -> dict[str, list[PruneTarget]]:
    """The targets of each block by block name ("<stack>.<index>"), over every stack in `stacks`;
    explicitly requested targets outside the blocks are an error."""
    per_block: dict[str, list[PruneTarget]] = {
        block_name(name, i): [] for name, blocks in stacks for i in range(len(blocks))
    }
    outside = []
    for target in oneshot_targets(model, targets, ignore):
        block = _inside(target, list(per_block))
        if block is None:
            outside.append(target.name)
        else:
            per_block[block].append(target)
    names = [name for name, _ in stacks]
    if outside and targets is not None:
        raise ValueError(
            f"`targets`={targets!r} matches layers outside the blocks {names}, "
            f"which one-shot pruning cannot calibrate block by block: {outside}"
        )
    if not any(per_block.values()):
        raise ValueError(
            f"no Linear/Conv layers matched `targets`={targets!r} (`ignore`={ignore!r}) inside the blocks {names}"
        )
    return per_block


def plan_oneshot(model: nn.Module, blocks: BlocksArgument, targets: Any, ignore: Any) -> OneShotPlan:
    """Block by block over `blocks` (named, or found: see the module docstring), else one whole-model pass."""
    if blocks is not None:
        stacks = find_blocks(model, blocks)
        return OneShotPlan(stacks, block_targets(model, stacks, targets, ignore))
    stacks = find_block_lists(model)
    if stacks and isinstance(stacks[0][1], nn.ModuleList):
        return OneShotPlan(stacks, block_targets(model, stacks, targets, ignore))
    found = oneshot_targets(model, targets, ignore)
    names = [name for name, _ in stacks]
    outside = [
        t.name for t in found if _inside(t, [block_name(n, i) for n, b in stacks for i in range(len(b))]) is None
    ]
    if stacks and not outside:
        return OneShotPlan(stacks, block_targets(model, stacks, targets, ignore), fallback=True)
    if stacks:
        shown = ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else "")
        reason = f"layers outside the block lists {names}: {shown}"
    else:
        reason = "no block list found"
    return OneShotPlan([], {WHOLE_MODEL: found}, reason)
