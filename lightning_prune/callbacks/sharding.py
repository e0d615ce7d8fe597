"""A pruning callback's per-rank state under FSDP2 (Lightning's `ModelParallelStrategy`): mask blocks,
a gradient criterion's sums and a rewind snapshot, carried through distributed checkpoints.

Lightning 2.6.6's `ModelParallelStrategy.save_checkpoint` writes `checkpoint["state_dict"]` with
torch.distributed.checkpoint (every rank its blocks) and everything else, callback states
included, from rank 0 alone into `meta.pt`. A mask block differs on every rank, so it cannot ride
in the callback's state: the callback's `on_save_checkpoint` adds it to `checkpoint["state_dict"]`
as a DTensor under `_lightning_prune.<callback>.<kind>/<name>` keys (Lightning loads the model from
a template of the model's own keys, so these are not loaded into it), and its `load_state_dict`
reads them back (`parallel.checkpoint`) into DTensors laid out like the current parameters — on any
number of ranks. Lightning restores a distributed checkpoint after `on_fit_start`, when the
targets are known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_prune.parallel.checkpoint import as_dtensor, load_sharded_state, save_sharded_state
from lightning_prune.parallel.sharded import local_tensor, targets_shard_group
from lightning_prune.targets import PruneTarget

# The dtype each kind of block is read back in; other kinds (a rewind `snapshot`) take the parameter's.
BLOCK_DTYPES = {"mask": torch.bool, "sums": torch.float32}

Blocks = Mapping[str, Mapping[str, torch.Tensor]]  # kind ("mask", "sums", "snapshot") -> parameter name -> block


class ShardedMaskState:
    """Under FSDP2, the blocks of a callback's state that differ on every rank, in the distributed checkpoint.

    Made by the callback once its targets are known (`attach`), with the module that holds them, the
    key its blocks are saved under, and `blocks()`: the current blocks by kind and parameter name
    (local blocks, or DTensors already laid out like their parameter). Saved blocks are named
    `<kind>/<parameter>`; the callback state lists those names and `load` reads them back by kind,
    in the parameter's block shape and `BLOCK_DTYPES` dtype, or in what `layout(kind, parameter)` says
    (blocks of the parameter's rows with other columns, such as learned logits).
    """

    def __init__(
        self,
        module: nn.Module,
        targets: Sequence[PruneTarget],
        key: str,
        blocks: Callable[[], Blocks],
        layout: Callable[[str, str], tuple[tuple[int, ...], torch.dtype] | None] | None = None,
    ) -> None:
        self.group: dist.ProcessGroup | None = targets_shard_group(targets)  # refuses what FSDP2 pruning cannot do
        self.module = module
        self.key = key
        self.blocks = blocks
        self.layout = layout  # (kind, parameter) -> this rank's block shape and dtype, where not the parameter's

    def tensors(self) -> dict[str, DTensor]:
        """This rank's blocks as DTensors, by `<kind>/<parameter>`."""
        tensors: dict[str, DTensor] = {}
        for kind, blocks in self.blocks().items():
            for name, block in blocks.items():
                if not isinstance(block, DTensor):
                    block = as_dtensor(block, self._parameter(name))
                tensors[f"{kind}/{name}"] = block
        return tensors

    def save(self, checkpoint: dict) -> None:
        """Put this rank's blocks into the checkpoint's distributed `state_dict`."""
        save_sharded_state(checkpoint, self.key, self.tensors())

    def load(self, path: str | None, names: Sequence[str]) -> dict[str, dict[str, DTensor]]:
        """Read `names` (as `tensors` named them) from the distributed checkpoint at `path`, into DTensors
        laid out like the current parameters (this rank's blocks), by kind and parameter name."""
        if path is None:
            raise ValueError(
                f"{self.key}'s state holds sharded tensors {list(names)[:3]}..., readable only from the "
                "distributed checkpoint it came with"
            )
        templates: dict[str, DTensor] = {}
        for name in names:
            kind, _, param_name = name.partition("/")
            param = self._parameter(param_name)
            own = None if self.layout is None else self.layout(kind, param_name)
            block = local_tensor(param)
            shape, dtype = own or (tuple(block.shape), BLOCK_DTYPES.get(kind, param.dtype))
            templates[name] = as_dtensor(block.new_zeros(shape, dtype=dtype), param)
        load_sharded_state(path, self.key, templates)  # in place, into the templates' local blocks
        loaded: dict[str, dict[str, DTensor]] = {}
        for name, template in templates.items():
            kind, _, param_name = name.partition("/")
            loaded.setdefault(kind, {})[param_name] = template
        return loaded

    def _parameter(self, name: str) -> DTensor:
        param = self.module.get_parameter(name)
        if not isinstance(param, DTensor):
            raise ValueError(f"{name!r} is not sharded by FSDP2 (a DTensor), so it has no sharded state")
        return param
