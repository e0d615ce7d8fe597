"""The callbacks' side of FSDP2 (Lightning's `ModelParallelStrategy`): which strategies they run
under, and per-rank state (mask blocks, rewind snapshots) carried through distributed checkpoints.

Lightning 2.6.6's `ModelParallelStrategy.save_checkpoint` writes `checkpoint["state_dict"]` with
torch.distributed.checkpoint (every rank its blocks) and everything else, callback states
included, from rank 0 alone into `meta.pt`. A mask block differs on every rank, so it cannot ride
in the callback's state: `on_save_checkpoint` adds it to `checkpoint["state_dict"]` as a DTensor
under `_lightning_prune.<callback>.<name>` keys (Lightning loads the model from a template of the
model's own keys, so these are not loaded into it), and the callback reads them back with
`torch.distributed.checkpoint.load` into DTensors laid out like the current parameters — on any
number of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from lightning_prune.parallel.sharded import local_tensor

PREFIX = "_lightning_prune"


# Why FSDP1 is refused (torch 2.13, lightning 2.6.6). Lightning refuses FSDPStrategy with
# accelerator="cpu" (and passes FSDP1 no CPU device_id); in a CPU probe that bypassed both (a
# subclass, modules wrapped in `configure_model` with device_id=cpu, use_orig_params=True, 2 gloo
# ranks), outside the forward pass each rank's parameters and gradients were 1-D views of its equal
# slice of the wrapped module's flat buffer, cut mid-row (rank 0: 1560 of a 48x64 weight's 3072
# entries); its sharded state dict re-chunks whole parameters by rows, a third layout.
_FSDP1 = (
    "FSDP1 (FullyShardedDataParallel) flattens each wrapped module's parameters into one 1-D buffer and gives every rank an "
    "equal range of its elements, so a rank's parameters are 1-D views that cut rows and N:M groups at arbitrary offsets "
    "(with use_orig_params=True too), and its sharded checkpoints lay the same parameters out by rows instead; "
)


def check_strategy(strategy: object, sharded_ok: bool, ddp_ok: bool = True) -> bool:
    """Raise for strategies the masks cannot follow; return True under FSDP2 (`ModelParallelStrategy`).

    `sharded_ok` is False for callbacks that need whole weights (structured pruning); `ddp_ok` is False
    for callbacks that do not run under DDP either (LoRARecovery), so the message does not offer it.
    """
    name = type(strategy).__name__
    if name == "ModelParallelStrategy" and sharded_ok:
        return True
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
        reason = _FSDP1 if "FSDP" in name else ""
        fsdp2 = (
            " or ModelParallelStrategy (FSDP2, Lightning's strategy for `fully_shard`, which PyTorch recommends over FSDP1: "
            "`fully_shard` in `configure_model`, parameters as row-sharded DTensors; HSDP: a 2-D (replicate, shard) mesh)"
            if sharded_ok
            else ""
        )
        ddp = "strategy='ddp' (masks are identical on every rank)" if ddp_ok else "one process"
        raise ValueError(
            f"`strategy`={name} shards parameters in a way this callback does not support: {reason}use {ddp}{fsdp2}. One-shot and structured pruning need whole weights: "
            "prune before sharding (one-shot runs block by block with `offload`), then train the pruned model sharded"
        )
    return False


def as_dtensor(block: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's `block` (e.g. a mask) as a DTensor laid out like the parameter `like`."""
    return DTensor.from_local(block, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False)


def save_sharded_state(checkpoint: dict, key: str, tensors: Mapping[str, DTensor]) -> None:
    """Put `tensors` into the checkpoint's distributed `state_dict` under `_lightning_prune.<key>.<name>`."""
    state = checkpoint.get("state_dict", {})
    if tensors and (not state or not any(isinstance(value, DTensor) for value in state.values())):
        raise ValueError("a sharded pruning state can only be saved in a distributed checkpoint: use ModelParallelStrategy(save_distributed_checkpoint=True) (the default)")
    for name, tensor in tensors.items():
        state[f"{PREFIX}.{key}.{name}"] = tensor


def load_sharded_state(path: str, key: str, templates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read what `save_sharded_state` wrote into this rank's blocks of the DTensor `templates` (any world size)."""
    state = {f"{PREFIX}.{key}.{name}": template for name, template in templates.items()}
    dcp.load({"state_dict": state}, checkpoint_id=path)
    return {name: local_tensor(state[f"{PREFIX}.{key}.{name}"]) for name in templates}


class ShardedState:
    """Mixin for `MaskingCallback`: under FSDP2, mask blocks (and `IterativePruning`'s rewind
    snapshot, `snapshot/<name>`) go through the distributed checkpoint instead of the callback state.

    The host sets `_sharded` (attach), and provides `masks()`, `targets`, `_pl_module`,
    `restore_sharded(name, tensor)`; `state_dict` lists the names saved this way under `"sharded"`
    and `load_sharded(names)` reads them back from the checkpoint being restored.
    """

    _sharded = False
    _shard_group: dist.ProcessGroup | None = None  # the process group of the targets' row blocks (attach)
    _checkpoint_path: str | None = None

    def sharded_tensors(self) -> dict[str, DTensor]:
        """This rank's blocks as DTensors: masks (`mask/<parameter>`) and a gradient criterion's sums (`sums/<parameter>`)."""
        module = self._pl_module  # type: ignore[attr-defined]
        blocks = {f"mask/{name}": mask for name, mask in self.masks().items()}  # type: ignore[attr-defined]
        blocks.update({f"sums/{name}": value for name, value in self.criterion.state_dict().get("sums", {}).items()})  # type: ignore[attr-defined]
        return {name: as_dtensor(block, module.get_parameter(name.partition("/")[2])) for name, block in blocks.items()}

    def on_save_checkpoint(self, trainer: object, pl_module: object, checkpoint: dict) -> None:
        if self._sharded:
            save_sharded_state(checkpoint, type(self).__name__, self.sharded_tensors())

    def on_load_checkpoint(self, trainer: object, pl_module: object, checkpoint: dict) -> None:
        self._checkpoint_path = getattr(trainer, "ckpt_path", None)

    def load_sharded(self, names: list[str]) -> None:
        """Read `names` (as saved by `sharded_tensors`) from the checkpoint being restored, into this rank's blocks."""
        if self._checkpoint_path is None:
            raise ValueError(f"{type(self).__name__}'s state holds sharded tensors {names[:3]}..., readable only from the distributed checkpoint it came with")
        module = self._pl_module  # type: ignore[attr-defined]
        templates: dict[str, torch.Tensor] = {}
        for name in names:
            kind, _, param_name = name.partition("/")
            param = module.get_parameter(param_name)
            dtype = {"mask": torch.bool, "sums": torch.float32}.get(kind, param.dtype)
            templates[name] = as_dtensor(torch.zeros_like(local_tensor(param), dtype=dtype), param)
        for name, tensor in load_sharded_state(self._checkpoint_path, type(self).__name__, templates).items():
            self.restore_sharded(name, tensor if name.startswith(("mask/", "sums/")) else templates[name])  # type: ignore[attr-defined]
