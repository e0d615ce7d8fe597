"""`LoRARecovery` under FSDP2 (Lightning's `ModelParallelStrategy`): the callback's side of `lora.sharded`.

Lightning 2.6.6 calls the callbacks' `setup`, then `configure_model` (the user's `fully_shard`), the
strategy's setup (materialization, `configure_optimizers`), `on_fit_start`, and only then restores a
checkpoint. So the adapters are injected in `setup`, on the pruned model before sharding (the user's
`fully_shard` covers them, and they load from the distributed checkpoint like any parameter), and
the masks are cut to the rank's rows in `on_fit_start`. Why and how: README.md, "Training large
models with FSDP2".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from peft import PeftModel
from torch import nn

from lightning_prune.lora.sharded import (
    check_after_sharding,
    gathered_adapter_state,
    guard_gathered_forward,
    install_forward_masks,
    shard_masks_,
)


@contextmanager
def device_mesh_hidden(network: nn.Module) -> Iterator[None]:
    """Hide Lightning's device mesh from peft while it injects adapters into a LightningModule.

    peft 0.21.2's LoRA injection takes a `_device_mesh` attribute for a transformers tensor-parallel
    mesh (and then reads `model.config`); Lightning 2.6.6's ModelParallelStrategy stores its mesh in
    the LightningModule's `_device_mesh` (before callbacks' `setup`). An FSDP2 mesh is no TP plan.
    """
    mesh = network.__dict__.get("_device_mesh")
    if mesh is None:
        yield
        return
    network.__dict__["_device_mesh"] = None
    try:
        yield
    finally:
        network.__dict__["_device_mesh"] = mesh


def prepare_sharded(pl_module: nn.Module, masked_delta: bool) -> dict[str, str]:
    """After sharding: masks cut to the rank's row blocks, the forward masks installed when `masked_delta`,
    and a LoRA forward that FSDP2 did not gather guarded (the merge removes the guards with the LoRA
    layers). Returns the forward mask of each LoRA layer: 'nonzero' or 'gathered' (`lora.sharded`)."""
    group = check_after_sharding(pl_module, masked_delta)
    shard_masks_(pl_module)
    forward_masks = install_forward_masks(pl_module, group) if masked_delta else {}
    guard_gathered_forward(pl_module)
    return forward_masks


def save_gathered_adapter(peft_model: PeftModel, directory: str | Path) -> None:
    """Every rank: gather the adapters' row blocks (A is r × in, B is out × r); rank 0 writes whole tensors
    that peft loads on one process, and every rank waits for it.

    peft 0.21.2's own `save_pretrained` of the sharded adapters raises on FSDP2's DTensors ("invalid
    python storage"), so it is given the gathered `state_dict`.
    """
    state = gathered_adapter_state(peft_model)
    peft_model.save_pretrained(str(directory), state_dict=state, is_main_process=dist.get_rank() == 0)
    dist.barrier()
