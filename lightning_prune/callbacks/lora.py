"""`LoRARecovery`: LoRA adapters on a pruned model for one fit, merged without losing the sparsity pattern."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from torch import nn

from lightning_prune.callbacks.strategy import check_strategy
from lightning_prune.lora import (
    adapter_parameters,
    attach_lora,
    check_lora_arguments,
    lora_target_names,
    merge_lora,
    unwrapped_state_dict,
)
from lightning_prune.lora.experts import expert_parameter_names
from lightning_prune.lora.sharded import (
    check_after_sharding,
    check_before_sharding,
    gathered_adapter_state,
    guard_gathered_forward,
    install_forward_masks,
    merge_lora_sharded,
    shard_masks_,
)
from lightning_prune.targets import find_targets
from lightning_prune.validation import check_number


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


def wrapped_network(pl_module: nn.Module) -> nn.Module:
    """The network LoRA wraps: `pl_module.model` when it is a module (the demos' convention), else `pl_module`."""
    network = getattr(pl_module, "model", None)
    return network if isinstance(network, nn.Module) else pl_module


class LoRARecovery(Callback):
    """Recover a pruned model with LoRA: only adapters train, base masks stay, merge keeps the zeros.

    Lifecycle: `on_fit_start` (under FSDP2 `setup`, see below) wraps the pruned layers (and fused expert parameters, one adapter per
    expert) of `pl_module.model` (or `pl_module`) with peft LoRA adapters (`lightning_prune.lora.attach_lora`), freezes every other parameter and replaces the
    Trainer's optimizer with one of the same class and settings over the adapter parameters only
    (learning rate `lr`, or the original one when None). `on_fit_end` merges `W + M ⊙ (s·B·A)`
    (`merge_lora`) when `merge`, restoring the original `requires_grad` flags; with `merge=False`
    the adapters stay and `save_adapter(dir)` (peft's `save_pretrained`) saves them beside the
    sparse base, for `load_lora(base, dir)`.

    Order: Lightning runs callbacks' hooks in list order, so put a `OneShotPruning` callback *before*
    `LoRARecovery` in the same Trainer (the adapters target the layers pruned at that point); on an
    already pruned model it is the only callback needed. `configure_optimizers` must not return LR
    schedulers (they would still point at the replaced optimizer). Under DDP it is refused: adapters
    created after DDP wrapped the model would not have their gradients synchronised.

    FSDP2 (`ModelParallelStrategy`): Lightning 2.6.6 calls, in order, the callbacks' `setup`, the
    module's `configure_model` (the user's `fully_shard`), the strategy's setup (materialization,
    `configure_optimizers`), `on_fit_start`, then restores a checkpoint. So the adapters are
    injected in `setup`, on the pruned model before sharding, and the user's `fully_shard` covers
    them. A loop sharding `isinstance(m, nn.Linear)` children skips peft's LoRA layers (no
    `nn.Linear`) and leaves them to the enclosing unit, which gathers them only if its forward runs
    (Lightning calls `training_step`, not the root's forward; an ungathered LoRA forward raises with
    the fix); one over `modules()` makes `lora_A`/`lora_B` units of their own, which only
    `masked_delta=False` allows. Shard the LoRA layers or their blocks. `on_fit_start` cuts the masks to
    the rank's rows and swaps the optimizer; the merge adds each rank's rows
    (`lora.sharded.merge_lora_sharded`). Checkpoints keep the adapters in the model's distributed
    `state_dict` (injected before the restore, they load like any parameter). With `merge=False`
    call `save_adapter(dir)` on every rank after fit: it gathers the adapters (A is r × in, B is
    out × r) and rank 0 writes whole tensors that peft loads on one process (peft 0.21.2's own
    `save_pretrained` raises on FSDP2's DTensors: "invalid python storage"). Needs the pruned
    weights loaded before `trainer.fit` (not meta-initialized) and `nn.Linear` targets only.

    Checkpoints (one process): while adapters are attached, the checkpoint's model `state_dict` is written with
    the unwrapped model's keys (no `base_layer`, no adapters) and the adapters go into this
    callback's state, so a resumed fit loads the base strictly, re-attaches, restores the adapters
    and then Lightning restores the adapter optimizer's state.

    Example YAML (`lightning_prune/conf/lora/lora.yaml`)::

        _target_: lightning_prune.callbacks.LoRARecovery
        r: 8                 # adapter rank
        alpha: 16            # scaling numerator: s = alpha / r
        dropout: 0.0         # dropout on the adapter input
        target_modules: null # regexes of module names; null = the pruned layers
        target_parameters: null # regexes of fused expert parameter names; null = the pruned ones if target_modules is null
        merge: true          # merge into the sparse weights at the end of fit
        lr: null             # adapter learning rate; null = the model's optimizer's
        masked_delta: true   # mask the delta in the forward pass: merged model == trained model
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] | None = None,
        merge: bool = True,
        lr: float | None = None,
        masked_delta: bool = True,
        target_parameters: str | Sequence[str] | None = None,
    ) -> None:
        check_lora_arguments(r, alpha, dropout, target_parameters)
        if lr is not None:
            check_number(lr, "lr", low=0.0, low_open=True)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.target_parameters = target_modules, target_parameters
        self.merge, self.lr, self.masked_delta = merge, lr, masked_delta
        self.peft_model: PeftModel | None = None
        self.merged = False
        self._requires_grad: dict[str, bool] = {}
        self._restored_adapters: dict[str, torch.Tensor] = {}
        self._pl_module: pl.LightningModule | None = None
        self._sharded = False  # injected in `setup` under ModelParallelStrategy (FSDP2)
        self.forward_masks: dict[str, str] = {}  # under FSDP2: 'nonzero' or 'gathered' per LoRA layer (lora.sharded)

    @property
    def state_key(self) -> str:
        keys = {"r": self.r, "target_modules": str(self.target_modules)}
        if self.target_parameters is not None:  # only then: earlier checkpoints keep their key
            keys["target_parameters"] = str(self.target_parameters)
        return self._generate_state_key(**keys)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sharded = stage == "fit" and check_strategy(trainer.strategy, sharded_ok=True, ddp_ok=False)
        if self._sharded:
            self.inject_before_sharding(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sharded:
            self.attach_sharded(trainer, pl_module)
            return
        self.preflight(pl_module)
        self.attach(trainer, pl_module)

    def preflight(self, pl_module: nn.Module) -> None:
        """Raise before training when `target_modules` or `target_parameters` match nothing (None is
        resolved at fit start: what is pruned by then)."""
        if self.target_modules is not None:
            find_targets(
                wrapped_network(pl_module), include=self.target_modules, ignore_output_head=False, experts=False
            )
        if self.target_parameters is not None:
            expert_parameter_names(wrapped_network(pl_module), self.target_parameters)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge and self.peft_model is not None:
            self.merge_adapters(pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the pruned layers, freeze the rest, and give the Trainer an adapter-only optimizer."""
        check_strategy(trainer.strategy, sharded_ok=False, ddp_ok=False)
        if trainer.world_size > 1:
            raise ValueError(
                f"LoRARecovery runs in one process or under ModelParallelStrategy (FSDP2); got a Trainer with world_size={trainer.world_size}"
            )
        check_one_optimizer(trainer)
        adapters = self.inject(pl_module)
        if self._restored_adapters:
            self.restore_adapters(pl_module)
        trainer.strategy.optimizers = [self.adapter_optimizer(trainer.optimizers[0], adapters)]
        self.merged = False

    def inject_before_sharding(self, pl_module: pl.LightningModule) -> None:
        """FSDP2: wrap the pruned layers and freeze the rest before `configure_model` shards the model."""
        self.preflight(pl_module)
        network = wrapped_network(pl_module)
        check_before_sharding(network, *lora_target_names(network, self.target_modules, self.target_parameters))
        self.inject(pl_module)

    def attach_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2, after sharding: masks to row blocks, forward masks, and the adapter-only optimizer."""
        check_one_optimizer(trainer)
        group = check_after_sharding(pl_module, self.masked_delta)
        shard_masks_(pl_module)
        self.forward_masks = install_forward_masks(pl_module, group) if self.masked_delta else {}
        guard_gathered_forward(pl_module)  # removed with the LoRA layers by the merge
        trainer.strategy.optimizers = [self.adapter_optimizer(trainer.optimizers[0], adapter_parameters(pl_module))]
        self.merged = False

    def inject(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        """Wrap the pruned layers with adapters and freeze every other parameter; returns the adapters."""
        self._pl_module = pl_module
        self._requires_grad = {name: p.requires_grad for name, p in pl_module.named_parameters()}
        network = wrapped_network(pl_module)
        with device_mesh_hidden(network):
            self.peft_model = attach_lora(
                network,
                r=self.r,
                alpha=self.alpha,
                dropout=self.dropout,
                target_modules=self.target_modules,
                masked_delta=self.masked_delta,
                target_parameters=self.target_parameters,
            )
        adapters = adapter_parameters(pl_module)
        adapter_ids = {id(p) for p in adapters}
        for parameter in pl_module.parameters():
            parameter.requires_grad_(id(parameter) in adapter_ids)
        return adapters

    def adapter_optimizer(
        self, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter]
    ) -> torch.optim.Optimizer:
        """An optimizer of `optimizer`'s class and settings over `parameters`, at `lr` when given."""
        # `defaults` may hold keys the constructor does not take (AdamW's `decoupled_weight_decay`).
        accepted = inspect.signature(type(optimizer).__init__).parameters
        settings = {key: value for key, value in optimizer.defaults.items() if key in accepted}
        settings["lr"] = self.lr if self.lr is not None else optimizer.param_groups[0]["lr"]
        return type(optimizer)(parameters, **settings)

    def restore_adapters(self, pl_module: pl.LightningModule) -> None:
        """Copy adapter values saved in a checkpoint into the freshly attached adapters."""
        current = {name: p for name, p in pl_module.named_parameters() if "lora_" in name}
        if set(current) != set(self._restored_adapters):
            raise ValueError(
                f"checkpointed adapters {sorted(self._restored_adapters)[:3]}... do not match the attached ones "
                f"{sorted(current)[:3]}... (same `r`, `target_modules` and pruned layers are needed to resume)"
            )
        with torch.no_grad():
            for name, value in self._restored_adapters.items():
                current[name].copy_(value)
        self._restored_adapters = {}

    def merge_adapters(self, pl_module: pl.LightningModule) -> None:
        """Merge `M ⊙ (s·B·A)` into the sparse weights, unwrap, and restore `requires_grad`."""
        if self.peft_model is None:
            raise RuntimeError(
                "LoRARecovery.merge_adapters needs the adapters attached at fit start; none are attached"
            )
        (merge_lora_sharded if self._sharded else merge_lora)(self.peft_model)
        self.peft_model = None
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, True))
        self.merged = True

    def save_adapter(self, directory: str | Path) -> None:
        """Save the attached adapters with peft's `save_pretrained` into `directory` (for `load_lora`).

        Under FSDP2 every rank must call it: the adapters' row blocks are gathered into whole tensors
        and rank 0 writes them (then all ranks wait for it), so the adapter loads on one process.
        """
        if self.peft_model is None:
            raise ValueError(
                "LoRARecovery.save_adapter: no adapters are attached (with merge=True they are merged at fit end; use merge=False and call it after trainer.fit)"
            )
        if not self._sharded:
            self.peft_model.save_pretrained(str(directory))
            return
        state = gathered_adapter_state(self.peft_model)
        self.peft_model.save_pretrained(str(directory), state_dict=state, is_main_process=dist.get_rank() == 0)
        dist.barrier()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if (
            self.peft_model is not None and not self._sharded
        ):  # under FSDP2 the adapters stay in the distributed state_dict
            checkpoint["state_dict"] = unwrapped_state_dict(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        adapters = {}
        if self.peft_model is not None and not self._sharded:
            adapters = {name: p.detach().cpu().clone() for name, p in self._pl_module_parameters() if "lora_" in name}
        return {"merged": self.merged, "adapters": adapters or dict(self._restored_adapters)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merged = bool(state_dict.get("merged", False))
        self._restored_adapters = dict(state_dict.get("adapters", {}))

    def _pl_module_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._pl_module.named_parameters()) if self._pl_module is not None else []


def check_one_optimizer(trainer: pl.Trainer) -> None:
    """Raise unless `configure_optimizers` gave one optimizer and no LR scheduler (LoRARecovery replaces it)."""
    if len(trainer.optimizers) != 1 or trainer.lr_scheduler_configs:
        raise ValueError(
            f"LoRARecovery replaces the one optimizer of `configure_optimizers`; got {len(trainer.optimizers)} "
            f"optimizers and {len(trainer.lr_scheduler_configs)} LR schedulers (return one optimizer, no scheduler)"
        )
