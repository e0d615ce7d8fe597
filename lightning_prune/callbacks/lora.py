"""`LoRARecovery`: LoRA adapters on a pruned model for one fit, merged without losing the sparsity pattern."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from torch import nn

from lightning_prune.callbacks.lora_sharded import device_mesh_hidden, prepare_sharded, save_gathered_adapter
from lightning_prune.callbacks.scheduled import ScheduledPruning
from lightning_prune.callbacks.strategy import check_strategy
from lightning_prune.lora import (
    adapter_parameters,
    attach_lora,
    check_lora_arguments,
    lora_target_names,
    merge_lora,
    pruned_module_names,
    unwrapped_state_dict,
)
from lightning_prune.lora.conv import check_lora_convolutions
from lightning_prune.lora.experts import expert_parameter_names
from lightning_prune.lora.sharded import check_before_sharding, merge_lora_sharded
from lightning_prune.lora.wrap import pruned_expert_names
from lightning_prune.targets import find_targets
from lightning_prune.validation import check_number


def wrapped_network(pl_module: nn.Module) -> nn.Module:
    """The network LoRA wraps: `pl_module.model` when it is a module (the demos' convention), else `pl_module`."""
    network = getattr(pl_module, "model", None)
    return network if isinstance(network, nn.Module) else pl_module


class LoRARecovery(Callback):
    """Recover a pruned model with LoRA: only adapters train, base masks stay, merge keeps the zeros.

    Lifecycle: `on_fit_start` (under FSDP2 `setup`) wraps the pruned layers (and fused expert parameters,
    one adapter per expert) of `pl_module.model` (or `pl_module`) with peft LoRA adapters
    (`lora.attach_lora`), freezes every other parameter and replaces the Trainer's optimizer with one of
    the same class and settings over the adapters (at `lr`, or the original learning rate). `on_fit_end`
    merges `W + M ⊙ (s·B·A)` (`merge_lora`) when `merge` and restores `requires_grad`; with `merge=False`
    the adapters stay and `save_adapter(dir)` saves them beside the sparse base for `load_lora(base, dir)`.
    Why and how: README.md, "One-shot Wanda and SparseGPT, then LoRA recovery"; under FSDP2
    (`callbacks/lora_sharded.py`), "Training large models with FSDP2".

    Put a `OneShotPruning` *before* it in the Trainer's callbacks: hooks run in list order and the
    adapters target what is pruned by then. `configure_optimizers` must return one optimizer and no LR
    scheduler (it would point at the replaced optimizer). DDP is refused: adapters created after DDP
    wrapped the model would not have their gradients synchronised. Checkpoints (one process): the model
    `state_dict` is written with the unwrapped model's keys and the adapters go into this callback's
    state, so a resumed fit loads the base strictly, re-attaches and restores the adapters, then
    Lightning restores the adapter optimizer; under FSDP2 they stay in the model's distributed state.

    Example YAML (`lightning_prune/conf/lora/lora.yaml`)::

        _target_: lightning_prune.callbacks.LoRARecovery
        r: 8                 # adapter rank
        alpha: 16            # scaling numerator: s = alpha / r
        dropout: 0.0         # dropout on the adapter input
        target_modules: null # regexes of module names; null = the pruned layers
        target_parameters: null # fused expert parameter regexes; null = the pruned ones if target_modules is null
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

    def preflight(self, pl_module: nn.Module, callbacks: Sequence[Any] = (), earlier: Sequence[Any] = ()) -> None:
        """Raise before training when `target_modules` or `target_parameters` match nothing, or the adapted
        layers include a convolution LoRA cannot adapt (`lora.conv`). None is resolved at fit start (what is
        pruned by then); it is checked here too when the model is already pruned, and given the stage's
        `callbacks` (and `earlier`, the earlier stages'), refused when nothing can be pruned by then."""
        network = wrapped_network(pl_module)
        if self.target_modules is not None:
            find_targets(network, include=self.target_modules, ignore_output_head=False, experts=False)
        if self.target_parameters is not None:
            expert_parameter_names(network, self.target_parameters)
        names = (
            pruned_module_names(network)
            if self.target_modules is None
            else lora_target_names(network, self.target_modules, None)[0]
        )
        check_lora_convolutions(network, names, self.masked_delta)
        if self.target_modules is None and callbacks and not names and not pruned_expert_names(network):
            self.check_pruned_in_time(callbacks, earlier)

    def check_pruned_in_time(self, callbacks: Sequence[Any], earlier: Sequence[Any]) -> None:
        """Raise when the model holds nothing pruned, no earlier stage has a callback, and the callbacks before
        this one in its stage prune only during training (`ScheduledPruning`): at fit start, when the adapters
        attach to the pruned layers, there would be none."""
        before = list(callbacks)[: next((i for i, c in enumerate(callbacks) if c is self), len(callbacks))]
        if earlier or not all(isinstance(callback, ScheduledPruning) for callback in before):
            return
        during = f" and {', '.join(type(c).__name__ for c in before)} prunes during training" if before else ""
        raise ValueError(
            "LoRARecovery with `target_modules`=None adapts the layers pruned when its fit starts, and none will be: "
            f"the model holds no pruned weight{during}. Recover in a later stage (stages: a `use: [pruning]` stage, "
            "then a `use: [lora]` one), after a one-shot pruning callback listed before it, or name `target_modules`"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge and self.peft_model is not None:
            self.merge_adapters(pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the pruned layers, freeze the rest, and give the Trainer an adapter-only optimizer."""
        check_strategy(trainer.strategy, sharded_ok=False, ddp_ok=False)
        if trainer.world_size > 1:
            raise ValueError(
                "LoRARecovery runs in one process or under ModelParallelStrategy (FSDP2); got a Trainer with "
                f"world_size={trainer.world_size}"
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
        self.forward_masks = prepare_sharded(pl_module, self.masked_delta)
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
                "LoRARecovery.save_adapter: no adapters are attached (with merge=True they are merged at fit end; "
                "use merge=False and call it after trainer.fit)"
            )
        if not self._sharded:
            self.peft_model.save_pretrained(str(directory))
            return
        save_gathered_adapter(self.peft_model, directory)

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
