"""A row block of an FSDP2-sharded parameter, and the whole tensor gathered from the blocks (with autograd).

FSDP2 splits a parameter's rows like `torch.chunk` over the ranks of its sharding group: every rank
but the last ones holds ceil(rows/world) rows, rank r starting at r·ceil(rows/world) (a rank past the
end holds none). A per-row quantity kept beside the weight (the learned masks' logits) follows the
same blocks; `gather_rows` builds the whole tensor for a forward that sees the unsharded weight, and
its backward hands every rank the gradient of its own rows summed over the ranks. Pure torch.distributed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lightning_prune.parallel.collectives import collective_device


def row_block(rows: int, group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first row, row count) of this rank's block of a `rows`-row tensor sharded over `group` (None: all)."""
    if group is None:
        return 0, rows
    chunk = math.ceil(rows / dist.get_world_size(group))
    start = min(dist.get_rank(group) * chunk, rows)
    return start, min(chunk, rows - start)


def replica_group(tensor: DTensor) -> dist.ProcessGroup | None:
    """The process group of HSDP's replicas of `tensor`'s blocks (its `Replicate()` mesh dimension), or None."""
    dims = [d for d, p in enumerate(tensor.placements) if isinstance(p, Replicate) and tensor.device_mesh.size(d) > 1]
    if len(dims) > 1:
        raise ValueError(f"a parameter replicated over {len(dims)} mesh dimensions is not supported, got {tensor}")
    return tensor.device_mesh.get_group(dims[0]) if dims else None


def sum_over_(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum each tensor over the ranks of `group`, in place."""
    for tensor in tensors:
        carrier = tensor.to(collective_device(group))
        dist.all_reduce(carrier, group=group)
        if carrier is not tensor:
            tensor.copy_(carrier)


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks (padded to equal size) into the whole tensor; backward: the summed rows' gradient."""

    @staticmethod
    def forward(ctx: Any, block: torch.Tensor, rows: int, group: dist.ProcessGroup) -> torch.Tensor:
        world = dist.get_world_size(group)
        chunk = math.ceil(rows / world)
        ctx.rows, ctx.group, ctx.start = rows, group, row_block(rows, group)[0]
        ctx.count, ctx.device = block.shape[0], block.device
        carrier = block.to(collective_device(group))
        if carrier.dtype == torch.bool:  # gloo has no bool
            carrier = carrier.to(torch.uint8)
        padded = carrier.new_zeros((chunk, *block.shape[1:]))
        padded[: block.shape[0]] = carrier
        blocks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(blocks, padded.contiguous(), group=group)
        whole = torch.cat(blocks)[:rows]
        return whole.to(device=block.device, dtype=block.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        summed = grad.to(collective_device(ctx.group)).contiguous().clone()
        dist.all_reduce(summed, group=ctx.group)  # every rank's loss reaches every row's gradient
        return summed[ctx.start : ctx.start + ctx.count].to(ctx.device), None, None


def gather_rows(block: torch.Tensor, rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The whole `rows`-row tensor from every rank's `block` (as `row_block` lays them out), differentiable:
    the gradient of `block` is the sum over the ranks of the gradient of its rows. Every rank of `group`
    calls it in the same order (and so its backward). `group=None`: `block` is the whole tensor."""
    if group is None:
        return block
    result: torch.Tensor = _GatherRows.apply(block, rows, group)
    return result
