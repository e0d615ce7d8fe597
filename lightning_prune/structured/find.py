"""`find_groups`: the group sets of a model, from its transformers blocks or its `nn.Sequential` stacks."""

from __future__ import annotations

from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.structured.groups import KINDS, GroupSet
from lightning_prune.structured.sequential import find_sequential_groups
from lightning_prune.structured.transformer import find_block_groups


def find_groups(model: nn.Module, kind: str, blocks: str | None = None) -> list[GroupSet]:
    """Group sets of `kind` ("neuron", "head" or "filter"): transformer blocks first, else `nn.Sequential` stacks."""
    if kind not in KINDS:
        raise ValueError(f"`structure` must be one of {KINDS}, got {kind!r}")
    if kind == "filter":
        return find_sequential_groups(model, kind)
    try:
        find_block_stack(model, blocks)
    except ValueError:
        if kind == "head":
            raise
        return find_sequential_groups(model, kind)
    return find_block_groups(model, kind, blocks)
