"""What every training-time pruning callback shares: targets, masks kept applied, state, logging.

The callbacks decide *when* to prune; the math is in `criteria`, `selection` and `masking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune.criteria import CRITERIA, Criterion, make_criterion
from lightning_prune.distributed import broadcast_masks_
from lightning_prune.masking import apply_masks_, finalize, get_mask, keep_masks_applied, load_masks, update_masks
from lightning_prune.selection import SCOPES, check_sparsity, parse_pattern
from lightning_prune.targets import PruneTarget, find_targets


class MaskingCallback(Callback):
    """Base of the pruning callbacks: resolves targets, keeps masks applied, saves and restores them.

    Lifecycle: `on_fit_start` finds the targets, re-attaches masks restored from a checkpoint and
    registers a post-step hook on every optimizer that re-zeroes pruned weights;
    `on_before_optimizer_step` feeds gradient-based criteria; `on_fit_end` removes the hooks and,
    with `finalize_on_end`, bakes the masks in.
    """

    def __init__(
        self,
        sparsity: float,
        criterion: str | Criterion = "magnitude",
        scope: str = "layer",
        pattern: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
        seed: int = 0,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        if not isinstance(criterion, Criterion) and criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA} or a Criterion, got {criterion!r}")
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
        if pattern is not None:
            n, m = parse_pattern(pattern)
            if abs(self.sparsity - (m - n) / m) > 1e-9:
                raise ValueError(f"`sparsity` must be {(m - n) / m} for `pattern`={pattern!r} (N:M fixes it), got {sparsity}")
        self.criterion = make_criterion(criterion, seed)
        self.scope = scope
        self.pattern = pattern
        self.target_patterns = targets
        self.ignore = ignore
        self.finalize_on_end = finalize_on_end
        self.current_sparsity = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self._targets: list[PruneTarget] = []
        self._restored_masks: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._pl_module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, pattern=self.pattern, targets=str(self.target_patterns))

    @property
    def targets(self) -> list[PruneTarget]:
        """The weights this callback prunes (known from `on_fit_start` on)."""
        return self._targets

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.criterion.needs_gradients:
            self.accumulate_gradients()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach(pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve targets, restore saved masks, and keep masks applied after every optimizer step."""
        refuse_sharded_strategy(trainer.strategy)
        self._pl_module = pl_module
        self._targets = find_targets(pl_module, include=self.target_patterns, ignore=self.ignore)
        if self.pattern is not None:
            check_pattern_fits(self._targets, self.pattern)
        if self._restored_masks:
            load_masks(pl_module, self._restored_masks)
            self._restored_masks = {}
        self._hooks = [keep_masks_applied(optimizer, pl_module) for optimizer in trainer.optimizers]

    def detach(self, pl_module: pl.LightningModule) -> None:
        """Remove the optimizer hooks; bake the masks in when `finalize_on_end`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.finalize_on_end:
            finalize(pl_module)

    def accumulate_gradients(self) -> None:
        """Feed this step's (already reduced) gradients to the criterion."""
        for target in self._targets:
            if target.weight.grad is not None:
                self.criterion.accumulate(target.name, target.weight, target.weight.grad)

    def prune_to(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Recompute masks at `sparsity` from the criterion's scores (monotone: pruned stays pruned)."""
        scores = {t.name: self.criterion.score(t.name, t.weight) for t in self._targets}
        update_masks(self._targets, scores, sparsity, scope=self.scope, pattern=self.pattern)
        self.criterion.reset()
        masks = self.masks()
        broadcast_masks_(masks)  # every rank computed them from the same weights; rank 0's win ties
        apply_masks_(self._pl_module)
        kept = {name: int(mask.sum()) for name, mask in masks.items()}
        self.layer_sparsity = {name: 1.0 - kept[name] / masks[name].numel() for name in masks}
        self.current_sparsity = 1.0 - sum(kept.values()) / sum(mask.numel() for mask in masks.values())
        return masks

    def log_sparsity(self, pl_module: pl.LightningModule, layers: bool = False, on_step: bool = True) -> None:
        """Log the targets' global sparsity as `prune/sparsity` (and per layer as `prune/layer/<name>`)."""
        metrics = {"prune/sparsity": self.current_sparsity}
        if layers:
            metrics.update({f"prune/layer/{name}": value for name, value in self.layer_sparsity.items()})
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def masks(self) -> dict[str, torch.Tensor]:
        """This callback's current keep-masks by qualified parameter name."""
        found = {t.name: get_mask(t.module, t.param_name) for t in self._targets}
        return {name: mask for name, mask in found.items() if mask is not None}

    def state_dict(self) -> dict[str, Any]:
        masks = {name: mask.detach().cpu().clone() for name, mask in self.masks().items()}
        return {
            "masks": masks or dict(self._restored_masks),
            "criterion": self.criterion.state_dict(),
            "current_sparsity": self.current_sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = dict(state_dict.get("masks", {}))
        if self._targets and self._restored_masks:  # strategies that restore after `on_fit_start`
            load_masks(self._pl_module, self._restored_masks)
            self._restored_masks = {}
        self.criterion.load_state_dict(state_dict.get("criterion", {}))
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))


def check_pattern_fits(targets: Sequence[PruneTarget], pattern: str) -> None:
    """Raise before training when an N:M `pattern` does not divide a target's input dimension."""
    _, m = parse_pattern(pattern)
    for target in targets:
        columns = target.as_matrix(target.weight).shape[-1]
        if columns % m:
            raise ValueError(
                f"`pattern`={pattern!r} needs every target's input dimension to divide by {m}, "
                f"got {columns} for {target.name!r}; leave it dense with `ignore`"
            )


def refuse_sharded_strategy(strategy: object) -> None:
    """Raise for strategies that shard parameters (FSDP, DeepSpeed, model parallel).

    Masks live beside whole weights; a sharded weight would need a sharded mask and a global
    selection across shards, which these callbacks do not do.
    """
    name = type(strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(
            f"`strategy`={name} shards parameters, which lightning_prune's masks do not support; "
            "use strategy='ddp' (masks are identical on every rank), or prune one-shot before wrapping the model"
        )
