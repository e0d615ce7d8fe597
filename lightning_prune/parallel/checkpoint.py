"""Row blocks that differ on every rank (FSDP2 mask blocks, a sharded teacher), saved as DTensors
into a distributed checkpoint's `state_dict` and read back with torch.distributed.checkpoint.

Pure torch: a checkpoint is the dict that gets written, whose `"state_dict"` holds the model's
DTensors (what Lightning's `ModelParallelStrategy` writes with torch.distributed.checkpoint, every
rank its blocks). Our tensors go there under `_lightning_prune.<key>.<name>` keys, and are read
back into DTensors laid out like the current parameters, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from lightning_prune.parallel.sharded import local_tensor

PREFIX = "_lightning_prune"


def as_dtensor(block: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's `block` (e.g. a mask) as a DTensor laid out like the parameter `like`: the same row blocks;
    the other dimensions are the block's (a per-row quantity such as learned logits may have other columns)."""
    shape, stride = like.shape, like.stride()
    if tuple(block.shape[1:]) != tuple(like.shape[1:]):
        shape = torch.Size((like.shape[0], *block.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(block, like.device_mesh, like.placements, shape=shape, stride=stride, run_check=False)


def save_sharded_state(checkpoint: dict, key: str, tensors: Mapping[str, DTensor]) -> None:
    """Put `tensors` into the checkpoint's distributed `state_dict` under `_lightning_prune.<key>.<name>`."""
    state = checkpoint.get("state_dict", {})
    if tensors and (not state or not any(isinstance(value, DTensor) for value in state.values())):
        raise ValueError(
            "a sharded pruning state can only be saved in a distributed checkpoint: "
            "use ModelParallelStrategy(save_distributed_checkpoint=True) (the default)"
        )
    for name, tensor in tensors.items():
        state[f"{PREFIX}.{key}.{name}"] = tensor


def load_sharded_state(path: str, key: str, templates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read what `save_sharded_state` wrote into this rank's blocks of the DTensor `templates` (any world size)."""
    state = {f"{PREFIX}.{key}.{name}": template for name, template in templates.items()}
    dcp.load({"state_dict": state}, checkpoint_id=path)
    return {name: local_tensor(state[f"{PREFIX}.{key}.{name}"]) for name in templates}
