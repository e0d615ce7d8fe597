"""torch.distributed helpers: identical masks on every rank, statistics summed across ranks.

Pure torch.distributed (no Lightning): every function is a no-op when no process group is
initialised, so the same code runs in one process and under Lightning's DDP strategy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective over `group` (default: the world) needs its tensors: NCCL CUDA, gloo CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )


@torch.no_grad()
def broadcast_masks_(masks: Mapping[str, torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's masks with rank `src`'s, in place (sorted by name on every rank).

    Masks are computed from identical, already synchronised weights and gradients on every rank;
    the broadcast guards against ties broken differently by floating-point noise.
    """
    if not is_distributed():
        return
    for name in sorted(masks):
        mask = masks[name]
        carrier = mask.to(device=collective_device(), dtype=torch.uint8)  # gloo has no bool
        dist.broadcast(carrier, src=src)
        mask.copy_(carrier.to(device=mask.device, dtype=torch.bool))


@torch.no_grad()
def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (fp32/fp64 statistics: Hessians, squared norms, counts)."""
    if not is_distributed():
        return
    for tensor in tensors:
        carrier = tensor if tensor.device == collective_device() else tensor.to(collective_device())
        dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
        if carrier is not tensor:
            tensor.copy_(carrier)
